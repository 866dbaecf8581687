"""``mvtrain plan`` as a library call: what fits on the card, before any GPU is touched.

From the model config (weights not needed: parameters are counted on the meta device), the
training setup and the shard index it computes static memory per GPU (DeepSpeed ZeRO, or the
plain torch engine, which partitions nothing), the activation model, the named overhead
terms (estimates), the token and patch budgets that fit ``target`` of the card, the
costliest micro-batch those budgets allow and its predicted peak -- device memory, with its
allocated and reserved parts -- the epoch's steps from the index, and, when nothing fits,
what each remedy (LoRA, frozen vision, gradient checkpointing, more GPUs, a lower
``--max-res``) would change, as numbers. A probe fit (``mvtrain probe``), when given and
measured with the same setup, is the activation peak: ``a*T + b*P + c``.

``--dtype auto`` resolves to bf16 here: a plan is for a GPU, whatever machine computes it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mvshards.index import load_index
from mvtrain.bucketer import Budgets, CostModel
from mvtrain.memory import (
    BudgetError,
    IndexStats,
    Overhead,
    ProbeFitModel,
    StaticMemory,
    TrainingSetup,
    activation_model,
    check_probe_setup,
    count_parameters,
    load_config_only,
    load_probe_fit,
    plan_budgets,
    static_memory,
    torch_engine_static_memory,
)
from mvtrain.memory.probe_fit import probe_setup
from mvtrain.memory.static import resolved_bytes
from mvtrain.plan import PlanIndex, all_rank_plans, equal_step_plans, plan_report
from mvtrain.precision import resolve_dtype

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


ENGINES = ("deepspeed", "torch")


@dataclass(frozen=True)
class PlanRequest:
    """What to plan: the data, the model, the cards and the training setup."""

    shards: Path
    model: str
    gpus: int = 1
    gpu_mem: int = 80 * GiB
    zero_stage: int = 2
    lora: bool = False
    lora_rank: int = 8
    freeze_vision: bool = False
    grad_ckpt: bool = False
    dtype: str = "auto"
    """``auto``/``bf16``/``fp16``/``fp32``; ``auto`` is bf16 (a plan is for a GPU)."""
    target: float = 0.9
    grad_accum: int = 1
    attention: str = "sdpa"
    probe: Path | None = None
    engine: str = "deepspeed"
    """``deepspeed`` (ZeRO ``zero_stage``) or ``torch`` (the plain engine: no partitioning)."""

    @property
    def resolved_dtype(self) -> str:
        return resolve_dtype(self.dtype, cuda_bf16=True)


def _config(model: str) -> Any:
    if model == "tiny":
        from mvtrain.tiny import tiny_model_config

        return tiny_model_config()
    return load_config_only(model)


def _wanted_setup(request: PlanRequest, config: Any) -> dict[str, Any]:
    """The setup record a probe fit must match for ``request``."""
    setup = probe_setup(
        config,
        request.model,
        request.resolved_dtype,
        request.lora,
        request.lora_rank,
        request.freeze_vision,
        request.grad_ckpt,
        request.attention,
    )
    return {**setup, "shards": str(request.shards)}


def _load_probe(request: PlanRequest, config: Any) -> ProbeFitModel | None:
    """The request's probe fit, checked against its setup (ValueError when it differs)."""
    if request.probe is None:
        return None
    fit = load_probe_fit(request.probe)
    check_probe_setup(fit, _wanted_setup(request, config))
    return fit


def _index_stats(shards: Path) -> tuple[Any, IndexStats]:
    index = load_index(shards)
    return index, IndexStats.from_costs(index.sample_rows())


def _static(request: PlanRequest, counts: Any) -> StaticMemory:
    """Static memory per GPU of the request's engine (ZeRO buckets planned with
    ``overlap_comm``, as the generated DeepSpeed config sets it on CUDA)."""
    if request.engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {request.engine!r}")
    dtype = request.resolved_dtype
    if request.engine == "torch":
        return torch_engine_static_memory(counts.total, counts.trainable, dtype, request.gpus)
    return static_memory(
        counts.total,
        counts.trainable,
        num_gpus=request.gpus,
        zero_stage=request.zero_stage,
        dtype=dtype,
        overlap_comm=True,
    )


def _activations(request: PlanRequest, config: Any, fit: ProbeFitModel | None) -> Any:
    """The probe fit when given (it is the activation peak), else the config-derived model
    in the compute dtype (the torch engine's autocast dtype; ``TrainingSetup.bf16`` stands
    for 2-byte activations, bf16 or fp16)."""
    if fit is not None:
        return fit
    setup = TrainingSetup(
        bf16=resolved_bytes(request.resolved_dtype) == 2,
        lora=request.lora,
        lora_rank=request.lora_rank,
        freeze_vision=request.freeze_vision,
        grad_ckpt=request.grad_ckpt,
        vision_input_requires_grad=False,
        attention=request.attention,
    )
    return activation_model(config, setup)


def activation_model_of(request: PlanRequest) -> Any:
    """The activation model a plan of ``request`` uses: its probe fit (checked) or the
    config-derived model."""
    config = _config(request.model)
    return _activations(request, config, _load_probe(request, config))


def _fit(
    request: PlanRequest, config: Any, stats: IndexStats, fit: ProbeFitModel | None = None
) -> dict[str, Any]:
    """Everything that depends on the setup: params, static, activations, budgets."""
    counts = count_parameters(
        config, lora=request.lora, lora_rank=request.lora_rank, freeze_vision=request.freeze_vision
    )
    static = _static(request, counts)
    act = _activations(request, config, fit)
    overhead = Overhead.for_gpus(request.gpus)
    out: dict[str, Any] = {
        "counts": counts,
        "static": static,
        "activations": act,
        "overhead": overhead,
    }
    try:
        out["budgets"] = plan_budgets(static, act, request.gpu_mem, request.target, stats, overhead)
    except BudgetError as exc:
        out["error"] = exc
    return out


def _activation_fields(act: Any) -> dict[str, Any]:
    """The activation coefficients of the plan JSON (a probe fit has no quadratic term)."""
    if isinstance(act, ProbeFitModel):
        return {
            "activation_bytes_per_token": act.bytes_per_token,
            "activation_bytes_per_patch": act.bytes_per_patch,
            "activation_quadratic_bytes_per_token_sq": 0.0,
            "activation_const_bytes": act.const_bytes,
            "activation_model": act.to_dict(),
            "activation_from_probe": True,
        }
    return {
        "activation_bytes_per_token": act.bytes_per_token,
        "activation_bytes_per_patch": act.bytes_per_patch,
        "activation_quadratic_bytes_per_token_sq": act.quadratic_bytes_per_token_sq,
        "activation_const_bytes": act.const_bytes,
        "activation_model": act.to_dict(),
        "activation_from_probe": False,
    }


def make_plan(request: PlanRequest) -> dict[str, Any]:
    """The plan as a JSON-ready dict (``mvtrain plan --json`` prints it)."""
    config = _config(request.model)
    probe = _load_probe(request, config)
    index, stats = _index_stats(request.shards)
    fit = _fit(request, config, stats, probe)
    counts, static, act = fit["counts"], fit["static"], fit["activations"]
    plan: dict[str, Any] = {
        "model": request.model,
        "gpus": request.gpus,
        "gpu_mem_bytes": request.gpu_mem,
        "target": request.target,
        "engine": request.engine,
        "zero_stage": request.zero_stage if request.engine == "deepspeed" else None,
        "dtype": request.resolved_dtype,
        "dtype_requested": request.dtype,
        "setup": {
            "lora": request.lora,
            "freeze_vision": request.freeze_vision,
            "grad_ckpt": request.grad_ckpt,
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
        **_activation_fields(act),
        "overhead": fit["overhead"].to_dict(),
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
            predicted_reserved_bytes=budgets.predicted_reserved,
            predicted_allocated_bytes=budgets.predicted_allocated,
            activation_peak_bytes=budgets.activation_peak,
            fragmentation_bytes=fit["overhead"].fragmentation(budgets.activation_peak),
        )
        plan["epoch"] = _epoch_numbers(index, request, budgets)
    else:
        plan["error"] = str(fit["error"])
        plan["needed_bytes"] = fit["error"].needed
    plan["advice"] = _advice(request, config, stats, probe)
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
    request: PlanRequest, config: Any, stats: IndexStats, probe: ProbeFitModel | None
) -> list[dict[str, Any]]:
    """Each remedy of the article's advice, evaluated: does it fit, and with which budgets.
    A probe fit holds for its own setup only: the remedies that change the setup use the
    config-derived activation model."""
    remedies: list[tuple[str, PlanRequest, IndexStats, bool]] = []
    if not request.lora:
        remedies.append(("--lora", replace(request, lora=True), stats, False))
    if not request.freeze_vision:
        remedies.append(("--freeze-vision", replace(request, freeze_vision=True), stats, False))
    if not request.grad_ckpt:
        remedies.append(("--grad-ckpt", replace(request, grad_ckpt=True), stats, False))
    for gpus in (request.gpus * 2, request.gpus * 4):
        remedies.append((f"--gpus {gpus}", replace(request, gpus=gpus), stats, True))
    lower = replace(
        stats,
        total_patches=stats.total_patches * 5 // 10,
        patches_p99=stats.patches_p99 * 5 // 10,
        patches_max=stats.patches_max * 5 // 10,
    )
    remedies.append(("mvprep build --max-res 896 (about half the patches)", request, lower, True))
    out = []
    for name, changed, changed_stats, same_setup in remedies:
        fit = _fit(changed, config, changed_stats, probe if same_setup else None)
        row: dict[str, Any] = {
            "change": name,
            "static_bytes_per_gpu": fit["static"].total,
            "fits": "budgets" in fit,
            "activations": "probe fit" if same_setup and probe else "model config",
        }
        if "budgets" in fit:
            row["token_budget"] = fit["budgets"].token_budget
            row["patch_budget"] = fit["budgets"].patch_budget
            row["predicted_peak_bytes"] = fit["budgets"].predicted_peak
        else:
            row["needed_bytes"] = fit["error"].needed
        out.append(row)
    return out


def _g(value: float) -> str:
    return f"{value / GiB:7.2f} GiB"


def _header(plan: dict[str, Any]) -> str:
    engine = (
        f"DeepSpeed ZeRO-{plan['zero_stage']}"
        if plan["engine"] == "deepspeed"
        else "plain torch engine (no partitioning)"
    )
    modes = [k for k, v in plan["setup"].items() if v is True] or ["full fine-tune"]
    return (
        f"mvtrain plan: {plan['model']} on {plan['gpus']} x "
        f"{plan['gpu_mem_bytes'] / GiB:.0f} GiB, {engine}, {plan['dtype']} "
        f"(--dtype {plan['dtype_requested']}), {plan['setup']['attention']} attention, "
        f"target {plan['target']:.0%}, " + ", ".join(modes)
    )


def _static_lines(plan: dict[str, Any]) -> list[str]:
    lines = ["static memory per GPU"]
    for key, value in plan["static"].items():
        if key in ("num_gpus", "zero_stage") or not isinstance(value, int):
            continue
        if value or key != "autocast_weight_copies":
            lines.append(f"  {key:<28}{_g(value)}")
    return lines


def _activation_lines(plan: dict[str, Any]) -> list[str]:
    source = "probe fit (a*T + b*P + c)" if plan["activation_from_probe"] else "model config"
    return [
        "activation model (bytes)",
        f"  per padded token    {plan['activation_bytes_per_token']:,.0f}",
        f"  per padded patch    {plan['activation_bytes_per_patch']:,.0f}",
        f"  per token^2 (attn)  {plan['activation_quadratic_bytes_per_token_sq']:,.1f}",
        f"  constant            {plan['activation_const_bytes']:,.0f}",
        f"  source              {source}",
    ]


def _overhead_lines(plan: dict[str, Any]) -> list[str]:
    o = plan["overhead"]
    return [
        "overhead per GPU (ESTIMATES, not measured)",
        f"  cuda_context                {_g(o['cuda_context'])}",
        f"  cublas_workspace            {_g(o['cublas_workspace'])}",
        f"  nccl_buffers                {_g(o['nccl_buffers'])}",
        f"  fragmentation               {o['fragmentation_fraction']:.0%} of the activation peak",
    ]


def _budget_lines(plan: dict[str, Any]) -> list[str]:
    if plan["token_budget"] is None:
        return [f"NOTHING FITS: {plan['error']}"]
    lines = [
        f"budgets that fit {plan['target']:.0%} of the card: "
        f"--token-budget {plan['token_budget']} --patch-budget {plan['patch_budget']}",
        "  costliest batch they allow, predicted (the overhead terms are estimates):",
        f"    activation peak           {_g(plan['activation_peak_bytes'])}",
        f"    allocated                 {_g(plan['predicted_allocated_bytes'])}"
        "  (static + cuBLAS + activations; cf. max_memory_allocated)",
        f"    reserved                  {_g(plan['predicted_reserved_bytes'])}"
        "  (+ fragmentation; cf. max_memory_reserved)",
        f"    device peak               {_g(plan['predicted_peak_bytes'])}"
        "  (+ CUDA context + NCCL: what an OOM is about)",
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
    return lines


def _advice_lines(plan: dict[str, Any]) -> list[str]:
    lines = ["what changes would do:"]
    for row in plan["advice"]:
        if row["fits"]:
            lines.append(
                f"  {row['change']:<48} static {_g(row['static_bytes_per_gpu'])}, budgets "
                f"{row['token_budget']} tokens / {row['patch_budget']} patches, "
                f"peak {_g(row['predicted_peak_bytes'])}"
            )
        else:
            lines.append(
                f"  {row['change']:<48} static {_g(row['static_bytes_per_gpu'])}, still does "
                f"not fit (needs {_g(row['needed_bytes'])})"
            )
    return lines


def format_plan(plan: dict[str, Any]) -> str:
    """The plan for the terminal."""
    p = plan["params"]
    lines = [
        _header(plan),
        "",
        "parameters",
        f"  total {plan['params_total']:,}  trainable {plan['params_trainable']:,}"
        + ("  (estimate from config)" if p["estimate"] else ""),
        f"  LLM {p['llm']:,}  vision {p['vision']:,}  resampler {p['resampler']:,}  "
        f"other {p['other']:,}",
        *_static_lines(plan),
        *_activation_lines(plan),
        *_overhead_lines(plan),
        "",
        *_budget_lines(plan),
        "",
        *_advice_lines(plan),
    ]
    return "\n".join(lines)


__all__ = ["PlanRequest", "activation_model_of", "format_plan", "make_plan", "parse_bytes"]
