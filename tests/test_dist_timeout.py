"""Collective timeouts (``--dist-timeout``) with 2 real processes on gloo, and the launcher's
environment (the CUDA allocator default)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from mvtrain import cli
from mvtrain import launch as launch_module
from mvtrain.distributed import DEFAULT_ALLOC_CONF, alloc_conf_env, ensure_alloc_conf
from mvtrain.loop import RunResult

SLEEP_S = 8
"""How long rank 0 sleeps after recounting its share of the lengths, before the all-gather
of the counts the others wait in."""

LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
ALLOC_ENV = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def _two_ranks(shards: Path, out: Path, engine: str, timeout_minutes: float):
    """A 1-step run on 2 processes whose rank 0 is slow to recount; (process, seconds)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update(OMP_NUM_THREADS="1", MVTRAIN_FAULT=f"slow-recount:{SLEEP_S}")
    cmd = [sys.executable, "-m", "mvtrain.cli", "run", "--shards", str(shards)]
    cmd += ["--model", "tiny", "--output", str(out), "--token-budget", "1024"]
    cmd += ["--patch-budget", "4096", "--no-progress", "--no-export", "--max-steps", "1"]
    cmd += ["--engine", engine, "--nproc-per-node", "2", "--dist-timeout", str(timeout_minutes)]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    return proc, time.monotonic() - started


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_a_timeout_shorter_than_rank_0s_recount_fails_the_run(
    shards: Path, tmp_path: Path, engine: str
) -> None:
    if engine == "deepspeed":
        pytest.importorskip("deepspeed")
    proc, _ = _two_ranks(shards, tmp_path / "out", engine, timeout_minutes=0.08)  # 4.8 s
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-3000:]
    assert "Timed out waiting 4800ms" in output, output[-6000:]
    assert "in gather_counts" in output, "the timeout was not in the gather of the counts"
    # (ranks that wait in this gather within the timeout go on: every 2-rank run of the
    # suite does, under the default --dist-timeout)


@pytest.mark.slow
def test_run_options_reach_the_config(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = []

    def fake_run(config: Any) -> RunResult:
        seen.append(config)
        return RunResult(steps_done=0, output=config.output)

    monkeypatch.setattr("mvtrain.loop.run", fake_run)
    base = ["run", "--shards", str(shards), "--model", "tiny", "--output", str(tmp_path)]
    for extra, workers, minutes in (
        ([], None, 60.0),
        (["--loader-workers", "auto", "--dist-timeout", "0.5"], None, 0.5),
        (["--loader-workers", "0"], 0, 60.0),
        (["--loader-workers", "3", "--dist-timeout", "120"], 3, 120.0),
    ):
        result = CliRunner().invoke(cli.main, base + extra)
        assert result.exit_code == 0, result.output
        assert (seen[-1].loader_workers, seen[-1].dist_timeout_minutes) == (workers, minutes)
    result = CliRunner().invoke(cli.main, [*base, "--loader-workers", "many"])
    assert result.exit_code == 2 and "--loader-workers takes a count" in result.output


def test_alloc_conf_defaults_unless_the_user_set_one() -> None:
    expandable = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    assert expandable["PYTORCH_CUDA_ALLOC_CONF"] == DEFAULT_ALLOC_CONF
    assert alloc_conf_env({"PATH": "/bin"}) == expandable
    assert alloc_conf_env({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:64"}) == {}
    assert alloc_conf_env({"PYTORCH_ALLOC_CONF": "expandable_segments:False"}) == {}
    assert alloc_conf_env({"PYTORCH_CUDA_ALLOC_CONF": ""}) == {}


def test_ensure_alloc_conf_sets_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ALLOC_ENV:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    assert ensure_alloc_conf() == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:64")
    assert ensure_alloc_conf() == {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:64"}


def test_launch_passes_the_allocator_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ALLOC_ENV + ("OMP_NUM_THREADS",):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    env = launch_module.rank_env(launch_module.launch_env(os.environ), 1, 2, 29500, "/tmp/e")
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert env["OMP_NUM_THREADS"] == "1"
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]) == ("1", "1", "2")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("127.0.0.1", "29500")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "backend:cudaMallocAsync")
    env = launch_module.launch_env(os.environ)
    assert "PYTORCH_CUDA_ALLOC_CONF" not in env
    assert env["PYTORCH_ALLOC_CONF"] == "backend:cudaMallocAsync"
