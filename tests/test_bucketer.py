"""The 2-D budget bucketer: padded costs per family, budgets never broken, every sample
batched once or reported, the close rule, the buffer bound, determinism, bucket edges."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mvshards.cost import CostModel, SampleCost
from mvshards.families import NATIVE_46, REMOTE_26
from mvtrain.batching.bucketer import StreamingBucketer, make_batch
from mvtrain.batching.buckets import bucket_edges
from mvtrain.budgets import Budgets

FAMILIES = ["4.6", "2.6"]


def ref_padded(batch: list[SampleCost], family: str) -> tuple[int, int]:
    """What the adapters pad, written out independently of the module under test."""
    tokens = len(batch) * max(s.tokens for s in batch)
    if family == "4.6":
        return tokens, sum(s.patches for s in batch)
    longest_slice = max(s.max_patches_per_slice for s in batch)
    return tokens, sum(s.slices for s in batch) * longest_slice


def breaks(batch: list[SampleCost], family: str, budgets: Budgets) -> bool:
    tokens, patches = ref_padded(batch, family)
    return tokens > budgets.tokens or patches > budgets.patches


def sample(key: str, tokens: int, slice_patches: list[int]) -> SampleCost:
    return SampleCost(
        key, tokens, sum(slice_patches), len(slice_patches), max(slice_patches, default=0)
    )


@st.composite
def samples_st(draw: st.DrawFn, max_size: int = 60) -> list[SampleCost]:
    n = draw(st.integers(0, max_size))
    out = []
    for i in range(n):
        slices = draw(st.lists(st.integers(1, 1200), max_size=12))
        out.append(sample(f"{i:05d}", draw(st.integers(1, 5000)), slices))
    return out


budgets_st = st.builds(Budgets, st.integers(500, 12000), st.integers(500, 20000))


def test_padded_cost_by_hand() -> None:
    a = sample("a", 100, [1024, 900])  # 2 slices, longest 1024
    b = sample("b", 300, [400])
    c = sample("c", 50, [])  # text only
    assert CostModel.of("4.6").padded([a, b, c]) == (900, 1924 + 400)
    assert CostModel.of("2.6").padded([a, b, c]) == (900, 3 * 1024)
    assert CostModel.of("2.6").padded([c]) == (50, 0)
    assert CostModel.of("2.6").alone(a) == (100, 2 * 1024)
    assert CostModel.of("4.6").padded([]) == (0, 0)
    assert CostModel.real([a, b, c]) == (450, 2324)
    batch = make_batch([a, b], Budgets(1000, 4096), "2.6")
    assert (batch.padded_tokens, batch.padded_patches) == (600, 3072)
    assert (batch.real_tokens, batch.real_patches, batch.max_len) == (400, 2324, 300)
    assert batch.cost == pytest.approx(600 / 1000 + 3072 / 4096)
    assert CostModel.for_profile("minicpmv-2.6") is REMOTE_26.cost
    assert CostModel.for_profile("minicpmv-4.6-4x") is NATIVE_46.cost
    with pytest.raises(ValueError, match="unknown model family '3.0'"):
        CostModel.of("3.0")
    with pytest.raises(ValueError, match="positive"):
        Budgets(0, 10)


@pytest.mark.slow
@settings(max_examples=150, deadline=None)
@given(
    samples=samples_st(),
    budgets=budgets_st,
    family=st.sampled_from(FAMILIES),
    max_buffered=st.integers(1, 80),
    num_buckets=st.integers(1, 8),
    patch_rows=st.integers(0, 2),
)
def test_bucketer_guarantees(
    samples: list[SampleCost],
    budgets: Budgets,
    family: str,
    max_buffered: int,
    num_buckets: int,
    patch_rows: int,
) -> None:
    tokens = np.array([s.tokens for s in samples], dtype=np.int64)
    patches = np.array([s.patches for s in samples], dtype=np.int64)
    edges = bucket_edges(tokens, patches, num_buckets, patch_rows)
    bucketer = StreamingBucketer(budgets, family, edges, max_buffered)
    batches = []
    for s in samples:
        before = bucketer.buffered
        closed = bucketer.add(s)
        assert bucketer.buffered <= max_buffered
        for b in closed:
            if b.reason == "full":  # closed only because the new sample would break a budget
                assert b.bucket == edges.bucket_of(s.tokens, s.patches)
                assert breaks([*b.samples, s], family, budgets)
            else:
                assert b.reason == "buffer" and before + 1 > max_buffered
        batches.extend(closed)
    batches.extend(bucketer.flush())
    assert bucketer.buffered == 0

    for b in batches:
        assert b.samples and b.keys == tuple(s.key for s in b.samples)
        assert (b.padded_tokens, b.padded_patches) == ref_padded(list(b.samples), family)
        assert b.padded_tokens <= budgets.tokens and b.padded_patches <= budgets.patches
        assert b.real_tokens == sum(s.tokens for s in b.samples)
        assert b.real_patches == sum(s.patches for s in b.samples)
        assert b.weight == 1.0
    batched = Counter(k for b in batches for k in b.keys)
    skipped = Counter(o.sample.key for o in bucketer.oversize)
    assert batched + skipped == Counter(s.key for s in samples)  # each exactly once overall
    assert not set(batched) & set(skipped)
    for s in samples:
        assert (s.key in skipped) == breaks([s], family, budgets)

    again = StreamingBucketer(budgets, family, edges, max_buffered).add_all(samples)
    assert again == batches


def test_oversize_is_reported_with_reason() -> None:
    budgets = Budgets(1000, 2000)
    bucketer = StreamingBucketer(budgets, "2.6", bucket_edges(np.array([10]), np.array([0]), 4))
    # 2 slices of (up to) 1100 patches: 1500 real patches but 2200 padded under 2.6
    big = sample("000000007", 10, [1100, 400])
    long = sample("000000008", 1001, [])
    assert bucketer.add(big) == [] and bucketer.add(long) == [] and bucketer.flush() == []
    first, second = bucketer.oversize
    assert "000000007" in first.reason and "patch budget 2000" in first.reason
    assert (first.padded_tokens, first.padded_patches) == (10, 2200)
    assert "000000008" in second.reason and "token budget 1000" in second.reason
    # the same patches fit under 4.6 (no per-slice padding)
    ok = StreamingBucketer(budgets, "4.6", bucket_edges(np.array([10]), np.array([0]), 4))
    assert ok.add(big) == [] and [b.keys for b in ok.flush()] == [("000000007",)]


def test_buffer_bound_closes_fullest_batch() -> None:
    tokens = np.array([100] * 10 + [1000])  # equal token mass: ten short, one long
    edges = bucket_edges(tokens, np.zeros(11, dtype=np.int64), 2)
    assert edges.num_buckets == 2 and edges.bucket_of(100, 0) != edges.bucket_of(1000, 0)
    bucketer = StreamingBucketer(Budgets(10_000, 10), "4.6", edges, max_buffered=5)
    out = [bucketer.add(SampleCost(f"s{i}", 100, 0)) for i in range(3)]
    out += [bucketer.add(SampleCost(f"l{i}", 1000, 0)) for i in range(2)]
    assert all(o == [] for o in out) and bucketer.buffered == 5
    (closed,) = bucketer.add(SampleCost("s3", 100, 0))  # 6 > 5: the fuller (long) batch closes
    assert closed.reason == "buffer" and closed.keys == ("l0", "l1")
    assert bucketer.buffered == 4


def test_flush_repacks_leftovers_tightly() -> None:
    edges = bucket_edges(np.arange(1, 41) * 50, np.zeros(40, dtype=np.int64), 20)
    bucketer = StreamingBucketer(Budgets(4000, 10), "4.6", edges, max_buffered=1000)
    lengths = [50 * k for k in range(1, 41)]
    rng = np.random.default_rng(0)
    for k in rng.permutation(40):
        bucketer.add(SampleCost(f"k{k}", lengths[k], 0))
    flushed = bucketer.flush()
    assert sum(b.num_samples for b in flushed) + 0 <= 40
    real = sum(b.real_tokens for b in flushed)
    padded = sum(b.padded_tokens for b in flushed)
    assert real / padded > 0.9  # sorted packing, not one ragged batch per bucket
    assert all(b.reason == "flush" and b.padded_tokens <= 4000 for b in flushed)


def test_bucket_edges_equal_token_mass_and_rows() -> None:
    rng = np.random.default_rng(1)
    n = 5000
    tokens = np.maximum(rng.lognormal(np.log(500), 0.9, n), 50).astype(np.int64)
    patches = np.where(rng.random(n) < 0.3, 0, rng.integers(1000, 30000, n))
    edges = bucket_edges(tokens, patches, 16)
    assert edges.patch_edges == () and edges.num_buckets == 16  # 1-D by default
    ids = np.array([edges.bucket_of(int(t), int(p)) for t, p in zip(tokens, patches, strict=True)])
    mass = np.bincount(ids, weights=tokens, minlength=edges.num_buckets)
    assert mass.max() < 1.6 * mass.mean() and mass.min() > 0.5 * mass.mean()
    assert list(edges.token_edges[0]) == sorted(set(edges.token_edges[0]))

    grid = bucket_edges(tokens, patches, 16, patch_rows=2)
    assert grid.patch_edges[0] == 0 and len(grid.patch_edges) == 2  # text-only row + 2 rows
    assert grid.num_buckets >= 16
    text_buckets = {grid.bucket_of(int(t), 0) for t in tokens}
    image_buckets = {
        grid.bucket_of(int(t), int(p)) for t, p in zip(tokens, patches, strict=True) if p
    }
    assert not text_buckets & image_buckets
    assert edges.to_dict()["token_edges"][0] == list(edges.token_edges[0])

    one = bucket_edges(np.array([7, 7, 7]), np.array([0, 0, 0]), 8)
    assert one.num_buckets == 1 and one.bucket_of(10**6, 10**6) == 0
