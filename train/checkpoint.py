"""Checkpoints: engine state (DeepSpeed or torch) plus each rank's data position and RNG.

Layout: ``OUT/checkpoints/step-000012/`` holds the engine's files, ``rank-R.pt`` per rank
(data position, RNG states, budgets, learning-rate schedule), and ``COMPLETE``, written by
rank 0 after every rank has saved. A checkpoint without ``COMPLETE`` (a kill during the
save) is never resumed from. The data position is the global optimizer step: the batch plan
is a pure function of the index, the seed and the epoch, so a resumed run recomputes it and
skips to that step.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mvtrain.budgets import Budgets
from mvtrain.distributed import DistInfo, barrier
from mvtrain.engine import Engine

COMPLETE = "COMPLETE"
_TAG = re.compile(r"^step-(\d{6,})$")


def tag_for(step: int) -> str:
    return f"step-{step:06d}"


def checkpoint_root(output: Path) -> Path:
    return Path(output) / "checkpoints"


def newest_checkpoint(output: Path) -> tuple[int, str] | None:
    """(step, tag) of the newest complete checkpoint in ``output``, or None."""
    root = checkpoint_root(output)
    if not root.is_dir():
        return None
    found = []
    for child in root.iterdir():
        match = _TAG.match(child.name)
        if match and (child / COMPLETE).exists():
            found.append((int(match.group(1)), child.name))
    return max(found) if found else None


@dataclass
class TrainState:
    """What a rank needs besides the engine to continue exactly where it stopped."""

    step: int
    budgets: Budgets
    """The budgets in force (the planned ones until an out-of-memory error lowers them)."""
    events: list[dict[str, Any]] = field(default_factory=list)
    """Things that changed the run (e.g. OOM budget changes), kept across resumes."""
    schedule: dict[str, Any] | None = None
    """The learning-rate schedule in force (:class:`mvtrain.lr_schedule.LrSchedule` as a dict);
    None in checkpoints saved before it was recorded."""


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def capture_rng() -> dict[str, Any]:
    """Every RNG state a rank's training consumes (Python, numpy, torch, CUDA): what
    :func:`restore_rng` puts back, e.g. around an evaluation."""
    return _rng_state()


def restore_rng(state: dict[str, Any]) -> None:
    """Put back the RNG states :func:`capture_rng` returned."""
    _set_rng_state(state)


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(output: Path, engine: Engine, state: TrainState, info: DistInfo) -> Path:
    root = checkpoint_root(output)
    tag = tag_for(state.step)
    folder = root / tag
    folder.mkdir(parents=True, exist_ok=True)
    engine.save(root, tag)
    rank_file = folder / f"rank-{info.rank}.pt"
    tmp = rank_file.with_suffix(".pt.tmp")
    torch.save(
        {
            "step": state.step,
            "budgets": state.budgets,
            "events": state.events,
            "schedule": state.schedule,
            "rng": _rng_state(),
        },
        tmp,
    )
    tmp.replace(rank_file)
    barrier()
    if info.is_main:
        (folder / COMPLETE).write_text(f"{state.step}\n")
    barrier()
    return folder


def load_checkpoint(output: Path, tag: str, engine: Engine, info: DistInfo) -> TrainState:
    root = checkpoint_root(output)
    rank_file = root / tag / f"rank-{info.rank}.pt"
    if not rank_file.exists():
        raise FileNotFoundError(
            f"{rank_file} is missing: the checkpoint was written by a run with a different "
            "number of processes; resume with the same --nproc-per-node"
        )
    engine.load(root, tag)
    saved = torch.load(rank_file, map_location="cpu", weights_only=False)
    _set_rng_state(saved["rng"])
    budgets = Budgets.of(saved["budgets"])
    return TrainState(
        step=saved["step"],
        budgets=budgets,
        events=saved["events"],
        schedule=saved.get("schedule"),
    )
