"""A plan with no micro-batch stops at once with the reason and the fix (it used to plan up
to 10**6 empty epochs under ``--max-steps``, or train 0 steps and export an untrained model)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from run_helpers import MVTRAIN, _env

from mvshards.families import NATIVE_46
from mvtrain.batching.epochs import EmptyPlanError, plan_epochs
from mvtrain.batching.plan_index import PlanIndex
from mvtrain.distributed import DistInfo
from mvtrain.run_config import RunConfig

WORLD = DistInfo(rank=0, world_size=1, local_rank=0, backend="gloo")


def _config(tmp_path: Path, **changes: object) -> RunConfig:
    return RunConfig(shards=tmp_path, model="tiny", output=tmp_path / "out", **changes)  # type: ignore[arg-type]


def _index(tokens: list[int], patches: list[int]) -> PlanIndex:
    keys = [f"{i:09d}" for i in range(len(tokens))]
    return PlanIndex.from_arrays(keys, [0] * len(keys), tokens, patches, num_shards=1)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("max_steps", [None, 3])
def test_every_sample_over_budget_stops_at_once_naming_the_budget(
    tmp_path: Path, max_steps: int | None
) -> None:
    config = _config(tmp_path, token_budget=100, patch_budget=4096, max_steps=max_steps)
    index = _index([300, 250, 120], [0, 1024, 64])
    with pytest.raises(EmptyPlanError) as caught:
        plan_epochs(config, index, WORLD, NATIVE_46.cost)
    message = str(caught.value)
    assert "3 of 3 samples are over the budgets" in message
    assert "3 over --token-budget 100" in message and "0 over --patch-budget 4096" in message
    assert "pads to 300 tokens" in message and "1024 patches" in message


@pytest.mark.timeout(30)
def test_an_empty_index_says_the_build_rejected_everything(tmp_path: Path) -> None:
    config = _config(tmp_path, max_steps=2)
    with pytest.raises(EmptyPlanError, match="no samples.*rejects.jsonl"):
        plan_epochs(config, _index([], []), WORLD, NATIVE_46.cost)


def test_a_plan_with_batches_is_unaffected(tmp_path: Path) -> None:
    config = _config(tmp_path, token_budget=1000, patch_budget=4096, max_steps=4)
    plans = plan_epochs(config, _index([300, 250, 120], [0, 1024, 64]), WORLD, NATIVE_46.cost)
    assert sum(plans.steps) == 4


@pytest.mark.slow
def test_the_cli_repro_exits_non_zero_without_hanging_or_exporting(
    shards: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    cmd = [*MVTRAIN, "--shards", str(shards), "--model", "tiny", "--output", str(out)]
    cmd += ["--max-steps", "2", "--token-budget", "10", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=_env())
    assert proc.returncode != 0
    assert "nothing to train" in proc.stderr and "--token-budget 10" in proc.stderr
    assert not (out / "hf").exists()
