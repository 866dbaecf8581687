"""End-to-end builds with real files, real tars, real subprocesses and real kills."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pipeline_data import make_pipeline_dataset

from mvprep.build import build
from mvprep.options import BuildOptions
from mvprep.pool import RetryPolicy
from mvprep.unit import FAULT_ENV, WORKER_DIED
from mvshards.index import load_index
from mvshards.schema import SampleMeta
from mvshards.tario import iter_shard
from mvshards.verify import verify_dataset

MVPREP = [sys.executable, "-m", "mvprep.cli"]

pytestmark = pytest.mark.slow  # end-to-end builds: worker pools, CLI subprocesses, kills


def _shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def _options(data: Path, out: Path, **kw) -> BuildOptions:
    kw.setdefault("samples_per_shard", 4)
    return BuildOptions(data_path=data, out_dir=out, **kw)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pipeline_dataset(tmp_path_factory.mktemp("data") / "set", count=12)


@pytest.fixture(scope="module")
def reference(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted 1-worker build every other build is compared against."""
    out = tmp_path_factory.mktemp("ref") / "out"
    result = build(_options(dataset, out), workers=1, progress=False)
    assert result.ok
    return out


def _records(data: Path) -> list[dict]:
    return json.loads(data.read_text())


def test_every_record_ends_in_exactly_one_place(dataset: Path, reference: Path) -> None:
    records = _records(dataset)
    index = load_index(reference)
    keys = [int(k) for k in index.keys]
    rejects = [json.loads(line) for line in (reference / "rejects.jsonl").read_text().splitlines()]
    placed = sorted(keys + [r["index"] for r in rejects])
    assert placed == list(range(len(records)))
    reasons = {r["id"]: r["reason"] for r in rejects}
    assert set(reasons) == {r["id"] for r in records if r["id"].startswith("bad-")}
    assert reasons["bad-missing"] == "missing file"
    assert reasons["bad-empty"] == "empty file"
    assert reasons["bad-text"] == "not an image"
    assert reasons["bad-truncated"] == "truncated image"
    assert reasons["bad-escape"] == "path outside data folder"
    assert reasons["bad-role"] == "unknown role"
    assert reasons["bad-multi-one-broken"] == "truncated image"
    for reject in rejects:
        assert "\n" not in reject["reason"] and reject["error"]


def test_samples_match_their_layouts_and_index(reference: Path) -> None:
    from io import BytesIO

    from PIL import Image

    index = load_index(reference)
    rows = {row[0]: row for row in index.sample_rows()}
    seen = 0
    for shard in sorted(reference.glob("*.tar")):
        for key, members in iter_shard(shard):
            meta = SampleMeta.from_json(json.loads(members["json"]))
            assert rows[key] == meta.index_row()
            for i, image in enumerate(meta.images):
                src = Image.open(BytesIO(members[f"src{i}.jpg"]))
                assert src.size == image.layout.source_size
                if image.layout.grid is None:
                    assert image.refine_member is None and f"ref{i}.jpg" not in members
                else:
                    ref = Image.open(BytesIO(members[f"ref{i}.jpg"]))
                    assert ref.size == image.layout.refine_size
            seen += 1
    assert seen == len(rows) > 0
    assert verify_dataset(reference).ok


def test_worker_count_does_not_change_the_bytes(dataset: Path, reference: Path, tmp_path: Path):
    out = tmp_path / "out"
    result = build(_options(dataset, out), workers=2, progress=False)
    assert result.ok
    assert _shard_bytes(out) == _shard_bytes(reference)
    again = build(_options(dataset, out), workers=2, progress=False)
    assert again.processed_units == [] and len(again.skipped_units) == len(result.entries)


def test_changed_options_on_an_existing_folder_are_refused(reference: Path, dataset: Path):
    from mvshards.index import IndexMismatchError

    with pytest.raises(IndexMismatchError, match="max"):
        build(_options(dataset, reference, max_res=896), workers=1, progress=False)


@pytest.fixture(scope="module")
def bigger(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A dataset with many small units, so a kill lands mid-build, and its reference build."""
    data = make_pipeline_dataset(tmp_path_factory.mktemp("big") / "set", count=36, seed=7)
    out = tmp_path_factory.mktemp("bigref") / "out"
    assert build(_options(data, out, samples_per_shard=2), workers=1, progress=False).ok
    return data, out


@pytest.mark.parametrize("entries_before_kill", [0, 3, 9])
def test_kill_9_then_rerun_gives_the_uninterrupted_bytes(
    bigger: tuple[Path, Path], tmp_path: Path, entries_before_kill: int
) -> None:
    data, reference = bigger
    out = tmp_path / "out"
    cmd = [*MVPREP, "build", str(data), "--out", str(out), "--samples-per-shard", "2"]
    cmd += ["--workers", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "build.json").exists():
            done = len(list((out / "index").glob("*.json")))
            if done >= entries_before_kill:
                break
        time.sleep(0.002)
    assert proc.poll() is None, "the build finished before the kill; make the data set bigger"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert rerun.returncode == 0, rerun.stderr
    assert not list(out.glob("*.tmp")) and not list((out / "index").glob("*.tmp"))
    assert _shard_bytes(out) == _shard_bytes(reference)
    assert verify_dataset(out).ok


def test_a_record_that_kills_its_worker_is_rejected_and_the_rest_written(
    dataset: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAULT_ENV, "kill:single-0")
    out = tmp_path / "out"
    result = build(_options(dataset, out), workers=2, progress=False)
    assert result.ok and len(result.worker_deaths) == 2
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    died = [r for r in rejects if r["reason"] == WORKER_DIED]
    assert [r["id"] for r in died] == ["single-0"]
    ref_keys = set(load_index(reference).keys)
    assert set(load_index(out).keys) == ref_keys - {"000000000"}
    # the other units are untouched by the death
    ref, got = _shard_bytes(reference), _shard_bytes(out)
    assert all(got[name] == ref[name] for name in ref if name != "000000.tar")


def test_a_unit_that_always_kills_its_worker_ends_with_its_records_rejected(
    dataset: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAULT_ENV, "kill-commit:1")
    out = tmp_path / "out"
    result = build(_options(dataset, out), workers=2, progress=False)
    assert result.ok and len(result.worker_deaths) == RetryPolicy().unit_deaths
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in rejects if r["reason"] == WORKER_DIED) == [4, 5, 6, 7]
    ref, got = _shard_bytes(reference), _shard_bytes(out)
    assert all(got[name] == ref[name] for name in ref if name != "000001.tar")
    assert verify_dataset(out).ok


def test_a_hung_unit_is_killed_by_the_timeout(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAULT_ENV, "hang:single-1")
    out = tmp_path / "out"
    result = build(
        _options(dataset, out), workers=2, progress=False, policy=RetryPolicy(unit_timeout=4.0)
    )
    assert result.ok
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rejects if r["reason"] == WORKER_DIED] == ["single-1"]


def test_max_tokens_rejects_with_the_length(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert build(_options(dataset, out, max_tokens=300), workers=1, progress=False).ok
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    long = [r for r in rejects if r["reason"] == "too many tokens"]
    assert long, "some demo samples exceed 300 tokens"
    assert all("tokens" in r["error"] and "300" in r["error"] for r in long)
    assert all(row[1] <= 300 for row in load_index(out).sample_rows())


def test_cli_build_prints_a_summary(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "COLUMNS": "120"}
    proc = subprocess.run(
        [*MVPREP, "build", str(dataset), "--out", str(out), "--max-res", "896", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    for label in ("records", "samples", "rejects", "shards", "written", "images/s", "p50"):
        assert label in proc.stdout
    assert f"each one, with its record  {out / 'rejects.jsonl'}" in proc.stdout  # set has rejects
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["params"]["max_slice_nums"] == 4


def test_a_build_after_opencv_used_its_threads_in_the_same_process(tmp_path: Path) -> None:
    """A notebook that resized with OpenCV (its thread pool up) and then calls build(): the
    forked workers must not hang in their first cv2 call (they did before the pool stopped
    OpenCV's threads in the parent while forking)."""
    data = make_pipeline_dataset(tmp_path / "set", count=3)
    script = (
        "import sys, cv2, numpy as np\n"
        "from pathlib import Path\n"
        "from mvprep.build import build\n"
        "from mvprep.options import BuildOptions\n"
        "image = np.zeros((3000, 4000, 3), np.uint8)\n"
        "threads = cv2.getNumThreads()\n"
        "for _ in range(3):\n"
        "    cv2.resize(image, (1000, 700), interpolation=cv2.INTER_AREA)\n"
        "options = BuildOptions(data_path=Path(sys.argv[1]), out_dir=Path(sys.argv[2]),"
        " max_res=448)\n"
        "assert build(options, workers=2, progress=False).ok\n"
        "assert cv2.getNumThreads() == threads, 'the thread count was not restored'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(data), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert verify_dataset(tmp_path / "out").ok
