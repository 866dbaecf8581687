"""``mvtrain plan`` as a library call: what fits on the card, before any GPU is touched.

From the model config (weights not needed: parameters are counted on the meta device), the
training setup and the shard index it computes static memory per GPU under ZeRO, the
activation model, the token and patch budgets that fit ``target`` of the card, the costliest
micro-batch those budgets allow and its predicted peak, the epoch's steps from the index,
and, when nothing fits, what each remedy (LoRA, frozen vision, gradient checkpointing, more
GPUs, a lower ``--max-res``) would change, as numbers. A probe fit (``mvtrain probe``), when
given, replaces the activation coefficients with measured ones.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mvshards.index import load_index
from mvtrain.bucketer import Budgets, CostModel
from mvtrain.memory import (
    BudgetError,
    IndexStats,
    TrainingSetup,
    activation_model,
    count_parameters,
    load_config_only,
    plan_budgets,
    static_memory,
)
from mvtrain.plan import PlanIndex, all_rank_plans, equal_step_plans, plan_report

GiB = 1 << 30
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1e3,
    "mb": 1e6,
    "gb": 1e9,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": GiB,
}


def parse_bytes(text: str) -> int:
    """``80GiB``, ``24GB``, ``81920MiB`` or a plain byte count."""
    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a size; write e.g. 80GiB, 24GB or 81920MiB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


@dataclass(frozen=True)
class PlanRequest:
    shards: Path
    model: str
    gpus: int = 1
    gpu_mem: int = 80 * GiB
    zero_stage: int = 2
    lora: bool = False
    lora_rank: int = 8
    freeze_vision: bool = False
    grad_ckpt: bool = False
    bf16: bool = True
    target: float = 0.9
    grad_accum: int = 1
    attention: str = "sdpa"
    probe: Path | None = None


def _config(model: str) -> Any:
    if model == "tiny":
        from mvtrain.tiny import tiny_model_config

        return tiny_model_config()
    return load_config_only(model)


def _apply_probe(act: Any, probe: Path | None) -> Any:
    if probe is None:
        return act
    fit = json.loads(Path(probe).read_text())
    return replace(
        act,
        bytes_per_token=fit["bytes_per_token"],
        bytes_per_patch=fit["bytes_per_patch"],
    )


def _index_stats(shards: Path) -> tuple[Any, IndexStats]:
    index = load_index(shards)
    return index, IndexStats.from_costs(index.sample_rows())


def _fit(request: PlanRequest, config: Any, stats: IndexStats) -> dict[str, Any]:
    """Everything that depends on the setup: params, static, activations, budgets."""
    counts = count_parameters(
        config, lora=request.lora, lora_rank=request.lora_rank, freeze_vision=request.freeze_vision
    )
    static = static_memory(
        counts.total,
        counts.trainable,
        num_gpus=request.gpus,
        zero_stage=request.zero_stage,
        bf16=request.bf16,
    )
    setup = TrainingSetup(
        bf16=request.bf16,
        lora=request.lora,
        lora_rank=request.lora_rank,
        freeze_vision=request.freeze_vision,
        grad_ckpt=request.grad_ckpt,
        vision_input_requires_grad=False,
        attention=request.attention,
    )
    act = _apply_probe(activation_model(config, setup), request.probe)
    out: dict[str, Any] = {"counts": counts, "static": static, "activations": act}
    try:
        budgets = plan_budgets(static, act, request.gpu_mem, request.target, stats)
        out["budgets"] = budgets
    except BudgetError as exc:
        out["error"] = exc
    return out


def make_plan(request: PlanRequest) -> dict[str, Any]:
    """The plan as a JSON-ready dict (``mvtrain plan --json`` prints it)."""
    config = _config(request.model)
    index, stats = _index_stats(request.shards)
    fit = _fit(request, config, stats)
    counts, static, act = fit["counts"], fit["static"], fit["activations"]
    plan: dict[str, Any] = {
        "model": request.model,
        "gpus": request.gpus,
        "gpu_mem_bytes": request.gpu_mem,
        "target": request.target,
        "zero_stage": request.zero_stage,
        "setup": {
            "lora": request.lora,
            "freeze_vision": request.freeze_vision,
            "grad_ckpt": request.grad_ckpt,
            "bf16": request.bf16,
            "attention": request.attention,
        },
        "params_total": counts.total,
        "params_trainable": counts.trainable,
        "params": {
            "llm": counts.llm,
            "vision": counts.vision,
            "resampler": counts.resampler,
            "other": counts.other,
            "estimate": counts.estimate,
        },
        "static_bytes_per_gpu": static.total,
        "static": static.to_dict(),
        "activation_bytes_per_token": act.bytes_per_token,
        "activation_bytes_per_patch": act.bytes_per_patch,
        "activation_quadratic_bytes_per_token_sq": act.quadratic_bytes_per_token_sq,
        "activation_model": act.to_dict(),
        "activation_from_probe": request.probe is not None,
        "index": stats.__dict__,
        "token_budget": None,
        "patch_budget": None,
        "predicted_peak_bytes": None,
    }
    if "budgets" in fit:
        budgets = fit["budgets"]
        plan.update(
            token_budget=budgets.token_budget,
            patch_budget=budgets.patch_budget,
            predicted_peak_bytes=budgets.predicted_peak,
        )
        plan["epoch"] = _epoch_numbers(index, request, budgets)
    else:
        plan["error"] = str(fit["error"])
        plan["needed_bytes"] = fit["error"].needed
    plan["advice"] = _advice(request, config, stats, plan)
    return plan


def _epoch_numbers(index: Any, request: PlanRequest, budgets: Any) -> dict[str, Any]:
    family = "2.6" if "2.6" in index.params.get("profile", "") else "4.6"
    if family == "2.6":  # the 2.6 cost needs per-sample slice tables: read at run time
        return {"note": "2.6-family step counts need the slice table; mvtrain run reports them"}
    plan_index = PlanIndex.from_index(index)
    rank_plans = all_rank_plans(
        plan_index,
        0,
        0,
        request.gpus,
        Budgets(budgets.token_budget, budgets.patch_budget),
        CostModel(family),
    )
    try:
        steps, _ = equal_step_plans(rank_plans, request.grad_accum)
    except ValueError as exc:  # e.g. fewer shards than ranks
        return {"note": str(exc)}
    report = plan_report(rank_plans)
    costliest = max((b for p in rank_plans for b in p.batches), key=lambda b: b.cost)
    return {
        "micro_batches_per_rank": [len(p.batches) for p in rank_plans],
        "micro_batches_per_step": request.grad_accum,
        "steps_per_epoch": steps,
        "token_efficiency": report.get("token_efficiency"),
        "costliest_batch": {
            "samples": costliest.num_samples,
            "padded_tokens": costliest.padded_tokens,
            "padded_patches": costliest.padded_patches,
        },
        "token_count_exact": bool(index.params.get("tokenizer")),
    }


def _advice(
    request: PlanRequest, config: Any, stats: IndexStats, plan: dict[str, Any]
) -> list[dict[str, Any]]:
    """Each remedy of the article's advice, evaluated: does it fit, and with which budgets."""
    remedies: list[tuple[str, PlanRequest, IndexStats]] = []
    if not request.lora:
        remedies.append(("--lora", replace(request, lora=True), stats))
    if not request.freeze_vision:
        remedies.append(("--freeze-vision", replace(request, freeze_vision=True), stats))
    if not request.grad_ckpt:
        remedies.append(("--grad-ckpt", replace(request, grad_ckpt=True), stats))
    for gpus in (request.gpus * 2, request.gpus * 4):
        remedies.append((f"--gpus {gpus}", replace(request, gpus=gpus), stats))
    lower = replace(
        stats,
        total_patches=stats.total_patches * 5 // 10,
        patches_p99=stats.patches_p99 * 5 // 10,
        patches_max=stats.patches_max * 5 // 10,
    )
    remedies.append(("mvprep build --max-res 896 (about half the patches)", request, lower))
    out = []
    for name, changed, changed_stats in remedies:
        fit = _fit(changed, config, changed_stats)
        row: dict[str, Any] = {
            "change": name,
            "static_bytes_per_gpu": fit["static"].total,
            "fits": "budgets" in fit,
        }
        if "budgets" in fit:
            row["token_budget"] = fit["budgets"].token_budget
            row["patch_budget"] = fit["budgets"].patch_budget
            row["predicted_peak_bytes"] = fit["budgets"].predicted_peak
        else:
            row["needed_bytes"] = fit["error"].needed
        out.append(row)
    return out


def format_plan(plan: dict[str, Any]) -> str:
    g = lambda b: f"{b / GiB:7.2f} GiB"  # noqa: E731
    p = plan["params"]
    s = plan["static"]
    lines = [
        f"mvtrain plan: {plan['model']} on {plan['gpus']} x {plan['gpu_mem_bytes'] / GiB:.0f} GiB, "
        f"ZeRO-{plan['zero_stage']}, target {plan['target']:.0%}, "
        + ", ".join(k for k, v in plan["setup"].items() if v is True)
        or "full fine-tune",
        "",
        "parameters",
        f"  total {plan['params_total']:,}  trainable {plan['params_trainable']:,}"
        + ("  (estimate from config)" if p["estimate"] else ""),
        f"  LLM {p['llm']:,}  vision {p['vision']:,}  resampler {p['resampler']:,}  "
        f"other {p['other']:,}",
        "static memory per GPU",
    ]
    for key, value in s.items():
        if isinstance(value, int | float) and key not in ("num_gpus", "zero_stage"):
            lines.append(f"  {key:<28}{g(value)}")
    lines += [
        "activation model (bytes)",
        f"  per padded token    {plan['activation_bytes_per_token']:,.0f}",
        f"  per padded patch    {plan['activation_bytes_per_patch']:,.0f}",
        f"  per token^2 (attn)  {plan['activation_quadratic_bytes_per_token_sq']:,.1f}",
        f"  source              {'probe fit' if plan['activation_from_probe'] else 'model config'}",
        "",
    ]
    if plan["token_budget"] is not None:
        lines += [
            f"budgets that fit {plan['target']:.0%} of the card: "
            f"--token-budget {plan['token_budget']} --patch-budget {plan['patch_budget']}",
            "  predicted peak of the costliest batch they allow: "
            f"{g(plan['predicted_peak_bytes'])}",
        ]
        epoch = plan.get("epoch", {})
        if "note" in epoch:
            lines.append(f"  epoch: {epoch['note']}")
        if "steps_per_epoch" in epoch:
            c = epoch["costliest_batch"]
            lines += [
                f"  costliest planned micro-batch: {c['samples']} samples, {c['padded_tokens']} "
                f"padded tokens, {c['padded_patches']} patches",
                f"  steps per epoch: {epoch['steps_per_epoch']} "
                f"({epoch['micro_batches_per_step']} micro-batches per step, "
                f"{max(epoch['micro_batches_per_rank'])} per rank per epoch)",
            ]
    else:
        lines.append(f"NOTHING FITS: {plan['error']}")
    lines += ["", "what changes would do:"]
    for row in plan["advice"]:
        if row["fits"]:
            lines.append(
                f"  {row['change']:<48} static {g(row['static_bytes_per_gpu'])}, budgets "
                f"{row['token_budget']} tokens / {row['patch_budget']} patches, "
                f"peak {g(row['predicted_peak_bytes'])}"
            )
        else:
            lines.append(
                f"  {row['change']:<48} static {g(row['static_bytes_per_gpu'])}, still does not "
                f"fit (needs {g(row['needed_bytes'])})"
            )
    return "\n".join(lines)


__all__ = ["PlanRequest", "format_plan", "make_plan", "parse_bytes"]
