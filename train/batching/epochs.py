"""The run's epochs: every epoch's schedule for this rank and the step count all ranks share.

Steps per epoch are equal on every rank: the epoch's micro-batches are planned once and
dealt to (step, rank) slots (:func:`~mvtrain.batching.schedule.all_rank_plans`); with
``--max-steps`` epochs are planned until the steps are reached and the last is cut there.
With several weighted sources (:class:`SourceMix`) each epoch plans its own sample set
(:meth:`SourceMix.epoch_index`), so steps may differ per epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mvshards.cost import CostModel
from mvtrain.batching.bucketer import Oversize
from mvtrain.batching.schedule import (
    PlanIndex,
    RankPlan,
    all_rank_plans,
    equal_step_plans,
    plan_report,
)
from mvtrain.batching.sources import SourceMix
from mvtrain.budgets import Budgets
from mvtrain.distributed import DistInfo
from mvtrain.run_config import RunConfig


@dataclass
class EpochPlans:
    """Every epoch's plan for this rank and the step count all ranks share."""

    steps: list[int]
    plans: dict[int, RankPlan]
    report: dict[int, dict[str, Any]]
    skipped: dict[int, list[Oversize]] = field(default_factory=dict)
    """Per epoch, the samples over a budget on their own (never trained)."""
    mix: SourceMix | None = None
    """The sources the epochs were planned from (None: a bare plan index)."""

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


def plan_epochs(
    config: RunConfig, index: PlanIndex | SourceMix, info: DistInfo, cost_model: CostModel
) -> EpochPlans:
    """Every epoch's plan for ``info.rank`` from ``index`` (the same each epoch) or a mix of
    sources (each epoch its own weighted sample set); per epoch the report of all ranks'
    plans, with per-source counts under ``"sources"`` for a mix."""
    mix = index if isinstance(index, SourceMix) else None
    budgets = config.budgets
    steps: list[int] = []
    plans: dict[int, RankPlan] = {}
    reports: dict[int, dict[str, Any]] = {}
    skipped: dict[int, list[Oversize]] = {}
    for epoch in range(config.epoch_limit):
        epoch_index = mix.epoch_index(config.seed, epoch) if mix is not None else index
        assert isinstance(epoch_index, PlanIndex)
        rank_plans = all_rank_plans(
            epoch_index,
            config.seed,
            epoch,
            info.world_size,
            budgets,
            cost_model,
            shuffle_buffer=config.shuffle_buffer,
            grad_accum=config.grad_accum,
        )
        n, padded = equal_step_plans(rank_plans, config.grad_accum)
        if n == 0:  # every epoch plans the same samples (or draws) under the same budgets
            raise EmptyPlanError(nothing_to_train(epoch_index, rank_plans, budgets))
        steps.append(n)
        plans[epoch] = padded[info.rank]
        reports[epoch] = plan_report(rank_plans)
        if mix is not None:
            reports[epoch]["sources"] = mix.plan_counts(rank_plans)
        skipped[epoch] = [o for plan in rank_plans for o in plan.oversize]
        if config.max_steps is not None and sum(steps) >= config.max_steps:
            break
    if config.max_steps is not None:
        total, trimmed = config.max_steps, []
        for n in steps:
            trimmed.append(min(n, total))
            total -= trimmed[-1]
        steps = trimmed
    return EpochPlans(steps, plans, reports, skipped, mix)


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
