"""Checkpoints: engine state (DeepSpeed or torch) plus the run's data position and RNG.

Layout: ``OUT/checkpoints/step-000012/`` holds the engine's files, ``rank-R.pt`` per rank
(step, RNG states, budgets, learning-rate schedule, events; rank 0's also the data position
and the setup the engine state belongs to), and ``COMPLETE``, written by rank 0 after every
rank has saved. A checkpoint without ``COMPLETE`` (a kill during the save) is never resumed
from. The data position (:class:`~mvtrain.batching.position.DataPosition`) is the set of the
current epoch's samples trained so far and the settings of the plan in progress, so a resume
with the same settings continues that plan by step and one with other settings (world size,
budgets, ``--grad-accum``) plans the rest of the epoch anew. Every rank reads rank 0's file;
a rank restores its own RNG states when the world size is the checkpoint's, else it is
seeded from (seed, step, rank).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mvtrain.batching.position import DataPosition
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
    position: DataPosition | None = None
    """Where the run stands in the data (set before each save; None in checkpoints saved
    before it was recorded: the step alone, with the same settings)."""
    setup: dict[str, Any] | None = None
    """What the engine state belongs to (:func:`mvtrain.resume_checks.setup_record`)."""


@dataclass(frozen=True)
class SavedRun:
    """What rank 0's file of a checkpoint says about the run that wrote it."""

    tag: str
    state: TrainState
    world_size: int


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
    position = state.position if info.is_main and state.position is not None else None
    torch.save(
        {
            "step": state.step,
            "budgets": state.budgets,
            "events": state.events,
            "schedule": state.schedule,
            "rng": _rng_state(),
            "position": position.as_dict() if position is not None else None,
            "setup": state.setup,
        },
        tmp,
    )
    tmp.replace(rank_file)
    barrier()
    if info.is_main:
        (folder / COMPLETE).write_text(f"{state.step}\n")
    barrier()
    return folder


def read_checkpoint(output: Path, tag: str) -> SavedRun:
    """The run state rank 0 saved in checkpoint ``tag`` (every rank reads the same file)."""
    folder = checkpoint_root(output) / tag
    saved = torch.load(folder / "rank-0.pt", map_location="cpu", weights_only=False)
    setup = saved.get("setup")
    world_size = int(setup["world_size"]) if setup else len(list(folder.glob("rank-*.pt")))
    position = saved.get("position")
    state = TrainState(
        step=saved["step"],
        budgets=Budgets.of(saved["budgets"]),
        events=saved["events"],
        schedule=saved.get("schedule"),
        position=DataPosition.of(position) if position is not None else None,
        setup=setup,
    )
    return SavedRun(tag, state, world_size)


def load_checkpoint(
    output: Path, saved: SavedRun, engine: Engine, info: DistInfo, seed: int, engine_tag: str = ""
) -> TrainState:
    """Load the engine state of ``saved`` (``engine_tag``: a folder in the checkpoint's to
    load it from instead, such as a re-partitioned copy) and restore this rank's RNG states
    (the same world size), else seed them from (``seed``, step, rank); ``saved``'s state."""
    root = checkpoint_root(output)
    if engine_tag:
        engine.load(root / saved.tag, engine_tag)
    else:
        engine.load(root, saved.tag)
    state = saved.state
    if saved.world_size == info.world_size:
        rank_file = root / saved.tag / f"rank-{info.rank}.pt"
        _set_rng_state(torch.load(rank_file, map_location="cpu", weights_only=False)["rng"])
    else:
        seed_rng(seed, state.step, info.rank)
    return replace(state, events=list(state.events))


def seed_rng(seed: int, step: int, rank: int) -> None:
    """Seed every RNG of this rank from (``seed``, ``step``, ``rank``): a rank of another
    world size has no saved states of its own."""
    entropy = np.random.SeedSequence([seed, step, rank]).generate_state(2)
    value = int(entropy[0]) << 32 | int(entropy[1])
    random.seed(value)
    np.random.seed(int(entropy[0]))
    torch.manual_seed(value)
