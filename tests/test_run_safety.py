"""Runs that cannot collide or outlive their launcher: one live run per output folder
(``OUT/run.lock``), ranks that die with a SIGKILLed launcher, and a SIGKILLed rank that ends
the run instead of hanging it; the folder stays resumable."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from run_helpers import MVTRAIN, PATCHES, TOKENS, _env, _losses

from mvtrain.run_folder import LOCK_FILE, release_run_lock, take_run_lock

HOST = socket.gethostname()


def _write_lock(out: Path, host: str, pid: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / LOCK_FILE
    path.write_text(json.dumps({"host": host, "pid": pid, "started": 0.0}))
    return path


def test_a_live_holder_is_named_and_refused(tmp_path: Path) -> None:
    holder = subprocess.Popen(["sleep", "60"])
    try:
        _write_lock(tmp_path, HOST, holder.pid)
        with pytest.raises(ValueError) as refused:
            take_run_lock(tmp_path)
        assert str(refused.value).startswith(
            f"{tmp_path} is in use by mvtrain pid {holder.pid} on host {HOST} since "
        )
        assert str(refused.value).endswith(": wait for that run to end or stop it; one run "
                                           "per output folder")  # fmt: skip
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_holder_is_taken_over_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    _write_lock(tmp_path, HOST, dead.pid)
    with caplog.at_level(logging.WARNING, logger="mvtrain"):
        path = take_run_lock(tmp_path)
    assert f"taking over the lock of mvtrain pid {dead.pid}" in caplog.text
    assert json.loads(path.read_text())["pid"] == os.getpid()
    assert take_run_lock(tmp_path) == path, "the holder may take it again (a notebook)"
    release_run_lock(path)
    assert not path.exists()


def test_a_lock_from_another_host_is_refused_with_the_way_out(tmp_path: Path) -> None:
    path = _write_lock(tmp_path, "some-other-node", 12345)
    with pytest.raises(ValueError, match=f"another host: if that run is dead, delete {path}"):
        take_run_lock(tmp_path)
    release_run_lock(path)
    assert path.exists(), "a lock this process does not hold is never removed"


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(x) for x in text]
    return found


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")  # a zombie nobody reaped is dead too


def _start(out: Path, shards: Path, *extra: str) -> subprocess.Popen[str]:
    cmd = [*MVTRAIN, "--shards", str(shards), "--model", "tiny", "--output", str(out)]
    cmd += ["--token-budget", str(TOKENS), "--patch-budget", str(PATCHES), "--lr", "3e-3"]
    cmd += ["--no-progress", "--engine", "torch", "--nproc-per-node", "2", "--max-steps", "5"]
    cmd += ["--save-every", "1", "--no-export", *extra]
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()
    )


def _wait_for_checkpoint(out: Path, proc: subprocess.Popen[str], step: int) -> None:
    marker = out / "checkpoints" / f"step-{step:06d}" / "COMPLETE"
    deadline = time.monotonic() + 240
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.05)


@pytest.mark.slow
def test_ranks_die_with_a_sigkilled_launcher_and_the_run_resumes(
    shards: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    launcher = _start(out, shards)
    _wait_for_checkpoint(out, launcher, 2)
    ranks = _children(launcher.pid)
    assert len(ranks) == 2
    launcher.kill()
    launcher.communicate()
    killed = time.monotonic()
    while not all(_gone(pid) for pid in ranks):
        assert time.monotonic() - killed < 10, "ranks outlived their launcher by 10 s"
        time.sleep(0.05)
    assert (out / LOCK_FILE).exists(), "a killed run leaves its lock behind"
    resumed = _start(out, shards, "--resume")
    _, stderr = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, stderr[-3000:]
    assert "taking over the lock" in stderr
    assert sorted(_losses(out)) == list(range(1, 6))
    assert not (out / LOCK_FILE).exists(), "a finished run releases its lock"


@pytest.mark.slow
def test_a_sigkilled_rank_ends_the_run_in_one_line(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    launcher = _start(out, shards)
    _wait_for_checkpoint(out, launcher, 1)
    ranks = _children(launcher.pid)
    os.kill(ranks[1], signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = launcher.communicate(timeout=120)
    assert time.monotonic() - killed < 30, "the other rank was not ended in time"
    assert launcher.returncode == 137, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines[-1] == (
        "mvtrain: error: rank 1 was killed by SIGKILL (the out-of-memory killer? see `dmesg`)"
    ), stderr[-3000:]
    assert "Traceback" not in stderr
    assert all(_gone(pid) for pid in ranks)
