"""Epoch plans: every sample once per epoch across ranks, budgets kept, pure function of the
inputs, seeded orders, costliest batch first, equal steps (fillers only for an undividable
count), no length-sorted batch order, bounded shuffle buffer, real index and sample JSON; a 2.6
build plans from its index's per-image table as from its samples' JSON. The dealing itself:
tests/test_dealing.py."""

from __future__ import annotations

import json
import logging
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pipeline_data import make_pipeline_dataset

from mvprep.build import build
from mvprep.options import BuildOptions
from mvshards.image_table import IMAGE_TABLE_KEY
from mvshards.index import ShardEntry, load_index, write_entry, write_manifest
from mvshards.layout import compute_layout, num_image_tokens
from mvshards.profiles import get_profile
from mvshards.schema import ImageEntry, SampleMeta, sample_key
from mvshards.tario import iter_shard
from mvtrain.batching.plan_index import PlanIndex, slice_costs
from mvtrain.batching.schedule import (
    all_rank_plans,
    buffer_shuffle,
    epoch_plan,
    equal_step_plans,
    padded_plan,
    plan_report,
    steps_per_epoch,
)
from mvtrain.budgets import Budgets
from mvtrain.data.lengths import exact_lengths
from mvtrain.model.tiny import load_tiny_tokenizer


@st.composite
def index_st(draw: st.DrawFn) -> PlanIndex:
    """A small index: shards of 0..25 samples, text-only and image samples, slice table."""
    sizes = draw(st.lists(st.integers(0, 25), min_size=1, max_size=10))
    keys, shard_ids, tokens, patches, table = [], [], [], [], {}
    for shard, size in enumerate(sizes):
        for _ in range(size):
            key = sample_key(len(keys))
            slices = draw(st.lists(st.integers(1, 1100), max_size=10))
            keys.append(key)
            shard_ids.append(shard)
            tokens.append(draw(st.integers(1, 5000)))
            patches.append(sum(slices))
            if slices:
                table[key] = (len(slices), max(slices))
    return PlanIndex.from_arrays(keys, shard_ids, tokens, patches, len(sizes), table)


def synthetic(n: int, seed: int = 0, per_shard: int = 50) -> PlanIndex:
    """Realistic sizes: lognormal text, 25% text-only, images of 1-10 slices of ~1024 patches."""
    rng = np.random.default_rng(seed)
    slices = np.where(rng.random(n) < 0.25, 0, rng.integers(1, 11, n))
    patches = slices * rng.integers(900, 1025, n)
    tokens = np.clip(rng.lognormal(np.log(350), 0.9, n), 40, 3800).astype(np.int64) + 66 * slices
    keys = [sample_key(i) for i in range(n)]
    table = {k: (int(s), 1024) for k, s in zip(keys, slices, strict=True) if s}
    return PlanIndex.from_arrays(keys, np.arange(n) // per_shard, tokens, patches, None, table)


@pytest.mark.slow
@settings(max_examples=80, deadline=None)
@given(
    index=index_st(),
    budgets=st.builds(Budgets, st.integers(800, 15000), st.integers(800, 20000)),
    family=st.sampled_from(["4.6", "2.6"]),
    world=st.integers(1, 4),
    grad_accum=st.integers(1, 3),
    seed=st.integers(0, 2**32),
    epoch=st.integers(0, 3),
    buffer=st.integers(1, 40),
    window=st.integers(1, 10),
)
def test_plan_guarantees(
    index: PlanIndex,
    budgets: Budgets,
    family: str,
    world: int,
    grad_accum: int,
    seed: int,
    epoch: int,
    buffer: int,
    window: int,
) -> None:
    kw = {"shuffle_buffer": buffer, "num_buckets": 6, "batch_shuffle_window": window}
    plans = all_rank_plans(
        index, seed, epoch, world, budgets, family, max_buffered=30, grad_accum=grad_accum, **kw
    )
    shard_of = dict(zip(index.keys.tolist(), index.shard_ids.tolist(), strict=True))

    # every sample exactly once across ranks, batched or reported oversize (on rank 0)
    seen: Counter[str] = Counter()
    for p in plans:
        assert not p.oversize or p.rank == 0
        for b in p.batches:
            assert b.padded_tokens <= budgets.tokens and b.padded_patches <= budgets.patches
            assert all(shard_of[k] in p.shards for k in b.keys)
            if not b.is_filler:
                seen.update(b.keys)
        seen.update(o.sample.key for o in p.oversize)
        if p.batches:  # the costliest micro-batch runs first
            assert p.batches[0].cost == max(b.cost for b in p.batches)
    assert seen == Counter(index.keys.tolist())

    # a pure function: one rank alone, or again, gives the same plan
    for rank in {0, world - 1}:
        alone = epoch_plan(
            index, seed, epoch, rank, world, budgets, family, **kw, max_buffered=30,
            grad_accum=grad_accum,
        )  # fmt: skip
        assert alone == plans[rank]

    # equal steps already; fillers weigh 0, repeat the cheapest batch, fewer than a step's slots
    steps, padded = equal_step_plans(plans, grad_accum)
    assert padded == [replace(p, grad_accum=grad_accum) for p in plans]
    assert steps == steps_per_epoch(plans, grad_accum)
    cheapest = min((b.cost for p in plans for b in p.batches), default=None)
    for p in plans:
        assert len(p) == steps * grad_accum
        assert all(f.cost == cheapest for f in p.batches if f.is_filler)
    report = plan_report(padded)
    assert report["fillers"] < world * grad_accum or not steps
    assert report["oversize"] == sum(len(p.oversize) for p in plans)
    assert report["over_budget"] == 0
    if report["batches"]:
        assert 0 < report["token_efficiency"] <= 1 and 0 < report["patch_efficiency"] <= 1


def test_seed_and_epoch_change_the_order() -> None:
    index = synthetic(3000)
    budgets = Budgets(16384, 65536)

    def keys(seed: int, epoch: int) -> list[tuple[str, ...]]:
        return [b.keys for b in epoch_plan(index, seed, epoch, 0, 2, budgets, "4.6").batches]

    base = keys(1, 0)
    assert keys(1, 0) == base
    assert keys(2, 0) != base and keys(1, 1) != base
    assert keys(1, 0)[0] != base[1]
    # rank 1 of the same epoch trains the other samples
    other = epoch_plan(index, 1, 0, 1, 2, budgets, "4.6").batches
    assert not {k for b in base for k in b} & {k for b in other for k in b.keys}


@pytest.mark.parametrize("family", ["4.6", "2.6"])
def test_realistic_plan_is_efficient_and_not_length_sorted(family: str) -> None:
    index = synthetic(4000, seed=3)
    budgets = Budgets(16384, 65536)
    plans = all_rank_plans(index, 7, 0, 1, budgets, family)
    (plan,) = plans
    lengths = np.array([b.max_len for b in plan.batches[1:]], dtype=np.float64)
    # no sawtooth: position and batch length uncorrelated, ups and downs alternate freely
    ranks = np.argsort(np.argsort(lengths))
    rho = np.corrcoef(np.arange(len(lengths)), ranks)[0, 1]
    assert abs(rho) < 0.2
    ups = np.mean(np.diff(lengths) > 0)
    assert 0.3 < ups < 0.7
    assert plan.batches[0].cost == max(b.cost for b in plan.batches)
    # the end-of-stream leftovers (repacked longest first) are spread over the epoch
    flushed = [i for i, b in enumerate(plan.batches[1:]) if b.reason == "flush"]
    assert len(flushed) >= 8 and min(flushed) < len(lengths) / 2 < max(flushed)
    report = plan_report(plans)
    assert report["token_efficiency"] >= 0.95 and report["over_budget"] == 0
    assert report["oversize"] == 0 and report["samples"] == 4000


def test_window_shuffle_breaks_a_length_sorted_stream() -> None:
    """A dataset stored sorted by length, no sample shuffle: batches close in length order,
    so only the windowed batch shuffle keeps neighbours from being sorted."""
    n = 3000
    tokens = np.sort(np.random.default_rng(0).integers(100, 4000, n))
    index = PlanIndex.from_arrays([sample_key(i) for i in range(n)], [0] * n, tokens, [0] * n)
    plan = epoch_plan(index, 0, 0, 0, 1, Budgets(16384, 1000), "4.6", 1, 64, 32)
    lengths = np.array([b.max_len for b in plan.batches[1:]])
    assert len(lengths) > 100
    ups = np.mean(np.diff(lengths) > 0)
    assert 0.3 < ups < 0.7


def test_buffer_shuffle_is_bounded_and_seeded() -> None:
    items = list(range(500))
    out = buffer_shuffle(items, 32, np.random.default_rng(5))
    assert sorted(out) == items and out != items
    position = {x: i for i, x in enumerate(out)}
    assert all(position[i] >= i - 31 for i in items)  # never earlier than the buffer allows
    assert out == buffer_shuffle(items, 32, np.random.default_rng(5))
    assert buffer_shuffle(items, 1, np.random.default_rng(5)) == items
    assert sorted(buffer_shuffle(items[:10], 64, np.random.default_rng(0))) == items[:10]
    with pytest.raises(ValueError, match=">= 1"):
        buffer_shuffle(items, 0, np.random.default_rng(0))


def test_two_six_needs_a_slice_table() -> None:
    index = PlanIndex.from_arrays(["000000000", "000000001"], [0, 0], [100, 200], [0, 3000])
    with pytest.raises(ValueError, match="000000001.*slice table"):
        epoch_plan(index, 0, 0, 0, 1, Budgets(1000, 10000), "2.6")
    plan = epoch_plan(index, 0, 0, 0, 1, Budgets(1000, 10000), "4.6")
    assert plan.num_samples == 2
    wrong = PlanIndex.from_arrays(
        ["000000000"], [0], [100], [3000], slice_table={"000000000": (2, 1000)}
    )
    with pytest.raises(ValueError, match="does not belong"):
        epoch_plan(wrong, 0, 0, 0, 1, Budgets(1000, 10000), "2.6")


def test_padded_plan_rejects_too_few_steps_and_empty_ranks() -> None:
    index = synthetic(200, per_shard=100)  # 2 shards: every one of 3 ranks has batches
    plans = all_rank_plans(index, 0, 0, 3, Budgets(8192, 65536), "4.6")
    assert all(p.num_real_batches for p in plans) and len({len(p) for p in plans}) == 1
    with pytest.raises(ValueError, match="rank .* no batch this epoch"):
        equal_step_plans([*plans, replace(plans[0], rank=3, batches=())], 1)
    with pytest.raises(ValueError, match="more than"):
        padded_plan(plans[0], 1, 1)
    longer = padded_plan(plans[0], len(plans[0]) + 2, 1)
    assert longer.batches[: len(plans[0])] == plans[0].batches
    assert [b.is_filler for b in longer.batches[len(plans[0]) :]] == [True, True]


def _meta(key: str, sizes: list[tuple[int, int]]) -> SampleMeta:
    profile = get_profile("minicpmv-2.6")
    images = []
    for i, (w, h) in enumerate(sizes):
        layout = compute_layout(w, h, profile, 9)
        images.append(
            ImageEntry(
                f"{i}.jpg",
                "0" * 64,
                layout,
                None,
                num_image_tokens(layout, profile, None),
                f"{key}.src{i}.jpg",
                None,
            )  # fmt: skip
        )
    return SampleMeta(key, key, [{"role": "user", "content": "hi"}], images, num_text_tokens=20)


def test_from_a_real_index_with_slice_table(tmp_path: Path) -> None:
    metas = [_meta(sample_key(i), [(1344, 896)] * (i % 3)) for i in range(12)]
    entries = []
    for unit in range(3):
        rows = [m.index_row() for m in metas[4 * unit : 4 * unit + 4]]
        entry = ShardEntry(unit, f"{unit:06d}.tar", [4 * unit, 4 * unit + 4], "ab" * 32, 1, 4, rows)
        write_entry(tmp_path, entry)
        entries.append(entry)
    write_manifest(tmp_path, {"profile": "minicpmv-2.6"}, entries, {})
    dataset = load_index(tmp_path)
    table = {m.key: slice_costs(m) for m in metas if m.images}
    layout = metas[1].images[0].layout
    assert table[metas[1].key] == (1 + layout.num_slices, max(r * c for r, c in layout.tgt_sizes))
    assert table[metas[2].key][0] == 2 * (1 + layout.num_slices)

    budgets = Budgets(4096, 40000)
    plans = all_rank_plans(dataset, 3, 0, 2, budgets, "2.6", slice_table=table)
    planned = sorted(k for p in plans for b in p.batches for k in b.keys)
    skipped = sorted(o.sample.key for p in plans for o in p.oversize)
    assert sorted(planned + skipped) == [m.key for m in metas]
    for p in plans:
        for b in p.batches:
            pps = max((table.get(k, (0, 0))[1] for k in b.keys), default=0)
            assert b.padded_patches == sum(table.get(k, (0, 0))[0] for k in b.keys) * pps
    assert plan_report(plans)["cost_model"] == "2.6"


@pytest.fixture(scope="module")
def built_26(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real 2.6 build (sliced, multi-image and text-only samples) with its per-image table."""
    data = make_pipeline_dataset(tmp_path_factory.mktemp("data") / "set", count=12)
    out = tmp_path_factory.mktemp("built") / "26"
    options = BuildOptions(
        data_path=data, out_dir=out, profile="minicpmv-2.6", max_res=896, samples_per_shard=4
    )
    assert build(options, workers=1, progress=False).ok
    return out


def _json_slice_table(out: Path) -> dict[str, tuple[int, int]]:
    return {
        key: slice_costs(SampleMeta.from_json(json.loads(members["json"])))
        for shard in load_index(out).shard_paths()
        for key, members in iter_shard(shard)
    }


@pytest.mark.slow
def test_a_2_6_build_plans_from_its_index_as_from_its_json(built_26: Path) -> None:
    dataset = load_index(built_26)
    from_index = PlanIndex.from_index(dataset)
    from_json = PlanIndex.from_index(dataset, _json_slice_table(built_26))
    for name in ("keys", "shard_ids", "tokens", "patches", "slices", "max_patches_per_slice"):
        assert np.array_equal(getattr(from_index, name), getattr(from_json, name)), name
    assert (from_index.slices > dataset.num_images).any()  # slices counted, not only sources
    budgets = Budgets(4096, 40000)
    plans = all_rank_plans(from_index, 0, 0, 2, budgets, "2.6")
    assert plans == all_rank_plans(from_json, 0, 0, 2, budgets, "2.6")
    assert sum(p.num_samples + len(p.oversize) for p in plans) == len(dataset)


@pytest.mark.slow
def test_an_old_2_6_index_reads_slices_from_the_json(
    built_26: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old = tmp_path / "old"
    shutil.copytree(built_26, old)
    for path in (old / "index").glob("*.json"):
        obj = json.loads(path.read_text())
        del obj["stats"][IMAGE_TABLE_KEY]
        path.write_text(json.dumps(obj))
    dataset = load_index(old)
    assert dataset.slice_costs() is None
    with pytest.raises(ValueError, match="per-image table"):
        epoch_plan(dataset, 0, 0, 0, 1, Budgets(4096, 40000), "2.6")
    tokenizer = load_tiny_tokenizer()
    with caplog.at_level(logging.INFO, logger="mvtrain"):
        lengths = exact_lengths(dataset, tokenizer, "minicpmv-2.6", None)
    assert "no per-image table" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mvtrain"):
        fresh = exact_lengths(load_index(built_26), tokenizer, "minicpmv-2.6", None)
    assert "no per-image table" not in caplog.text
    assert lengths.slices == fresh.slices == _json_slice_table(built_26)
    assert np.array_equal(lengths.tokens, fresh.tokens)
