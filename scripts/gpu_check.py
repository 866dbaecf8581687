"""One short, prepared GPU check of the memory planner (issue: memory you can plan).

On a single CUDA GPU: build a mid-size random MiniCPM-V 4.6 model (full-attention text
layers, a real vocabulary-size head), generate and build the demo data at --max-res 1344
(drawn stand-in photos: no scikit-image needed), probe the model (fwd+bwd on worst-case
synthetic batches, fit), plan budgets from the probe fit (DeepSpeed ZeRO-2, bf16), train 20
steps with those budgets, and print per step the predicted and measured peaks --
``max_memory_allocated`` and ``max_memory_reserved`` -- and their spread across steps. First,
the pixel input path: uint8 (sub)images packed as the loader packs them, made the model's
float pixels on the GPU by the step's conversion (``mvtrain.model.pixel_input.model_inputs``),
must equal the same conversion on the CPU bit for bit, for both families.
Finishes in well under 8 minutes on an H100/H200. Needs only ``pip install -e '.[train]'``.

    python scripts/gpu_check.py [--workdir DIR] [--steps 20] [--target 0.6]
    python scripts/gpu_check.py --smoke     # CPU: the same code path, tiny sizes, no CUDA numbers
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from mvshards.units import GiB

REPO = Path(__file__).resolve().parents[1]


def mid_size_model(folder: Path, smoke: bool) -> Path:
    """A random native 4.6 model saved as a local HF folder (weights + project tokenizer)."""
    import torch
    from transformers import MiniCPMV4_6Config, MiniCPMV4_6ForConditionalGeneration

    from mvtrain.model.tiny import load_tiny_tokenizer, tiny_model_config

    tokenizer = load_tiny_tokenizer()
    base = tiny_model_config(tokenizer).to_dict()
    text, vision = base["text_config"], base["vision_config"]
    if not smoke:
        layers = 8
        text.update(
            hidden_size=1024,
            intermediate_size=3584,
            num_hidden_layers=layers,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=128,
            layer_types=["full_attention"] * layers,
            vocab_size=65536,
        )
        vision.update(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12
        )
        base["insert_layer_id"] = 6
    config = MiniCPMV4_6Config(**{k: v for k, v in base.items() if k not in ("model_type",)})
    torch.manual_seed(0)
    model = MiniCPMV4_6ForConditionalGeneration(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def sh(*cmd: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return proc.stdout


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument(
        "--target",
        type=float,
        default=0.6,
        help="fraction of the card to plan for (low: the card may be shared)",
    )
    parser.add_argument("--smoke", action="store_true", help="CPU smoke run of the same path")
    args = parser.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke:
        sys.exit("gpu_check needs a CUDA GPU (use --smoke to exercise the code path on CPU)")
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        check(work, args.steps if cuda else 2, args.target, args.smoke, cuda, started)
    print(f"done in {time.time() - started:.0f}s")


def demo_shards(work: Path, cuda: bool, smoke: bool) -> Path:
    """The demo set (drawn photos) built at --max-res 1344 under ``work`` (CPU smoke: 16
    records at --max-res 448, the same path at a size a CPU step takes in seconds)."""
    py, bin_ = sys.executable, Path(sys.executable).parent
    count = ["--count", "16"] if smoke else []
    data = [py, str(REPO / "scripts" / "make_demo_data.py"), str(work / "data"), *count]
    sh(*data, "--drawn-photos")
    sh(
        str(bin_ / "mvprep"),
        "build",
        str(work / "data" / "demo.json"),
        "--out",
        str(work / "shards"),
        "--max-res",
        "448" if smoke else "1344",
        "--workers",
        "8" if cuda else "2",
        "--no-progress",
    )
    return work / "shards"


def pixel_check(device: str) -> str:
    """uint8 pixels to ``device``: the model's pixel inputs made there equal the CPU's bit for
    bit (both families; a sliced image's slices are views, as the loader keeps them)."""
    import torch

    from mvshards.families import NATIVE_46, REMOTE_26
    from mvtrain.model.pixel_input import PixelPack, model_inputs

    gen = torch.Generator().manual_seed(0)
    refine = torch.randint(0, 256, (28 * 14, 64 * 14, 3), dtype=torch.uint8, generator=gen)
    source = torch.randint(0, 256, (24 * 14, 40 * 14, 3), dtype=torch.uint8, generator=gen)
    slices = [refine[:, :448], refine[:, 448:]]  # a 2x1 grid of 28x32-patch slices
    images = [[source, *slices], [], [source[: 14 * 16, : 14 * 16]]]
    moved = 0
    for family in (NATIVE_46, REMOTE_26):
        host = {"pixel_values": PixelPack.pack(images, family)}
        want = model_inputs(host, "cpu")["pixel_values"]
        got = model_inputs(host, device)["pixel_values"]
        flat = [want] if family.navit_packing else [p for row in want for p in row]
        flat_got = [got] if family.navit_packing else [p for row in got for p in row]
        for a, b in zip(flat, flat_got, strict=True):
            if b.device.type != torch.device(device).type or not torch.equal(a, b.cpu()):
                sys.exit(f"pixel check: {family} pixels made on {device} differ from the CPU's")
        moved = host["pixel_values"].rows.nbytes
    return (
        f"pixel input: {moved} bytes of uint8 to {device} per pack (float32: {4 * moved}); "
        "the model's pixels made there equal the CPU's bit for bit (4.6 and 2.6 families)"
    )


def check(work: Path, steps: int, target: float, smoke: bool, cuda: bool, started: float) -> None:
    """Pixel path, data, model, probe (CUDA), plan, train, report."""
    import torch

    from mvtrain.memory.plan import PlanRequest

    print(f"[{time.time() - started:5.0f}s] {pixel_check('cuda' if cuda else 'cpu')}")
    bin_ = Path(sys.executable).parent
    mvtrain = str(bin_ / "mvtrain")
    print(f"[{time.time() - started:5.0f}s] demo data + shards in {work}")
    shards = demo_shards(work, cuda, smoke)
    model_dir = mid_size_model(work / "model", smoke)
    # CPU smoke: a small "card", so the planned micro-batches stay seconds of CPU each
    gpu_mem = torch.cuda.get_device_properties(0).total_memory if cuda else GiB
    # CUDA: DeepSpeed in bf16, as `mvtrain run` picks there; CPU: the plain engine in fp32
    engine, dtype = ("deepspeed", "bf16") if cuda else ("torch", "fp32")
    fit_path = work / "probe.json" if cuda else None
    setup = ["--model", str(model_dir), "--dtype", dtype]
    if fit_path is not None:
        print(f"[{time.time() - started:5.0f}s] probe")
        print(sh(mvtrain, "probe", "--shards", str(shards), *setup, "--save", str(fit_path)))
    request = PlanRequest(
        shards=shards,
        model=str(model_dir),
        gpu_mem=gpu_mem,
        target=target,
        dtype=dtype,
        engine=engine,
        probe=fit_path,
    )
    plan_args = ["--shards", str(shards), *setup, "--gpu-mem", f"{gpu_mem}B"]
    plan_args += ["--target", str(target), "--engine", engine]
    plan_args += ["--probe", str(fit_path)] if fit_path is not None else []
    plan = json.loads(sh(mvtrain, "plan", *plan_args, "--json"))
    if plan["token_budget"] is None:
        sys.exit(f"the plan says nothing fits: {plan['error']}")
    print(
        f"[{time.time() - started:5.0f}s] plan: --token-budget {plan['token_budget']} "
        f"--patch-budget {plan['patch_budget']}, {plan['engine']} {plan['dtype']}, predicted "
        f"worst peak: allocated {plan['predicted_allocated_bytes'] / GiB:.2f} GiB, reserved "
        f"{plan['predicted_reserved_bytes'] / GiB:.2f} GiB, device "
        f"{plan['predicted_peak_bytes'] / GiB:.2f} GiB of {gpu_mem / GiB:.0f} GiB"
    )
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run each time (its batch log too)
    run_cmd = [mvtrain, "run", "--shards", str(shards), "--model", str(model_dir)]
    run_cmd += ["--output", str(run_dir), "--dtype", dtype, "--engine", engine]
    run_cmd += ["--token-budget", str(plan["token_budget"])]
    run_cmd += ["--patch-budget", str(plan["patch_budget"])]
    run_cmd += ["--max-steps", str(steps), "--epochs", "50", "--no-progress", "--no-export"]
    run_cmd += ["--batch-log", str(run_dir / "batches.jsonl"), "--lr", "1e-5"]
    print(f"[{time.time() - started:5.0f}s] train {steps} steps")
    sh(*run_cmd)
    report(plan, request, run_dir)


def _gib(value: float | None) -> str:
    return f"{value / GiB:9.2f}" if value is not None else f"{'n/a':>9}"


def _error(predicted: int, measured: int | None) -> str:
    return f"{(predicted - measured) / measured:+7.1%}" if measured else f"{'n/a':>7}"


def _spread(name: str, values: list[int]) -> str:
    lo, hi = min(values), max(values)
    return f"{name} {lo / GiB:.2f} .. {hi / GiB:.2f} GiB (max/min {hi / lo:.3f})"


def report(plan: dict, request: Any, run_dir: Path) -> None:
    """Per step: the worst micro-batch's predicted allocated and reserved peaks (the plan's
    static and overhead terms, its activation model) next to the measured ones."""
    from mvtrain.memory import Overhead, memory_breakdown
    from mvtrain.memory.plan import activation_model_of

    act = activation_model_of(request)
    fields = ("cuda_context", "cublas_workspace", "nccl_buffers", "fragmentation_fraction")
    overhead = Overhead(**{k: plan["overhead"][k] for k in fields})
    static = plan["static_bytes_per_gpu"]
    batches = [json.loads(x) for x in (run_dir / "batches.jsonl").read_text().splitlines()]
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    print(
        f"{'step':>4} {'samples':>7} {'tokens':>7} {'patches':>8} | allocated: "
        f"{'predicted GiB':>13} {'measured':>9} {'error':>7} | reserved: "
        f"{'predicted GiB':>13} {'measured':>9} {'error':>7}"
    )
    allocated_all, reserved_all = [], []
    for m in metrics:
        step_batches = [b for b in batches if b["step"] == m["step"] - 1]
        peaks = [
            act.peak_bytes(b["padded_tokens"], b["padded_patches"], b["num_samples"], b["max_len"])
            for b in step_batches
        ]
        predicted = memory_breakdown(static, max(peaks), overhead)
        worst = step_batches[peaks.index(max(peaks))]
        allocated, reserved = m.get("max_memory_allocated"), m.get("max_memory_reserved")
        allocated_all += [allocated] if allocated else []
        reserved_all += [reserved] if reserved else []
        print(
            f"{m['step']:>4} {worst['num_samples']:>7} {worst['padded_tokens']:>7} "
            f"{worst['padded_patches']:>8} | allocated: {_gib(predicted['allocated']):>13} "
            f"{_gib(allocated)} {_error(predicted['allocated'], allocated)} | reserved: "
            f"{_gib(predicted['reserved']):>13} {_gib(reserved)} "
            f"{_error(predicted['reserved'], reserved)}"
        )
    if allocated_all:
        print(f"measured spread across steps: {_spread('allocated', allocated_all)}")
    if reserved_all:
        print(f"measured spread across steps: {_spread('reserved', reserved_all)}")
    print(
        f"planned worst case: allocated {plan['predicted_allocated_bytes'] / GiB:.2f} GiB, "
        f"reserved {plan['predicted_reserved_bytes'] / GiB:.2f} GiB, device "
        f"{plan['predicted_peak_bytes'] / GiB:.2f} GiB (the overhead terms are estimates)"
    )


if __name__ == "__main__":
    main()
