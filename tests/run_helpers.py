"""Shared helpers of the tests that run the trainer's CLI in a subprocess (test_train_run,
test_oom_recovery): the command, the budgets, a clean environment, and readers of a run's
outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

MVTRAIN = [sys.executable, "-m", "mvtrain.cli", "run"]
TOKENS, PATCHES = 1024, 4096


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def _train(
    shards: Path, out: Path, *args: str, env: dict[str, str] | None = None, check: bool = True
):
    cmd = [*MVTRAIN, "--shards", str(shards), "--model", "tiny", "--output", str(out)]
    cmd += ["--token-budget", str(TOKENS), "--patch-budget", str(PATCHES), "--lr", "3e-3"]
    cmd += ["--no-progress", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env or _env())
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


TWO_RANK_ARGS = ("--nproc-per-node", "2", "--max-steps", "6", "--epochs", "4", "--save-every", "2")
"""The 2-rank DeepSpeed run of the ``two_rank_run`` fixture (conftest)."""


def _losses(out: Path) -> dict[int, float]:
    """The training loss of every step (a row of an eval alone, step 0, has none)."""
    found: dict[int, float] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record or "eval_loss" not in record:
            found[record["step"]] = record["loss"]  # a resumed run rewrites steps: keep the last
    return found


def _digests(out: Path) -> set[str]:
    return {p.read_text().strip() for p in out.glob("params-rank*.sha256")}
