"""What a run folder promises: ``--resume`` needs a checkpoint, and ``metrics.jsonl`` logs
the learning rate each step used (not the next step's)."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest
from run_helpers import MVTRAIN, PATCHES, TOKENS, _env

pytestmark = pytest.mark.slow


def _run(shards: Path, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [*MVTRAIN, "--shards", str(shards), "--model", "tiny", "--output", str(out)]
    cmd += ["--token-budget", str(TOKENS), "--patch-budget", str(PATCHES), "--no-progress"]
    cmd += ["--engine", "torch", "--no-export", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())


def test_resume_without_a_checkpoint_is_an_error(shards: Path, tmp_path: Path) -> None:
    proc = _run(shards, tmp_path / "empty", "--max-steps", "1", "--resume")
    assert proc.returncode != 0
    assert "has no complete checkpoint to resume from" in proc.stderr
    assert not (tmp_path / "empty" / "metrics.jsonl").exists()


def test_metrics_log_the_rate_each_step_used(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    proc = _run(shards, out, "--max-steps", "3", "--lr", "1e-3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = [json.loads(x)["lr"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    # no warm-up: cosine from the peak (step 1) towards 10% of it over the 3 steps
    expected = [1e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi * k / 3))) for k in range(3)]
    assert logged == pytest.approx(expected, rel=1e-9)
    assert logged[0] == pytest.approx(1e-3)
