"""One short, prepared GPU check of the memory planner (issue: memory you can plan).

On a single CUDA GPU: build a mid-size random MiniCPM-V 4.6 model (full-attention text
layers, a real vocabulary-size head), generate and build the demo data at --max-res 1344,
probe the model (fwd+bwd on worst-case synthetic batches, fit), plan budgets from the probe
fit, train 20 steps with those budgets, and print predicted vs measured peak memory per
step and the spread of measured peaks across steps. Finishes in well under 8 minutes on an
H100/H200.

    python scripts/gpu_check.py [--workdir DIR] [--steps 20] [--target 0.6]
    python scripts/gpu_check.py --smoke     # CPU: the same code path, tiny sizes, no CUDA numbers
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GiB = 1 << 30


def mid_size_model(folder: Path, smoke: bool) -> Path:
    """A random native 4.6 model saved as a local HF folder (weights + project tokenizer)."""
    import torch
    from transformers import MiniCPMV4_6Config, MiniCPMV4_6ForConditionalGeneration

    from mvtrain.tiny import load_tiny_tokenizer, tiny_model_config

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
        py, bin_ = sys.executable, Path(sys.executable).parent
        print(f"[{time.time() - started:5.0f}s] demo data + shards in {work}")
        sh(py, str(REPO / "scripts" / "make_demo_data.py"), str(work / "data"))
        sh(
            str(bin_ / "mvprep"),
            "build",
            str(work / "data" / "demo.json"),
            "--out",
            str(work / "shards"),
            "--max-res",
            "1344",
            "--workers",
            "8" if cuda else "2",
            "--no-progress",
        )
        model_dir = mid_size_model(work / "model", args.smoke)
        gpu_mem = torch.cuda.get_device_properties(0).total_memory if cuda else 8 * GiB
        precision = "--bf16" if cuda else "--fp32"

        fit_path = work / "probe.json"
        plan_args = [
            "--shards",
            str(work / "shards"),
            "--model",
            str(model_dir),
            "--gpu-mem",
            str(gpu_mem),
            "--target",
            str(args.target),
            precision,
        ]
        if cuda:
            print(f"[{time.time() - started:5.0f}s] probe")
            print(
                sh(
                    str(bin_ / "mvtrain"),
                    "probe",
                    "--shards",
                    str(work / "shards"),
                    "--model",
                    str(model_dir),
                    "--save",
                    str(fit_path),
                    precision,
                ).strip()
            )
            plan_args += ["--probe", str(fit_path)]
        plan = json.loads(sh(str(bin_ / "mvtrain"), "plan", *plan_args, "--json"))
        if plan["token_budget"] is None:
            sys.exit(f"the plan says nothing fits: {plan['error']}")
        print(
            f"[{time.time() - started:5.0f}s] plan: --token-budget {plan['token_budget']} "
            f"--patch-budget {plan['patch_budget']}, predicted worst peak "
            f"{plan['predicted_peak_bytes'] / GiB:.2f} GiB of {gpu_mem / GiB:.0f} GiB"
        )

        run_dir = work / "run"
        steps = args.steps if cuda else 2
        run_cmd = [
            str(bin_ / "mvtrain"),
            "run",
            "--shards",
            str(work / "shards"),
            "--model",
            str(model_dir),
            "--output",
            str(run_dir),
            "--token-budget",
            str(plan["token_budget"]),
            "--patch-budget",
            str(plan["patch_budget"]),
            "--max-steps",
            str(steps),
            "--epochs",
            "50",
            "--no-progress",
            "--no-export",
            "--batch-log",
            str(run_dir / "batches.jsonl"),
            "--lr",
            "1e-5",
        ]
        if cuda:
            run_cmd.append("--bf16")
        else:
            run_cmd += ["--engine", "torch"]
        print(f"[{time.time() - started:5.0f}s] train {steps} steps")
        sh(*run_cmd)
        report(plan, run_dir, cuda)
    print(f"done in {time.time() - started:.0f}s")


def report(plan: dict, run_dir: Path, cuda: bool) -> None:
    """Predicted vs measured peak per step, and the spread of the measured peaks."""
    from mvtrain.memory import TrainingSetup, activation_model, load_config_only

    act_coeffs = plan["activation_model"]
    static = plan["static_bytes_per_gpu"]
    config = load_config_only(plan["model"])
    act = activation_model(config, TrainingSetup(bf16=cuda))
    if plan.get("activation_from_probe"):
        act = act.__class__(
            **{
                **act.__dict__,
                "bytes_per_token": act_coeffs["bytes_per_token"],
                "bytes_per_patch": act_coeffs["bytes_per_patch"],
            }
        )
    batches = [json.loads(x) for x in (run_dir / "batches.jsonl").read_text().splitlines()]
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    print(
        f"{'step':>4} {'samples':>7} {'tokens':>7} {'patches':>8} {'predicted GiB':>14} "
        f"{'measured GiB':>13} {'error':>7}"
    )
    measured_all = []
    for m in metrics:
        step_batches = [b for b in batches if b["step"] == m["step"] - 1]
        predicted = max(
            static
            + act.peak_bytes(
                b["padded_tokens"], b["padded_patches"], b["num_samples"], b["max_len"]
            )
            for b in step_batches
        )
        worst = max(step_batches, key=lambda b: b["padded_tokens"])
        measured = m.get("max_memory_allocated")
        if measured is not None:
            measured_all.append(measured)
        error = f"{(predicted - measured) / measured:+.1%}" if measured else "n/a"
        shown = f"{measured / GiB:13.2f}" if measured else f"{'n/a':>13}"
        print(
            f"{m['step']:>4} {worst['num_samples']:>7} {worst['padded_tokens']:>7} "
            f"{worst['padded_patches']:>8} {predicted / GiB:14.2f} {shown} {error:>7}"
        )
    if measured_all:
        lo, hi = min(measured_all), max(measured_all)
        print(
            f"measured peak spread across steps: {lo / GiB:.2f} .. {hi / GiB:.2f} GiB "
            f"(max/min {hi / lo:.3f}); planned worst case "
            f"{plan['predicted_peak_bytes'] / GiB:.2f} GiB"
        )


if __name__ == "__main__":
    main()
