"""The run's epochs: every epoch's schedule for this rank and the step count all ranks share.

Steps per epoch are equal on every rank: the epoch's micro-batches are planned once and
dealt to (step, rank) slots (:func:`~mvtrain.batching.schedule.all_rank_plans`); with
``--max-steps`` epochs are planned until the steps are reached and the last is cut there.
With several weighted sources (:class:`SourceMix`) each epoch plans its own sample set
(:meth:`SourceMix.epoch_index`), so steps may differ per epoch.

A resumed run starts from the checkpoint's :class:`~mvtrain.batching.position.DataPosition`:
the epochs before it keep the steps they took, its epoch continues its plan by step number
when the settings are the checkpoint's, else the samples not yet trained are planned anew
with this run's settings (a new *segment*, :mod:`mvtrain.batching.position`), and later
epochs are planned whole with this run's settings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mvshards.cost import CostModel
from mvtrain.batching.bucketer import Oversize
from mvtrain.batching.position import (
    DataPosition,
    PlanSettings,
    remainder_index,
    step_of_rows,
)
from mvtrain.batching.schedule import (
    PlanIndex,
    RankPlan,
    all_rank_plans,
    equal_step_plans,
    plan_edges,
    plan_report,
)
from mvtrain.batching.sources import SourceMix
from mvtrain.budgets import Budgets
from mvtrain.distributed import DistInfo
from mvtrain.run_config import RunConfig

REPLAN_EVENT = "resume_replan"
"""The event a resume with other settings records (``events.jsonl``, ``run.json``)."""


@dataclass(frozen=True)
class Segment:
    """The plan an epoch follows from its in-epoch step ``start`` on: the rows not trained
    before it, planned with ``settings``."""

    start: int
    settings: PlanSettings
    before: np.ndarray | None
    """Per row of the epoch's plan index: trained before the segment (None: nothing)."""
    step_of_row: np.ndarray
    """Per row: the segment's step (0-based) that trains it, -1 for none."""
    steps: int

    def trained(self, local: int) -> np.ndarray:
        """Per row: trained once ``local`` steps of the segment are done (``before`` too)."""
        done = (self.step_of_row >= 0) & (self.step_of_row < local)
        return done if self.before is None else done | self.before


@dataclass
class EpochPlans:
    """Every epoch's plan for this rank and the step count all ranks share."""

    steps: list[int]
    plans: dict[int, RankPlan]
    """Per epoch this rank's plan; a resumed epoch's begins at ``segments[e].start``."""
    report: dict[int, dict[str, Any]]
    skipped: dict[int, list[Oversize]] = field(default_factory=dict)
    """Per epoch, the samples over a budget on their own (never trained)."""
    mix: SourceMix | None = None
    """The sources the epochs were planned from (None: a bare plan index)."""
    lengths: list[int] = field(default_factory=list)
    """Steps per epoch before ``--max-steps`` cut the last one (empty: ``steps``)."""
    segments: dict[int, Segment] = field(default_factory=dict)
    settings: PlanSettings | None = None
    """This run's plan settings."""
    seed: int = 0
    change: dict[str, Any] | None = None
    """The resume's re-plan of its epoch (:data:`REPLAN_EVENT`), when the settings changed."""

    def skipped_rows(self) -> list[dict[str, Any]]:
        """One row per skipped sample and epoch: its id and source, its costs alone, the
        reason."""
        source = self.mix.locator.source_of if self.mix is not None else None
        return [
            {
                "epoch": epoch,
                "key": o.sample.key,
                **({"source": source(o.sample.key)} if source is not None else {}),
                "padded_tokens": o.padded_tokens,
                "padded_patches": o.padded_patches,
                "reason": o.reason,
            }
            for epoch, found in sorted(self.skipped.items())
            for o in found
        ]

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, step within the epoch) of a global step."""
        for epoch, n in enumerate(self.steps):
            if step < n:
                return epoch, step
            step -= n
        raise IndexError("step past the planned epochs")

    def plan_start(self, epoch: int) -> int:
        """The in-epoch step at which ``plans[epoch]`` begins (0 but for a re-planned one)."""
        segment = self.segments.get(epoch)
        return segment.start if segment is not None else 0

    def position_at(self, step: int) -> DataPosition:
        """The data position after ``step`` global steps: what a checkpoint saves."""
        assert self.settings is not None
        lengths = self.lengths or self.steps
        start = 0
        for epoch, n in enumerate(lengths):
            if step < start + n:
                segment = self.segments[epoch]
                return DataPosition(
                    step=step,
                    epoch=epoch,
                    epoch_start=start,
                    epoch_steps=tuple(lengths[:epoch]),
                    segment_start=start + segment.start,
                    settings=segment.settings,
                    seed=self.seed,
                    rows=len(segment.step_of_row),
                    before=segment.before,
                    trained=segment.trained(step - start - segment.start),
                )
            start += n
        return DataPosition(
            step=step,
            epoch=len(lengths),
            epoch_start=start,
            epoch_steps=tuple(lengths),
            segment_start=start,
            settings=self.settings,
            seed=self.seed,
            rows=None,
        )


def plan_epochs(
    config: RunConfig,
    index: PlanIndex | SourceMix,
    info: DistInfo,
    cost_model: CostModel,
    resume: DataPosition | None = None,
) -> EpochPlans:
    """Every epoch's plan for ``info.rank`` from ``index`` (the same each epoch) or a mix of
    sources (each epoch its own weighted sample set); per epoch the report of all ranks'
    plans, with per-source counts under ``"sources"`` for a mix. ``resume``: the checkpoint's
    data position (see the module doc)."""
    mix = index if isinstance(index, SourceMix) else None
    budgets = config.budgets
    settings = PlanSettings(info.world_size, config.grad_accum, budgets, config.shuffle_buffer)
    if resume is not None:
        _check_seed(resume, config.seed)
    steps: list[int] = []
    plans: dict[int, RankPlan] = {}
    reports: dict[int, dict[str, Any]] = {}
    skipped: dict[int, list[Oversize]] = {}
    segments: dict[int, Segment] = {}
    change = None
    for epoch in range(config.epoch_limit):
        epoch_index = mix.epoch_index(config.seed, epoch) if mix is not None else index
        assert isinstance(epoch_index, PlanIndex)
        if resume is not None and epoch == resume.epoch:
            segment, rank_plans, change = _resumed_segment(
                epoch_index, resume, settings, epoch, cost_model
            )
        else:
            segment, rank_plans = _segment(
                epoch_index, None, 0, settings, config.seed, epoch, cost_model
            )
        if segment.steps == 0 and segment.start == 0:  # nothing of the epoch trained, or to
            # train: every epoch plans the same samples (or draws) alike
            raise EmptyPlanError(nothing_to_train(epoch_index, rank_plans, budgets))
        n = segment.start + segment.steps
        if resume is not None and epoch < resume.epoch:
            n = resume.epoch_steps[epoch]  # trained already, maybe with other settings
        _, padded = equal_step_plans(rank_plans, config.grad_accum)
        steps.append(n)
        plans[epoch] = padded[info.rank]
        segments[epoch] = segment
        reports[epoch] = plan_report(rank_plans)
        if segment.start:
            reports[epoch]["planned_from_step"] = segment.start
        if mix is not None:
            reports[epoch]["sources"] = mix.plan_counts(rank_plans)
        skipped[epoch] = [o for plan in rank_plans for o in plan.oversize]
        if config.max_steps is not None and sum(steps) >= config.max_steps:
            break
    lengths = list(steps)
    if config.max_steps is not None:
        total, trimmed = config.max_steps, []
        for n in steps:
            trimmed.append(min(n, total))
            total -= trimmed[-1]
        steps = trimmed
    return EpochPlans(
        steps, plans, reports, skipped, mix, lengths, segments, settings, config.seed, change
    )


def _segment(
    epoch_index: PlanIndex,
    before: np.ndarray | None,
    start: int,
    settings: PlanSettings,
    seed: int,
    epoch: int,
    cost_model: CostModel,
) -> tuple[Segment, list[RankPlan]]:
    """The segment of ``epoch`` beginning at in-epoch step ``start``: the rows not in
    ``before`` planned with ``settings`` (bucket edges from the whole epoch's index), and
    every rank's plan of it."""
    whole = before is None or not before.any()
    index = epoch_index if whole else remainder_index(epoch_index, before)
    rank_plans = all_rank_plans(
        index,
        seed,
        epoch,
        settings.world_size,
        settings.budgets,
        cost_model,
        shuffle_buffer=settings.shuffle_buffer,
        grad_accum=settings.grad_accum,
        edges=None if whole else plan_edges(epoch_index),
    )
    n, _ = equal_step_plans(rank_plans, settings.grad_accum)
    local = step_of_rows(index, rank_plans)
    if whole:
        return Segment(start, settings, before, local, n), rank_plans
    assert before is not None
    step_of_row = np.full(len(epoch_index), -1, dtype=np.int64)
    step_of_row[np.flatnonzero(~before)] = local
    return Segment(start, settings, before, step_of_row, n), rank_plans


def _resumed_segment(
    epoch_index: PlanIndex,
    resume: DataPosition,
    settings: PlanSettings,
    epoch: int,
    cost_model: CostModel,
) -> tuple[Segment, list[RankPlan], dict[str, Any] | None]:
    """The segment the resumed epoch continues with: the checkpoint's (same settings, and its
    plan reproduces the trained rows), else the untrained rows planned anew from the
    checkpoint's step with ``settings``; and the change record (None: no change)."""
    if resume.rows is not None and resume.rows != len(epoch_index):
        raise ValueError(
            f"--resume: epoch {epoch} of the checkpoint held {resume.rows} samples, this run's "
            f"holds {len(epoch_index)}: resume with the checkpoint's --shards folders and "
            "weights (or start over with --overwrite)"
        )
    in_epoch = resume.step - resume.epoch_start
    trained = resume.trained
    if resume.settings == settings:
        start = resume.segment_start - resume.epoch_start
        segment, rank_plans = _segment(
            epoch_index, resume.before, start, settings, resume.seed, epoch, cost_model
        )
        if trained is None or np.array_equal(segment.trained(in_epoch - start), trained):
            return segment, rank_plans, None
        changed = ["the checkpoint's plan is not reproduced (another mvtrain version?)"]
    else:
        changed = resume.settings.changes(settings)
    if trained is None:
        trained = np.zeros(len(epoch_index), dtype=bool)
    segment, rank_plans = _segment(
        epoch_index, trained, in_epoch, settings, resume.seed, epoch, cost_model
    )
    change = {
        "event": REPLAN_EVENT,
        "step": resume.step,
        "epoch": epoch,
        "changed": changed,
        "from": resume.settings.as_dict(),
        "to": settings.as_dict(),
        "trained_samples": int(trained.sum()),
        "planned_samples": sum(p.num_samples for p in rank_plans),
        "epoch_steps": segment.start + segment.steps,
        "steps_left_in_epoch": segment.steps,
    }
    return segment, rank_plans, change


def _check_seed(resume: DataPosition, seed: int) -> None:
    if resume.seed != seed:
        raise ValueError(
            f"--resume: the checkpoint was trained with --seed {resume.seed}, this run has "
            f"--seed {seed}: pass --seed {resume.seed} (the seed chooses each epoch's samples "
            "and their order)"
        )


class EmptyPlanError(ValueError):
    """The plan has no micro-batch: nothing to train (the message says why and the fix)."""


def nothing_to_train(index: PlanIndex, plans: list[RankPlan], budgets: Budgets) -> str:
    """Why an epoch holds no micro-batch: how many samples, how many over which budget, the
    largest sample, and the fix."""
    if len(index) == 0:
        return (
            "nothing to train: the index has no samples (the build rejected every record?); "
            "see rejects.jsonl next to the shards and rebuild"
        )
    over = [o for p in plans for o in p.oversize]
    over_tokens = sum(1 for o in over if o.padded_tokens > budgets.tokens)
    over_patches = sum(1 for o in over if o.padded_patches > budgets.patches)
    top_tokens = max(o.padded_tokens for o in over) if over else int(index.tokens.max())
    top_patches = max(o.padded_patches for o in over) if over else int(index.patches.max())
    return (
        f"nothing to train: {len(over)} of {len(index)} samples are over the budgets "
        f"({over_tokens} over --token-budget {budgets.tokens}, {over_patches} over "
        f"--patch-budget {budgets.patches}); the longest alone pads to {top_tokens} tokens, the "
        f"largest to {top_patches} patches: raise the budgets to at least those (see "
        "`mvprep stats` or `mvtrain plan`), or rebuild with a lower --max-res"
    )
