"""Epoch plans: which micro-batches every rank runs, in which order, from the index alone.

A plan is a pure function of (index, seed, epoch, rank, world_size, budgets, cost model,
options); no image is opened. Per rank and epoch:

1. seeded shard shuffle (the same permutation on every rank: seeded by (seed, epoch));
2. rank ``r`` takes shards ``r::world_size`` of that order;
3. its samples in shard order (dataset order within a shard);
4. a bounded seeded shuffle buffer of ``shuffle_buffer`` samples;
5. the streaming 2-D bucketer (:mod:`mvtrain.batching.bucketer`), edges from the whole index;
6. the end-of-stream batches (the buckets' leftovers, repacked longest first) scattered to
   seeded random places, then the batch order shuffled in consecutive windows of
   ``batch_shuffle_window`` batches (seeded), so neighbouring batches are not sorted by
   length (no sawtooth loss) while the loader still reads nearby shards;
7. the costliest micro-batch moved to position 0, so an OOM shows at step 1.

Every rank can compute every rank's plan (:func:`all_rank_plans`), so all agree on the
number of optimizer steps (:func:`steps_per_epoch`); :func:`padded_plan` appends zero-weight
fillers so each rank runs exactly ``steps * grad_accum`` micro-batches. Resume = recompute
the plan and skip to the saved micro-batch index.

Pure Python + numpy; no torch.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from mvshards.cost import CostModel
from mvshards.families import NATIVE_46
from mvshards.index import DatasetIndex
from mvtrain.batching.bucketer import Batch, Oversize, StreamingBucketer
from mvtrain.batching.buckets import BucketEdges, bucket_edges
from mvtrain.batching.plan_index import PlanIndex, SliceTable
from mvtrain.budgets import Budgets

_SHARDS, _BUFFER, _BATCHES, _SCATTER = 1, 2, 3, 4
"""Purpose tags mixed into the seeds so each random stream is independent."""


@dataclass(frozen=True)
class RankPlan:
    """One rank's micro-batches for one epoch, in run order, and its skipped samples."""

    seed: int
    epoch: int
    rank: int
    world_size: int
    budgets: Budgets
    cost_model: CostModel
    shards: tuple[int, ...]
    """Shard positions (in the index) this rank reads, in read order."""
    batches: tuple[Batch, ...]
    oversize: tuple[Oversize, ...]

    def __len__(self) -> int:
        return len(self.batches)

    @property
    def num_real_batches(self) -> int:
        return sum(1 for b in self.batches if not b.is_filler)

    @property
    def num_samples(self) -> int:
        """Real samples planned (fillers excluded)."""
        return sum(b.num_samples for b in self.batches if not b.is_filler)


def _rng(seed: int, epoch: int, purpose: int, rank: int = 0) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, purpose, rank]))


def buffer_shuffle(
    items: Sequence[int] | np.ndarray, size: int, rng: np.random.Generator
) -> list[int]:
    """Bounded shuffle (WebDataset style): keep ``size`` items, emit a random one per arrival.

    The item at input position ``i`` comes out at position ``>= i - size + 1``; ``size == 1``
    keeps the order. The buffer is drained in random order at the end.
    """
    if size < 1:
        raise ValueError(f"shuffle buffer size must be >= 1, got {size}")
    items = [int(x) for x in items]
    draws = rng.random(max(len(items) - size, 0))
    buf = items[:size]
    out: list[int] = []
    for k, item in enumerate(items[size:]):
        j = int(draws[k] * size)
        out.append(buf[j])
        buf[j] = item
    out.extend(buf[i] for i in rng.permutation(len(buf)))
    return out


def _window_shuffle(batches: list[Batch], window: int, rng: np.random.Generator) -> list[Batch]:
    out: list[Batch] = []
    for start in range(0, len(batches), window):
        chunk = batches[start : start + window]
        out.extend(chunk[i] for i in rng.permutation(len(chunk)))
    return out


def _scatter_flushed(batches: list[Batch], rng: np.random.Generator) -> list[Batch]:
    """Put the end-of-stream batches (repacked longest first) at random places of the epoch.

    Left at the tail they would run sorted by length (a sawtooth at the end of every epoch,
    and the whole epoch when a rank's share fits in the buffers).
    """
    streamed = [b for b in batches if b.reason != "flush"]
    flushed = [b for b in batches if b.reason == "flush"]
    if not flushed:
        return streamed
    slots = set(rng.choice(len(batches), size=len(flushed), replace=False).tolist())
    flushed = [flushed[i] for i in rng.permutation(len(flushed))]
    out, s, f = [], iter(streamed), iter(flushed)
    for pos in range(len(batches)):
        out.append(next(f) if pos in slots else next(s))
    return out


def _as_plan_index(index: PlanIndex | DatasetIndex, slice_table: SliceTable | None) -> PlanIndex:
    if isinstance(index, PlanIndex):
        if slice_table is not None:
            raise ValueError("pass slice_table when building the PlanIndex, not with one")
        return index
    return PlanIndex.from_index(index, slice_table)


def plan_edges(index: PlanIndex, num_buckets: int = 64, patch_rows: int = 0) -> BucketEdges:
    """Bucket edges from the whole index (the same on every rank)."""
    return bucket_edges(index.tokens, index.patches, num_buckets, patch_rows)


def _rank_stream(
    index: PlanIndex, seed: int, epoch: int, rank: int, world_size: int
) -> tuple[list[int], list[int]]:
    """``(shards, samples)`` of ``rank``: shards ``rank::world_size`` of the epoch's seeded
    shard order, and their samples in shard order (dataset order within a shard)."""
    shard_order = _rng(seed, epoch, _SHARDS).permutation(index.num_shards)
    mine = [int(s) for s in shard_order[rank::world_size]]
    by_shard = np.argsort(index.shard_ids, kind="stable")
    bounds = np.searchsorted(index.shard_ids[by_shard], np.arange(index.num_shards + 1))
    return mine, [int(i) for s in mine for i in by_shard[bounds[s] : bounds[s + 1]]]


def epoch_plan(
    index: PlanIndex | DatasetIndex,
    seed: int,
    epoch: int,
    rank: int,
    world_size: int,
    budgets: Budgets,
    cost_model: CostModel | str = NATIVE_46.cost,
    shuffle_buffer: int = 1000,
    num_buckets: int = 64,
    batch_shuffle_window: int = 64,
    *,
    max_buffered: int = 2048,
    patch_rows: int = 0,
    slice_table: SliceTable | None = None,
    edges: BucketEdges | None = None,
) -> RankPlan:
    """Rank ``rank``'s plan for ``epoch`` (see the module doc for the steps).

    ``edges`` defaults to :func:`plan_edges` of the whole index; pass it to skip recomputing.
    ``slice_table`` is only read when ``index`` is a ``DatasetIndex``.
    """
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed} epoch={epoch}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    if batch_shuffle_window < 1:
        raise ValueError(f"batch_shuffle_window must be >= 1, got {batch_shuffle_window}")
    model = CostModel.of(cost_model)
    pindex = _as_plan_index(index, slice_table)
    pindex.check(model)
    if edges is None:
        edges = plan_edges(pindex, num_buckets, patch_rows)

    mine, stream = _rank_stream(pindex, seed, epoch, rank, world_size)
    order = buffer_shuffle(stream, shuffle_buffer, _rng(seed, epoch, _BUFFER, rank))
    bucketer = StreamingBucketer(budgets, model, edges, max_buffered)
    batches = bucketer.add_all(pindex.sample(i) for i in order)

    batches = _window_shuffle(
        _scatter_flushed(batches, _rng(seed, epoch, _SCATTER, rank)),
        batch_shuffle_window,
        _rng(seed, epoch, _BATCHES, rank),
    )
    if batches:
        top = max(range(len(batches)), key=lambda i: (batches[i].cost, -i))
        batches.insert(0, batches.pop(top))
    return RankPlan(
        seed=seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        budgets=budgets,
        cost_model=model,
        shards=tuple(mine),
        batches=tuple(batches),
        oversize=tuple(bucketer.oversize),
    )


def all_rank_plans(
    index: PlanIndex | DatasetIndex,
    seed: int,
    epoch: int,
    world_size: int,
    budgets: Budgets,
    cost_model: CostModel | str = NATIVE_46.cost,
    shuffle_buffer: int = 1000,
    num_buckets: int = 64,
    batch_shuffle_window: int = 64,
    *,
    max_buffered: int = 2048,
    patch_rows: int = 0,
    slice_table: SliceTable | None = None,
) -> list[RankPlan]:
    """Every rank's (unpadded) plan for ``epoch``; edges are computed once."""
    pindex = _as_plan_index(index, slice_table)
    edges = plan_edges(pindex, num_buckets, patch_rows)
    return [
        epoch_plan(
            pindex,
            seed,
            epoch,
            rank,
            world_size,
            budgets,
            cost_model,
            shuffle_buffer,
            num_buckets,
            batch_shuffle_window,
            max_buffered=max_buffered,
            patch_rows=patch_rows,
            edges=edges,
        )
        for rank in range(world_size)
    ]


def steps_per_epoch(plans: Sequence[RankPlan], grad_accum: int) -> int:
    """Optimizer steps every rank runs: max over ranks of ceil(real micro-batches / grad_accum)."""
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    return max((math.ceil(p.num_real_batches / grad_accum) for p in plans), default=0)


def padded_plan(plan: RankPlan, steps: int, grad_accum: int) -> RankPlan:
    """``plan`` with zero-weight fillers (repeats of its cheapest batch) appended so it holds
    exactly ``steps * grad_accum`` micro-batches."""
    real = [b for b in plan.batches if not b.is_filler]
    want = steps * grad_accum
    if len(real) > want:
        raise ValueError(
            f"rank {plan.rank} has {len(real)} micro-batches, more than {steps} steps x "
            f"{grad_accum}: compute steps with steps_per_epoch over all ranks' plans"
        )
    if not real and want:
        raise ValueError(
            f"rank {plan.rank} of {plan.world_size} has no batch this epoch (too few shards or "
            "samples for this many ranks): rebuild with smaller shards or use fewer ranks"
        )
    fillers: list[Batch] = []
    if want > len(real):
        cheapest = min(real, key=lambda b: (b.cost, b.padded_tokens, b.keys))
        fillers = [replace(cheapest, weight=0.0)] * (want - len(real))
    return replace(plan, batches=tuple(real) + tuple(fillers))


def equal_step_plans(plans: Sequence[RankPlan], grad_accum: int) -> tuple[int, list[RankPlan]]:
    """``(steps, padded plans)``: every rank padded to the same number of steps."""
    steps = steps_per_epoch(plans, grad_accum)
    return steps, [padded_plan(p, steps, grad_accum) for p in plans]


def _spread(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {"max": 0.0, "mean": 0.0, "std": 0.0, "p50": 0.0, "p95": 0.0, "p95_over_p50": 0.0}
    p50, p95 = (float(x) for x in np.percentile(values, [50, 95]))
    return {
        "max": float(values.max()),
        "mean": float(values.mean()),
        "std": float(values.std()),
        "p50": p50,
        "p95": p95,
        "p95_over_p50": p95 / p50 if p50 else math.inf,
    }


def batch_stats(batches: Sequence[Batch], budgets: Budgets) -> dict[str, Any]:
    """Efficiency, utilisation and spread of a list of (real) micro-batches."""
    pt = np.array([b.padded_tokens for b in batches], dtype=np.float64)
    pp = np.array([b.padded_patches for b in batches], dtype=np.float64)
    rt = sum(b.real_tokens for b in batches)
    rp = sum(b.real_patches for b in batches)
    sizes = np.array([b.num_samples for b in batches], dtype=np.float64)
    return {
        "batches": len(batches),
        "samples": int(sizes.sum()),
        "mean_batch_size": float(sizes.mean()) if len(sizes) else 0.0,
        "token_efficiency": rt / pt.sum() if pt.sum() else 1.0,
        "patch_efficiency": rp / pp.sum() if pp.sum() else 1.0,
        "token_utilisation": float(pt.mean()) / budgets.tokens if len(pt) else 0.0,
        "patch_utilisation": float(pp.mean()) / budgets.patches if len(pp) else 0.0,
        "over_budget": int(((pt > budgets.tokens) | (pp > budgets.patches)).sum()),
        "padded_tokens": _spread(pt),
        "padded_patches": _spread(pp),
        "cost": _spread(pt / budgets.tokens + pp / budgets.patches),
    }


def plan_report(plans: Sequence[RankPlan]) -> dict[str, Any]:
    """Summary of a set of rank plans (fillers counted apart, never in the efficiencies)."""
    if not plans:
        return {}
    budgets = plans[0].budgets
    real = [b for p in plans for b in p.batches if not b.is_filler]
    report = batch_stats(real, budgets)
    oversize = [o for p in plans for o in p.oversize]
    report.update(
        {
            "ranks": len(plans),
            "budgets": {"tokens": budgets.tokens, "patches": budgets.patches},
            "cost_model": plans[0].cost_model.name,
            "micro_batches_per_rank": [len(p) for p in plans],
            "fillers": sum(1 for p in plans for b in p.batches if b.is_filler),
            "closed_by": dict(sorted(Counter(b.reason for b in real).items())),
            "oversize": len(oversize),
            "oversize_reasons": [o.reason for o in oversize[:10]],
        }
    )
    return report
