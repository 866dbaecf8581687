"""The memory plan as it runs on a real GPU: probe fits, engines, buckets, overhead, dtype.

* A probe fit ``a*T + b*P + c`` IS the activation peak: nothing of the config model is added.
* A fit records the setup it was measured with; another setup (or an old file) is refused.
* ``--engine torch`` partitions nothing: 16P for full fine-tuning on any number of GPUs.
* ZeRO buckets follow the documented ``overlap_comm`` rule (4.5x reduce + all-gather).
* The predicted peak is device memory: allocated + fragmentation (reserved) + context + NCCL.
* ``--dtype auto`` is bf16 in a plan; ``scripts/gpu_check.py`` runs without scikit-image.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mvshards.units import GiB, MiB
from mvtrain.cli import main as mvtrain_main
from mvtrain.deepspeed_config import deepspeed_config
from mvtrain.memory import (
    IndexStats,
    Overhead,
    ProbeFitModel,
    load_config_only,
    load_probe_fit,
    plan_budgets,
    static_memory,
    torch_engine_static_memory,
)
from mvtrain.memory.plan import PlanRequest, make_plan
from mvtrain.memory.plan_text import format_plan
from mvtrain.memory.probe import ProbePoint, fit_points, gradients_freed_as_produced, write_fit
from mvtrain.memory.probe_fit import probe_setup
from mvtrain.memory.static import (
    DEFAULT_ALLGATHER_BUCKET,
    DEFAULT_REDUCE_BUCKET,
    bucket_bytes,
)
from mvtrain.model.tiny import tiny_model_config

REPO = Path(__file__).resolve().parents[1]
A, B, C = 300_000.0, 50_000.0, 2.0 * GiB
"""Known probe coefficients: bytes per padded token, per padded patch, constant."""
STATS = IndexStats(
    count=1000,
    total_tokens=1000 * 900,
    total_patches=1000 * 3000,
    tokens_p99=2500,
    patches_p99=10_000,
    tokens_max=4000,
    patches_max=12_000,
)


def _points() -> list[ProbePoint]:
    """The probe's shapes with peaks generated exactly from (A, B, C)."""
    shapes = [(1, 4096, 0), (1, 2048, 0), (1, 256, 16384), (1, 256, 8192), (1, 4096, 16384)]
    shapes.append((2, 2048, 8192))
    return [ProbePoint(b * n, p, b, int(A * b * n + B * p + C)) for b, n, p in shapes]


def _setup(dtype: str, grad_ckpt: bool = False, config=None) -> dict:
    return probe_setup(config or tiny_model_config(), "tiny", dtype, False, 8, False, grad_ckpt)


def _fit_file(tmp_path: Path, setup: dict) -> Path:
    path = tmp_path / "fit.json"
    write_fit(_points(), setup, path, "synthetic", "bfloat16")
    return path


def _cli_plan(shards: Path, *args: str) -> tuple[int, str]:
    argv = ["plan", "--shards", str(shards), "--model", "tiny", *args]
    result = CliRunner().invoke(mvtrain_main, argv)
    return result.exit_code, result.output


# --- 1. a probe fit is the activation peak --------------------------------------------------


def test_fit_points_recovers_known_coefficients() -> None:
    fit = fit_points(_points())
    assert fit["bytes_per_token"] == pytest.approx(A, rel=1e-9)
    assert fit["bytes_per_patch"] == pytest.approx(B, rel=1e-9)
    assert fit["const_bytes"] == pytest.approx(C, rel=1e-9)
    assert fit["max_relative_error"] < 1e-9


def test_budgets_from_a_fit_are_the_largest_multiples_of_64_that_fit() -> None:
    fit = ProbeFitModel(A, B, C)
    assert fit.peak_bytes(4096, 1024, 8, 512, padded=True) == fit.peak_bytes(4096, 1024)
    static = static_memory(10**9, 10**9, 1, 2)
    overhead = Overhead.for_gpus(1)
    plan = plan_budgets(static, fit, 80 * GiB, 0.9, STATS, overhead)
    tokens, patches = plan.token_budget, plan.patch_budget
    assert tokens % 64 == 0 and patches % 64 == 0

    def device(t: int, p: int) -> int:
        act = int(A * t + B * p + C)
        return static.total + overhead.fixed + act + overhead.fragmentation(act)

    assert plan.activation_peak == int(A * tokens + B * patches + C)
    assert plan.predicted_peak == device(tokens, patches) <= 0.9 * 80 * GiB
    larger = tokens + 64
    assert device(larger, int(STATS.patch_token_ratio * larger) // 64 * 64) > 0.9 * 80 * GiB


@pytest.mark.slow
def test_a_plan_with_a_probe_fit_predicts_static_overhead_and_the_fit(
    shards: Path, tmp_path: Path
) -> None:
    path = _fit_file(tmp_path, _setup("bf16"))
    fit = load_probe_fit(path)
    assert (fit.bytes_per_token, fit.bytes_per_patch) == pytest.approx((A, B), rel=1e-9)
    plan = make_plan(PlanRequest(shards=shards, model="tiny", dtype="bf16", probe=path)).to_json()
    tokens, patches = plan["token_budget"], plan["patch_budget"]
    act = fit.peak_bytes(tokens, patches)
    overhead = Overhead.for_gpus(1)
    assert plan["activation_from_probe"] and plan["activation_peak_bytes"] == act
    assert plan["predicted_peak_bytes"] == (
        plan["static_bytes_per_gpu"] + overhead.fixed + act + overhead.fragmentation(act)
    )
    assert plan["activation_quadratic_bytes_per_token_sq"] == 0.0
    assert plan["activation_const_bytes"] == pytest.approx(C, rel=1e-9)


def test_the_probe_drops_each_gradient_as_it_is_produced() -> None:
    layer = torch.nn.Linear(4, 3)
    with gradients_freed_as_produced(layer):
        layer(torch.ones(2, 4)).sum().backward()
    assert all(p.grad is None for p in layer.parameters())
    layer(torch.ones(2, 4)).sum().backward()  # the hooks are gone afterwards
    assert all(p.grad is not None for p in layer.parameters())


# --- 2. a fit holds for its own setup ---------------------------------------------------------


@pytest.mark.slow
def test_a_fit_records_its_setup_and_another_setup_is_refused(shards: Path, tmp_path: Path) -> None:
    path = _fit_file(tmp_path, _setup("fp32"))
    setup = json.loads(path.read_text())["setup"]
    for key in ("dtype", "lora", "lora_rank", "freeze_vision", "grad_ckpt", "attention"):
        assert key in setup
    assert setup["dtype"] == "fp32" and setup["model"] == "tiny" and setup["config_hash"]
    assert make_plan(PlanRequest(shards, "tiny", dtype="fp32", probe=path)).fit.from_probe

    request = PlanRequest(shards, "tiny", dtype="bf16", grad_ckpt=True, probe=path)
    with pytest.raises(ValueError) as info:
        make_plan(request)
    message = str(info.value)
    assert "\n" not in message
    assert "dtype fp32 (plan: bf16)" in message and "grad_ckpt False (plan: True)" in message
    assert "re-run `mvtrain probe" in message and "--dtype bf16 --grad-ckpt" in message

    other = tmp_path / "other"
    other.mkdir()
    other_setup = _setup("fp32", config=load_config_only(REPO / "scripts/configs/minicpmv-4.6"))
    with pytest.raises(ValueError, match=r"model tiny with config \w+ \(plan: tiny with"):
        make_plan(PlanRequest(shards, "tiny", dtype="fp32", probe=_fit_file(other, other_setup)))

    code, output = _cli_plan(shards, "--dtype", "bf16", "--probe", str(path), "--json")
    assert code == 2 and "re-run `mvtrain probe" in output


@pytest.mark.slow
def test_a_fit_without_its_setup_is_refused(shards: Path, tmp_path: Path) -> None:
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"bytes_per_token": A, "bytes_per_patch": B, "const_bytes": C}))
    with pytest.raises(ValueError, match="older mvtrain; re-run `mvtrain probe`"):
        make_plan(PlanRequest(shards, "tiny", probe=old))


# --- 3. the plain torch engine ---------------------------------------------------------------


@pytest.mark.slow
def test_the_torch_engine_partitions_nothing(shards: Path) -> None:
    p = 10**9
    one, eight = (torch_engine_static_memory(p, p, "fp32", n) for n in (1, 8))
    assert one.total == eight.total == 16 * p and one.buffer_bytes == 0
    bf16 = torch_engine_static_memory(p, p, "bf16", 8)
    assert bf16.model_states == 16 * p and bf16.autocast_weight_copies == 2 * p
    assert torch_engine_static_memory(p, 10**7, "fp32").total == 4 * p + 12 * 10**7
    with pytest.raises(ValueError, match="fp16"):
        torch_engine_static_memory(p, p, "fp16")

    plans = {
        (engine, gpus): make_plan(
            PlanRequest(shards, "tiny", gpus=gpus, dtype="fp32", engine=engine)
        ).to_json()
        for engine in ("torch", "deepspeed")
        for gpus in (1, 8)
    }
    torch_one, torch_eight = plans["torch", 1], plans["torch", 8]
    assert torch_one["static_bytes_per_gpu"] == torch_eight["static_bytes_per_gpu"]
    buffers = torch_one["static"]["model_buffers"]
    assert buffers > 0, "the tiny model's RoPE frequencies are buffers every rank holds"
    assert torch_one["static_bytes_per_gpu"] == 16 * torch_one["params_total"] + buffers
    assert torch_eight["engine"] == "torch" and torch_eight["zero_stage"] is None
    ds_eight = plans["deepspeed", 8]["static"]
    assert ds_eight["model_states"] < torch_eight["static"]["model_states"]

    code, output = _cli_plan(shards, "--engine", "torch", "--dtype", "fp16")
    assert code == 2 and "fp16" in output


# --- 4. ZeRO communication buckets ---------------------------------------------------------


@pytest.mark.slow
def test_zero_buckets_follow_the_documented_overlap_comm_rule(shards: Path) -> None:
    assert bucket_bytes(500_000_000, 500_000_000, 2, True) == 9_000_000_000  # "9GB footprint"
    assert bucket_bytes(200_000_000, 200_000_000, 2, True) == 3_600_000_000  # "3.6GB"
    assert bucket_bytes(200_000_000, 200_000_000, 2, False) == 400_000_000
    p = 10**9
    assert static_memory(p, p, 1, 2, "bf16").buffer_bytes == 3_600_000_000
    assert static_memory(p, p, 8, 1, "bf16").buffer_bytes == 7_200_000_000  # fp32 staging
    assert static_memory(p, p, 1, 0, "bf16").buffer_bytes == 0
    zero = deepspeed_config(grad_accum=1)["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["allgather_bucket_size"]) == (
        DEFAULT_REDUCE_BUCKET,
        DEFAULT_ALLGATHER_BUCKET,
    )
    plan = make_plan(PlanRequest(shards, "tiny", dtype="bf16"))
    assert plan.to_json()["static"]["buffer_bytes"] == 3_600_000_000
    assert "buffer_bytes                   3.35 GiB" in format_plan(plan)


# --- 5. reserved, not allocated ------------------------------------------------------------


@pytest.mark.slow
def test_the_overhead_is_named_and_the_peak_is_device_memory(shards: Path) -> None:
    one, eight = Overhead.for_gpus(1), Overhead.for_gpus(8)
    assert one.cuda_context == 512 * MiB and one.cublas_workspace == 2 * 32 * MiB
    assert one.nccl_buffers == 0 and eight.nccl_buffers == 4 * MiB * 32 * 2
    assert one.fragmentation(1000 * MiB) == 100 * MiB

    typed = make_plan(PlanRequest(shards, "tiny", gpus=8, dtype="bf16"))
    plan = typed.to_json()
    o, act = plan["overhead"], plan["activation_peak_bytes"]
    assert o["estimate"] and o["nccl_buffers"] == eight.nccl_buffers
    allocated = plan["static_bytes_per_gpu"] + o["cublas_workspace"] + act
    reserved = allocated + int(o["fragmentation_fraction"] * act)
    assert plan["predicted_allocated_bytes"] == allocated
    assert plan["predicted_reserved_bytes"] == reserved == allocated + plan["fragmentation_bytes"]
    assert plan["predicted_peak_bytes"] == reserved + o["cuda_context"] + o["nccl_buffers"]
    text = format_plan(typed)
    for term in ("cuda_context", "cublas_workspace", "nccl_buffers", "fragmentation"):
        assert term in text
    assert "ESTIMATES" in text and "max_memory_reserved" in text and "device peak" in text


# --- 6. --dtype -----------------------------------------------------------------------------


@pytest.mark.slow
def test_dtype_auto_is_bf16_in_a_plan_and_the_plan_says_so(shards: Path) -> None:
    assert PlanRequest(shards, "tiny").resolved_dtype == "bf16"
    code, output = _cli_plan(shards, "--json")
    plan = json.loads(output.strip().splitlines()[-1])
    assert code == 0 and plan["dtype"] == "bf16" and plan["dtype_requested"] == "auto"
    assert plan["static"]["weights"] == 2 * plan["params_total"]
    assert "bf16 (--dtype auto)" in format_plan(make_plan(PlanRequest(shards, "tiny")))
    code, output = _cli_plan(shards, "--dtype", "fp32", "--json")
    plan = json.loads(output.strip().splitlines()[-1])
    assert plan["dtype"] == "fp32" and plan["static"]["weights"] == 4 * plan["params_total"]
    code, output = _cli_plan(shards, "--dtype", "fp8")
    assert code == 2 and "--dtype" in output


# --- 8. scripts/gpu_check.py needs no scikit-image -------------------------------------------


@pytest.mark.slow
def test_gpu_check_smoke_runs_its_path_on_cpu_without_scikit_image(tmp_path: Path) -> None:
    blocker = tmp_path / "no_skimage"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['skimage'] = None\n")
    env = {**os.environ, "PYTHONPATH": str(blocker), "OMP_NUM_THREADS": "1"}
    env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    check = subprocess.run(
        [sys.executable, "-c", "import skimage"], env=env, capture_output=True, text=True
    )
    assert check.returncode != 0 and "halted" in check.stderr  # the blocker works
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "skimage" not in proc.stderr
    assert "allocated:" in proc.stdout and "reserved:" in proc.stdout
    assert "plan: --token-budget" in proc.stdout and "torch fp32" in proc.stdout
    assert "predicted GiB" in proc.stdout  # the script's whole path ran (CPU stands in)
