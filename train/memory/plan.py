"""``mvtrain plan`` as a library call: what fits on the card, before any GPU is touched.

:func:`make_plan` reads the model config and the shard index, fits the request's setup
(:mod:`.setup_fit`: parameters, static memory, activations, overhead, budgets), counts the
epoch's steps under those budgets, and evaluates the remedies (:mod:`.remedies`). The
result is a :class:`MemoryPlan`; :meth:`MemoryPlan.to_json` is what ``mvtrain plan --json``
prints and :func:`mvtrain.memory.plan_text.format_plan` what it prints for the terminal.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mvshards.profiles import DEFAULT_PROFILE, get_profile
from mvtrain.batching.plan_index import PlanIndex
from mvtrain.batching.schedule import all_rank_plans, equal_step_plans, plan_report
from mvtrain.batching.sources import ShardSource, SourceMix, load_sources
from mvtrain.budgets import Budgets
from mvtrain.memory.budgets import BudgetPlan, IndexStats
from mvtrain.memory.remedies import Remedy, remedies
from mvtrain.memory.setup_fit import (
    ActivationPeak,
    PlanRequest,
    SetupFit,
    activations_for,
    fit_setup,
    load_probe,
    model_config,
)


@dataclass(frozen=True)
class CostliestBatch:
    """The planned micro-batch with the highest cost."""

    samples: int
    padded_tokens: int
    padded_patches: int


@dataclass(frozen=True)
class EpochSteps:
    """The epoch planned under the budgets, as ``mvtrain run`` would plan it."""

    micro_batches_per_rank: list[int]
    micro_batches_per_step: int
    steps_per_epoch: int
    token_efficiency: float | None
    costliest_batch: CostliestBatch
    token_count_exact: bool
    """Whether the index's token counts come from the real tokenizer."""


@dataclass(frozen=True)
class EpochNote:
    """Why the epoch's steps are not counted here."""

    note: str


@dataclass(frozen=True)
class MemoryPlan:
    """What :func:`make_plan` found for a request."""

    request: PlanRequest
    fit: SetupFit
    index: IndexStats
    epoch: EpochSteps | EpochNote | None
    """None when nothing fits."""
    remedies: list[Remedy]

    def to_json(self) -> dict[str, Any]:
        """The plan as a JSON-ready dict (``mvtrain plan --json`` prints it)."""
        r, counts, static = self.request, self.fit.counts, self.fit.static
        return {
            "model": r.model,
            "gpus": r.gpus,
            "gpu_mem_bytes": r.gpu_mem,
            "target": r.target,
            "engine": r.engine,
            "zero_stage": r.zero_stage if r.engine == "deepspeed" else None,
            "dtype": r.resolved_dtype,
            "dtype_requested": r.dtype,
            "setup": {
                "lora": r.lora,
                "freeze_vision": r.freeze_vision,
                "grad_ckpt": r.grad_ckpt,
                "attention": r.attention,
                "chunked_loss": r.chunked_loss,
            },
            "params_total": counts.total,
            "params_trainable": counts.trainable,
            "params": {
                "llm": counts.llm,
                "vision": counts.vision,
                "resampler": counts.resampler,
                "other": counts.other,
                "estimate": counts.estimate,
            },
            "static_bytes_per_gpu": static.total,
            "static": static.to_dict(),
            **_activation_json(self.fit),
            "overhead": self.fit.overhead.to_dict(),
            "index": asdict(self.index),
            **self._budget_json(),
            "advice": [remedy.to_json() for remedy in self.remedies],
        }

    def _budget_json(self) -> dict[str, Any]:
        budgets, shortfall = self.fit.budgets, self.fit.shortfall
        if budgets is None:
            assert shortfall is not None
            return {
                "token_budget": None,
                "patch_budget": None,
                "predicted_peak_bytes": None,
                "error": str(shortfall),
                "needed_bytes": shortfall.needed,
            }
        return {
            "token_budget": budgets.token_budget,
            "patch_budget": budgets.patch_budget,
            "predicted_peak_bytes": budgets.predicted_peak,
            "predicted_reserved_bytes": budgets.predicted_reserved,
            "predicted_allocated_bytes": budgets.predicted_allocated,
            "activation_peak_bytes": budgets.activation_peak,
            "fragmentation_bytes": self.fit.overhead.fragmentation(budgets.activation_peak),
            "epoch": asdict(self.epoch) if self.epoch is not None else None,
        }


def _activation_json(fit: SetupFit) -> dict[str, Any]:
    """The activation coefficients of the plan JSON (a probe fit has no quadratic term)."""
    act = fit.activations
    return {
        "activation_bytes_per_token": act.bytes_per_token,
        "activation_bytes_per_patch": act.bytes_per_patch,
        "activation_quadratic_bytes_per_token_sq": fit.quadratic_bytes_per_token_sq,
        "activation_const_bytes": act.const_bytes,
        "activation_model": act.to_dict(),
        "activation_from_probe": fit.from_probe,
    }


def _epoch(
    sources: list[ShardSource], indexes: list[Any], request: PlanRequest, budgets: BudgetPlan
) -> EpochSteps | EpochNote:
    """The first epoch's micro-batches and steps under ``budgets`` (of the weighted mix of
    the ``--shards`` folders; a note when they cannot be counted from these indexes)."""
    cost = get_profile(indexes[0].params.get("profile", DEFAULT_PROFILE)).family.cost
    if cost.pads_subimages and any(index.image_columns is None for index in indexes):
        return EpochNote(
            f"{cost.name}-family step counts need the index's per-image table, which "
            "an older mvprep did not write: rebuild the shards, or mvtrain run reports them"
        )
    mix = SourceMix.build(sources, indexes, [PlanIndex.from_index(ix) for ix in indexes])
    plan_index = mix.epoch_index(0, 0)
    rank_budgets = Budgets(budgets.token_budget, budgets.patch_budget)
    rank_plans = all_rank_plans(
        plan_index, 0, 0, request.gpus, rank_budgets, cost, grad_accum=request.grad_accum
    )
    try:
        steps, _ = equal_step_plans(rank_plans, request.grad_accum)
    except ValueError as exc:  # no batch at all
        return EpochNote(str(exc))
    report = plan_report(rank_plans)
    costliest = max((b for p in rank_plans for b in p.batches), key=lambda b: b.cost)
    return EpochSteps(
        micro_batches_per_rank=[len(p.batches) for p in rank_plans],
        micro_batches_per_step=request.grad_accum,
        steps_per_epoch=steps,
        token_efficiency=report.get("token_efficiency"),
        costliest_batch=CostliestBatch(
            costliest.num_samples, costliest.padded_tokens, costliest.padded_patches
        ),
        token_count_exact=all(index.params.get("tokenizer") for index in indexes),
    )


def make_plan(request: PlanRequest) -> MemoryPlan:
    """Plan ``request`` (ValueError for a probe fit of another setup, an unknown engine, an
    empty index...)."""
    config = model_config(request.model)
    probe = load_probe(request, config)
    sources, indexes = load_sources(request.shards)
    stats = IndexStats.from_costs([row for index in indexes for row in index.sample_rows()])
    fit = fit_setup(request, config, stats, probe)
    epoch = _epoch(sources, indexes, request, fit.budgets) if fit.budgets is not None else None
    return MemoryPlan(request, fit, stats, epoch, remedies(request, config, stats, probe))


def activation_model_of(request: PlanRequest) -> ActivationPeak:
    """The activation model a plan of ``request`` uses: its probe fit (checked) or the
    config-derived model."""
    config = model_config(request.model)
    return activations_for(request, config, load_probe(request, config))


__all__ = [
    "CostliestBatch",
    "EpochNote",
    "EpochSteps",
    "MemoryPlan",
    "PlanRequest",
    "activation_model_of",
    "make_plan",
]
