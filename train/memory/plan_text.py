"""``mvtrain plan`` for the terminal: a :class:`~mvtrain.memory.plan.MemoryPlan` as text."""

from __future__ import annotations

from mvshards.units import GiB
from mvtrain.memory.activations import ActivationModel
from mvtrain.memory.plan import EpochNote, EpochSteps, MemoryPlan
from mvtrain.memory.remedies import Remedy


def _g(value: float) -> str:
    return f"{value / GiB:7.2f} GiB"


def _header(plan: MemoryPlan) -> str:
    r = plan.request
    engine = (
        f"DeepSpeed ZeRO-{r.zero_stage}"
        if r.engine == "deepspeed"
        else "plain torch engine (no partitioning)"
    )
    modes = r.modes or ["full fine-tune"]
    loss = "chunked loss" if r.chunked_loss else "plain loss (--no-chunked-loss)"
    return (
        f"mvtrain plan: {r.model} on {r.gpus} x {r.gpu_mem / GiB:.0f} GiB, {engine}, "
        f"{r.resolved_dtype} (--dtype {r.dtype}), {r.attention} attention, "
        f"target {r.target:.0%}, " + ", ".join(modes) + f", {loss}"
    )


def _parameter_lines(plan: MemoryPlan) -> list[str]:
    c = plan.fit.counts
    return [
        "parameters",
        f"  total {c.total:,}  trainable {c.trainable:,}"
        + ("  (estimate from config)" if c.estimate else ""),
        f"  LLM {c.llm:,}  vision {c.vision:,}  resampler {c.resampler:,}  other {c.other:,}",
    ]


def _static_lines(plan: MemoryPlan) -> list[str]:
    lines = ["static memory per GPU"]
    for key, value in plan.fit.static.to_dict().items():
        if key in ("num_gpus", "zero_stage") or not isinstance(value, int):
            continue
        if value or key != "autocast_weight_copies":
            lines.append(f"  {key:<28}{_g(value)}")
    return lines


def _activation_lines(plan: MemoryPlan) -> list[str]:
    fit, act = plan.fit, plan.fit.activations
    source = "probe fit (a*T + b*P + c)" if fit.from_probe else "model config"
    lines = [
        "activation model (bytes)",
        f"  per padded token    {act.bytes_per_token:,.0f}",
    ]
    if isinstance(act, ActivationModel):
        kind = "chunked" if act.chunked_loss else "plain: fp32 log-probs"
        lines.append(f"  per label row       {act.logits_bytes_per_token:,.0f}  (loss, {kind})")
    return [
        *lines,
        f"  per padded patch    {act.bytes_per_patch:,.0f}",
        f"  per token^2 (attn)  {fit.quadratic_bytes_per_token_sq:,.1f}",
        f"  constant            {act.const_bytes:,.0f}",
        f"  source              {source}",
    ]


def _overhead_lines(plan: MemoryPlan) -> list[str]:
    o = plan.fit.overhead
    return [
        "overhead per GPU (ESTIMATES, not measured)",
        f"  cuda_context                {_g(o.cuda_context)}",
        f"  cublas_workspace            {_g(o.cublas_workspace)}",
        f"  nccl_buffers                {_g(o.nccl_buffers)}",
        f"  fragmentation               {o.fragmentation_fraction:.0%} of the activation peak",
    ]


def _epoch_lines(epoch: EpochSteps | EpochNote | None) -> list[str]:
    if isinstance(epoch, EpochNote):
        return [f"  epoch: {epoch.note}"]
    if isinstance(epoch, EpochSteps):
        c = epoch.costliest_batch
        return [
            f"  costliest planned micro-batch: {c.samples} samples, {c.padded_tokens} "
            f"padded tokens, {c.padded_patches} patches",
            f"  steps per epoch: {epoch.steps_per_epoch} "
            f"({epoch.micro_batches_per_step} micro-batches per step, "
            f"{max(epoch.micro_batches_per_rank)} per rank per epoch)",
        ]
    return []


def _budget_lines(plan: MemoryPlan) -> list[str]:
    b = plan.fit.budgets
    if b is None:
        return [f"NOTHING FITS: {plan.fit.shortfall}"]
    return [
        f"budgets that fit {plan.request.target:.0%} of the card: "
        f"--token-budget {b.token_budget} --patch-budget {b.patch_budget}",
        "  costliest batch they allow, predicted (the overhead terms are estimates):",
        f"    activation peak           {_g(b.activation_peak)}",
        f"    allocated                 {_g(b.predicted_allocated)}"
        "  (static + cuBLAS + activations; cf. max_memory_allocated)",
        f"    reserved                  {_g(b.predicted_reserved)}"
        "  (+ fragmentation; cf. max_memory_reserved)",
        f"    device peak               {_g(b.predicted_peak)}"
        "  (+ CUDA context + NCCL: what an OOM is about)",
        *_epoch_lines(plan.epoch),
    ]


def _remedy_line(remedy: Remedy) -> str:
    fit = remedy.fit
    start = f"  {remedy.change:<48} static {_g(fit.static.total)}, "
    if fit.budgets is not None:
        b = fit.budgets
        return (
            f"{start}budgets {b.token_budget} tokens / {b.patch_budget} patches, "
            f"peak {_g(b.predicted_peak)}"
        )
    assert fit.shortfall is not None
    return f"{start}still does not fit (needs {_g(fit.shortfall.needed)})"


def format_plan(plan: MemoryPlan) -> str:
    """The plan for the terminal."""
    lines = [
        _header(plan),
        "",
        *_parameter_lines(plan),
        *_static_lines(plan),
        *_activation_lines(plan),
        *_overhead_lines(plan),
        "",
        *_budget_lines(plan),
        "",
        "what changes would do:",
        *(_remedy_line(remedy) for remedy in plan.remedies),
    ]
    return "\n".join(lines)
