"""Static memory per GPU: weights, gradients and optimizer state under ZeRO stage 0/1/2.

``P`` = all parameters, ``Pt`` = trainable parameters (LoRA: the adapters only; frozen
vision: all but the vision tower), ``N`` = data-parallel GPUs, ``w`` = bytes of the model
dtype (2 for bf16/fp16, 4 for fp32). The optimizer is torch AdamW (two fp32 moments).

ZeRO's layout of these terms, per stage and dtype, is derived in :func:`static_memory`; its
communication buckets, reported apart from the model states, in :func:`bucket_bytes`.
The plain torch engine (:func:`torch_engine_static_memory`) has no partitioning at all.
The CUDA context, library workspaces and allocator slack are not tensors of the model:
:class:`mvtrain.memory.budgets.Overhead` names them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mvtrain.precision import bytes_per_element, engine_precision
from mvtrain.run_config import DTYPES

DEFAULT_REDUCE_BUCKET = 200_000_000
"""Elements in one ZeRO reduce bucket (``reduce_bucket_size`` of the generated config)."""
DEFAULT_ALLGATHER_BUCKET = 200_000_000
"""Elements in one ZeRO all-gather bucket (``allgather_bucket_size`` of the generated config)."""
OVERLAP_COMM_FACTOR = 4.5
"""Documented footprint of ``overlap_comm``: 4.5x the reduce and all-gather buckets."""


@dataclass(frozen=True)
class StaticMemory:
    """Bytes per GPU that do not depend on the batch."""

    weights: int
    gradients: int
    """16-bit (or fp32 when not mixed) gradients, full or the partition."""
    fp32_gradients: int
    master_weights: int
    optimizer_states: int
    """Adam m and v (fp32)."""
    buffer_bytes: int
    """ZeRO communication buckets; 0 for the plain torch engine."""
    zero_stage: int
    num_gpus: int
    autocast_weight_copies: int = 0
    """Plain torch engine in bf16: the half-precision copies of the fp32 weights that
    ``torch.autocast`` makes for matmuls and autograd keeps until backward (ESTIMATE: every
    weight counted once, ``2P``)."""
    engine: str = "deepspeed"
    model_buffers: int = 0
    """The model's buffers (not partitioned by ZeRO: every rank holds all of them), e.g. the
    4.5 resampler's float32 ``temporal_pos_embed``; :attr:`ParamCounts.buffer_bytes`."""

    @property
    def model_states(self) -> int:
        """What DeepSpeed's estimator counts: weights + gradients + optimizer."""
        return (
            self.weights
            + self.gradients
            + self.fp32_gradients
            + self.master_weights
            + self.optimizer_states
        )

    @property
    def total(self) -> int:
        return (
            self.model_states + self.buffer_bytes + self.autocast_weight_copies + self.model_buffers
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(model_states=self.model_states, total=self.total)
        return out


def resolved_bytes(dtype: str) -> int:
    """Bytes per element of a resolved ``bf16``/``fp16``/``fp32`` (``auto`` is refused:
    resolve it first, for the GPU the plan is for)."""
    if dtype == "auto" or dtype not in DTYPES:
        raise ValueError(f"dtype must be bf16, fp16 or fp32 here, got {dtype!r}")
    return bytes_per_element(dtype)


def bucket_bytes(
    reduce_bucket_size: int, allgather_bucket_size: int, grad_bytes: int, overlap_comm: bool
) -> int:
    """ZeRO communication buffers: ``4.5 * (reduce + allgather) * grad_bytes`` with
    ``overlap_comm``, one reduce bucket without.

    Not model states: :attr:`StaticMemory.buffer_bytes`. The bucket sizes are elements
    (``reduce_bucket_size`` / ``allgather_bucket_size``; the generated config,
    :func:`mvtrain.deepspeed_config.deepspeed_config`, uses 2e8 of each and sets ``overlap_comm`` on
    CUDA). With ``overlap_comm`` we follow the documented rule: "overlap_comm
    uses 4.5x the allgather_bucket_size and reduce_bucket_size values. So if they are set to 5e8,
    this requires a 9GB footprint (5e8 x 2Bytes x 2 x 4.5)" (Hugging Face Transformers, DeepSpeed
    integration guide, ZeRO-2 config, ``docs/source/en/main_classes/deepspeed.md``; DeepSpeed's
    own ``config-json`` page documents the two bucket sizes but not the multiplier), i.e.
    ``4.5 * (reduce + allgather) * g`` bytes with ``g`` the gradient element size (2e8 + 2e8 in
    bf16: 3.6e9 bytes). It is a rule of thumb and an upper bound: DeepSpeed 0.19's
    ``stage_1_and_2.py`` allocates two ``reduce_bucket_size`` staging buffers with
    ``overlap_comm`` (one without), the rest being transient copies of the reduction and the
    parameter all-gather. Without ``overlap_comm``: one reduce bucket, ``reduce * g``.
    """
    if overlap_comm:
        elements = OVERLAP_COMM_FACTOR * (int(reduce_bucket_size) + int(allgather_bucket_size))
        return int(elements * grad_bytes)
    return int(reduce_bucket_size) * grad_bytes


def _check_counts(total_params: int, trainable_params: int, num_gpus: int) -> None:
    if num_gpus < 1:
        raise ValueError(f"num_gpus must be >= 1, got {num_gpus}")
    if not 0 <= trainable_params <= total_params:
        raise ValueError(f"trainable params {trainable_params} must be within 0..{total_params}")


def static_memory(
    total_params: int,
    trainable_params: int,
    num_gpus: int = 1,
    zero_stage: int = 2,
    dtype: str = "bf16",
    reduce_bucket_size: int | None = DEFAULT_REDUCE_BUCKET,
    allgather_bucket_size: int = DEFAULT_ALLGATHER_BUCKET,
    overlap_comm: bool = True,
    model_buffers: int = 0,
) -> StaticMemory:
    """Static bytes per GPU under DeepSpeed ZeRO ``zero_stage`` (0, 1, 2) on ``num_gpus``.

    Mixed precision (bf16), as DeepSpeed 0.19 implements it (``stage_1_and_2.py``,
    ``bf16_optimizer.py``):

    ====== ========== ======================= ============== ============= =================
    stage  weights    16-bit gradients        fp32 gradients fp32 master   Adam m, v
    ====== ========== ======================= ============== ============= =================
    0      ``2P``     ``2Pt`` (full)          ``4Pt`` (full) ``4Pt/N``     ``8Pt/N``
    1      ``2P``     ``2Pt`` (full)          ``4Pt/N``      ``4Pt/N``     ``8Pt/N``
    2      ``2P``     ``2Pt/N`` (partition)   ``4Pt/N``      ``4Pt/N``     ``8Pt/N``
    ====== ========== ======================= ============== ============= =================

    So ZeRO-2 full fine-tuning is ``2P + 18P/N`` -- exactly DeepSpeed's own
    ``estimate_zero2_model_states_mem_needs(P, N, cpu_offload=False)`` GPU figure ("2 =
    params_16bit, 18 = 2_grads_16bit + 4_grads_32bit + 4_params_32bit +
    8_optimizer_states_32bit"); ZeRO-1 is the ``4P + 16P/N`` form quoted in the DeepSpeed/ZeRO
    paper family (16-bit gradients are not partitioned); stage 0 uses DeepSpeed's
    ``BF16_Optimizer`` (full fp32 gradient accumulation buffer, fp32 master and moments
    partitioned like ZeRO-1). The terms we count are the ones DeepSpeed counts: 16-bit weights,
    16-bit gradients, the fp32 gradient partition, the fp32 master partition, m and v.

    fp32 training (``--dtype fp32``): weights ``4P``; gradients ``4Pt`` (stages 0/1) or
    ``4Pt/N`` (stage 2); DeepSpeed still keeps an fp32 master partition ``4Pt/N`` and an fp32
    gradient partition ``4Pt/N``; Adam ``8Pt/N``. fp16 is laid out like bf16.

    ``dtype``: resolved (``bf16``/``fp16``/``fp32``). ``reduce_bucket_size`` None (or 0)
    leaves the buckets out. Integer division per term, as DeepSpeed's partitions (no padding).
    """
    if zero_stage not in (0, 1, 2):
        raise ValueError(f"zero_stage must be 0, 1 or 2 (ZeRO-3 is unsupported), got {zero_stage}")
    _check_counts(total_params, trainable_params, num_gpus)
    n, p, pt = num_gpus, total_params, trainable_params
    w = resolved_bytes(dtype)
    # BF16_Optimizer (stage 0) accumulates into a full fp32 buffer; ZeRO keeps a partition.
    fp32_grads = 4 * pt if (w == 2 and zero_stage == 0) else 4 * pt // n
    buffers = 0
    if reduce_bucket_size and zero_stage in (1, 2) and pt:
        grad_bytes = w if zero_stage == 2 else 4  # ZeRO-1 stages the fp32 accumulator
        buffers = bucket_bytes(reduce_bucket_size, allgather_bucket_size, grad_bytes, overlap_comm)
    return StaticMemory(
        weights=w * p,
        gradients=w * pt // n if zero_stage == 2 else w * pt,
        fp32_gradients=fp32_grads,
        master_weights=4 * pt // n,
        optimizer_states=8 * pt // n,
        buffer_bytes=buffers,
        zero_stage=zero_stage,
        num_gpus=n,
        model_buffers=model_buffers,
    )


def torch_engine_static_memory(
    total_params: int,
    trainable_params: int,
    dtype: str = "bf16",
    num_gpus: int = 1,
    model_buffers: int = 0,
) -> StaticMemory:
    """The plain torch engine (:class:`mvtrain.engine.TorchEngine`) on any number of GPUs:
    nothing is partitioned, every rank holds fp32 weights ``4P``, fp32 gradients ``4Pt`` and
    AdamW's fp32 ``m``, ``v`` ``8Pt`` -- ``4P + 12Pt`` whatever ``dtype`` and ``num_gpus``
    (16P for full fine-tuning); no buckets (gradients are all-reduced in place). Under bf16
    the forward runs in ``torch.autocast``, which adds the half-precision weight copies
    (:attr:`StaticMemory.autocast_weight_copies`). fp16 is refused: the plain engine does no
    loss scaling."""
    _check_counts(total_params, trainable_params, num_gpus)
    resolved_bytes(dtype)
    autocast = engine_precision(dtype, deepspeed=False).autocast  # refuses fp16
    return StaticMemory(
        weights=4 * total_params,
        gradients=4 * trainable_params,
        fp32_gradients=0,
        master_weights=0,
        optimizer_states=8 * trainable_params,
        buffer_bytes=0,
        zero_stage=0,
        num_gpus=num_gpus,
        autocast_weight_copies=bytes_per_element(autocast) * total_params if autocast else 0,
        engine="torch",
        model_buffers=model_buffers,
    )
