"""The run's epochs: every epoch's schedule for this rank and the step count all ranks share.

Steps per epoch are equal on every rank (:func:`~mvtrain.batching.schedule.equal_step_plans`
pads the short ranks); with ``--max-steps`` epochs are planned until the steps are reached
and the last is cut there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mvshards.cost import CostModel
from mvtrain.batching.schedule import (
    PlanIndex,
    RankPlan,
    all_rank_plans,
    equal_step_plans,
    plan_report,
)
from mvtrain.distributed import DistInfo
from mvtrain.run_config import RunConfig


@dataclass
class EpochPlans:
    """Every epoch's plan for this rank and the step count all ranks share."""

    steps: list[int]
    plans: dict[int, RankPlan]
    report: dict[int, dict[str, Any]]

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, step within the epoch) of a global step."""
        for epoch, n in enumerate(self.steps):
            if step < n:
                return epoch, step
            step -= n
        raise IndexError("step past the planned epochs")


def plan_epochs(
    config: RunConfig, index: PlanIndex, info: DistInfo, cost_model: CostModel
) -> EpochPlans:
    budgets = config.budgets
    steps: list[int] = []
    plans: dict[int, RankPlan] = {}
    reports: dict[int, dict[str, Any]] = {}
    for epoch in range(config.epochs if config.max_steps is None else 10**6):
        rank_plans = all_rank_plans(
            index,
            config.seed,
            epoch,
            info.world_size,
            budgets,
            cost_model,
            shuffle_buffer=config.shuffle_buffer,
        )
        n, padded = equal_step_plans(rank_plans, config.grad_accum)
        steps.append(n)
        plans[epoch] = padded[info.rank]
        reports[epoch] = plan_report(rank_plans)
        if config.max_steps is not None and sum(steps) >= config.max_steps:
            break
    if config.max_steps is not None:
        total, trimmed = config.max_steps, []
        for n in steps:
            trimmed.append(min(n, total))
            total -= trimmed[-1]
        steps = trimmed
    return EpochPlans(steps, plans, reports)


def plan_index(index: Any, lengths: Any) -> PlanIndex:
    """The index with the exact token counts and 2.6 slice costs of ``lengths``."""
    return PlanIndex.from_arrays(
        index.keys,
        index.shard_ids,
        lengths.tokens,
        index.num_patches,
        num_shards=len(index.shards),
        slice_table=lengths.slices,
    )
