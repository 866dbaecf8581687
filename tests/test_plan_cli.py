"""`mvtrain plan` end to end: config-only folders, JSON fields, auto budgets in `run`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mvshards.units import GiB

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "scripts" / "configs"
MVTRAIN = [sys.executable, "-m", "mvtrain.cli"]

pytestmark = pytest.mark.slow  # builds shards; plans a 1.3B/8B model; runs the CLI


def _plan(shards: Path, *args: str, subprocess_cli: bool = False) -> tuple[int, dict]:
    """``mvtrain plan ... --json``: its exit code and JSON. In this process by default (the
    same click command; the test process has torch and transformers imported already), in a
    fresh interpreter with ``subprocess_cli`` (the installed entry point, as a user runs it)."""
    argv = ["plan", "--shards", str(shards), *args, "--json"]
    if subprocess_cli:
        proc = subprocess.run([*MVTRAIN, *argv], capture_output=True, text=True, timeout=300)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    else:
        from click.testing import CliRunner

        from mvtrain.cli import main

        result = CliRunner().invoke(main, argv, catch_exceptions=False)
        code, out, err = result.exit_code, result.stdout, result.stderr
    assert code in (0, 3), err[-3000:]
    return code, json.loads(out)


def test_plan_of_a_config_only_folder_fits_and_reports_every_field(shards: Path) -> None:
    assert sorted(p.name for p in (CONFIGS / "minicpmv-4.6").iterdir()) == ["config.json"]
    code, plan = _plan(
        shards, "--model", str(CONFIGS / "minicpmv-4.6"), "--gpu-mem", "80GiB", subprocess_cli=True
    )
    assert code == 0
    for key in (
        "params_total",
        "params_trainable",
        "static_bytes_per_gpu",
        "activation_bytes_per_token",
        "activation_bytes_per_patch",
        "token_budget",
        "patch_budget",
        "predicted_peak_bytes",
    ):
        assert plan[key] is not None, key
    assert 1.2e9 < plan["params_total"] < 1.4e9
    assert plan["predicted_peak_bytes"] <= 0.9 * 80 * GiB
    assert plan["epoch"]["steps_per_epoch"] >= 1
    changes = {row["change"] for row in plan["advice"]}
    assert {"--lora", "--freeze-vision", "--grad-ckpt"} <= changes


@pytest.fixture(scope="module")
def shards_26(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 12-record set built for the 2.6 family (its index carries the per-image table)."""
    from pipeline_data import make_pipeline_dataset

    from mvprep.build import build
    from mvprep.options import BuildOptions

    data = make_pipeline_dataset(tmp_path_factory.mktemp("data") / "set", count=12)
    out = tmp_path_factory.mktemp("shards") / "shards-26"
    options = BuildOptions(
        data_path=data, out_dir=out, profile="minicpmv-2.6", max_res=448, samples_per_shard=3
    )
    assert build(options, workers=1, progress=False).ok
    return out


def test_plan_of_a_2_6_build_counts_its_steps(shards_26: Path) -> None:
    model = ["--model", str(CONFIGS / "minicpmv-2.6"), "--gpu-mem", "80GiB", "--lora"]
    code, plan = _plan(shards_26, *model)
    assert code == 0, plan.get("error")
    assert plan["epoch"]["steps_per_epoch"] >= 1 and "note" not in plan["epoch"]
    assert plan["epoch"]["costliest_batch"]["padded_patches"] > 0


def test_more_gpus_shrink_static_memory_and_lora_shrinks_trainable(shards: Path) -> None:
    model = ["--model", str(CONFIGS / "minicpmv-4.6"), "--gpu-mem", "80GiB"]
    _, one = _plan(shards, *model, "--gpus", "1")
    _, eight = _plan(shards, *model, "--gpus", "8")
    _, lora = _plan(shards, *model, "--lora")
    assert eight["static_bytes_per_gpu"] < one["static_bytes_per_gpu"]
    assert eight["token_budget"] >= one["token_budget"]
    assert lora["params_trainable"] < 0.05 * lora["params_total"]
    assert lora["static_bytes_per_gpu"] < one["static_bytes_per_gpu"]


def test_nothing_fits_says_what_would(shards: Path) -> None:
    code, plan = _plan(shards, "--model", str(CONFIGS / "minicpmv-2.6"), "--gpu-mem", "24GiB")
    assert code == 3 and plan["token_budget"] is None
    assert "needs" in plan["error"]
    assert any(row["fits"] for row in plan["advice"]) or all(
        row["needed_bytes"] > 0 for row in plan["advice"]
    )


def test_run_with_auto_budgets_uses_the_plan(shards: Path, tmp_path: Path) -> None:
    plan_args = ("--model", "tiny", "--gpu-mem", "4GiB", "--dtype", "fp32", "--engine", "torch")
    _, plan = _plan(shards, *plan_args)
    assert plan["token_budget"] is not None, plan.get("error")
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            *MVTRAIN,
            "run",
            "--shards",
            str(shards),
            "--model",
            "tiny",
            "--output",
            str(out),
            "--token-budget",
            "auto",
            "--patch-budget",
            "auto",
            "--gpu-mem",
            "4GiB",
            "--engine",
            "torch",
            "--max-steps",
            "1",
            "--no-progress",
            "--no-export",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((out / "run.json").read_text())
    assert run["budgets"] == {"tokens": plan["token_budget"], "patches": plan["patch_budget"]}
    assert run["predicted_peak_bytes"] == plan["predicted_peak_bytes"]


def test_probe_refuses_without_cuda(shards: Path, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the probe would run for real")
    from click.testing import CliRunner

    from mvtrain.cli import main

    argv = ["probe", "--shards", str(shards), "--model", "tiny", "--dtype", "fp32"]
    result = CliRunner().invoke(main, [*argv, "--save", str(tmp_path / "fit.json")])
    assert result.exit_code != 0 and "needs CUDA" in result.stderr
    assert not (tmp_path / "fit.json").exists()


def test_sizes_have_one_reading_and_p99_is_the_nearest_rank() -> None:
    from mvshards.units import p99, parse_bytes
    from mvtrain.memory.budgets import IndexStats

    assert parse_bytes("80GiB") == parse_bytes("81920MiB") == parse_bytes("80 gib") == 80 * GiB
    assert parse_bytes("80G") == parse_bytes("80GB") == parse_bytes("80000000000B") == 80 * 10**9
    for bad in ("80XB", "80iB", "1.2.3GB", "lots"):
        with pytest.raises(ValueError, match="not a memory size"):
            parse_bytes(bad)
    assert p99(list(range(1, 101))) == 99  # 99 of the 100 values do not exceed it
    assert p99(list(range(1, 49))) == 48
    assert IndexStats.from_costs([(t, 2 * t) for t in range(1, 201)]).patches_p99 == 2 * 198
