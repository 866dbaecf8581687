"""The 2-D budget bucketer: samples in, micro-batches that never break a budget out.

A sample costs LLM tokens and vision patches (:class:`~mvshards.cost.SampleCost`); a
micro-batch costs what the model's batch really pads, by the family's rule
(:class:`~mvshards.cost.CostModel`: tokens ``batch_size * max_tokens``; patches packed (4.6
family) or every (sub)image padded to the longest (2.6 family)).

:class:`StreamingBucketer` works like Lhotse's ``DynamicBucketingSampler``: samples are
routed to buckets over (tokens, patches) whose edges come from the dataset's distribution
(:func:`bucket_edges`); each bucket keeps one open micro-batch, which closes when adding the
next sample of that bucket would break EITHER budget. A sample that breaks a budget on its
own is never batched: it is reported (:class:`Oversize`). The number of buffered samples is
bounded: past the bound the fullest open batch closes early. Everything is deterministic
(no randomness here: order comes from the caller).

Pure Python + numpy; no torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from mvshards.cost import CostModel, CostTotals, SampleCost
from mvtrain.batching.buckets import BucketEdges
from mvtrain.budgets import Budgets

CloseReason = Literal["full", "buffer", "flush"]


@dataclass(frozen=True)
class Batch:
    """One micro-batch: its samples (in arrival order) and its padded and real costs.

    ``cost = padded_tokens / budgets.tokens + padded_patches / budgets.patches`` is the
    ordering key of "the costliest batch" (both budgets stand for what fits in memory).
    ``weight`` is 1.0 for a real batch and 0.0 for a filler (a repeat that keeps ranks in
    step; its loss must be multiplied by 0). ``reason`` says why it closed: ``"full"`` (the
    next sample of its bucket would break a budget), ``"buffer"`` (the buffer bound was
    reached) or ``"flush"`` (end of the stream).
    """

    keys: tuple[str, ...]
    samples: tuple[SampleCost, ...]
    padded_tokens: int
    padded_patches: int
    real_tokens: int
    real_patches: int
    cost: float
    bucket: int = -1
    reason: CloseReason = "flush"
    weight: float = 1.0

    @property
    def num_samples(self) -> int:
        return len(self.keys)

    @property
    def max_len(self) -> int:
        """Longest sample in tokens (the padded length of the batch)."""
        return max((s.tokens for s in self.samples), default=0)

    @property
    def is_filler(self) -> bool:
        return self.weight == 0.0


@dataclass(frozen=True)
class Oversize:
    """A sample that breaks a budget on its own: skipped and reported, never batched."""

    sample: SampleCost
    padded_tokens: int
    padded_patches: int
    reason: str
    """One line naming the sample, the budget it breaks and the fix."""


def make_batch(
    samples: Sequence[SampleCost],
    budgets: Budgets,
    cost_model: CostModel | str,
    bucket: int = -1,
    reason: CloseReason = "flush",
) -> Batch:
    """A :class:`Batch` of ``samples`` with its costs computed by ``cost_model``."""
    model = CostModel.of(cost_model)
    padded_tokens, padded_patches = model.padded(samples)
    real_tokens, real_patches = model.real(samples)
    return Batch(
        keys=tuple(s.key for s in samples),
        samples=tuple(samples),
        padded_tokens=padded_tokens,
        padded_patches=padded_patches,
        real_tokens=real_tokens,
        real_patches=real_patches,
        cost=padded_tokens / budgets.tokens + padded_patches / budgets.patches,
        bucket=bucket,
        reason=reason,
    )


def split_batch(batch: Batch, budgets: Budgets, cost_model: CostModel | str) -> tuple[Batch, Batch]:
    """Two micro-batches of ``batch``'s samples (it needs two or more): sorted by tokens
    (longest first) and dealt alternately, so both parts have about the same length. Neither
    part pads more tokens or patches than ``batch`` (padding only grows with the samples), so
    both keep its budgets."""
    if batch.num_samples < 2:
        raise ValueError(f"a micro-batch of {batch.num_samples} sample cannot be split")
    order = sorted(
        range(batch.num_samples),
        key=lambda i: (-batch.samples[i].tokens, -batch.samples[i].patches, i),
    )
    first, second = (
        make_batch(
            [batch.samples[i] for i in part], budgets, cost_model, batch.bucket, batch.reason
        )
        for part in (order[0::2], order[1::2])
    )
    return first, second


class _OpenBatch:
    """A bucket's open micro-batch with its running totals (O(1) budget checks)."""

    __slots__ = ("samples", "totals", "first_seq")

    def __init__(self, first_seq: int) -> None:
        self.samples: list[SampleCost] = []
        self.totals = CostTotals()
        self.first_seq = first_seq

    def add(self, s: SampleCost, totals: CostTotals) -> None:
        """Append ``s``; ``totals`` are this batch's with it (``self.totals.plus(s)``)."""
        self.samples.append(s)
        self.totals = totals


class StreamingBucketer:
    """Route samples to buckets; emit a bucket's micro-batch when it cannot take the next one.

    ``add(sample)`` returns the batches that closed because of it (0, 1 or 2: its bucket's
    full batch and/or the fullest batch when the buffer bound is passed); ``flush()`` closes
    every open batch (in bucket order). Samples over budget on their own are appended to
    ``oversize`` (in arrival order) and never enter a batch.
    At most ``max_buffered`` samples wait in open batches at any time.
    """

    def __init__(
        self,
        budgets: Budgets,
        cost_model: CostModel | str,
        edges: BucketEdges,
        max_buffered: int = 2048,
    ) -> None:
        if max_buffered < 1:
            raise ValueError(f"max_buffered must be >= 1, got {max_buffered}")
        self.budgets = budgets
        self.cost_model = CostModel.of(cost_model)
        self.edges = edges
        self.max_buffered = max_buffered
        self.oversize: list[Oversize] = []
        self._open: dict[int, _OpenBatch] = {}
        self._buffered = 0
        self._seq = 0

    @property
    def buffered(self) -> int:
        """Samples waiting in open batches now."""
        return self._buffered

    def _oversize(self, s: SampleCost) -> Oversize | None:
        tokens, patches = self.cost_model.alone(s)
        broken = []
        if tokens > self.budgets.tokens:
            broken.append(f"{tokens} tokens > token budget {self.budgets.tokens}")
        if patches > self.budgets.patches:
            broken.append(f"{patches} padded patches > patch budget {self.budgets.patches}")
        if not broken:
            return None
        return Oversize(
            s,
            tokens,
            patches,
            f"sample {s.key}: {' and '.join(broken)} on its own; skipped: raise the budget "
            "or rebuild the shards with a smaller --max-slice-nums / shorter text",
        )

    def _close(self, bucket: int, reason: CloseReason) -> Batch:
        open_batch = self._open.pop(bucket)
        self._buffered -= len(open_batch.samples)
        return make_batch(open_batch.samples, self.budgets, self.cost_model, bucket, reason)

    def _fullness(self, b: _OpenBatch) -> float:
        tokens, patches = self.cost_model.padded_totals(b.totals)
        return max(tokens / self.budgets.tokens, patches / self.budgets.patches)

    def add(self, sample: SampleCost) -> list[Batch]:
        """Take one sample; return the micro-batches that closed (maybe none)."""
        report = self._oversize(sample)
        if report is not None:
            self.oversize.append(report)
            return []
        seq, self._seq = self._seq, self._seq + 1
        bucket = self.edges.bucket_of(sample.tokens, sample.patches)
        closed: list[Batch] = []
        open_batch = self._open.get(bucket)
        if open_batch is not None:
            totals = open_batch.totals.plus(sample)
            tokens, patches = self.cost_model.padded_totals(totals)
            if tokens > self.budgets.tokens or patches > self.budgets.patches:
                closed.append(self._close(bucket, "full"))
                open_batch = None
        if open_batch is None:
            open_batch = self._open[bucket] = _OpenBatch(seq)
            totals = open_batch.totals.plus(sample)
        open_batch.add(sample, totals)
        self._buffered += 1
        if self._buffered > self.max_buffered:
            fullest = max(
                self._open,
                key=lambda b: (self._fullness(self._open[b]), -self._open[b].first_seq),
            )
            closed.append(self._close(fullest, "buffer"))
        return closed

    def add_all(self, samples: Iterable[SampleCost]) -> list[Batch]:
        """``add`` every sample, then ``flush``; all batches in closing order."""
        out: list[Batch] = []
        for s in samples:
            out.extend(self.add(s))
        out.extend(self.flush())
        return out

    def flush(self) -> list[Batch]:
        """Close every open micro-batch: the leftovers of all buckets, repacked.

        At the end of a stream every bucket holds a partial batch; closing them as they are
        would leave one small batch per bucket. Instead all leftovers are sorted by tokens
        (longest first; ties by patches, then arrival) and packed greedily under the same
        budget rule, which gives few, full and tight batches.
        """
        leftovers = [
            (s, b.first_seq, k) for b in self._open.values() for k, s in enumerate(b.samples)
        ]
        leftovers.sort(key=lambda x: (-x[0].tokens, -x[0].patches, x[1], x[2]))
        self._open.clear()
        self._buffered = 0
        out: list[Batch] = []
        current = _OpenBatch(0)
        for s, _, _ in leftovers:
            totals = current.totals.plus(s)
            tokens, patches = self.cost_model.padded_totals(totals)
            if current.samples and (tokens > self.budgets.tokens or patches > self.budgets.patches):
                out.append(make_batch(current.samples, self.budgets, self.cost_model, -1, "flush"))
                current = _OpenBatch(0)
                totals = current.totals.plus(s)
            current.add(s, totals)
        if current.samples:
            out.append(make_batch(current.samples, self.budgets, self.cost_model, -1, "flush"))
        return out
