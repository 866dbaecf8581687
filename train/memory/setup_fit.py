"""What one training setup needs on a card, and the budgets it leaves: the first step of a plan.

:class:`PlanRequest` is what ``mvtrain plan`` is asked (data, model, cards, training setup);
:func:`fit_setup` answers it for the index's :class:`~mvtrain.memory.budgets.IndexStats` with
a :class:`SetupFit`: the parameter counts (weights not needed: counted on the meta device),
static memory per GPU of the request's engine (DeepSpeed ZeRO, or the plain torch engine,
which partitions nothing), the activation model, the named overhead terms (estimates), and
the token and patch budgets that fit ``target`` of the card -- or, when nothing fits, the
:class:`~mvtrain.memory.budgets.BudgetError` saying how many bytes it needs.

A probe fit (``mvtrain probe``), when given and measured with the same setup, is the
activation peak ``a*T + b*P + c``; otherwise the activation model is derived from the config.
``--dtype auto`` resolves to bf16 here: a plan is for a GPU, whatever machine computes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mvshards.units import GiB
from mvtrain.memory.activations import ActivationModel, TrainingSetup, activation_model
from mvtrain.memory.budgets import BudgetError, BudgetPlan, IndexStats, Overhead, plan_budgets
from mvtrain.memory.params import ParamCounts, count_parameters, load_config_only
from mvtrain.memory.probe_fit import ProbeFitModel, check_probe_setup, load_probe_fit, probe_setup
from mvtrain.memory.static import (
    StaticMemory,
    resolved_bytes,
    static_memory,
    torch_engine_static_memory,
)
from mvtrain.precision import resolve_dtype

ENGINES = ("deepspeed", "torch")


@dataclass(frozen=True)
class PlanRequest:
    """What to plan: the data, the model, the cards and the training setup."""

    shards: Any
    """The shard folders, as ``RunConfig.shards`` takes them (see
    :func:`mvtrain.batching.sources.parse_sources`)."""
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
    chunked_loss: bool = True
    """The chunked loss (default); False: the plain logits loss (``--no-chunked-loss``)."""

    @property
    def resolved_dtype(self) -> str:
        return resolve_dtype(self.dtype, cuda_bf16=True)

    @property
    def modes(self) -> list[str]:
        """The setup switches that are on: ``lora``, ``freeze_vision``, ``grad_ckpt``."""
        on = {"lora": self.lora, "freeze_vision": self.freeze_vision, "grad_ckpt": self.grad_ckpt}
        return [name for name, value in on.items() if value]


ActivationPeak = ActivationModel | ProbeFitModel
"""An activation model a plan can use: config-derived, or a probe fit."""


@dataclass(frozen=True)
class SetupFit:
    """What one setup needs per GPU, and the budgets that fit (:func:`fit_setup`)."""

    counts: ParamCounts
    static: StaticMemory
    activations: ActivationPeak
    overhead: Overhead
    budgets: BudgetPlan | None
    """The budgets that fit ``target`` of the card; None when nothing fits."""
    shortfall: BudgetError | None = None
    """Why nothing fits, and how many bytes the p99 sample needs (set when budgets is None)."""

    @property
    def from_probe(self) -> bool:
        return isinstance(self.activations, ProbeFitModel)

    @property
    def quadratic_bytes_per_token_sq(self) -> float:
        """The attention term per padded token squared (a probe fit has none: 0.0)."""
        if isinstance(self.activations, ProbeFitModel):
            return 0.0
        return self.activations.quadratic_bytes_per_token_sq


def model_config(model: str) -> Any:
    """The config of ``model``: ``tiny``, or a folder whose ``config.json`` is enough."""
    if model == "tiny":
        from mvtrain.model.tiny import tiny_model_config

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
        request.chunked_loss,
    )
    from mvtrain.batching.sources import parse_sources

    return {**setup, "shards": " --shards ".join(str(s) for s in parse_sources(request.shards))}


def load_probe(request: PlanRequest, config: Any) -> ProbeFitModel | None:
    """The request's probe fit, checked against its setup (ValueError when it differs)."""
    if request.probe is None:
        return None
    fit = load_probe_fit(request.probe)
    check_probe_setup(fit, _wanted_setup(request, config))
    return fit


def _static(request: PlanRequest, counts: ParamCounts) -> StaticMemory:
    """Static memory per GPU of the request's engine (ZeRO buckets planned with
    ``overlap_comm``, as the generated DeepSpeed config sets it on CUDA)."""
    if request.engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {request.engine!r}")
    dtype = request.resolved_dtype
    if request.engine == "torch":
        return torch_engine_static_memory(
            counts.total, counts.trainable, dtype, request.gpus, counts.buffer_bytes
        )
    return static_memory(
        counts.total,
        counts.trainable,
        num_gpus=request.gpus,
        zero_stage=request.zero_stage,
        dtype=dtype,
        overlap_comm=True,
        model_buffers=counts.buffer_bytes,
    )


def activations_for(
    request: PlanRequest, config: Any, probe: ProbeFitModel | None
) -> ActivationPeak:
    """``probe`` when given (it is the activation peak), else the config-derived model in the
    compute dtype (the torch engine's autocast dtype; ``TrainingSetup.bf16`` stands for
    2-byte activations, bf16 or fp16)."""
    if probe is not None:
        return probe
    setup = TrainingSetup(
        bf16=resolved_bytes(request.resolved_dtype) == 2,
        lora=request.lora,
        lora_rank=request.lora_rank,
        freeze_vision=request.freeze_vision,
        grad_ckpt=request.grad_ckpt,
        vision_input_requires_grad=False,
        attention=request.attention,
        chunked_loss=request.chunked_loss,
    )
    return activation_model(config, setup)


def fit_setup(
    request: PlanRequest, config: Any, stats: IndexStats, probe: ProbeFitModel | None = None
) -> SetupFit:
    """Everything that depends on the setup: parameters, static memory, activations,
    overhead, and the budgets (or why there are none)."""
    counts = count_parameters(
        config, lora=request.lora, lora_rank=request.lora_rank, freeze_vision=request.freeze_vision
    )
    static = _static(request, counts)
    act = activations_for(request, config, probe)
    overhead = Overhead.for_gpus(request.gpus)
    try:
        budgets = plan_budgets(static, act, request.gpu_mem, request.target, stats, overhead)
    except BudgetError as exc:
        return SetupFit(counts, static, act, overhead, None, exc)
    return SetupFit(counts, static, act, overhead, budgets)
