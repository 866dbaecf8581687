"""The 2-D budget bucketer: samples in, micro-batches that never break a budget out.

A sample costs LLM tokens and vision patches. A micro-batch costs what the model's batch
really pads (see :class:`CostModel`):

* tokens, every family: ``batch_size * max_tokens`` (text is right-padded to the longest);
* patches, ``"4.6"`` (NaViT packing, no padding): the sum of every sample's patches;
* patches, ``"2.6"`` (every slice padded to the longest slice of the batch):
  ``total_slices * max_patches_per_slice``.

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

from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

CostFamily = Literal["4.6", "2.6"]
CloseReason = Literal["full", "buffer", "flush"]


@dataclass(frozen=True)
class Budgets:
    """Per-micro-batch limits on padded LLM tokens and padded vision patches."""

    tokens: int
    patches: int

    def __post_init__(self) -> None:
        if self.tokens < 1 or self.patches < 1:
            raise ValueError(
                f"budgets must be positive, got tokens={self.tokens} patches={self.patches}: "
                "pass --token-budget and --patch-budget >= 1"
            )


@dataclass(frozen=True)
class SampleCost:
    """What one sample contributes to a micro-batch.

    ``slices`` counts every (sub)image the vision tower sees (each image's source plus its
    slices) and ``max_patches_per_slice`` is the largest ``rows * cols`` among them; both are
    0 for a text-only sample and only the ``"2.6"`` cost model reads them.
    """

    key: str
    tokens: int
    patches: int
    slices: int = 0
    max_patches_per_slice: int = 0


@dataclass(frozen=True)
class CostModel:
    """How a model family pads a micro-batch; ``family`` is ``"4.6"`` or ``"2.6"``."""

    family: CostFamily = "4.6"

    def __post_init__(self) -> None:
        if self.family not in ("4.6", "2.6"):
            raise ValueError(f"unknown cost model {self.family!r}: use '4.6' or '2.6'")

    @classmethod
    def of(cls, value: CostModel | str) -> CostModel:
        """``value`` itself, or the cost model named ``"4.6"`` / ``"2.6"``."""
        return value if isinstance(value, CostModel) else cls(value)  # type: ignore[arg-type]

    @classmethod
    def for_profile(cls, profile_name: str) -> CostModel:
        """The cost model of a ``mvshards.profiles`` profile name (``minicpmv-2.6`` -> 2.6)."""
        from mvshards.profiles import get_profile

        return cls(get_profile(profile_name).family)

    def padded_cost(self, batch: Sequence[SampleCost]) -> tuple[int, int]:
        """``(padded_tokens, padded_patches)`` of ``batch`` as the model pads it."""
        if not batch:
            return 0, 0
        tokens = len(batch) * max(s.tokens for s in batch)
        if self.family == "4.6":
            return tokens, sum(s.patches for s in batch)
        slices = sum(s.slices for s in batch)
        return tokens, slices * max(s.max_patches_per_slice for s in batch)

    @staticmethod
    def real_cost(batch: Sequence[SampleCost]) -> tuple[int, int]:
        """``(real_tokens, real_patches)``: what ``batch`` holds without padding."""
        return sum(s.tokens for s in batch), sum(s.patches for s in batch)

    def alone_cost(self, sample: SampleCost) -> tuple[int, int]:
        """``(padded_tokens, padded_patches)`` of a batch holding only ``sample``."""
        if self.family == "4.6":
            return sample.tokens, sample.patches
        return sample.tokens, sample.slices * sample.max_patches_per_slice


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
    padded_tokens, padded_patches = model.padded_cost(samples)
    real_tokens, real_patches = model.real_cost(samples)
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


@dataclass(frozen=True)
class BucketEdges:
    """A 2-D bucket grid: rows over patches, then token buckets within each row.

    ``patch_edges[i]`` is the inclusive upper patch bound of row ``i`` (the last row is open
    ended); ``token_edges[r][j]`` the inclusive upper token bound of bucket ``j`` of row
    ``r`` (the last bucket of a row is open ended). Rows are not a uniform grid: each row
    has its own token edges, so text-only samples (row 0 when the data has any) and image
    samples each get buckets where their lengths are.
    """

    patch_edges: tuple[int, ...]
    token_edges: tuple[tuple[int, ...], ...]
    _offsets: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.token_edges) != len(self.patch_edges) + 1:
            raise ValueError("token_edges needs one entry per patch row")
        offsets, total = [], 0
        for row in self.token_edges:
            offsets.append(total)
            total += len(row) + 1
        object.__setattr__(self, "_offsets", (*offsets, total))

    @property
    def num_buckets(self) -> int:
        return self._offsets[-1]

    def bucket_of(self, tokens: int, patches: int) -> int:
        """The flat bucket id (``0 .. num_buckets-1``) of a sample."""
        row = bisect_left(self.patch_edges, patches)
        return self._offsets[row] + bisect_left(self.token_edges[row], tokens)

    def to_dict(self) -> dict[str, list]:
        return {
            "patch_edges": list(self.patch_edges),
            "token_edges": [list(r) for r in self.token_edges],
        }


def _weighted_edges(values: np.ndarray, weights: np.ndarray, n: int) -> tuple[int, ...]:
    """Inclusive upper edges splitting sorted ``values`` into ``n`` parts of equal weight."""
    if n <= 1 or len(values) == 0:
        return ()
    order = np.argsort(values, kind="stable")
    v, cum = values[order], np.cumsum(weights[order], dtype=np.float64)
    targets = cum[-1] * np.arange(1, n) / n
    picks = v[np.minimum(np.searchsorted(cum, targets, side="left"), len(v) - 1)]
    edges = sorted({int(x) for x in picks if x < v[-1]})
    return tuple(edges)


def bucket_edges(
    tokens: np.ndarray, patches: np.ndarray, num_buckets: int = 64, patch_rows: int = 0
) -> BucketEdges:
    """Bucket edges from a dataset's token and patch counts (the index's distribution).

    Token buckets: ``num_buckets`` in all, edges at token-WEIGHTED quantiles, so every
    bucket holds the same number of tokens and fills its token budget at the same rate
    (Lhotse's equal-duration buckets): narrow buckets where the mass is, which keeps
    ``batch_size * max_len`` close to the real token count.

    Patch rows (optional 2nd axis, ``patch_rows >= 1``): text-only samples get a row of their
    own when the data has both kinds, and image samples are split into ``patch_rows`` rows at
    patch quantiles; the token buckets are shared between rows in proportion to each row's
    tokens. The default is ``patch_rows=0``: ONE row, i.e. 1-D buckets over tokens, with both
    budgets still enforced per batch. Measured with ``scripts/bench_batching.py`` (4000
    samples, both cost models, loose and tight patch budgets): splitting by patches always
    lowered token efficiency and raised the batch count, because (a) 4.6 packs patches
    without padding, so mixing text-only samples into image batches is free and fills the
    token budget of patch-bound batches, and (b) under 2.6 every (sub)image is resized to
    about the same area, so ``max_patches_per_slice`` hardly varies and there is little
    patch padding to save.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    patches = np.asarray(patches, dtype=np.int64)
    if tokens.shape != patches.shape:
        raise ValueError(f"tokens {tokens.shape} and patches {patches.shape} differ in shape")
    if num_buckets < 1 or patch_rows < 0:
        raise ValueError(
            f"need num_buckets >= 1 and patch_rows >= 0, got {num_buckets}, {patch_rows}"
        )
    patch_edges: list[int] = []
    images = patches > 0
    if patch_rows >= 1 and images.any():
        if not images.all():
            patch_edges.append(0)
        img = patches[images]
        quant = np.quantile(img, np.arange(1, patch_rows) / patch_rows, method="lower")
        patch_edges.extend(sorted({int(q) for q in quant if 0 < q < img.max()}))
    rows = np.searchsorted(np.array(patch_edges, dtype=np.int64), patches, side="left")
    num_rows = len(patch_edges) + 1
    mass = np.array([tokens[rows == r].sum() for r in range(num_rows)], dtype=np.float64)
    share = _allocate(mass, max(num_buckets, num_rows))
    token_edges = tuple(
        _weighted_edges(tokens[rows == r], tokens[rows == r].astype(np.float64), share[r])
        for r in range(num_rows)
    )
    return BucketEdges(tuple(patch_edges), token_edges)


def _allocate(mass: np.ndarray, total: int) -> list[int]:
    """Share ``total`` buckets between rows in proportion to ``mass`` (>= 1 each)."""
    n = len(mass)
    if mass.sum() <= 0:
        return [max(1, total // n)] * n
    ideal = mass / mass.sum() * (total - n)
    share = np.floor(ideal).astype(int) + 1
    for r in np.argsort(-(ideal - np.floor(ideal)), kind="stable")[: total - int(share.sum())]:
        share[r] += 1
    return [int(x) for x in share]


class _OpenBatch:
    """A bucket's open micro-batch with running maxima and sums (O(1) budget checks)."""

    __slots__ = ("samples", "max_tokens", "patches", "slices", "max_pps", "first_seq")

    def __init__(self, first_seq: int) -> None:
        self.samples: list[SampleCost] = []
        self.max_tokens = self.patches = self.slices = self.max_pps = 0
        self.first_seq = first_seq

    def cost_with(self, s: SampleCost, family: CostFamily) -> tuple[int, int]:
        tokens = (len(self.samples) + 1) * max(self.max_tokens, s.tokens)
        if family == "4.6":
            return tokens, self.patches + s.patches
        return tokens, (self.slices + s.slices) * max(self.max_pps, s.max_patches_per_slice)

    def add(self, s: SampleCost) -> None:
        self.samples.append(s)
        self.max_tokens = max(self.max_tokens, s.tokens)
        self.patches += s.patches
        self.slices += s.slices
        self.max_pps = max(self.max_pps, s.max_patches_per_slice)


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
        tokens, patches = self.cost_model.alone_cost(s)
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
        tokens = len(b.samples) * b.max_tokens
        patches = b.patches if self.cost_model.family == "4.6" else b.slices * b.max_pps
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
            tokens, patches = open_batch.cost_with(sample, self.cost_model.family)
            if tokens > self.budgets.tokens or patches > self.budgets.patches:
                closed.append(self._close(bucket, "full"))
                open_batch = None
        if open_batch is None:
            open_batch = self._open[bucket] = _OpenBatch(seq)
        open_batch.add(sample)
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
            tokens, patches = current.cost_with(s, self.cost_model.family)
            if current.samples and (tokens > self.budgets.tokens or patches > self.budgets.patches):
                out.append(make_batch(current.samples, self.budgets, self.cost_model, -1, "flush"))
                current = _OpenBatch(0)
            current.add(s)
        if current.samples:
            out.append(make_batch(current.samples, self.budgets, self.cost_model, -1, "flush"))
        return out
