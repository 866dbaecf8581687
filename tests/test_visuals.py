"""`mvprep stats`, `mvprep inspect`, `mvtrain report`: numbers checked against the shards,
pictures checked pixel by pixel, on a real build and a real tiny training run."""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from pipeline_data import make_pipeline_dataset

from mvprep.build import build
from mvprep.cli import main as mvprep_main
from mvprep.inspect_sample import (
    LINE,
    PANEL,
    PROBLEM,
    InspectError,
    compact_text,
    inspect_sample,
    read_members,
    render_sample,
    shard_of_key,
)
from mvprep.options import BuildOptions
from mvprep.stats import (
    IndexArrays,
    dataset_stats,
    load_index_arrays,
    per_sample_patch_cost,
    percentiles,
)
from mvprep.stats_plot import plot_stats
from mvshards.families import REMOTE_26
from mvshards.image_table import IMAGE_TABLE_KEY
from mvshards.profiles import get_profile
from mvshards.schema import SampleMeta
from mvshards.tario import iter_shard
from mvtrain.batching.plan_index import slice_costs
from mvtrain.cli import main as mvtrain_main
from mvtrain.report import GIB, format_report, parse_bytes, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = make_pipeline_dataset(tmp_path_factory.mktemp("data") / "set", count=12)
    out = tmp_path_factory.mktemp("shards") / "shards"
    options = BuildOptions(data_path=data, out_dir=out, max_res=1344, samples_per_shard=4)
    assert build(options, workers=1, progress=False).ok
    return out


def _metas(out: Path) -> list[SampleMeta]:
    """Every sample's meta, read from the tars (not the index), in dataset order."""
    return [
        SampleMeta.from_json(json.loads(sample["json"]))
        for shard in sorted(out.glob("*.tar"))
        for _, sample in iter_shard(shard)
    ]


def _nearest_rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(math.ceil(q / 100 * len(ordered)), 1) - 1]


def _expected_dist(values: list[float]) -> dict[str, float]:
    return {
        "p50": _nearest_rank(values, 50),
        "p90": _nearest_rank(values, 90),
        "p99": _nearest_rank(values, 99),
        "max": max(values),
    }


def _check_png(path: Path, size: tuple[int, int]) -> np.ndarray:
    """A real PNG of ``size`` with visible content; returns its RGB pixels."""
    assert path.read_bytes()[:8] == PNG_MAGIC
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.size == size
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 20, "the picture is (nearly) blank"
    colours = np.unique(pixels.reshape(-1, 3), axis=0)
    assert len(colours) > 50, f"only {len(colours)} distinct colours"
    return pixels


# --- stats ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_stats_numbers_equal_the_shard_jsons(built: Path) -> None:
    metas = _metas(built)
    stats = dataset_stats(load_index_arrays(built))
    images = [image for meta in metas for image in meta.images]
    expected = {
        "tokens_per_sample": [m.num_tokens for m in metas],
        "patches_per_sample": [m.num_patches for m in metas],
        "images_per_sample": [len(m.images) for m in metas],
        "slices_per_image": [i.layout.num_slices for i in images],
        "patches_per_image": [i.layout.num_patches for i in images],
        "original_width": [i.layout.original_size[0] for i in images],
        "original_height": [i.layout.original_size[1] for i in images],
        "original_megapixels": [
            i.layout.original_size[0] * i.layout.original_size[1] / 1e6 for i in images
        ],
    }
    for name, values in expected.items():
        assert stats["percentiles"][name] == pytest.approx(_expected_dist(values)), name
    assert stats["counts"]["samples"] == len(metas)
    assert stats["counts"]["images"] == len(images)
    assert stats["counts"]["sliced_images"] == sum(i.layout.grid is not None for i in images)
    assert stats["counts"]["text_only_samples"] == sum(not m.images for m in metas)
    assert any(i.layout.num_slices > 0 for i in images)  # the data exercises slicing

    rejects = [json.loads(line) for line in (built / "rejects.jsonl").read_text().splitlines()]
    by_reason: dict[str, int] = {}
    for reject in rejects:
        by_reason[reject["reason"]] = by_reason.get(reject["reason"], 0) + 1
    assert stats["rejects_by_reason"] == by_reason and stats["counts"]["rejects"] == len(rejects)
    assert stats["counts"]["records"] == len(rejects) + len(metas)

    budgets = stats["budgets"]
    assert budgets["cost_model"] == "4.6"
    tokens, patches = expected["tokens_per_sample"], expected["patches_per_sample"]
    assert budgets["p99"] == {
        "token_budget": _nearest_rank(tokens, 99),
        "patch_budget": _nearest_rank(patches, 99),
    }
    assert budgets["max"] == {"token_budget": max(tokens), "patch_budget": max(patches)}
    assert sum(t <= budgets["p99"]["token_budget"] for t in tokens) >= 0.99 * len(tokens)


@pytest.mark.slow
def test_the_2_6_patch_cost_matches_the_trainers_slice_costs(built: Path) -> None:
    metas = _metas(built)
    costs = per_sample_patch_cost(load_index_arrays(built), REMOTE_26.cost)
    assert costs is not None
    expected = [slices * largest for slices, largest in map(slice_costs, metas)]
    assert costs.tolist() == expected


@pytest.mark.slow
def test_stats_reads_the_index_alone(built: Path, tmp_path: Path) -> None:
    with_tars = CliRunner().invoke(mvprep_main, ["stats", str(built), "--json"])
    assert with_tars.exit_code == 0, with_tars.output
    copy = tmp_path / "no-tars"
    shutil.copytree(built, copy)
    for tar in copy.glob("*.tar"):
        tar.unlink()
    result = CliRunner().invoke(mvprep_main, ["stats", str(copy), "--json"])
    assert result.exit_code == 0, result.output
    a, b = json.loads(with_tars.output), json.loads(result.output)
    assert a.pop("dataset") != b.pop("dataset")
    assert a == b


@pytest.mark.slow
def test_an_index_without_image_tables_still_gives_sample_stats(built: Path, tmp_path: Path):
    copy = tmp_path / "old"
    shutil.copytree(built, copy)
    for entry in (copy / "index").glob("*.json"):
        obj = json.loads(entry.read_text())
        del obj["stats"][IMAGE_TABLE_KEY]
        entry.write_text(json.dumps(obj))
    stats = dataset_stats(load_index_arrays(copy))
    fresh = dataset_stats(load_index_arrays(built))
    assert stats["percentiles"]["tokens_per_sample"] == fresh["percentiles"]["tokens_per_sample"]
    assert "slices_per_image" not in stats["percentiles"]
    assert stats["notes"] and "rebuild" in stats["notes"][0]


@pytest.mark.slow
def test_stats_refuses_an_unfinished_build(built: Path, tmp_path: Path) -> None:
    copy = tmp_path / "partial"
    shutil.copytree(built, copy)
    next(iter(sorted((copy / "index").glob("*.json")))).unlink()
    result = CliRunner().invoke(mvprep_main, ["stats", str(copy)])
    assert result.exit_code == 1
    assert "re-run mvprep build" in result.output


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=10**9), min_size=1, max_size=300))
def test_percentiles_are_nearest_rank(values: list[int]) -> None:
    found = percentiles(np.array(values, dtype=np.int64))
    assert found == _expected_dist(values)
    assert all(isinstance(v, int) for v in found.values())


@pytest.mark.slow
def test_stats_png(built: Path, tmp_path: Path) -> None:
    png = tmp_path / "stats.png"
    result = CliRunner().invoke(mvprep_main, ["stats", str(built), "--png", str(png)])
    assert result.exit_code == 0, result.output
    assert "p99" in result.output and "--token-budget" in result.output
    _check_png(png, (1200, 900))


@pytest.mark.slow
def test_stats_png_of_an_empty_dataset_is_still_drawn(tmp_path: Path) -> None:
    arrays = IndexArrays(
        out=tmp_path,
        manifest={"params": {"profile": "minicpmv-2.6"}, "shards": [], "totals": {}},
        tokens=np.zeros(0, np.int64),
        patches=np.zeros(0, np.int64),
        images=np.zeros(0, np.int64),
        image_columns=None,
    )
    stats = dataset_stats(arrays)
    assert stats["budgets"]["max"] == {"token_budget": None, "patch_budget": None}
    png = plot_stats(arrays, stats, tmp_path / "empty.png")
    with Image.open(png) as image:
        assert image.size == (1200, 900)


# --- inspect -------------------------------------------------------------------------------


def _sliced_key(out: Path, min_slices: int = 4) -> str:
    for meta in _metas(out):
        if len(meta.images) == 1 and meta.images[0].layout.num_slices >= min_slices:
            return meta.key
    raise AssertionError("the fixture has no sliced single-image sample")


def _fraction(pixels: np.ndarray, colour: tuple[int, int, int]) -> float:
    return float(np.all(np.abs(pixels.astype(int) - colour) <= 8, axis=-1).mean())


@pytest.mark.slow
def test_inspect_draws_the_grid_on_the_slice_boundaries(built: Path, tmp_path: Path) -> None:
    key = _sliced_key(built)
    found = inspect_sample(built, key=key)
    assert found.problems == []
    layout = found.meta.images[0].layout
    cols, rows = layout.grid
    refine_w, refine_h = layout.refine_size
    png = tmp_path / "inspect.png"
    found.image.save(png)
    pixels = _check_png(png, found.image.size)

    # The refine image is where the panel says, at the scale the panel says.
    panel = found.panels[0]
    scale = PANEL / max(refine_w, refine_h)
    assert panel.main_scale == pytest.approx(scale)
    ox, oy = panel.main_origin
    members = read_members(shard_of_key(built, key), key)
    ref_ext = found.meta.images[0].refine_member.partition(".")[2]
    refine = Image.open(io.BytesIO(members[ref_ext])).convert("RGB")
    shown = np.asarray(refine.resize((round(refine_w * scale), round(refine_h * scale))))
    crop = pixels[oy : oy + shown.shape[0], ox : ox + shown.shape[1]].astype(int)
    assert np.median(np.abs(crop - shown.astype(int))) < 4

    # Grid lines: every slice boundary (and the outer edges) is magenta along its length,
    # halfway between two boundaries it is not.
    cell_w, cell_h = refine_w / cols * scale, refine_h / rows * scale
    height, width = shown.shape[:2]
    for c in range(cols + 1):
        x = ox + round(c * cell_w)
        assert _fraction(pixels[oy + 4 : oy + height - 4, x], LINE) > 0.95, f"column {c}"
        if c < cols:
            mid = ox + round((c + 0.5) * cell_w)
            assert _fraction(pixels[oy : oy + height, mid], LINE) < 0.2
    for r in range(rows + 1):
        y = oy + round(r * cell_h)
        assert _fraction(pixels[y, ox + 4 : ox + width - 4], LINE) > 0.95, f"row {r}"
        if r < rows:
            mid = oy + round((r + 0.5) * cell_h)
            assert _fraction(pixels[mid, ox : ox + width], LINE) < 0.2


@pytest.mark.slow
def test_a_wrong_layout_is_flagged_and_drawn_wrong(built: Path) -> None:
    key = _sliced_key(built)
    members = read_members(shard_of_key(built, key), key)
    meta = SampleMeta.from_json(json.loads(members["json"]))
    good_image, good_panels = render_sample(meta, members, "minicpmv-4.6", 9)
    layout = meta.images[0].layout
    cols, rows = layout.grid
    wrong = replace(layout, grid=(rows, cols) if rows != cols else (cols + 1, rows))
    meta.images[0].layout = wrong
    bad_image, bad_panels = render_sample(meta, members, "minicpmv-4.6", 9)
    assert good_panels[0].problems == []
    assert any("compute_layout" in p for p in bad_panels[0].problems)
    assert bad_panels[0].grid_xs != good_panels[0].grid_xs
    assert _fraction(np.asarray(bad_image), PROBLEM) > 5 * _fraction(
        np.asarray(good_image), PROBLEM
    )


@pytest.mark.slow
def test_inspect_placeholder_text_has_every_image_token(built: Path) -> None:
    profile = get_profile("minicpmv-4.6")
    for meta in _metas(built):
        found = inspect_sample(built, key=meta.key)
        text = "\n".join(turn["content"] for turn in found.turns)
        queries = sum(
            profile.tokens_per_subimage(t) for image in meta.images for t in image.layout.tgt_sizes
        )
        assert text.count("<unk>") == queries
        assert text.count("<slice>") == sum(i.layout.num_slices for i in meta.images)
        assert text.count("<image>") == len(meta.images)
        assert not re.search(r"<image_\d+>", text)
        compact = compact_text(text, "<unk>")
        expanded = re.sub(r"\[<unk> x (\d+)\]", lambda m: "<unk>" * int(m.group(1)), compact)
        assert expanded == text


@pytest.mark.slow
def test_inspect_by_id_and_its_errors(built: Path, tmp_path: Path) -> None:
    meta = next(m for m in _metas(built) if m.images)
    by_id = inspect_sample(built, record_id=meta.id)
    assert by_id.meta.key == meta.key
    with pytest.raises(InspectError, match="was rejected"):
        inspect_sample(built, record_id="bad-empty")
    with pytest.raises(InspectError, match="no sample or reject"):
        inspect_sample(built, record_id="no-such-id")
    png = tmp_path / "x.png"
    result = CliRunner().invoke(
        mvprep_main, ["inspect", str(built), "--id", meta.id, "--png", str(png)]
    )
    assert result.exit_code == 0, result.output
    assert f"sample {meta.key}" in result.output and "[<unk> x " in result.output
    with Image.open(png) as image:
        assert image.size == by_id.image.size
    rejected = json.loads((built / "rejects.jsonl").read_text().splitlines()[0])
    result = CliRunner().invoke(mvprep_main, ["inspect", str(built), f"{rejected['index']:09d}"])
    assert result.exit_code == 1 and rejected["reason"] in result.output


# --- report --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(built: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("run") / "run"
    cmd = [sys.executable, "-m", "mvtrain.cli", "run", "--shards", str(built), "--model", "tiny"]
    cmd += ["--output", str(out), "--max-steps", "2", "--token-budget", "2048"]
    cmd += ["--patch-budget", "16384", "--engine", "torch", "--no-progress", "--no-export"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**env, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out


@pytest.mark.slow
def test_report_of_a_real_tiny_run(tiny_run: Path, tmp_path: Path) -> None:
    # a CPU run: no GPU memory in the metrics, the memory panel says so
    assert "max_memory_allocated" not in (tiny_run / "metrics.jsonl").read_text()
    png = tmp_path / "report.png"
    result = CliRunner().invoke(mvtrain_main, ["report", str(tiny_run), "--png", str(png)])
    assert result.exit_code == 0, result.output
    assert "loss" in result.output and str(png) in result.output
    _check_png(png, (1500, 800))
    assert re.search(r"steps 2, loss \d+\.\d+ -> \d+\.\d+", result.output)


@pytest.mark.slow
def test_report_draws_gpu_memory_against_the_planned_line(tiny_run: Path, tmp_path: Path):
    run = tmp_path / "gpu-run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("checkpoints", "cache"))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    for i, record in enumerate(records):
        record["max_memory_allocated"] = int((3 + i) * GIB)
    stale = {**records[0], "loss": 99.0}  # a resumed run re-logs a step: the last one wins
    body = [json.dumps(r) for r in [stale, *records]]
    (run / "metrics.jsonl").write_text("\n".join(body) + "\n")
    no_line = write_report(run, tmp_path / "a.png")
    assert not any("memory" in p for p in no_line.panels[:-1])
    report = write_report(run, tmp_path / "b.png", memory_budget=parse_bytes("6GiB"))
    assert report.steps == [1, 2] and report.series["loss"][0] != 99.0
    assert report.token_budget == 2048 and report.patch_budget == 16384
    assert "loss" in report.panels and "learning rate" in report.panels
    assert report.memory_budget == 6 * GIB and no_line.memory_budget is None
    assert "peak GPU memory per step (GiB)" in report.panels
    a = np.asarray(Image.open(tmp_path / "a.png").convert("RGB")).astype(int)
    b = np.asarray(Image.open(tmp_path / "b.png").convert("RGB")).astype(int)
    assert a.shape == b.shape and np.abs(a - b).sum() > 0  # the planned line is drawn
    _check_png(tmp_path / "b.png", (1500, 800))


def _with_memory(run: Path, key: str, base_gib: float) -> None:
    """Add ``key`` (bytes) to every step of ``run``'s metrics: ``base_gib`` GiB, +1 per step."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for i, record in enumerate(records):
        record[key] = int((base_gib + i) * GIB)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.mark.slow
def test_report_draws_reserved_next_to_allocated(tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "gpu-run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("checkpoints", "cache"))
    _with_memory(run, "max_memory_allocated", 3)
    allocated = write_report(run, tmp_path / "a.png", memory_budget=8 * GIB)
    _with_memory(run, "max_memory_reserved", 4.5)
    both = write_report(run, tmp_path / "b.png", memory_budget=8 * GIB)
    assert allocated.series["max_memory_reserved"] == [None, None]
    assert both.series["max_memory_reserved"] == [int(4.5 * GIB), int(5.5 * GIB)]
    assert "peak GPU memory per step (GiB)" in both.panels
    a = np.asarray(Image.open(tmp_path / "a.png").convert("RGB")).astype(int)
    b = np.asarray(Image.open(tmp_path / "b.png").convert("RGB")).astype(int)
    assert a.shape == b.shape and np.abs(a - b).sum() > 0  # the reserved line is drawn
    assert "peak reserved 5.50 GiB" in format_report(both)
    assert "peak reserved" not in format_report(allocated)


def test_report_errors_are_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(mvtrain_main, ["report", str(tmp_path)])
    assert result.exit_code == 1 and "metrics.jsonl does not exist" in result.output
    assert parse_bytes("80GiB") == 80 * GIB and parse_bytes("24GB") == 24 * 10**9
    with pytest.raises(ValueError, match="not a memory size"):
        parse_bytes("lots")


@pytest.mark.slow
def test_inspect_takes_span_strings_from_a_tokenizer(built: Path, tmp_path: Path) -> None:
    from mvshards.tiny_tokenizer import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(tmp_path / "tok")
    key = _sliced_key(built)
    args = ["inspect", str(built), key, "--png", str(tmp_path / "t.png"), "--tokenizer"]
    result = CliRunner().invoke(mvprep_main, [*args, str(tokenizer), "--full"])
    assert result.exit_code == 0, result.output
    assert "[<unk> x" not in result.output and "<unk><unk>" in result.output
