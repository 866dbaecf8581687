"""Work dealt by micro-batch, not by shard: filling a step's slots (splits before fillers),
dealing to (step, rank) slots with balanced padded cost, one shard on 2, 3 and 8 ranks, the
benchmark's filler fraction, efficiency and balance at 8 ranks, and the exact-length recount
shared by the ranks (all-gathered, cached by rank 0, skipped for an exact index)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mvshards.cost import SampleCost
from mvshards.families import NATIVE_46
from mvshards.index import load_index
from mvtrain.batching.bucketer import Batch, make_batch
from mvtrain.batching.epochs import plan_epochs
from mvtrain.batching.plan_index import PlanIndex
from mvtrain.batching.schedule import (
    all_rank_plans,
    deal_steps,
    fill_steps,
    plan_report,
    step_balance,
)
from mvtrain.budgets import Budgets
from mvtrain.data.lengths import FINGERPRINT_PARAM, exact_lengths, tokenizer_fingerprint
from mvtrain.distributed import DistInfo
from mvtrain.model.tiny import load_tiny_tokenizer
from mvtrain.run_config import RunConfig

BUDGETS = Budgets(4096, 8192)


@st.composite
def batches_st(draw: st.DrawFn) -> list[Batch]:
    """Micro-batches of 1..5 samples within BUDGETS (4.6 cost: tokens n * longest)."""
    out: list[Batch] = []
    for b in range(draw(st.integers(0, 24))):
        n = draw(st.integers(1, 5))
        longest = draw(st.integers(1, BUDGETS.tokens // n))
        samples = [
            SampleCost(
                f"{b:03d}-{i}", draw(st.integers(1, longest)), draw(st.integers(0, 1300)), 0, 0
            )
            for i in range(n)
        ]
        out.append(make_batch(samples, BUDGETS, "4.6"))
    return out


@settings(max_examples=100, deadline=None)
@given(
    batches=batches_st(),
    world=st.integers(1, 8),
    grad_accum=st.integers(1, 3),
    window=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_filling_and_dealing_guarantees(
    batches: list[Batch], world: int, grad_accum: int, window: int, seed: int
) -> None:
    slots = world * grad_accum
    filled, fillers = fill_steps(batches, slots, BUDGETS, "4.6")
    real = [b for b in filled if not b.is_filler]
    # the same samples, each once; no part over budget; a multiple of the slots
    assert Counter(k for b in real for k in b.keys) == Counter(k for b in batches for k in b.keys)
    assert all(b.padded_tokens <= BUDGETS.tokens for b in filled)
    assert all(b.padded_patches <= BUDGETS.patches for b in filled)
    assert len(filled) % slots == 0 and fillers == len(filled) - len(real)
    # fillers only when nothing is left to split, and fewer than one step's slots
    assert fillers < slots
    if fillers:
        assert all(b.num_samples == 1 for b in real)
        cheapest = min(b.cost for b in real)
        assert all(b.weight == 0.0 and b.cost == cheapest for b in filled if b.is_filler)
    if not batches:
        assert filled == []

    plans = deal_steps(filled, world, grad_accum, window, np.random.default_rng(seed))
    steps = len(filled) // slots
    assert [len(p) for p in plans] == [steps * grad_accum] * world
    assert Counter(id(b) for p in plans for b in p) == Counter(id(b) for b in filled)
    if not steps:
        return
    top = sorted((b.cost for b in filled), reverse=True)
    if world > 1:  # step 0 holds the costliest batches: every rank's first is its costliest
        first = sorted((b.cost for p in plans for b in p[:grad_accum]), reverse=True)
        assert first == top[:slots]
    for p in plans:
        assert p[0].cost == max(b.cost for b in p)
    # per step the ranks' padded costs differ by at most the step's costliest batch
    for s in range(steps):
        mine = [p[s * grad_accum : (s + 1) * grad_accum] for p in plans]
        loads = [sum(b.cost for b in m) for m in mine]
        assert max(loads) - min(loads) <= max(b.cost for m in mine for b in m) + 1e-9
    # the same inputs deal the same way
    assert deal_steps(filled, world, grad_accum, window, np.random.default_rng(seed)) == plans


def _one_shard(n: int = 29, seed: int = 0) -> PlanIndex:
    rng = np.random.default_rng(seed)
    return PlanIndex.from_arrays(
        [f"{i:09d}" for i in range(n)],
        [0] * n,
        rng.integers(40, 900, n),
        rng.integers(0, 3000, n),
        num_shards=1,
    )


@pytest.mark.parametrize("world", [2, 3, 8])
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_one_shard_trains_on_any_number_of_ranks(world: int, grad_accum: int) -> None:
    """The issue's repro (29 samples, one shard), planned by every rank as a run does."""
    index = _one_shard()
    config = RunConfig(
        shards=[], model="tiny", output=Path("unused"), epochs=2, token_budget=4096,
        patch_budget=16384, grad_accum=grad_accum,
    )  # fmt: skip
    plans = [
        plan_epochs(config, index, DistInfo(r, world, r, "gloo"), NATIVE_46.cost)
        for r in range(world)
    ]
    assert all(p.steps == plans[0].steps for p in plans) and plans[0].steps[0] >= 1
    for epoch, steps in enumerate(plans[0].steps):
        mine = [p.plans[epoch] for p in plans]
        assert all(len(m) == steps * grad_accum for m in mine)
        assert all(m.num_real_batches for m in mine), "every rank trains something"
        trained = Counter(k for m in mine for b in m.batches if not b.is_filler for k in b.keys)
        assert trained == Counter(index.keys.tolist())
        report = plans[0].report[epoch]
        assert report["fillers"] < world * grad_accum
        assert len(report["step_balance"]["per_step"]) == steps


def test_the_benchmark_set_at_8_ranks() -> None:
    """scripts/bench_batching.py's set: few fillers, one rank's efficiency, balanced steps."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
    from bench_batching import synthetic_index

    index, _ = synthetic_index(4000, 0, "minicpmv-4.6")
    budgets = Budgets(16384, 131072)
    one = plan_report(all_rank_plans(index, 0, 0, 1, budgets, "4.6"))
    eight = plan_report(all_rank_plans(index, 0, 0, 8, budgets, "4.6"))
    assert eight["filler_fraction"] <= 0.01
    assert abs(eight["token_efficiency"] - one["token_efficiency"]) <= 0.01
    assert eight["step_balance"]["mean"] >= 0.9 and one["step_balance"]["min"] == 1.0
    assert eight["samples"] == one["samples"] == 4000


def test_step_balance_reads_each_steps_ranks() -> None:
    def batch(tokens: int) -> Batch:
        return make_batch([SampleCost("k", tokens, 0, 0, 0)], BUDGETS, "4.6")

    plans = all_rank_plans(_one_shard(8), 0, 0, 2, BUDGETS, "4.6")
    a, b = (plans[0].__class__(**{**vars(p), "batches": bs}) for p, bs in zip(
        plans, [(batch(100), batch(400)), (batch(300), batch(400))], strict=True
    ))  # fmt: skip
    got = step_balance([a, b])
    assert got["per_step"] == [round((100 + 300) / 2 / 300, 3), 1.0]
    assert got["min"] == pytest.approx(2 / 3)


# --- exact lengths: every rank its share ---------------------------------------------------


def _threaded_gather(world: int) -> Callable[[Any], list[Any]]:
    """An all-gather between ``world`` threads (each one rank)."""
    slots: list[Any] = [None] * world
    barrier = threading.Barrier(world)
    local = threading.local()

    def gather(obj: Any) -> list[Any]:
        slots[local.rank] = obj
        barrier.wait(timeout=60)
        out = list(slots)
        barrier.wait(timeout=60)
        return out

    gather.local = local  # type: ignore[attr-defined]
    return gather


def _on_ranks(world: int, call: Callable[[int, Callable[[Any], list[Any]]], Any]) -> list[Any]:
    gather = _threaded_gather(world)
    results: list[Any] = [None] * world
    errors: list[BaseException] = []

    def body(rank: int) -> None:
        gather.local.rank = rank  # type: ignore[attr-defined]
        try:
            results[rank] = call(rank, gather)
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    return results


@pytest.mark.slow
def test_a_recount_shared_by_ranks_equals_one_ranks(shards: Path, tmp_path: Path) -> None:
    index = load_index(shards)  # 12 samples in 4 shards
    tokenizer = load_tiny_tokenizer()
    profile = str(index.params["profile"])
    alone = exact_lengths(index, tokenizer, profile, None)
    assert alone.recounted
    for world in (3, 5):  # 5 ranks: more ranks than shards
        cache = tmp_path / f"cache{world}"
        counted = _on_ranks(
            world,
            lambda r, g, w=world, c=cache: exact_lengths(
                index, tokenizer, profile, c, rank=r, world_size=w, gather=g
            ),
        )
        for got in counted:
            assert got.recounted and np.array_equal(got.tokens, alone.tokens)
            assert got.slices == alone.slices and got.mismatches == alone.mismatches
        assert len(list(cache.glob("lengths-*.json"))) == 1, "rank 0 wrote the cache"
        again = _on_ranks(
            world,
            lambda r, g, w=world, c=cache: exact_lengths(
                index, tokenizer, profile, c, rank=r, world_size=w, gather=g
            ),
        )
        assert all(not a.recounted and np.array_equal(a.tokens, alone.tokens) for a in again)
    # a cache only one rank sees: all recount (no rank waits alone in a gather)
    lonely = tmp_path / "cache3"
    mixed = _on_ranks(
        2,
        lambda r, g: exact_lengths(
            index, tokenizer, profile, lonely if r == 0 else None, rank=r, world_size=2, gather=g
        ),
    )
    assert all(m.recounted for m in mixed)
    with pytest.raises(ValueError, match="needs their gather"):
        exact_lengths(index, tokenizer, profile, None, rank=0, world_size=2)


@pytest.mark.slow  # the shards fixture builds a data set
def test_an_exact_index_of_the_same_tokenizer_is_not_recounted(shards: Path) -> None:
    index = load_index(shards)
    tokenizer = load_tiny_tokenizer()
    profile = str(index.params["profile"])
    index.params[FINGERPRINT_PARAM] = tokenizer_fingerprint(tokenizer)
    got = exact_lengths(index, tokenizer, profile, None)
    assert not got.recounted and np.array_equal(got.tokens, index.num_tokens)
    index.params[FINGERPRINT_PARAM] = "another"
    assert exact_lengths(index, tokenizer, profile, None).recounted


@pytest.mark.slow  # builds a small data set with a tokenizer
def test_a_build_with_the_trainers_tokenizer_records_its_fingerprint_and_skips_the_recount(
    tmp_path: Path,
) -> None:
    from pipeline_data import make_pipeline_dataset

    from mvprep.build import build
    from mvprep.options import BuildOptions
    from mvshards.tiny_tokenizer import build_tiny_tokenizer

    tok_dir = build_tiny_tokenizer(tmp_path / "tok")
    data = make_pipeline_dataset(tmp_path / "data", count=6)
    out = tmp_path / "shards"
    options = BuildOptions(
        data_path=data, out_dir=out, max_res=448, samples_per_shard=3, tokenizer=str(tok_dir)
    )
    assert build(options, workers=1, progress=False).ok
    index = load_index(out)
    tokenizer = load_tiny_tokenizer()
    assert index.params[FINGERPRINT_PARAM] == tokenizer_fingerprint(tokenizer)
    profile = str(index.params["profile"])
    got = exact_lengths(index, tokenizer, profile, None)
    assert not got.recounted
    index.params[FINGERPRINT_PARAM] = "another"
    recount = exact_lengths(index, tokenizer, profile, None)
    assert recount.recounted and np.array_equal(recount.tokens, got.tokens)
