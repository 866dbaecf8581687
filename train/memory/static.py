"""Static memory per GPU: weights, gradients and optimizer state under ZeRO stage 0/1/2.

``P`` = all parameters, ``Pt`` = trainable parameters (LoRA: the adapters only; frozen
vision: all but the vision tower), ``N`` = data-parallel GPUs, ``w`` = bytes of the model
dtype (2 for bf16/fp16, 4 for fp32). The optimizer is torch AdamW (two fp32 moments).

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

fp32 training (no ``--bf16``): weights ``4P``; gradients ``4Pt`` (stages 0/1) or ``4Pt/N``
(stage 2); DeepSpeed still keeps an fp32 master partition ``4Pt/N`` and an fp32 gradient
partition ``4Pt/N``; Adam ``8Pt/N``.

Not model states, reported separately in :attr:`StaticMemory.buffer_bytes`: ZeRO's gradient
reduce bucket (``reduce_bucket_size`` elements of the gradient dtype, two of them with
``overlap_comm``; mvtrain's generated config uses 2e8 elements and overlaps on CUDA).
The CUDA context and allocator slack are not tensors at all: :mod:`budgets` takes them as a
fixed overhead.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

DEFAULT_REDUCE_BUCKET = 200_000_000
"""Elements in one ZeRO reduce bucket (``reduce_bucket_size`` of the generated config)."""


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
    """ZeRO reduce bucket(s); 0 for the plain torch engine."""
    zero_stage: int
    num_gpus: int

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
        return self.model_states + self.buffer_bytes

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(model_states=self.model_states, total=self.total)
        return out


def static_memory(
    total_params: int,
    trainable_params: int,
    num_gpus: int = 1,
    zero_stage: int = 2,
    bf16: bool = True,
    reduce_bucket_size: int | None = DEFAULT_REDUCE_BUCKET,
    overlap_comm: bool = True,
) -> StaticMemory:
    """Static bytes per GPU under DeepSpeed ZeRO ``zero_stage`` (0, 1, 2) on ``num_gpus``.

    ``reduce_bucket_size`` None (or 0) leaves the reduce bucket out (e.g. the plain engine).
    Integer division per term, as DeepSpeed's partitions (padding ignored).
    """
    if zero_stage not in (0, 1, 2):
        raise ValueError(f"zero_stage must be 0, 1 or 2 (ZeRO-3 is unsupported), got {zero_stage}")
    if num_gpus < 1:
        raise ValueError(f"num_gpus must be >= 1, got {num_gpus}")
    if not 0 <= trainable_params <= total_params:
        raise ValueError(f"trainable params {trainable_params} must be within 0..{total_params}")
    n, p, pt = num_gpus, total_params, trainable_params
    w = 2 if bf16 else 4
    weights = w * p
    gradients = w * pt // n if zero_stage == 2 else w * pt
    # BF16_Optimizer (stage 0) accumulates into a full fp32 buffer; ZeRO keeps a partition.
    fp32_grads = 4 * pt if (bf16 and zero_stage == 0) else 4 * pt // n
    master = 4 * pt // n
    adam = 8 * pt // n
    buffers = 0
    if reduce_bucket_size and zero_stage in (1, 2) and pt:
        grad_bytes = w if zero_stage == 2 else 4
        buffers = int(reduce_bucket_size) * grad_bytes * (2 if overlap_comm else 1)
    return StaticMemory(
        weights=weights,
        gradients=gradients,
        fp32_gradients=fp32_grads,
        master_weights=master,
        optimizer_states=adam,
        buffer_bytes=buffers,
        zero_stage=zero_stage,
        num_gpus=n,
    )


def torch_engine_static_memory(
    total_params: int, trainable_params: int, bf16: bool
) -> StaticMemory:
    """The plain torch engine (one GPU, no ZeRO): weights, gradients and AdamW moments all in
    the model dtype (``w*P + w*Pt + 2*w*Pt``); no master copy, no buckets."""
    w = 2 if bf16 else 4
    return StaticMemory(
        weights=w * total_params,
        gradients=w * trainable_params,
        fp32_gradients=0,
        master_weights=0,
        optimizer_states=2 * w * trainable_params,
        buffer_bytes=0,
        zero_stage=0,
        num_gpus=1,
    )
