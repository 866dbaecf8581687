"""Token and patch budgets that fit a GPU, from static memory and the activation model.

Rule (:func:`plan_budgets`):

1. Headroom for activations: ``target_fraction * gpu_bytes - static - overhead`` where
   ``overhead`` (default :data:`DEFAULT_OVERHEAD`) stands for what is on the card but not in
   tensors: the CUDA context, cuBLAS/NCCL workspaces and allocator fragmentation.
2. The budgets keep the dataset's own mix: ``patch_budget = ratio * token_budget`` with
   ``ratio = total padded-cost patches / total tokens`` over the index, so a micro-batch of
   typical samples reaches both budgets at about the same time (neither resource idles).
3. The worst micro-batch the bucketer can form under ``(T, P)`` fills both budgets at once,
   with the longest sample of the index setting the padding shape (``B = T // L_max``
   sequences of ``L_max``, which maximises the quadratic mask term ``B*L^2 = T*L_max``).
   ``T`` is the largest value whose predicted peak (static + overhead + activation peak of
   that batch) stays within the target; found by bisection (the peak is monotone in ``T``).
4. The p99 sample must fit alone: if ``T`` is below the p99 token count (or ``P`` below the
   p99 patch count) that budget is raised to it and the other one gets what is left. When
   even that does not fit, :class:`BudgetError` says how many bytes are missing.

Budgets are rounded down to multiples of :data:`ROUND` when above it (the patch budget is
at least 1, also for a text-only index, whose micro-batches still run the dummy image).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from mvtrain.memory.activations import ActivationModel
from mvtrain.memory.static import StaticMemory

GiB = 1 << 30
DEFAULT_OVERHEAD = int(1.5 * GiB)
"""CUDA context + library workspaces + fragmentation slack (not visible to the allocator)."""
ROUND = 64


class BudgetError(ValueError):
    """Nothing fits: ``needed`` bytes for the p99 sample vs ``available`` on the card."""

    def __init__(self, message: str, needed: int, available: int) -> None:
        super().__init__(message)
        self.needed = needed
        self.available = available


@dataclass(frozen=True)
class IndexStats:
    """What the budget rule needs from the shard index (per-sample padded costs)."""

    count: int
    total_tokens: int
    total_patches: int
    tokens_p99: int
    patches_p99: int
    tokens_max: int
    patches_max: int

    @property
    def patch_token_ratio(self) -> float:
        return self.total_patches / self.total_tokens if self.total_tokens else 0.0

    @classmethod
    def from_costs(cls, costs: Iterable[Sequence[int]]) -> IndexStats:
        """From ``(tokens, patches)`` pairs, or index rows ``[key, tokens, patches, images]``."""
        tokens: list[int] = []
        patches: list[int] = []
        for row in costs:
            t, p = (row[1], row[2]) if isinstance(row[0], str) else (row[0], row[1])
            tokens.append(int(t))
            patches.append(int(p))
        if not tokens:
            raise ValueError("the index is empty: no samples to plan budgets for")

        def p99(values: list[int]) -> int:
            ordered = sorted(values)
            return ordered[min(len(ordered) - 1, int(0.99 * (len(ordered) - 1) + 0.999999))]

        return cls(
            count=len(tokens),
            total_tokens=sum(tokens),
            total_patches=sum(patches),
            tokens_p99=p99(tokens),
            patches_p99=p99(patches),
            tokens_max=max(tokens),
            patches_max=max(patches),
        )


class BudgetPlan(NamedTuple):
    token_budget: int
    patch_budget: int
    predicted_peak: int
    """Static + overhead + activation peak of the worst micro-batch the budgets allow."""


def _static_total(static: int | StaticMemory) -> int:
    return static.total if isinstance(static, StaticMemory) else int(static)


def predicted_peak_bytes(
    static: int | StaticMemory,
    act: ActivationModel,
    padded_tokens: int,
    padded_patches: int,
    batch_size: int | None = None,
    max_len: int | None = None,
    overhead_bytes: int = 0,
) -> int:
    """Peak GPU bytes of one micro-batch: static + overhead + activation peak."""
    peak = act.peak_bytes(padded_tokens, padded_patches, batch_size, max_len)
    return _static_total(static) + int(overhead_bytes) + peak


def worst_batch_peak(act: ActivationModel, tokens: int, patches: int, longest: int) -> int:
    """Activation peak of the worst micro-batch within ``(tokens, patches)`` budgets when the
    longest sample has ``longest`` tokens (see the module doc, step 3)."""
    length = max(1, min(longest, tokens)) if tokens else 1
    batch = max(1, tokens // length)
    return act.peak_bytes(tokens, patches, batch, length, padded=batch > 1)


def _stats(index_stats: IndexStats | Mapping[str, Any]) -> IndexStats:
    if isinstance(index_stats, IndexStats):
        return index_stats
    return IndexStats(**{k: int(index_stats[k]) for k in IndexStats.__dataclass_fields__})


def plan_budgets(
    static_bytes: int | StaticMemory,
    activation_model: ActivationModel,
    gpu_bytes: int,
    target_fraction: float,
    index_stats: IndexStats | Mapping[str, Any],
    overhead_bytes: int = DEFAULT_OVERHEAD,
) -> BudgetPlan:
    """Budgets that fit ``target_fraction`` of a ``gpu_bytes`` card (rule in the module doc)."""
    if not 0 < target_fraction <= 1:
        raise ValueError(f"target fraction must be in (0, 1], got {target_fraction}")
    stats = _stats(index_stats)
    act = activation_model
    limit = int(target_fraction * gpu_bytes)
    fixed = _static_total(static_bytes) + int(overhead_bytes)
    available = limit - fixed
    ratio = stats.patch_token_ratio
    longest = max(1, stats.tokens_max)

    def cost(tokens: int, patches: int) -> int:
        return worst_batch_peak(act, tokens, patches, longest)

    need_t, need_p = max(1, stats.tokens_p99), stats.patches_p99
    needed = cost(need_t, need_p)
    if needed > available:
        raise BudgetError(
            f"the p99 sample ({need_t} tokens, {need_p} patches) needs {needed / GiB:.2f} GiB of "
            f"activations but only {max(available, 0) / GiB:.2f} GiB remain of "
            f"{target_fraction:.0%} x {gpu_bytes / GiB:.1f} GiB after {fixed / GiB:.2f} GiB "
            "static + overhead",
            needed=fixed + needed,
            available=limit,
        )

    def largest(fits: Any, low: int) -> int:
        high = max(low, 1)
        while fits(high * 2) and high < 1 << 40:
            high *= 2
        high *= 2
        while high - low > 1:
            mid = (low + high) // 2
            low, high = (mid, high) if fits(mid) else (low, mid)
        return low

    tokens = largest(lambda t: cost(t, int(ratio * t)) <= available, 0)
    patches = int(ratio * tokens)
    if tokens < need_t:
        tokens = need_t
        patches = largest(lambda p: cost(tokens, p) <= available, need_p)
    elif patches < need_p:
        patches = need_p
        tokens = largest(lambda t: cost(t, patches) <= available, need_t)
    tokens = max(need_t, tokens // ROUND * ROUND)
    patches = max(need_p, patches // ROUND * ROUND if patches >= ROUND else patches, 1)
    return BudgetPlan(tokens, patches, fixed + cost(tokens, patches))
