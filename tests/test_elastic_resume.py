"""``--resume`` with another world size, other budgets or another ``--grad-accum``: the rest of
the epoch is exactly the samples not yet trained, planned anew from the checkpoint's data
position (the set of trained samples, not a step number), and ZeRO-2 state is re-partitioned.

Planning (fast): any chain of setting changes trains every sample of every epoch exactly
once (weighted copies too), the issue's 29-sample budget change included; the same settings
continue the checkpoint's plan by step; a re-plan is deterministic; what cannot change is
refused in one line; the learning-rate schedule follows a re-plan's step count.

Runs (slow, :mod:`elastic_runs`): 2 ranks -> 1 with lower budgets, 1 -> 2 (on two torchrun
nodes), each checked against the batch logs (every sample once) and against the
uninterrupted run's weights (the rest of the epoch is one step: equal within fp32 rounding,
which needs the Adam state re-partitioned right); and another engine refused in one line.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import elastic_runs
import numpy as np
import pytest
import torch
from elastic_runs import (
    GROUP,
    all_keys,
    events,
    max_difference,
    stopped_copy,
    train,
    trained,
    weights,
)

from mvshards.families import NATIVE_46
from mvtrain.batching.epochs import REPLAN_EVENT, EpochPlans, plan_epochs
from mvtrain.batching.plan_index import PlanIndex
from mvtrain.batching.position import DataPosition
from mvtrain.batching.sources import ShardSource, SourceMix
from mvtrain.distributed import DistInfo
from mvtrain.resume_checks import check_old_checkpoint, check_same_engine, setup_record
from mvtrain.run_config import RunConfig

two_node_run = elastic_runs.two_node_run
one_rank_run = elastic_runs.one_rank_run
one_rank_on_two_nodes = elastic_runs.one_rank_on_two_nodes

# --- planning ----------------------------------------------------------------------------


def _index(n: int = 29, per_shard: int = 29, seed: int = 0) -> PlanIndex:
    """The issue's epoch: ``n`` samples (one shard by default), random costs."""
    rng = np.random.default_rng(seed)
    return PlanIndex.from_arrays(
        [f"{i:09d}" for i in range(n)],
        [i // per_shard for i in range(n)],
        rng.integers(40, 900, n),
        rng.integers(0, 3000, n),
    )


def _config(**changes: Any) -> RunConfig:
    options: dict[str, Any] = {
        "shards": [],
        "model": "tiny",
        "output": Path("unused"),
        "epochs": 2,
        "token_budget": 4096,
        "patch_budget": 16384,
    }
    return RunConfig(**{**options, **changes})


Leg = tuple[int, dict[str, Any], int | None]
"""A stretch of a run: (world size, RunConfig changes, optimizer steps; None: to the end)."""


def _train(index: PlanIndex | SourceMix, legs: list[Leg]) -> tuple[Counter, list[EpochPlans]]:
    """Simulate ``legs`` of a run as the loop steps through the plans, every rank planning
    for itself and each leg resuming from the data position the last one saved: how often
    each (epoch, sample) was trained, and every leg's rank-0 plans."""
    done: Counter[tuple[int, str]] = Counter()
    position: DataPosition | None = None
    step = 0
    seen = []
    for world, changes, steps in legs:
        config = _config(**changes)
        ranks = [
            plan_epochs(config, index, DistInfo(r, world, r, "gloo"), NATIVE_46.cost, position)
            for r in range(world)
        ]
        epochs = ranks[0]
        assert all(r.steps == epochs.steps for r in ranks), "every rank runs the same steps"
        end = sum(epochs.steps) if steps is None else min(sum(epochs.steps), step + steps)
        while step < end:
            epoch, in_epoch = epochs.locate(step)
            local = in_epoch - epochs.plan_start(epoch)
            for plan in (r.plans[epoch] for r in ranks):
                window = plan.batches[local * config.grad_accum : (local + 1) * config.grad_accum]
                done.update((epoch, k) for b in window if not b.is_filler for k in b.keys)
            step += 1
        position = epochs.position_at(step)
        seen.append(epochs)
    return done, seen


def _every_sample_once(index: PlanIndex, epochs: int = 2) -> Counter:
    return Counter({(e, str(k)): 1 for e in range(epochs) for k in index.keys})


def test_the_issues_budget_change_trains_every_sample_once() -> None:
    """29 samples on 2 ranks, stopped after step 2, resumed with budgets 2048/14400 instead
    of 4096/16384 (in the issue, mapping the position by step number trained 9 samples
    twice and 4 never; here it would train 14 twice and 9 never)."""
    index = _index()
    lower = {"token_budget": 2048, "patch_budget": 14400}
    done, legs = _train(index, [(2, {}, 2), (2, lower, None)])
    assert done == _every_sample_once(index)
    change = legs[1].change
    assert change is not None and change["event"] == REPLAN_EVENT
    assert change["changed"] == ["--token-budget 4096 -> 2048", "--patch-budget 16384 -> 14400"]
    assert change["trained_samples"] + change["planned_samples"] == 29
    assert legs[1].plans[0].budgets.as_dict() == {"tokens": 2048, "patches": 14400}


@pytest.mark.parametrize(
    "legs",
    [
        [(2, {}, 1), (1, {}, None)],  # 2 ranks -> 1
        [(1, {}, 2), (2, {}, None)],  # 1 -> 2
        [(2, {}, 1), (1, {"grad_accum": 3}, 2), (3, {"token_budget": 3000}, 1), (2, {}, None)],
        [(3, {"grad_accum": 2}, 1), (3, {"grad_accum": 1}, 4), (1, {"patch_budget": 9000}, None)],
    ],
)
def test_any_chain_of_settings_trains_every_sample_once(legs: list[Leg]) -> None:
    index = _index(per_shard=4)
    done, _ = _train(index, legs)
    assert done == _every_sample_once(index)


def test_weighted_copies_are_trained_as_often_as_the_epoch_holds_them() -> None:
    """A mix: one source twice and a half (copies of a key share it), one at 0.5."""
    sources = [ShardSource(Path("a/shards"), 2.5), ShardSource(Path("b/shards"), 0.5)]
    mix = SourceMix.of_plan_indexes(sources, [_index(10, 3, seed=1), _index(9, 3, seed=2)])
    legs = [(2, {}, 2), (1, {"grad_accum": 2}, 3), (2, {"token_budget": 2048}, None)]
    done, _ = _train(mix, legs)
    for epoch in range(2):
        expected = Counter(str(k) for k in mix.epoch_index(0, epoch).keys)
        assert Counter({k: n for (e, k), n in done.items() if e == epoch}) == expected


def test_the_same_settings_continue_the_plan_by_step() -> None:
    """Unchanged settings: the resumed plans are the uninterrupted run's, no re-plan."""
    index = _index(per_shard=4)
    _, [whole] = _train(index, [(2, {}, None)])
    _, [_, resumed] = _train(index, [(2, {}, 3), (2, {}, None)])
    assert resumed.change is None and resumed.steps == whole.steps
    assert all(resumed.plans[e] == whole.plans[e] for e in whole.plans)
    assert all(resumed.plan_start(e) == 0 for e in whole.plans)


def test_a_second_resume_of_the_same_kind_plans_the_same() -> None:
    """Re-planned twice from one checkpoint: the same plan. Resumed again later with the
    settings of the re-plan: it continues by step (no second re-plan)."""
    index = _index(per_shard=4)
    done, [_, replanned, continued] = _train(index, [(2, {}, 2), (1, {}, 1), (1, {}, None)])
    assert done == _every_sample_once(index)
    assert replanned.change is not None and continued.change is None
    assert continued.locate(3)[0] == 0, "the third leg starts inside the re-planned epoch"
    assert continued.plans[0] == replanned.plans[0] and continued.plan_start(0) == 2
    _, [first, again] = _train(index, [(2, {}, 2), (1, {"grad_accum": 2}, 0)])
    position = first.position_at(2)
    twice = plan_epochs(_config(grad_accum=2), index, DistInfo(0, 1, 0, "gloo"), NATIVE_46.cost,
                        position)  # fmt: skip
    assert twice.plans == again.plans and twice.steps == again.steps
    assert twice.plan_start(0) == 2 and twice.change == again.change


def test_the_position_survives_a_checkpoint(tmp_path: Path) -> None:
    index = _index(per_shard=4)
    _, [leg] = _train(index, [(2, {"epochs": 1}, 2)])
    position = leg.position_at(2)
    torch.save({"position": position.as_dict()}, tmp_path / "rank-0.pt")
    back = DataPosition.of(torch.load(tmp_path / "rank-0.pt", weights_only=False)["position"])
    assert back.trained is not None and position.trained is not None
    assert np.array_equal(back.trained, position.trained) and back.before is None
    assert (back.step, back.epoch, back.settings, back.rows) == (2, 0, position.settings, 29)
    assert 0 < back.trained_count < 29


def test_another_seed_or_other_shards_are_refused() -> None:
    index = _index(per_shard=4)
    _, [leg] = _train(index, [(2, {}, 1)])
    position = leg.position_at(1)
    world = DistInfo(0, 2, 0, "gloo")
    with pytest.raises(ValueError, match="pass --seed 0"):
        plan_epochs(_config(seed=1), index, world, NATIVE_46.cost, position)
    with pytest.raises(ValueError, match="held 29 samples, this run's holds 30"):
        plan_epochs(_config(), _index(30, 4), world, NATIVE_46.cost, position)


def test_another_engine_state_is_refused_naming_the_options() -> None:
    ds = setup_record(_config(), True, "fp32", 2)
    torch_engine = setup_record(_config(), False, "fp32", 1)
    with pytest.raises(ValueError) as refused:
        check_same_engine(ds, torch_engine, "OUT/checkpoints/step-000002")
    assert str(refused.value) == (
        "--resume: OUT/checkpoints/step-000002 holds the optimizer state of the deepspeed "
        "engine (ZeRO-2, fp32), which cannot carry over to the torch engine (fp32): resume "
        "with --engine deepspeed --zero 2, or start over with --overwrite"
    )
    lora = setup_record(_config(lora=True, lora_rank=4), True, "fp32", 1)
    with pytest.raises(ValueError, match="resume with --lora --lora-rank 4, or start over"):
        check_same_engine(lora, setup_record(_config(), True, "fp32", 1), "X")
    check_same_engine(ds, setup_record(_config(grad_accum=4), True, "fp32", 8), "X")
    check_same_engine(None, torch_engine, "X")  # an older checkpoint: not checked
    with pytest.raises(ValueError, match="resumes only with its own settings: run it on 2 proc"):
        check_old_checkpoint(False, 2, 1, "X")  # no data position: the same world size only
    check_old_checkpoint(True, 2, 1, "X")


def test_the_schedule_follows_a_replan_alone() -> None:
    """A re-plan that changes the step count moves the schedule's total steps with it (no
    --schedule-change needed); with another --max-steps too it is refused as before."""
    from mvtrain.checkpoint import SavedRun, TrainState
    from mvtrain.engine import make_engine
    from mvtrain.lr_schedule import LrSchedule
    from mvtrain.session import _keep_or_change_schedule

    model = torch.nn.Linear(2, 2)
    world = DistInfo(0, 1, 0, "gloo")
    engine = make_engine(model, world, use_deepspeed=False, lr=1e-3, weight_decay=0.0,
                         warmup_steps=0, total_steps=6, grad_accum=1)  # fmt: skip
    config = _config(max_steps=None, epochs=2, lr=1e-3)
    record = setup_record(config, False, "fp32", 2)
    saved = SavedRun("step-000002", TrainState(2, config.budgets, setup=record), 2)
    replan = {"event": REPLAN_EVENT}

    for _ in range(2):  # the checkpoint's 2 steps
        engine.step()

    def resume(new: RunConfig) -> TrainState:
        state = TrainState(2, new.budgets, schedule=LrSchedule(1e-3, 0, 4).as_dict())
        _keep_or_change_schedule(new, engine, state, LrSchedule(1e-3, 0, 6), replan, saved)
        return state

    state = resume(config)
    [change] = state.events
    assert change["reason"].startswith("the resume re-planned the epoch")
    assert state.schedule is not None and state.schedule["total_steps"] == 6
    assert engine.current_lr() == pytest.approx(1e-3 * (0.1 + 0.45 * (1 + np.cos(np.pi / 3))))
    with pytest.raises(ValueError, match="--schedule-change"):
        resume(_config(max_steps=6, epochs=2, lr=1e-3))


# --- runs --------------------------------------------------------------------------------


def _check_one_step_resume(out: Path, reference: Path, shards: Path) -> None:
    """Every sample of the epoch trained once, and the weights after the last step those of
    the uninterrupted ``reference`` (the last step moved them far more than the tolerance)."""
    assert trained(out) == all_keys(shards)
    moved = max_difference(weights(reference, 2), weights(reference, 1))
    assert moved > 1e-4
    assert max_difference(weights(out, 2), weights(reference, 2)) < 1e-5


def _replan(out: Path) -> dict[str, Any]:
    [change] = [e for e in events(out) if e["event"] == REPLAN_EVENT]
    assert json.loads((out / "run.json").read_text())["resume_replans"] == [change]
    return change


@pytest.mark.slow
@GROUP
def test_two_ranks_resumed_on_one_with_lower_budgets(
    shards: Path, two_node_run: tuple[Path, list[str]], tmp_path: Path
) -> None:
    """2 ranks -> 1, and what a backward OOM tells the user to do: lower budgets."""
    reference, _ = two_node_run
    out = stopped_copy(reference, tmp_path / "run", 1)
    train(out, shards, "--patch-budget", "2048", "--grad-accum", "4", "--resume")
    _check_one_step_resume(out, reference, shards)
    change = _replan(out)
    assert change["changed"] == [
        "world size 2 -> 1", "--grad-accum 1 -> 4", "--patch-budget 4096 -> 2048",
    ]  # fmt: skip
    assert change["zero_repartition"] == {
        "from_world_size": 2, "to_world_size": 1, "via": "step-000001/universal",
    }  # fmt: skip
    assert (out / "checkpoints" / "step-000001" / "universal" / "zero").is_dir()
    assert not (out / "checkpoints" / "step-000002" / "rank-1.pt").exists()
    resumed = [json.loads(x) for x in (out / "batches.jsonl").read_text().splitlines()]
    assert all(b["padded_patches"] <= 2048 for b in resumed if b["step"] >= 1)
    saved = torch.load(out / "checkpoints" / "step-000002" / "rank-0.pt", weights_only=False)
    assert saved["budgets"].as_dict() == {"tokens": 1024, "patches": 2048}


@pytest.mark.slow
@GROUP
def test_one_rank_resumed_on_two(
    shards: Path, one_rank_run: Path, one_rank_on_two_nodes: tuple[Path, list[str]]
) -> None:
    out, _ = one_rank_on_two_nodes
    _check_one_step_resume(out, one_rank_run, shards)
    change = _replan(out)
    assert change["changed"] == ["world size 1 -> 2"]
    assert change["zero_repartition"]["to_world_size"] == 2


@pytest.mark.slow
@GROUP
def test_an_engine_state_that_cannot_carry_over_is_one_line(
    shards: Path, two_node_run: tuple[Path, list[str]], tmp_path: Path
) -> None:
    out = stopped_copy(two_node_run[0], tmp_path / "run", 1)
    proc = train(out, shards, "--engine", "torch", "--resume", check=False)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [
        f"mvtrain: error: --resume: {out}/checkpoints/step-000001 holds the optimizer state of "
        "the deepspeed engine (ZeRO-2, fp32), which cannot carry over to the torch engine "
        "(fp32): resume with --engine deepspeed --zero 2, or start over with --overwrite"
    ], proc.stderr[-3000:]
