"""The one cost model: sample costs from a sample's JSON, an index row with the index's
per-image table, or a loaded sample agree; each family's padded cost is what its collate
really pads; the stats, the planner and the bucketer call the same rule; families are
singletons."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pytest
import train_fixtures
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from train_fixtures import PROFILES, Loaded

from mvprep.stats import load_index_arrays, per_sample_patch_cost
from mvshards.cost import CostModel, CostTotals, SampleCost
from mvshards.families import FAMILIES, NATIVE_46, REMOTE_26, get_family
from mvshards.index import load_index
from mvshards.profiles import get_profile
from mvtrain.batching.bucketer import make_batch
from mvtrain.batching.plan_index import PlanIndex
from mvtrain.budgets import Budgets
from mvtrain.model.adapters import Native46Adapter, adapter_for, sample_cost

# The shared module-scoped fixtures (``loaded`` needs the other four), bound here so that
# this module gets its own instances.
_one_thread = train_fixtures._one_thread
tok_dir = train_fixtures.tok_dir
tiny = train_fixtures.tiny
dataset = train_fixtures.dataset
loaded = train_fixtures.loaded

PATCH = 14


def _patches_held_by(adapter: Any, batch: dict[str, Any]) -> int:
    """Patches the collated pixel tensors really hold, padding included.

    4.6: every (sub)image NaViT-packed along the last axis of ``[1, 3, 14, sum(L_i * 14)]``.
    2.6: per-sample lists of ``[3, 14, L_i * 14]``; the model pads each to the longest.
    """
    if isinstance(adapter, Native46Adapter):
        pv = batch["pixel_values"]
        return 0 if pv is None else pv.shape[-1] // PATCH
    views = [p for per_sample in batch["pixel_values"] for p in per_sample]
    return len(views) * max((p.shape[-1] // PATCH for p in views), default=0)


def _index_costs(loaded: Any, profile: str) -> dict[str, SampleCost]:
    """Every sample's cost from the built index alone: its row and its per-image table."""
    index = load_index(loaded.root / profile)
    table = index.slice_costs()
    assert table is not None
    return {
        row[0]: SampleCost.from_index_row(row, int(a), int(b))
        for row, a, b in zip(index.sample_rows(), *table, strict=True)
    }


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    profile=st.sampled_from(PROFILES),
    picks=st.lists(st.integers(0, 11), min_size=1, max_size=5),
)
def test_padded_cost_is_what_collate_pads(
    profile: str, picks: list[int], loaded: Any, tiny: tuple[Any, Any]
) -> None:
    rows: Loaded = [loaded[profile][i % len(loaded[profile])] for i in picks]
    cost = get_profile(profile).family.cost
    adapter = adapter_for(profile, tiny[1])
    batch = adapter.collate([s for _, _, s in rows])
    padded = (batch["input_ids"].numel(), _patches_held_by(adapter, batch))
    from_loaded = [sample_cost(s) for _, _, s in rows]
    from_json = [SampleCost.from_meta(m) for m, _, _ in rows]
    by_key = _index_costs(loaded, profile)
    from_index = [by_key[m.key] for m, _, _ in rows]
    assert from_loaded == from_json == from_index
    assert cost.padded(from_loaded) == padded
    assert adapter.padded_cost([s for _, _, s in rows]) == padded
    assert adapter.padded_cost([m for m, _, _ in rows]) == padded
    if not cost.pads_subimages:
        assert adapter.padded_cost([m.index_row() for m, _, _ in rows]) == padded
    elif any(m.images for m, _, _ in rows):
        with pytest.raises(ValueError, match="per-\\(sub\\)image sizes"):
            adapter.padded_cost([m.index_row() for m, _, _ in rows])


def test_padded_and_alone_by_hand() -> None:
    a = SampleCost.from_grids("a", 100, [(32, 32), (30, 30)])
    b = SampleCost.from_grids("b", 300, [(20, 20)])
    c = SampleCost.from_grids("c", 50, [])
    assert (a.patches, a.slices, a.max_patches_per_slice) == (1924, 2, 1024)
    assert c == SampleCost("c", 50, 0, 0, 0)
    assert NATIVE_46.cost.padded([a, b, c]) == (900, 1924 + 400 + 0)
    assert REMOTE_26.cost.padded([a, b, c]) == (900, 3 * 1024)
    assert REMOTE_26.cost.alone(b) == (300, 400) == NATIVE_46.cost.alone(b)
    assert NATIVE_46.cost.padded([]) == REMOTE_26.cost.padded([]) == (0, 0)
    assert CostModel.real([a, b, c]) == (450, 2324)
    assert CostTotals.of([a, b, c]) == (3, 300, 2324, 3, 1024)
    REMOTE_26.cost.check(a)
    with pytest.raises(ValueError, match="sample r: 1924 patches"):
        REMOTE_26.cost.check(SampleCost.from_index_row(["r", 100, 1924, 1]))
    NATIVE_46.cost.check(SampleCost.from_index_row(["r", 100, 1924, 1]))


def test_the_rule_over_arrays_is_the_rule_per_sample() -> None:
    rng = np.random.default_rng(0)
    samples = [
        SampleCost.from_grids(f"{i}", int(rng.integers(1, 4000)), rng.integers(1, 40, (k, 2)))
        for i, k in enumerate(rng.integers(0, 6, 200))
    ]
    columns = [np.array([getattr(s, f) for s in samples]) for f in ("tokens", "patches")]
    slices = np.array([s.slices for s in samples])
    largest = np.array([s.max_patches_per_slice for s in samples])
    for family in FAMILIES.values():
        totals = CostTotals(1, *columns, slices, largest)
        tokens, patches = family.cost.padded_totals(totals)
        assert [(int(t), int(p)) for t, p in zip(tokens, patches, strict=True)] == [
            family.cost.alone(s) for s in samples
        ]


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["minicpmv-4.6", "minicpmv-2.6"])
def test_stats_planner_and_bucketer_call_the_one_rule(profile: str, loaded: Any) -> None:
    cost = get_profile(profile).family.cost
    metas = {m.key: m for m, _, _ in loaded[profile]}
    out = loaded.root / profile
    index = load_index(out)
    expected = [cost.alone(SampleCost.from_meta(metas[k])) for k in index.keys.tolist()]
    stats = per_sample_patch_cost(load_index_arrays(out), cost)
    assert stats is not None and stats.tolist() == [p for _, p in expected]
    plan_index = PlanIndex.from_index(index)
    assert [cost.alone(plan_index.sample(i)) for i in range(len(plan_index))] == expected
    batch = make_batch([plan_index.sample(i) for i in range(len(plan_index))], Budgets(1, 1), cost)
    assert (batch.padded_tokens, batch.padded_patches) == cost.padded(
        [SampleCost.from_meta(metas[k]) for k in index.keys.tolist()]
    )


def test_families_are_singletons_with_their_facts() -> None:
    assert get_family("4.6") is NATIVE_46 and get_family("2.6") is REMOTE_26
    assert pickle.loads(pickle.dumps(REMOTE_26)) is REMOTE_26
    assert str(NATIVE_46) == "4.6" and NATIVE_46 != REMOTE_26
    assert {get_profile(p).family for p in PROFILES} == {NATIVE_46, REMOTE_26}
    assert CostModel.of("2.6") is REMOTE_26.cost and CostModel.of(NATIVE_46.cost) is NATIVE_46.cost
    assert NATIVE_46.navit_packing and not NATIVE_46.remote_code
    assert REMOTE_26.remote_code and REMOTE_26.cost.pads_subimages
    with pytest.raises(ValueError, match="known families: 2.6, 4.6"):
        get_family("3.0")
