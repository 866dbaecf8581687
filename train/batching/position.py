"""The data position of a run: which samples of the current epoch are trained, and the plan
the rest follows.

An epoch's samples are the rows of its plan index (one source: the index; a mix: its
:meth:`~mvtrain.batching.sources.SourceMix.epoch_index`, where each weighted copy is a row of
its own). A run trains an epoch in one or more *segments*. A segment is the plan of the rows
not trained when it began, made with the settings then in force (:class:`PlanSettings`: world
size, ``--grad-accum``, budgets, shuffle buffer) from (index, seed, epoch, settings, trained
rows) alone. An uninterrupted run, or one resumed with the same settings, trains an epoch in
one segment: its whole plan, continued by step number. A resume with other settings ends the
segment at the checkpoint's step and plans the rows not yet trained anew
(:func:`remainder_index`), so every sample of the epoch is trained exactly once and a second
resume of the same kind plans the same.

A checkpoint stores the :class:`DataPosition`: the epoch, where it and its segment began, the
segment's settings, and the trained rows (a bit per row), before the segment and at the
checkpoint's step.

Pure numpy; no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mvtrain.batching.plan_index import PlanIndex
from mvtrain.batching.schedule import RankPlan
from mvtrain.budgets import Budgets


@dataclass(frozen=True)
class PlanSettings:
    """The inputs of an epoch's plan that a resume may change (besides index, seed, epoch)."""

    world_size: int
    grad_accum: int
    budgets: Budgets
    """The budgets the plan was made with (``--token-budget``, ``--patch-budget``)."""
    shuffle_buffer: int = 1000

    def as_dict(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "grad_accum": self.grad_accum,
            "token_budget": self.budgets.tokens,
            "patch_budget": self.budgets.patches,
            "shuffle_buffer": self.shuffle_buffer,
        }

    @classmethod
    def of(cls, record: dict[str, Any]) -> PlanSettings:
        return cls(
            world_size=int(record["world_size"]),
            grad_accum=int(record["grad_accum"]),
            budgets=Budgets(int(record["token_budget"]), int(record["patch_budget"])),
            shuffle_buffer=int(record.get("shuffle_buffer", 1000)),
        )

    def changes(self, new: PlanSettings) -> list[str]:
        """What differs from ``self`` in ``new``, e.g. ``["world size 2 -> 1"]``."""
        out = []
        for name, old_value, new_value in (
            ("world size", self.world_size, new.world_size),
            ("--grad-accum", self.grad_accum, new.grad_accum),
            ("--token-budget", self.budgets.tokens, new.budgets.tokens),
            ("--patch-budget", self.budgets.patches, new.budgets.patches),
            ("shuffle buffer", self.shuffle_buffer, new.shuffle_buffer),
        ):
            if old_value != new_value:
                out.append(f"{name} {old_value} -> {new_value}")
        return out


def _pack(mask: np.ndarray | None) -> np.ndarray | None:
    return None if mask is None else np.packbits(mask.astype(bool))


def _unpack(packed: Any, rows: int | None) -> np.ndarray | None:
    if packed is None or rows is None:
        return None
    return np.unpackbits(np.asarray(packed, dtype=np.uint8), count=rows).astype(bool)


@dataclass(frozen=True)
class DataPosition:
    """Where a checkpoint stands in the data: saved with it, read back by ``--resume``."""

    step: int
    """The checkpoint's global step."""
    epoch: int
    epoch_start: int
    """The global step at which ``epoch`` began."""
    epoch_steps: tuple[int, ...]
    """The steps each earlier epoch took (as trained, whatever the settings were then)."""
    segment_start: int
    """The global step at which the segment in progress began."""
    settings: PlanSettings
    """The segment's plan inputs."""
    seed: int
    rows: int | None
    """Rows of the epoch's plan index (None: the epoch is not planned yet, nothing trained)."""
    before: np.ndarray | None = None
    """Per row: trained before the segment began (None: nothing)."""
    trained: np.ndarray | None = None
    """Per row: trained by the checkpoint's step, ``before`` included (None: nothing)."""

    @property
    def trained_count(self) -> int:
        return 0 if self.trained is None else int(self.trained.sum())

    def as_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "epoch_start": self.epoch_start,
            "epoch_steps": list(self.epoch_steps),
            "segment_start": self.segment_start,
            "settings": self.settings.as_dict(),
            "seed": self.seed,
            "rows": self.rows,
            "before": _pack(self.before),
            "trained": _pack(self.trained),
            "trained_count": self.trained_count,
        }

    @classmethod
    def of(cls, record: dict[str, Any]) -> DataPosition:
        rows = record["rows"]
        return cls(
            step=int(record["step"]),
            epoch=int(record["epoch"]),
            epoch_start=int(record["epoch_start"]),
            epoch_steps=tuple(int(n) for n in record["epoch_steps"]),
            segment_start=int(record["segment_start"]),
            settings=PlanSettings.of(record["settings"]),
            seed=int(record["seed"]),
            rows=None if rows is None else int(rows),
            before=_unpack(record.get("before"), rows),
            trained=_unpack(record.get("trained"), rows),
        )


def remainder_index(index: PlanIndex, trained: np.ndarray) -> PlanIndex:
    """``index`` without the ``trained`` rows: the same shards (some may be empty now), the
    other rows in dataset order."""
    keep = ~np.asarray(trained, dtype=bool)
    return PlanIndex(
        keys=index.keys[keep],
        shard_ids=index.shard_ids[keep],
        num_shards=index.num_shards,
        tokens=index.tokens[keep],
        patches=index.patches[keep],
        slices=index.slices[keep],
        max_patches_per_slice=index.max_patches_per_slice[keep],
    )


def step_of_rows(index: PlanIndex, plans: Sequence[RankPlan]) -> np.ndarray:
    """Per row of ``index``, the optimizer step of ``plans`` (every rank's plan of ``index``)
    that trains it; -1 for a row no step trains (over a budget). A key ``index`` holds k times
    (weighted copies) is trained k times: its occurrences take its rows in row order."""
    keys: list[str] = []
    steps: list[int] = []
    for plan in plans:
        for position, batch in enumerate(plan.batches):
            if batch.is_filler:
                continue
            keys.extend(batch.keys)
            steps.extend([position // plan.grad_accum] * batch.num_samples)
    out = np.full(len(index), -1, dtype=np.int64)
    if not keys:
        return out
    order = np.argsort(index.keys, kind="stable")
    sorted_keys = index.keys[order]
    occ_keys = np.asarray(keys, dtype=sorted_keys.dtype)
    occ_steps = np.asarray(steps, dtype=np.int64)
    by_key = np.lexsort((occ_steps, occ_keys))
    occ_keys, occ_steps = occ_keys[by_key], occ_steps[by_key]
    first = np.searchsorted(sorted_keys, occ_keys, side="left")
    at = np.arange(len(occ_keys))
    new_key = np.ones(len(occ_keys), dtype=bool)
    new_key[1:] = occ_keys[1:] != occ_keys[:-1]
    within = at - np.maximum.accumulate(np.where(new_key, at, 0))
    slot = first + within
    inside = np.minimum(slot, len(sorted_keys) - 1)
    bad = (slot >= len(sorted_keys)) | (sorted_keys[inside] != occ_keys)
    if bad.any():
        raise ValueError(
            f"sample {occ_keys[bad][0]} is planned more often than the epoch holds it: the plan "
            "does not belong to this index"
        )
    out[order[slot]] = occ_steps
    return out
