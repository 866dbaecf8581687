"""Runners: a local build, a Ray build and 16 parts merged are byte-identical; faults under Ray
are handled as the local pool handles them; ``--part`` and ``mvprep merge`` keep their promises.

Real components only: subprocess CLIs running at the same time on one output folder, a real
local Ray (2 CPUs, started once per test session; the Ray tests form one xdist group, which
pyproject's ``--dist loadgroup`` keeps on one worker), real SIGKILLs of Ray workers. Without
the ``ray`` extra the Ray tests are skipped, saying so.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pipeline_data import make_pipeline_dataset

from mvprep.build import build, claim_build_params
from mvprep.merge import MergeIncompleteError, merge
from mvprep.options import BuildOptions
from mvprep.partition import Part, parse_part, part_of
from mvprep.pool import RetryPolicy
from mvprep.runners.journal import journal_path, judge, read_attempts
from mvprep.unit import FAULT_ENV, WORKER_DIED
from mvshards.index import IndexMismatchError, IndexMissingError, load_index, shard_name
from mvshards.verify import verify_dataset

MVPREP = [sys.executable, "-m", "mvprep.cli"]
DATASET_FILES = ("manifest.json", "rejects.jsonl", "README.md")


def ray_tests(test):
    """All Ray tests on one xdist worker (one local Ray), and slow."""
    return pytest.mark.slow(pytest.mark.xdist_group("ray")(test))


def _options(data: Path, out: Path, sps: int = 1, **kw) -> BuildOptions:
    return BuildOptions(data_path=data, out_dir=out, samples_per_shard=sps, **kw)


def _shards(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def _dataset_bytes(out: Path) -> dict[str, bytes]:
    """Every shard and every dataset file: what must not depend on the runner."""
    return {**_shards(out), **{name: (out / name).read_bytes() for name in DATASET_FILES}}


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.rglob("*.tmp"))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """19 records (12 good, 7 bad): 19 units at 1 record a shard, enough for 16 parts."""
    return make_pipeline_dataset(tmp_path_factory.mktemp("data") / "set", count=12)


@pytest.fixture(scope="module")
def reference(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "out"
    assert build(_options(dataset, out), workers=1, progress=False).ok
    return out


# --------------------------------------------------------------------------- --part


def test_parse_part() -> None:
    assert parse_part("3/16") == Part(3, 16) and parse_part(" 1 / 1 ") == Part(1, 1)
    assert str(Part(3, 16)) == "3/16"
    for bad in ("0/16", "17/16", "3", "3/0", "-1/4", "a/b", "3/16/2"):
        with pytest.raises(ValueError, match="--part"):
            parse_part(bad)


@given(num_units=st.integers(0, 300), count=st.integers(1, 40))
def test_parts_partition_the_units(num_units: int, count: int) -> None:
    shares = [Part(i, count).units(num_units) for i in range(1, count + 1)]
    flat = sorted(u for share in shares for u in share)
    assert flat == list(range(num_units))  # every unit in exactly one part
    assert max(map(len, shares)) - min(map(len, shares)) <= 1  # balanced
    for i, share in enumerate(shares, start=1):
        assert all(Part(i, count).owns(u) and part_of(u, count) == i for u in share)


def _run_parts(data: Path, out: Path, parts: list[int], count: int) -> None:
    """Run ``mvprep build --part i/count`` for every i at the same time; all must succeed."""
    procs = [
        subprocess.Popen(
            [*MVPREP, "build", str(data), "--out", str(out), "--samples-per-shard", "1"]
            + ["--no-progress", "--part", f"{i}/{count}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in parts
    ]
    for i, proc in zip(parts, procs, strict=True):
        _, err = proc.communicate(timeout=240)
        # a part whose every record is rejected exits 1 (here: parts of one bad record each),
        # having written its shard and entry like any other part
        all_rejected = f"mvprep: error: part {i}/{count}: all " in err
        assert proc.returncode == 0 or (proc.returncode == 1 and all_rejected), (
            f"part {i}/{count}: {err}"
        )


@pytest.mark.slow
def test_sixteen_concurrent_parts_merged_equal_a_local_build(
    dataset: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    first = [i for i in range(1, 17) if i not in (3, 7)]
    _run_parts(dataset, out, first, 16)
    owned = sorted(shard_name(u) for u in range(19) if part_of(u, 16) in first)
    assert sorted(_shards(out)) == owned  # each part wrote only its own shards
    assert not (out / "manifest.json").exists() and not _leftovers(out)

    refused = subprocess.run([*MVPREP, "merge", str(out)], capture_output=True, text=True)
    assert refused.returncode == 1
    message = refused.stderr
    assert "3/16 (never started)" in message and "7/16 (never started)" in message
    for unit in (2, 6, 18):  # parts 3 and 7 of 16
        assert shard_name(unit) in message
    assert "3 of 19 shards" in message and not (out / "manifest.json").exists()

    _run_parts(dataset, out, [3, 7], 16)
    merged = subprocess.run([*MVPREP, "merge", str(out)], capture_output=True, text=True)
    assert merged.returncode == 0, merged.stderr
    assert _dataset_bytes(out) == _dataset_bytes(reference)
    first_merge = _dataset_bytes(out)
    merge(out, verify_hashes=True)  # idempotent: the same bytes again
    assert _dataset_bytes(out) == first_merge
    assert verify_dataset(out).ok
    markers = sorted((out / "parts").glob("*.json"))
    assert len(markers) == 16
    assert all(json.loads(m.read_text())["state"] == "done" for m in markers)


@pytest.mark.slow
def test_merge_names_a_damaged_shard_and_refuses_an_empty_folder(
    dataset: Path, tmp_path: Path
) -> None:
    with pytest.raises(IndexMissingError, match="no build.json"):
        merge(tmp_path)
    out = tmp_path / "out"
    for i in (1, 2):
        assert build(_options(dataset, out, sps=4), progress=False, part=Part(i, 2)).ok
    merge(out)
    (out / "000003.tar").write_bytes(b"truncated")  # a damaged shard: size differs from entry
    with pytest.raises(MergeIncompleteError, match=r"000003\.tar.*parts to run \(again\): 2/2"):
        merge(out)


@pytest.mark.slow
def test_a_part_leaves_other_parts_temporaries_alone(dataset: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "000001.tar.tmp").write_bytes(b"being written by part 2/2 on another machine")
    assert build(_options(dataset, out, sps=4), progress=False, part=Part(1, 2)).ok
    assert (out / "000001.tar.tmp").exists()
    assert sorted(_shards(out)) == ["000000.tar", "000002.tar", "000004.tar"]
    assert build(_options(dataset, out, sps=4), progress=False, part=Part(2, 2)).ok
    assert not _leftovers(out)


def _claim(out: str, params: dict, barrier, results) -> None:
    barrier.wait()
    try:
        claim_build_params(Path(out), params)
        results.put("ok")
    except Exception as exc:  # reported to the parent
        results.put(f"{type(exc).__name__}: {exc}")


@pytest.mark.slow
def test_build_params_claim_is_race_safe(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    params = {"profile": "minicpmv-4.6", "samples_per_shard": 4, "data_path": "/d.json"}
    for _ in range(3):
        out = tmp_path / f"out{_}"
        out.mkdir()
        n = 12
        barrier, results = ctx.Barrier(n), ctx.Queue()
        procs = [
            ctx.Process(target=_claim, args=(str(out), params, barrier, results)) for _ in range(n)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
        assert sorted(results.get(timeout=5) for _ in range(n)) == ["ok"] * n
        assert json.loads((out / "build.json").read_text()) == params
        assert sorted(p.name for p in out.iterdir()) == ["build.json"]
    with pytest.raises(IndexMismatchError, match="samples-per-shard 4, this run asks for 8"):
        claim_build_params(out, {**params, "samples_per_shard": 8})


@pytest.mark.slow
def test_cli_part_and_runner_errors(dataset: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from mvprep.cli import main

    base = ["build", str(dataset), "--out", str(tmp_path / "o"), "--no-progress"]
    for extra, text in [
        (["--part", "0/16"], "parts are numbered from 1"),
        (["--part", "3"], "expected i/n"),
        (["--ray-address", "auto"], "--ray-address needs --runner ray"),
    ]:
        result = CliRunner().invoke(main, base + extra)
        assert result.exit_code == 2 and text in result.output, result.output
    assert not (tmp_path / "o").exists()


FAKE_SBATCH = """#!/usr/bin/env bash
# A stand-in for Slurm's sbatch: runs an array's tasks at the same time, then returns.
array="" ; args=()
for a in "$@"; do
  case "$a" in
    --array=*) array="${a#--array=}" ;;
    --parsable|--dependency=*|--cpus-per-task=*|--job-name=*|--output=*) ;;
    *) args+=("$a") ;;
  esac
done
echo "${args[*]}" >> "$SBATCH_LOG"
if [[ -n "$array" ]]; then
  for i in $(seq "${array%-*}" "${array#*-}"); do
    SLURM_ARRAY_TASK_ID=$i SLURM_CPUS_PER_TASK=1 bash "${args[@]}" > "$SBATCH_LOG.$i" 2>&1 &
  done
  wait
  echo "101;cluster"
else
  bash "${args[@]}" > "$SBATCH_LOG.merge" 2>&1 || true
  echo 102
fi
"""


@pytest.mark.slow
def test_slurm_array_script_submits_parts_and_a_merge(
    dataset: Path, reference: Path, tmp_path: Path
) -> None:
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text(FAKE_SBATCH)
    (fake / "sbatch").chmod(0o755)
    (fake / "mvprep").write_text(f'#!/usr/bin/env bash\nexec {sys.executable} -m mvprep.cli "$@"\n')
    (fake / "mvprep").chmod(0o755)
    log = tmp_path / "sbatch.log"
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}", "SBATCH_LOG": str(log)}
    script = Path(__file__).resolve().parents[1] / "scripts" / "slurm_array.sh"
    out = tmp_path / "out"
    proc = subprocess.run(
        ["bash", str(script), "submit", str(dataset), str(out), "3", "--samples-per-shard", "1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "submitted parts: job 101 (array 1-3); merge: job 102" in proc.stdout
    assert "merged 19 shards" in Path(f"{log}.merge").read_text()
    assert "mvprep part 2/3 on" in Path(f"{log}.2").read_text()
    assert _dataset_bytes(out) == _dataset_bytes(reference)


# --------------------------------------------------------------------------- journal


def _journal(tmp_path: Path, text: str) -> list:
    path = tmp_path / "j.attempts.tmp"
    path.write_text(text)
    return read_attempts(path)


def test_journal_judges_deaths_as_the_pool_does(tmp_path: Path) -> None:
    policy = RetryPolicy(record_deaths=2, unit_deaths=3)
    begin = "begin 1.0 host 7\n"
    # finished and OSError attempts are not deaths; a torn last line is ignored
    quiet = judge(
        5, _journal(tmp_path, begin + "rec 3\nok\nend\n" + begin + "ioerror\nrec"), policy
    )
    assert quiet.deaths == [] and quiet.skips == {} and quiet.gave_up is None
    # one death on record 12: retried with it; two: it is skipped
    once = judge(5, _journal(tmp_path, begin + "rec 11\nok\nrec 12\n"), policy)
    assert once.deaths == ["worker running unit 5 died on record 12 (pid 7 on host)"]
    assert once.skips == {}
    twice = judge(5, _journal(tmp_path, (begin + "rec 12\n") * 2), policy)
    assert list(twice.skips) == [12] and "killed its worker 2 times" in twice.skips[12]
    # deaths between records (e.g. at commit) count against the unit: the 3rd gives it up
    between = begin + "rec 12\nok\n"
    assert judge(5, _journal(tmp_path, between * 2), policy).gave_up is None
    assert judge(5, _journal(tmp_path, between * 3), policy).gave_up == "worker running unit 5 died"
    timed = judge(5, _journal(tmp_path, begin + "rec 4\ntimeout 3\n"), policy)
    assert timed.deaths == ["unit 5 timed out after 3s on record 4 (pid 7 on host)"]


# --------------------------------------------------------------------------- Ray


def _skip_without_ray() -> None:
    """Skip when the extra is absent; never import ray here (start_ray sets its env first)."""
    from mvprep.runners.ray_runner import ray_installed

    if not ray_installed():
        pytest.skip("Ray is not installed: pip install 'mvkit[ray]' to run the Ray runner tests")


@pytest.fixture(scope="session")
def local_ray():
    """One quiet local Ray with 2 CPUs (startup costs ~5-10 s). Session-scoped: xdist may
    interleave this module's tests with others', which would restart a module fixture."""
    _skip_without_ray()
    from mvprep.runners.ray_runner import start_ray

    started = start_ray(num_cpus=2)
    yield
    if started:
        import ray

        ray.shutdown()


@pytest.fixture(scope="module")
def reference6(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local build at 6 records a shard (units 0-3): long enough units to kill mid-shard."""
    out = tmp_path_factory.mktemp("ref6") / "out"
    assert build(_options(dataset, out, sps=6), workers=2, progress=False).ok
    return out


@ray_tests
def test_ray_cli_build_equals_a_local_build_and_starts_quietly(
    dataset: Path, reference: Path, tmp_path: Path
) -> None:
    _skip_without_ray()
    out = tmp_path / "out"
    cmd = [*MVPREP, "build", str(dataset), "--out", str(out), "--samples-per-shard", "1"]
    proc = subprocess.run(
        cmd + ["--runner", "ray", "--workers", "2", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "", f"a local Ray must start quietly:\n{proc.stderr}"
    assert _dataset_bytes(out) == _dataset_bytes(reference)
    assert not _leftovers(out) and verify_dataset(out).ok


@ray_tests
def test_ray_part_and_local_part_merge_to_the_local_build(
    local_ray, dataset: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    assert build(_options(dataset, out), progress=False, part=Part(1, 2), runner="ray").ok
    assert build(_options(dataset, out), workers=2, progress=False, part=Part(2, 2)).ok
    merge(out)
    assert _dataset_bytes(out) == _dataset_bytes(reference)


def _kill_mid_shard(out: Path, unit: int, records_started: int, found: dict) -> None:
    """SIGKILL the Ray worker running ``unit`` once it has started ``records_started``
    records; note what was visible in OUT at that moment."""
    path = journal_path(out, unit)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            lines = []
        if lines and sum(line.startswith("rec ") for line in lines) >= records_started:
            found["tmp_visible"] = (out / (shard_name(unit) + ".tmp")).exists()
            found["shard_visible"] = (out / shard_name(unit)).exists()
            os.kill(int(lines[0].split()[3]), signal.SIGKILL)
            found["killed"] = True
            return
        time.sleep(0.001)


@ray_tests
def test_ray_worker_killed_mid_shard_leaves_no_partial_or_duplicate(
    local_ray, dataset: Path, reference6: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    found: dict = {}
    killer = threading.Thread(target=_kill_mid_shard, args=(out, 1, 3, found), daemon=True)
    killer.start()
    result = build(_options(dataset, out, sps=6), progress=False, runner="ray")
    killer.join(5)
    assert found == {"tmp_visible": True, "shard_visible": False, "killed": True}
    assert result.ok and len(result.worker_deaths) == 1
    assert "unit 1 died on record" in result.worker_deaths[0]
    assert _dataset_bytes(out) == _dataset_bytes(reference6)  # the retry rewrote it whole
    assert not _leftovers(out) and verify_dataset(out).ok


@ray_tests
def test_ray_record_that_kills_its_worker_ends_as_under_the_local_pool(
    local_ray, dataset: Path, reference6: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAULT_ENV, "kill:single-0")
    ray_out, local_out = tmp_path / "ray", tmp_path / "local"
    result = build(_options(dataset, ray_out, sps=6), progress=False, runner="ray")
    assert result.ok and len(result.worker_deaths) == 2
    assert build(_options(dataset, local_out, sps=6), workers=2, progress=False).ok
    assert _shards(ray_out) == _shards(local_out)
    rejects = [json.loads(line) for line in (ray_out / "rejects.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rejects if r["reason"] == WORKER_DIED] == ["single-0"]
    assert set(load_index(ray_out).keys) == set(load_index(reference6).keys) - {"000000000"}
    ref = _shards(reference6)
    assert all(_shards(ray_out)[n] == ref[n] for n in ref if n != "000000.tar")


@ray_tests
def test_ray_unit_that_always_kills_its_worker_has_its_records_rejected(
    local_ray, dataset: Path, reference6: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAULT_ENV, "kill-commit:1")
    out = tmp_path / "out"
    result = build(_options(dataset, out, sps=6), progress=False, runner="ray")
    assert result.ok and len(result.worker_deaths) == RetryPolicy().unit_deaths
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert sorted(r["index"] for r in rejects if r["reason"] == WORKER_DIED) == list(range(6, 12))
    ref, got = _shards(reference6), _shards(out)
    assert all(got[n] == ref[n] for n in ref if n != "000001.tar")
    assert not _leftovers(out) and verify_dataset(out).ok


@ray_tests
def test_ray_hung_unit_is_cancelled_by_the_driver_deadline(
    local_ray, dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAULT_ENV, "hang:single-1")
    out = tmp_path / "out"
    policy = RetryPolicy(unit_timeout=3.0)
    result = build(_options(dataset, out, sps=6), progress=False, runner="ray", policy=policy)
    assert result.ok and len(result.worker_deaths) == 2
    assert all("timed out after 3s on record 1" in why for why in result.worker_deaths)
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rejects if r["reason"] == WORKER_DIED] == ["single-1"]
    assert not _leftovers(out) and verify_dataset(out).ok


@ray_tests
def test_ray_retries_oserror_a_few_times_then_fails_only_that_unit(
    local_ray, dataset: Path, reference6: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    (out / "000002.tar" / "blocker").mkdir(parents=True)  # the shard's rename fails: OSError
    result = build(_options(dataset, out, sps=6), progress=False, runner="ray")
    assert list(result.failed_units) == [2]
    assert "UnitIOError" in result.failed_units[2] and "3 attempts" in result.failed_units[2]
    # three attempts, each ended by its OSError (no death counted): the journal tells
    assert [a.ended for a in read_attempts(journal_path(out, 2))] == [True, True, True]
    assert not (out / "manifest.json").exists()
    (out / "000002.tar" / "blocker").rmdir()
    (out / "000002.tar").rmdir()
    again = build(_options(dataset, out, sps=6), progress=False, runner="ray")
    assert again.ok and again.processed_units == [2]
    assert _dataset_bytes(out) == _dataset_bytes(reference6) and not _leftovers(out)
