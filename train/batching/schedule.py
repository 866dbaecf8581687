"""Epoch plans: which micro-batches every rank runs, in which order, from the index alone.

A plan is a pure function of (index, seed, epoch, world_size, grad_accum, budgets, cost
model, options); no image is opened. The whole epoch is planned once, the same on every
rank (work is dealt by micro-batch, not by shard, so any number of shards trains on any
number of ranks):

1. seeded shard shuffle (seeded by (seed, epoch)), every sample in shard order (dataset order
   within a shard);
2. a bounded seeded shuffle buffer of ``shuffle_buffer`` samples;
3. ONE streaming 2-D bucketer over the whole stream (:mod:`mvtrain.batching.bucketer`),
   edges from the whole index; each micro-batch's samples in dataset (shard, offset) order,
   so a micro-batch reads its shards front to back;
4. the end-of-stream batches (the buckets' leftovers, repacked longest first) scattered to
   seeded random places, then the batch order shuffled in consecutive windows of
   ``batch_shuffle_window`` batches (seeded), so neighbouring batches are not sorted by
   length (no sawtooth loss) while a stretch of the epoch still reads nearby shards;
5. the micro-batch count made a multiple of ``world_size * grad_accum`` (the slots of one
   optimizer step): the costliest batches of two or more samples are split in two
   (:func:`~mvtrain.batching.bucketer.split_batch`; a part never pads more than the whole),
   and only when no batch can be split are zero-weight fillers added (so fillers are fewer
   than one step's slots, and only on tiny epochs);
6. dealing (:func:`deal_steps`): the ``world_size * grad_accum`` costliest batches form step
   0 (an OOM shows at step 1, on every rank); the rest, window by window, are sorted by cost
   and cut into steps (batches of like cost share a step), the steps' order is shuffled
   within the window (seeded), and each step's batches are dealt to ranks longest first, each
   to the least-loaded rank with a free slot (LPT), so every rank's padded cost in a step is
   close. With one rank, the batch order of 4 is kept (costliest first).

Every rank runs the same number of steps (``ceil(batches / (world_size * grad_accum))``)
and the ranks' micro-batch counts differ by at most one step's worth. Resume = recompute the
plan and skip to the saved micro-batch index.

Pure Python + numpy; no torch.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from mvshards.cost import CostModel
from mvshards.families import NATIVE_46
from mvshards.index import DatasetIndex
from mvtrain.batching.bucketer import Batch, Oversize, StreamingBucketer, split_batch
from mvtrain.batching.buckets import BucketEdges, bucket_edges
from mvtrain.batching.plan_index import PlanIndex, SliceTable
from mvtrain.batching.plan_index import slice_costs as slice_costs  # re-exported
from mvtrain.budgets import Budgets

_SHARDS, _BUFFER, _BATCHES, _SCATTER, _STEPS = 1, 2, 3, 4, 6
"""Purpose tags mixed into the seeds so each random stream is independent (5 is the source
mix's draw, :mod:`mvtrain.batching.sources`)."""


@dataclass(frozen=True)
class RankPlan:
    """One rank's micro-batches for one epoch, in run order (``grad_accum`` per optimizer
    step), and the epoch's skipped samples (on rank 0's plan only: the epoch is planned once
    for all ranks)."""

    seed: int
    epoch: int
    rank: int
    world_size: int
    budgets: Budgets
    cost_model: CostModel
    shards: tuple[int, ...]
    """Shard positions (in the index) this rank reads, in the order it first reads them."""
    batches: tuple[Batch, ...]
    oversize: tuple[Oversize, ...]
    grad_accum: int = 1
    """Micro-batches per optimizer step the plan was dealt for."""

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


def _epoch_stream(index: PlanIndex, seed: int, epoch: int) -> np.ndarray:
    """Every row of the epoch: the shards in the epoch's seeded order, each shard's samples in
    dataset order."""
    shard_order = _rng(seed, epoch, _SHARDS).permutation(index.num_shards)
    by_shard = np.argsort(index.shard_ids, kind="stable")
    bounds = np.searchsorted(index.shard_ids[by_shard], np.arange(index.num_shards + 1))
    parts = [by_shard[bounds[s] : bounds[s + 1]] for s in shard_order]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def fill_steps(
    batches: Sequence[Batch], slots: int, budgets: Budgets, cost_model: CostModel | str
) -> tuple[list[Batch], int]:
    """``(batches, fillers)``: ``batches`` made a multiple of ``slots`` long, by splitting the
    costliest batches of two or more samples in place (each into two), then, when none is
    left to split, by appending zero-weight fillers (repeats of the cheapest batch)."""
    if slots < 1:
        raise ValueError(f"slots must be >= 1, got {slots}")
    missing = -len(batches) % slots
    if not batches or not missing:
        return list(batches), 0
    model = CostModel.of(cost_model)
    parts: list[list[Batch]] = [[b] for b in batches]
    heap = [(-b.cost, i, 0, b) for i, b in enumerate(batches) if b.num_samples > 1]
    heapq.heapify(heap)
    made = 0
    while missing and heap:
        _, pos, _, batch = heapq.heappop(heap)
        at = next(j for j, b in enumerate(parts[pos]) if b is batch)
        halves = split_batch(batch, budgets, model)
        parts[pos][at : at + 1] = list(halves)
        for half in halves:
            if half.num_samples > 1:
                made += 1
                heapq.heappush(heap, (-half.cost, pos, made, half))
        missing -= 1
    out = [b for part in parts for b in part]
    if missing:
        cheapest = min(out, key=lambda b: (b.cost, b.padded_tokens, b.keys))
        out.extend([replace(cheapest, weight=0.0)] * missing)
    return out, missing


def deal_steps(
    batches: Sequence[Batch],
    world_size: int,
    grad_accum: int,
    window: int,
    rng: np.random.Generator,
) -> list[list[Batch]]:
    """Per rank its micro-batches in run order, ``grad_accum`` per step (``len(batches)`` a
    multiple of ``world_size * grad_accum``; see step 6 of the module doc)."""
    slots = world_size * grad_accum
    if len(batches) % slots:
        raise ValueError(f"{len(batches)} micro-batches do not fill steps of {slots} slots")
    if not batches:
        return [[] for _ in range(world_size)]

    def by_cost(ids: Sequence[int]) -> list[int]:
        return sorted(ids, key=lambda i: (-batches[i].cost, i))

    ranked = by_cost(range(len(batches)))
    if world_size == 1:
        return [[batches[ranked[0]]] + [b for i, b in enumerate(batches) if i != ranked[0]]]
    first = set(ranked[:slots])
    rest = [i for i in range(len(batches)) if i not in first]
    steps = [ranked[:slots]]
    per_window = max(1, round(window / slots)) * slots
    for start in range(0, len(rest), per_window):
        chunk = by_cost(rest[start : start + per_window])
        group = [chunk[k : k + slots] for k in range(0, len(chunk), slots)]
        steps.extend(group[j] for j in rng.permutation(len(group)))
    plans: list[list[Batch]] = [[] for _ in range(world_size)]
    for step in steps:
        load = [0.0] * world_size
        mine: list[list[Batch]] = [[] for _ in range(world_size)]
        for i in step:  # longest first, to the least-loaded rank with a free slot
            rank = min(
                (r for r in range(world_size) if len(mine[r]) < grad_accum),
                key=lambda r: (load[r], r),
            )
            load[rank] += batches[i].cost
            mine[rank].append(batches[i])
        for plan, got in zip(plans, mine, strict=True):
            plan.extend(got)
    return plans


class _Rows:
    """Index rows of sample ids (a duplicated id, a weighted copy, maps to its first row)."""

    def __init__(self, index: PlanIndex) -> None:
        self.order = np.argsort(index.keys, kind="stable")
        self.sorted = index.keys[self.order]
        self.shard_ids = index.shard_ids

    def of(self, keys: Sequence[str]) -> np.ndarray:
        if not len(keys):
            return np.zeros(0, dtype=np.int64)
        found = np.searchsorted(self.sorted, np.asarray(keys, dtype=self.sorted.dtype))
        return self.order[found]

    def in_row_order(self, batches: Sequence[Batch]) -> tuple[list[Batch], tuple[int, ...]]:
        """``batches`` with each one's samples in dataset (shard, offset) order, and the
        shards they read in first-read order."""
        rows = self.of([k for b in batches for k in b.keys])
        out, start = [], 0
        for b in batches:
            mine = rows[start : start + b.num_samples]
            start += b.num_samples
            order = np.argsort(mine, kind="stable").tolist()
            out.append(
                replace(
                    b,
                    keys=tuple(b.keys[i] for i in order),
                    samples=tuple(b.samples[i] for i in order),
                )
            )
        shards = self.shard_ids[rows]
        _, first = np.unique(shards, return_index=True)
        return out, tuple(int(shards[i]) for i in sorted(first.tolist()))


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
    grad_accum: int = 1,
) -> RankPlan:
    """Rank ``rank``'s plan for ``epoch``: its part of :func:`all_rank_plans` (the epoch is
    planned whole, so this costs as much as planning every rank)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    return all_rank_plans(
        index,
        seed,
        epoch,
        world_size,
        budgets,
        cost_model,
        shuffle_buffer,
        num_buckets,
        batch_shuffle_window,
        max_buffered=max_buffered,
        patch_rows=patch_rows,
        slice_table=slice_table,
        edges=edges,
        grad_accum=grad_accum,
    )[rank]


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
    edges: BucketEdges | None = None,
    grad_accum: int = 1,
) -> list[RankPlan]:
    """Every rank's plan for ``epoch`` (see the module doc), each exactly ``steps *
    grad_accum`` micro-batches long. ``edges`` defaults to :func:`plan_edges` of the whole
    index; ``slice_table`` is only read when ``index`` is a ``DatasetIndex``."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed} epoch={epoch}")
    if world_size < 1 or grad_accum < 1:
        raise ValueError(
            f"need world_size >= 1 and grad_accum >= 1, got {world_size}, {grad_accum}"
        )
    if batch_shuffle_window < 1:
        raise ValueError(f"batch_shuffle_window must be >= 1, got {batch_shuffle_window}")
    model = CostModel.of(cost_model)
    pindex = _as_plan_index(index, slice_table)
    pindex.check(model)
    if edges is None:
        edges = plan_edges(pindex, num_buckets, patch_rows)

    order = buffer_shuffle(
        _epoch_stream(pindex, seed, epoch), shuffle_buffer, _rng(seed, epoch, _BUFFER)
    )
    bucketer = StreamingBucketer(budgets, model, edges, max_buffered)
    batches = bucketer.add_all(pindex.sample(i) for i in order)
    batches = _window_shuffle(
        _scatter_flushed(batches, _rng(seed, epoch, _SCATTER)),
        batch_shuffle_window,
        _rng(seed, epoch, _BATCHES),
    )
    batches, _ = fill_steps(batches, world_size * grad_accum, budgets, model)
    dealt = deal_steps(
        batches, world_size, grad_accum, batch_shuffle_window, _rng(seed, epoch, _STEPS)
    )
    rows = _Rows(pindex)
    plans = []
    for rank, mine in enumerate(dealt):
        ordered, shards = rows.in_row_order(mine)
        plans.append(
            RankPlan(
                seed=seed,
                epoch=epoch,
                rank=rank,
                world_size=world_size,
                budgets=budgets,
                cost_model=model,
                shards=shards,
                batches=tuple(ordered),
                oversize=tuple(bucketer.oversize) if rank == 0 else (),
                grad_accum=grad_accum,
            )
        )
    return plans


def steps_per_epoch(plans: Sequence[RankPlan], grad_accum: int) -> int:
    """Optimizer steps every rank runs: max over ranks of ceil(micro-batches / grad_accum)."""
    if grad_accum < 1:
        raise ValueError(f"grad_accum must be >= 1, got {grad_accum}")
    return max((math.ceil(len(p.batches) / grad_accum) for p in plans), default=0)


def padded_plan(plan: RankPlan, steps: int, grad_accum: int) -> RankPlan:
    """``plan`` with zero-weight fillers (repeats of its cheapest batch) appended so it holds
    exactly ``steps * grad_accum`` micro-batches (a dealt plan already does: unchanged)."""
    want = steps * grad_accum
    if len(plan.batches) > want:
        raise ValueError(
            f"rank {plan.rank} has {len(plan.batches)} micro-batches, more than {steps} steps x "
            f"{grad_accum}: compute steps with steps_per_epoch over all ranks' plans"
        )
    if not plan.batches and want:
        raise ValueError(
            f"rank {plan.rank} of {plan.world_size} has no batch this epoch: plan every rank "
            "with all_rank_plans, which deals the epoch's micro-batches to all ranks"
        )
    fillers: list[Batch] = []
    if want > len(plan.batches):
        real = [b for b in plan.batches if not b.is_filler] or list(plan.batches)
        cheapest = min(real, key=lambda b: (b.cost, b.padded_tokens, b.keys))
        fillers = [replace(cheapest, weight=0.0)] * (want - len(plan.batches))
    return replace(plan, batches=plan.batches + tuple(fillers), grad_accum=grad_accum)


def equal_step_plans(plans: Sequence[RankPlan], grad_accum: int) -> tuple[int, list[RankPlan]]:
    """``(steps, padded plans)``: every rank padded to the same number of steps (plans from
    :func:`all_rank_plans` with this ``grad_accum`` already are)."""
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


def step_balance(plans: Sequence[RankPlan]) -> dict[str, Any]:
    """Per optimizer step, the ratio of the ranks' median to their largest padded cost
    (``Batch.cost`` summed over the rank's micro-batches of the step; fillers count, they
    run): 1.0 when every rank's share costs the same. ``per_step`` lists them (3 decimals);
    ``mean``, ``min`` and ``p5`` summarise them."""
    if not plans:
        return {"mean": 1.0, "min": 1.0, "p5": 1.0, "per_step": []}
    grad_accum = plans[0].grad_accum
    steps = min(len(p) for p in plans) // grad_accum
    loads = np.array(
        [
            [
                sum(b.cost for b in p.batches[s * grad_accum : (s + 1) * grad_accum])
                for s in range(steps)
            ]
            for p in plans
        ],
        dtype=np.float64,
    ).reshape(len(plans), steps)
    top = loads.max(axis=0) if steps else np.zeros(0)
    ratio = np.where(top > 0, np.median(loads, axis=0) / np.where(top > 0, top, 1.0), 1.0)
    if not len(ratio):
        return {"mean": 1.0, "min": 1.0, "p5": 1.0, "per_step": []}
    return {
        "mean": float(ratio.mean()),
        "min": float(ratio.min()),
        "p5": float(np.percentile(ratio, 5)),
        "per_step": [round(float(x), 3) for x in ratio],
    }


def plan_report(plans: Sequence[RankPlan]) -> dict[str, Any]:
    """Summary of a set of rank plans (fillers counted apart, never in the efficiencies):
    ``fillers`` and ``filler_fraction`` (of all micro-batches), ``step_balance`` (the ranks'
    p50/max padded cost per step, :func:`step_balance`)."""
    if not plans:
        return {}
    budgets = plans[0].budgets
    real = [b for p in plans for b in p.batches if not b.is_filler]
    report = batch_stats(real, budgets)
    oversize = [o for p in plans for o in p.oversize]
    fillers = sum(1 for p in plans for b in p.batches if b.is_filler)
    total = sum(len(p) for p in plans)
    report.update(
        {
            "ranks": len(plans),
            "grad_accum": plans[0].grad_accum,
            "budgets": {"tokens": budgets.tokens, "patches": budgets.patches},
            "cost_model": plans[0].cost_model.name,
            "micro_batches_per_rank": [len(p) for p in plans],
            "fillers": fillers,
            "filler_fraction": fillers / total if total else 0.0,
            "step_balance": step_balance(plans),
            "closed_by": dict(sorted(Counter(b.reason for b in real).items())),
            "oversize": len(oversize),
            "oversize_reasons": [o.reason for o in oversize[:10]],
        }
    )
    return report
