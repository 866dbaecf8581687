"""OOM recovery with the real exception type injected at a cost threshold, 1 and 2 ranks."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import torch
from run_helpers import MVTRAIN, PATCHES, TOKENS, _digests, _env, _losses, _train

from mvtrain.budgets import Budgets

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow  # subprocess runs, DeepSpeed

THRESHOLD = 500  # padded tokens; the plan (budget 1024) has micro-batches above it
RANK1_THRESHOLD = 440
"""For the faults on rank 1 only: the 2-rank plan's rank 1 has micro-batches above it."""


def _events(out: Path) -> list[dict]:
    path = out / "events.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _batches(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "batches.jsonl").read_text().splitlines()]


def _saved_budgets(out: Path, rank: int = 0) -> Budgets:
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    state = torch.load(ckpts[-1] / f"rank-{rank}.pt", map_location="cpu", weights_only=False)
    return state["budgets"]  # a checkpoint stores the Budgets value as it is


def _planned_keys(shards: Path, out: Path) -> list[str]:
    dry = out.parent / (out.name + "-dry")
    _train(shards, dry, "--dry-run", "--max-steps", "4", "--batch-log", str(dry / "b.jsonl"))
    lines = [json.loads(x) for x in (dry / "b.jsonl").read_text().splitlines()]
    return sorted(k for line in lines if line["weight"] > 0 for k in line["keys"])


@pytest.mark.parametrize("engine", ["torch", "deepspeed"])
def test_forward_oom_splits_lowers_budgets_and_trains_everything(
    shards: Path, tmp_path: Path, engine: str
) -> None:
    out = tmp_path / "run"
    _train(
        shards,
        out,
        "--engine",
        engine,
        "--max-steps",
        "4",
        "--batch-log",
        str(out / "batches.jsonl"),
        env=_env(MVTRAIN_FAULT=f"oom-forward:{THRESHOLD}"),
    )
    events = _events(out)
    assert events and all(e["phase"] == "forward" for e in events)
    budgets = _saved_budgets(out)
    assert isinstance(budgets, Budgets) and budgets.tokens <= THRESHOLD, budgets
    batches = _batches(out)
    assert all(b["padded_tokens"] <= THRESHOLD for b in batches)
    trained = sorted(k for b in batches if b["weight"] > 0 for k in b["keys"])
    assert trained == _planned_keys(shards, out), "a split lost or duplicated samples"
    assert all(torch.isfinite(torch.tensor(v)) for v in _losses(out).values())


def test_an_oom_on_one_rank_does_not_hang_the_other(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    _train(
        shards,
        out,
        "--nproc-per-node",
        "2",
        "--max-steps",
        "3",
        "--batch-log",
        str(out / "batches.jsonl"),
        env=_env(MVTRAIN_FAULT=f"oom-forward-rank1:{RANK1_THRESHOLD}"),
    )
    events = _events(out)
    assert events and {e["rank"] for e in events} == {1}
    assert _saved_budgets(out, 0) == _saved_budgets(out, 1)
    assert _saved_budgets(out, 0).tokens <= RANK1_THRESHOLD
    assert len(_digests(out)) == 1
    pieces = [b for b in _batches(out) if b["rank"] == 1 and b["weight"] > 0]
    for event in events:  # rank 1 trained the failed micro-batch's samples in smaller pieces
        trained = [
            b for b in pieces if b["step"] == event["step"] and set(b["keys"]) <= set(event["keys"])
        ]
        assert sorted(k for b in trained for k in b["keys"]) == sorted(event["keys"])
        assert all(b["padded_tokens"] <= RANK1_THRESHOLD for b in trained)


def test_backward_oom_replays_the_window_with_the_torch_engine(shards: Path, tmp_path: Path):
    out = tmp_path / "run"
    _train(
        shards,
        out,
        "--engine",
        "torch",
        "--max-steps",
        "3",
        "--batch-log",
        str(out / "batches.jsonl"),
        env=_env(MVTRAIN_FAULT=f"oom-backward:{THRESHOLD}"),
    )
    events = _events(out)
    assert events and events[0]["phase"] == "backward" and events[0]["action"] == "replay window"
    assert _saved_budgets(out).tokens <= THRESHOLD


def test_backward_oom_under_deepspeed_stops_with_the_budgets_to_restart_from(
    shards: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    proc = _train(
        shards,
        out,
        "--max-steps",
        "3",
        env=_env(MVTRAIN_FAULT=f"oom-backward:{THRESHOLD}"),
        check=False,
    )
    assert proc.returncode != 0
    assert "--resume --token-budget" in proc.stderr + proc.stdout


def test_backward_oom_on_one_rank_under_deepspeed_ends_the_run_with_its_restart_budgets(
    shards: Path, tmp_path: Path
) -> None:
    """Rank 0 waits inside ZeRO's backward reduce while rank 1 runs out of memory in
    backward: no agreement is possible, so rank 1 writes the budgets and exits at once and
    the launcher ends rank 0 (on NCCL anything else hangs until the watchdog)."""
    out = tmp_path / "run"
    cmd = [*MVTRAIN, "--shards", str(shards), "--model", "tiny", "--output", str(out)]
    cmd += ["--token-budget", str(TOKENS), "--patch-budget", str(PATCHES), "--no-progress"]
    cmd += ["--nproc-per-node", "2", "--max-steps", "3"]
    env = _env(MVTRAIN_FAULT=f"oom-backward-rank1:{RANK1_THRESHOLD}")
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode != 0
    assert time.monotonic() - started < 180
    restart = json.loads((out / "restart.json").read_text())
    assert restart["rank"] == 1
    assert restart["token_budget"] < restart["padded_tokens"]
    options = f"--resume --token-budget {restart['token_budget']} --patch-budget "
    assert options + str(restart["patch_budget"]) == restart["resume_options"]
    assert proc.stderr.count(restart["resume_options"]) == 1, proc.stderr[-3000:]
