"""Channels: read from a record's ``channel``/``source``/``dataset`` string field in every
input format, or ``mvprep build --channel`` for records without one; kept in the sample
JSON and the index (entries without channels stay as they were); ``mvprep stats`` per
channel against counts taken from the tars' sample JSON; the trainer's loss groups and
per-channel losses of two channels in one folder against plain single-sample forwards."""

from __future__ import annotations

import json
import pickle
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import format_fixtures as F
import numpy as np
import pytest
from click.testing import CliRunner
from pipeline_data import make_pipeline_dataset

from mvprep.cli import main
from mvprep.options import BuildOptions
from mvprep.readers import open_dataset
from mvprep.records import normalize_record
from mvprep.stats import dataset_stats, format_stats, load_index_arrays
from mvshards.index import ShardEntry, entry_path, load_index, read_entry
from mvshards.schema import SampleMeta
from mvshards.tario import iter_shard
from mvtrain.batching.plan_index import PlanIndex
from mvtrain.batching.sources import (
    ChannelGroup,
    ShardSource,
    SourceMix,
    sample_group,
    split_group_losses,
)

FIELDS: list[dict[str, Any]] = [
    {"channel": "ocr"},
    {"source": "caption", "dataset": "not-this"},
    {"dataset": "chat"},
    {},
    {"channel": "ocr", "source": "web"},
    {"channel": 7, "source": {"file": "x.json"}, "dataset": "vqa"},  # non-strings skipped
]
"""Channel fields added to each canonical record (JSON shapes)."""
TABLE_FIELDS: list[dict[str, Any]] = [
    {"channel": "ocr", "source": None, "dataset": None},
    {"channel": None, "source": "caption", "dataset": "not-this"},
    {"channel": None, "source": None, "dataset": "chat"},
    {"channel": "", "source": None, "dataset": None},  # empty: no channel
    {"channel": "ocr", "source": "web", "dataset": None},
    {"channel": None, "source": None, "dataset": "vqa"},
]
"""The same as string columns (Parquet, save_to_disk)."""
EXPECTED = ["ocr", "caption", "chat", None, "ocr", "vqa"]


def _with(records: list[dict[str, Any]], fields: list[dict[str, Any]]) -> list[dict[str, Any]]:
    good = [{**r, **f} for r, f in zip(records[: F.GOOD], fields, strict=True)]
    return [*good, *[{**r, **fields[3]} for r in records[F.GOOD :]]]


def _write_parquet(root: Path, path: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    turn = pa.struct([("role", pa.string()), ("content", pa.string())])
    columns = [("id", pa.string()), ("messages", pa.list_(turn)), ("images", pa.list_(image))]
    columns += [(name, pa.string()) for name in ("channel", "source", "dataset")]
    rows = _with(F.table_rows(root, embed=True), TABLE_FIELDS)
    pq.write_table(pa.Table.from_pylist(rows, schema=pa.schema(columns)), path, row_group_size=3)
    return path


def _write_disk(root: Path, folder: Path) -> Path:
    import datasets

    rows = _with(F.sharegpt_records(), TABLE_FIELDS)
    for row in rows:
        row["images"] = [str(root / p) if p.startswith("img/") else p for p in row["images"]]
        row.setdefault("system", None)
    rows[-1]["images"] = [str(root / "img" / "a.jpg")]
    turn = {"from": datasets.Value("string"), "value": datasets.Value("string")}
    strings = {name: datasets.Value("string") for name in ("id", "system", *TABLE_FIELDS[0])}
    features = datasets.Features(
        {"conversations": datasets.List(turn), "images": datasets.List(datasets.Image()), **strings}
    )
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(folder))
    return folder


def _write_formats(root: Path) -> dict[str, Path]:
    F.write_images(root)
    json_records = {
        "minicpmv": F.minicpmv_records(),
        "llava": F.llava_records(),
        "messages": F.messages_records(root),
        "sharegpt": F.sharegpt_records(),
    }
    files = {}
    for name, records in json_records.items():
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in _with(records, FIELDS)))
        files[name] = path
    files["parquet"] = _write_parquet(root, root / "train.parquet")
    files["hf-disk"] = _write_disk(root, root / "disk")
    return files


@pytest.fixture(scope="module")
def formats(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("pyarrow")
    pytest.importorskip("datasets")
    return _write_formats(tmp_path_factory.mktemp("channels"))


# --- records ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["minicpmv", "llava", "messages", "sharegpt", "parquet", "hf-disk"])
def test_the_channel_survives_every_input_format(formats: dict[str, Path], fmt: str) -> None:
    source = open_dataset(formats[fmt])
    rows = list(source.read_range(0, F.GOOD))
    got = [normalize_record(i, raw).channel for i, raw in rows]
    assert got == EXPECTED


def _cli(*args: str) -> None:
    result = CliRunner().invoke(main, ["build", *args, "--workers", "1", "--no-progress"])
    assert result.exit_code == 0, result.output


def _metas(out: Path) -> list[SampleMeta]:
    return [
        SampleMeta.from_json(json.loads(members["json"]))
        for shard in sorted(out.glob("*.tar"))
        for _, members in iter_shard(shard)
    ]


@pytest.mark.parametrize("fmt", ["messages", "parquet"])
def test_channels_reach_the_sample_json_and_the_index(
    formats: dict[str, Path], fmt: str, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    flag = ["--channel", "misc"] if fmt == "messages" else []
    _cli(str(formats[fmt]), "--out", str(out), "--samples-per-shard", "1", *flag)
    want = [c or ("misc" if flag else None) for c in EXPECTED]
    metas = _metas(out)
    assert [m.channel for m in metas] == want
    index = load_index(out)
    assert [c or None for c in index.channels.tolist()] == want  # type: ignore[union-attr]
    assert index.channel_names() == sorted({c for c in want if c})
    for unit, channel in enumerate(want):
        raw = json.loads(entry_path(out, unit).read_bytes())
        if channel is None:  # no sample with a channel: the entry is as it always was
            assert "channels" not in raw
        else:
            assert raw["channels"] == [channel]
    params = json.loads((out / "manifest.json").read_text())["params"]
    assert params.get("channel") == ("misc" if flag else None)


def test_no_channel_adds_no_key_and_old_entries_read(shards: Path) -> None:
    """A build without channels writes neither key (so its bytes are those of a build before
    channels); its index has no channels and every sample is ungrouped."""
    for path in sorted((shards / "index").glob("*.json")):
        assert "channels" not in json.loads(path.read_bytes())
    for meta in _metas(shards):
        assert meta.channel is None and "channel" not in meta.to_json()
    assert "channel" not in json.loads((shards / "build.json").read_text())
    index = load_index(shards)
    assert index.channels is None and index.channel_names() == []
    assert set(index.sample_channels().tolist()) == {""}
    assert "by_channel" not in dataset_stats(load_index_arrays(shards))


def test_malformed_channels_make_the_entry_unreadable(tmp_path: Path) -> None:
    entry = ShardEntry(0, "000000.tar", [0, 2], "0" * 64, 10, 2, [["a", 1, 0, 0], ["b", 2, 0, 0]])
    assert "channels" not in entry.to_json()
    for bad in (["x"], ["x", 3], "xy"):
        obj = {**entry.to_json(), "channels": bad}
        with pytest.raises(ValueError):
            ShardEntry.from_json(obj)
    good = ShardEntry.from_json({**entry.to_json(), "channels": ["x", None]})
    assert good.channels == ["x", None]
    (tmp_path / "index").mkdir()
    entry_path(tmp_path, 0).write_text(json.dumps({**entry.to_json(), "channels": ["x"]}))
    with pytest.warns(UserWarning, match="unreadable index entry"):
        assert read_entry(tmp_path, 0) is None


def test_blank_channel_option_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--channel"):
        BuildOptions(data_path=tmp_path / "a.json", out_dir=tmp_path / "o", channel=" ")


# --- stats --------------------------------------------------------------------------------


def test_stats_by_channel_equal_counts_from_the_sample_json(
    formats: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    _cli(str(formats["sharegpt"]), "--out", str(out), "--samples-per-shard", "4")
    counts: dict[str | None, Counter[str]] = defaultdict(Counter)
    for meta in _metas(out):  # independent: the sample JSON in the tars
        c = counts[meta.channel]
        c["samples"] += 1
        c["images"] += len(meta.images)
        c["tokens"] += meta.num_tokens
        c["patches"] += sum(image.num_patches for image in meta.images)
    stats = dataset_stats(load_index_arrays(out))
    rows = {r["channel"]: r for r in stats["by_channel"]}
    assert set(rows) == set(counts) == {"ocr", "caption", "chat", None, "vqa"}
    assert [r["channel"] for r in stats["by_channel"]] == ["caption", "chat", "ocr", "vqa", None]
    for channel, c in counts.items():
        assert {k: rows[channel][k] for k in c} == dict(c), channel
    assert sum(r["token_share"] for r in rows.values()) == pytest.approx(1.0)
    table = format_stats(stats)
    assert "by channel:" in table and "(no channel)" in table
    ocr = next(line for line in table.splitlines() if line.strip().startswith("ocr "))
    assert f"{counts['ocr']['tokens']:,}" in ocr and f"{counts['ocr']['patches']:,}" in ocr
    cli = CliRunner().invoke(main, ["stats", str(out), "--json"])
    assert cli.exit_code == 0, cli.output
    assert json.loads(cli.output)["by_channel"] == stats["by_channel"]


# --- trainer: loss groups -----------------------------------------------------------------


def _part(n: int) -> PlanIndex:
    return PlanIndex.from_arrays(
        [f"{i:09d}" for i in range(n)], [0] * n, [10] * n, [0] * n, num_shards=1
    )


def test_a_sample_group_is_its_channel_else_its_source() -> None:
    assert sample_group("a", "ocr") == "ocr" and isinstance(sample_group("a", "ocr"), ChannelGroup)
    assert sample_group("a", None) == "a" and not isinstance(sample_group("a"), ChannelGroup)
    label = pickle.loads(pickle.dumps(ChannelGroup("ocr")))  # DataLoader workers pickle it
    assert isinstance(label, ChannelGroup) and label == "ocr"

    sources = [ShardSource(Path("d/a")), ShardSource(Path("d/b")), ShardSource(Path("d/c"))]
    channels = [np.array(["ocr", "", "chat"]), np.array(["ocr", "ocr"]), None]
    mix = SourceMix.of_plan_indexes(sources, [_part(3), _part(2), _part(1)], (), channels)
    assert mix.groups == ("a", "c", "chat", "ocr")  # b has channels only: no group of its own
    assert [type(g) is ChannelGroup for g in mix.groups] == [False, False, True, True]
    loc = mix.locator
    assert [loc.group_of(k) for k in ("a/000000000", "a/000000001", "b/000000001")] == [
        "ocr",
        "a",
        "ocr",
    ]
    assert loc.group_of("c/000000000") == "c" and loc.channel_of("c/000000000") is None
    described = mix.describe()
    assert [d.get("channels") for d in described] == [{"chat": 1, "ocr": 1}, {"ocr": 2}, None]
    plain = SourceMix.of_plan_indexes(sources[:2], [_part(2), _part(2)])
    assert plain.groups == ("a", "b") and "channels" not in plain.describe()[0]
    # a channel spelled like a folder name is that folder's group (one label, one slot)
    same = SourceMix.of_plan_indexes(sources[:2], [_part(1), _part(1)], (), [None, np.array(["a"])])
    assert same.groups == ("a",) and same.locator.group_of("b/000000000") == "a"


def test_group_losses_split_into_source_and_channel_keys() -> None:
    by_group = {"a": 1.5, ChannelGroup("ocr"): 2.0, ChannelGroup("chat"): 3.0}
    assert split_group_losses(by_group) == {
        "loss_by_source": {"a": 1.5},
        "loss_by_channel": {"ocr": 2.0, "chat": 3.0},
    }
    assert split_group_losses({"a": 1.0}) == {"loss_by_source": {"a": 1.0}}
    assert split_group_losses({}) == {}


# --- trainer: per-channel loss of two channels in one folder -----------------------------


@pytest.mark.slow
def test_two_channels_in_one_folder_get_per_channel_losses_of_plain_forwards(
    tmp_path: Path,
) -> None:
    import torch
    from train_fixtures import alone_loss

    from mvprep.build import build
    from mvshards.tario import iter_shard
    from mvtrain.data.sample import load_sample
    from mvtrain.loop import run
    from mvtrain.model.adapters import adapter_for
    from mvtrain.model.tiny import build_tiny_model
    from mvtrain.run_config import RunConfig

    data = make_pipeline_dataset(tmp_path / "set", count=8)
    records = json.loads(data.read_text())
    for i, record in enumerate(records):
        record["channel"] = "ocr" if i % 2 else "chat"
    data.write_text(json.dumps(records))
    shards = tmp_path / "shards"
    options = BuildOptions(data_path=data, out_dir=shards, max_res=448, samples_per_shard=3)
    assert build(options, workers=1, progress=False).ok

    out = tmp_path / "run"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run(
            RunConfig(
                shards=[shards],
                model="tiny",
                output=out,
                token_budget=1024,
                patch_budget=4096,
                grad_accum=4,
                max_steps=1,
                use_deepspeed=False,
                export=False,
                progress=False,
                tensorboard=False,
                batch_log=out / "batches.jsonl",
            )
        )
        row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        assert "loss_by_source" not in row  # every sample has a channel
        assert set(row["loss_by_channel"]) == {"ocr", "chat"}

        # Independent: each trained sample alone through a fresh model with the run's seed,
        # its channel read from its own JSON in the tar.
        model, tok = build_tiny_model(seed=0)
        profile = load_index(shards).params["profile"]
        adapter = adapter_for(profile, tok)
        samples = {
            key: members for tar in sorted(shards.glob("*.tar")) for key, members in iter_shard(tar)
        }
        trained = [
            k
            for b in map(json.loads, (out / "batches.jsonl").read_text().splitlines())
            if b["weight"] > 0
            for k in b["keys"]
        ]
        sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        for key in trained:
            meta = SampleMeta.from_json(json.loads(samples[key]["json"]))
            total, count = alone_loss(model, adapter, load_sample(meta, samples[key], tok, profile))
            assert meta.channel is not None
            sums[meta.channel][0] += total
            sums[meta.channel][1] += count
    finally:
        torch.set_num_threads(before)
    assert set(sums) == {"ocr", "chat"}
    for channel, (total, count) in sums.items():
        # rel 1e-6: batched vs alone agree to ~1e-8 here, the two channels differ by ~5e-4
        assert row["loss_by_channel"][channel] == pytest.approx(total / count, rel=1e-6)
    overall = sum(t for t, _ in sums.values()) / sum(c for _, c in sums.values())
    assert row["loss"] == pytest.approx(overall, rel=1e-6)
    record = json.loads((out / "run.json").read_text())
    in_tars = Counter(SampleMeta.from_json(json.loads(m["json"])).channel for m in samples.values())
    assert record["sources"][0]["channels"] == dict(in_tars)
    assert set(result.loss_by_source) == {"ocr", "chat"}
