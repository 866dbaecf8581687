"""What a run folder promises: one run per folder (a second one needs ``--resume`` or
``--overwrite``), ``--resume`` needs a checkpoint and keeps the learning-rate schedule unless
``--schedule-change``, and ``metrics.jsonl`` logs the learning rate each step used (not the
next step's)."""

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


def _steps(out: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def _cosine(peak: float, total: int, k: int) -> float:
    """The rate of 0-based step ``k`` of ``total`` without warm-up."""
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * k / total)))


def test_a_second_run_is_refused_and_overwrite_starts_afresh(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = _run(shards, out, "--max-steps", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    (out / "notes.txt").write_text("mine\n")
    metrics = (out / "metrics.jsonl").read_bytes()

    again = _run(shards, out, "--max-steps", "3")
    assert again.returncode != 0
    assert f"{out} already holds a run (" in again.stderr
    assert "--resume" in again.stderr and "--overwrite" in again.stderr
    assert (out / "metrics.jsonl").read_bytes() == metrics

    fresh = _run(shards, out, "--max-steps", "3", "--overwrite")
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert "--overwrite: deleted" in fresh.stderr
    assert _steps(out) == [1, 2, 3]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000003"]
    assert (out / "notes.txt").read_text() == "mine\n"
    assert (out / "cache").is_dir()


def test_resume_and_overwrite_together_are_refused(shards: Path, tmp_path: Path) -> None:
    proc = _run(shards, tmp_path / "run", "--max-steps", "1", "--resume", "--overwrite")
    assert proc.returncode != 0
    assert "pick one" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_resume_keeps_the_schedule_unless_a_change_is_allowed(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = _run(shards, out, "--max-steps", "3", "--lr", "1e-3")
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["lr_schedule"]["total_steps"] == 3
    metrics = (out / "metrics.jsonl").read_bytes()
    logged = [json.loads(x)["lr"] for x in metrics.decode().splitlines()]
    # the rate each step used: no warm-up, cosine from the peak (step 1) towards 10% of it
    expected = [1e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi * k / 3))) for k in range(3)]
    assert logged == pytest.approx(expected, rel=1e-9)
    assert logged[0] == pytest.approx(1e-3)

    refused = _run(shards, out, "--max-steps", "5", "--lr", "1e-3", "--resume")
    assert refused.returncode != 0
    assert "3 total steps" in refused.stderr and "5 total steps" in refused.stderr
    assert "--schedule-change" in refused.stderr
    assert (out / "metrics.jsonl").read_bytes() == metrics

    args = ("--max-steps", "5", "--lr", "1e-3", "--resume", "--schedule-change")
    changed = _run(shards, out, *args)
    assert changed.returncode == 0, changed.stderr[-3000:]
    lrs = [json.loads(x)["lr"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert _steps(out) == [1, 2, 3, 4, 5]
    old = [_cosine(1e-3, 3, k) for k in range(3)]
    assert lrs == pytest.approx(old + [_cosine(1e-3, 5, k) for k in (3, 4)], rel=1e-9)
    record = json.loads((out / "run.json").read_text())
    assert record["lr_schedule"]["total_steps"] == 5
    [change] = record["lr_schedule_changes"]
    assert change["step"] == 3
    assert (change["from"]["total_steps"], change["to"]["total_steps"]) == (3, 5)


def test_a_changed_peak_applies_from_the_resumed_step() -> None:
    import torch

    from mvtrain.engine import lr_lambda
    from mvtrain.lr_schedule import LrSchedule, apply_schedule

    def restored(lr: float, total: int, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(0, total))
        for _ in range(steps):
            optimizer.step()
            scheduler.step()
        return scheduler

    old = restored(1e-3, 4, 2)
    new = restored(5e-3, 8, 0)
    new.optimizer.load_state_dict(old.optimizer.state_dict())
    new.load_state_dict(old.state_dict())
    apply_schedule(new, LrSchedule(5e-3, 0, 8))
    assert new.optimizer.param_groups[0]["lr"] == pytest.approx(_cosine(5e-3, 8, 2))
    new.optimizer.step()
    new.step()
    assert new.optimizer.param_groups[0]["lr"] == pytest.approx(_cosine(5e-3, 8, 3))
