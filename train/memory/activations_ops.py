"""What each autograd op saves for backward, and the ledger the activation counts fill.

Notation: ``a`` bytes of the activation dtype (2 bf16, 4 fp32), ``F = 4`` (fp32), ``s`` bytes
of a LayerNorm statistic (fp32 on CUDA; the CPU kernel keeps them in ``a``).

What an op saves (PyTorch autograd formulas):

* ``linear`` saves its input iff its weight trains (the grad of the input needs only the
  weight, a parameter); LoRA's ``lora_A`` saves the same input (de-duplicated) and
  ``lora_B`` saves the rank-``r`` output of ``lora_A``: ``a*r`` per adapted linear.
* ``mul`` saves each operand iff the *other* one needs a gradient; ``silu``/``gelu`` save
  their input; ``sigmoid``/``rsqrt``/``log_softmax`` their output; ``pow`` its input;
  ``mean``/``add``/views/casts save nothing; advanced indexing saves the int64 index.
* RMSNorm: :func:`mvtrain.memory.activations_llm.rmsnorm_saved`.
* LayerNorm saves input + mean + rstd (``a*W + 2s`` per row) when anything needs a grad.
* Attention with SDPA / flash / memory-efficient kernels saves ``q, k, v, out`` and the fp32
  ``logsumexp`` (``F`` per head per token): nothing quadratic. With a padding mask,
  transformers repeats k/v to all heads (GQA off) and SDPA saves its own float copy of the
  ``[B, 1, L, L]`` mask per layer: ``a*B*L^2`` per full-attention layer -- the quadratic term
  (0 with ``flash_attention_2``, which unpads). The eager path saves the fp32 softmax and
  its ``a`` copy: ``heads*(F + a)`` per ``L^2`` per layer, padded or not.
* Vision varlen attention (:mod:`mvtrain.model.attention`) also saves the int64 gather index
  (8 bytes per token per attention).
* Cross-entropy saves the fp32 ``log_softmax`` output (``F*vocab`` per label position: with
  a 150k-250k vocab the biggest per-token term) and the int64 targets.
"""

from __future__ import annotations

from dataclasses import dataclass

F = 4
"""Bytes of fp32."""
INDEX = 8
"""Bytes of an int64 index."""

UNITS = ("token", "loss_row", "patch", "image_token", "padded_token", "quad", "const")
"""What a term is counted per (see :class:`mvtrain.memory.activations.ActivationModel`)."""


@dataclass(frozen=True)
class Term:
    """One line of the breakdown: ``bytes`` per ``unit``."""

    name: str
    unit: str
    bytes: float


class Ledger:
    """Named terms; the same (name, unit) added again (another layer) is summed."""

    def __init__(self) -> None:
        self._bytes: dict[tuple[str, str], float] = {}

    def add(self, name: str, unit: str, value: float, times: float = 1) -> None:
        if value and times:
            key = (name, unit)
            self._bytes[key] = self._bytes.get(key, 0.0) + float(value) * times

    @property
    def terms(self) -> list[Term]:
        return [Term(name, unit, value) for (name, unit), value in self._bytes.items()]

    def total(self, unit: str) -> float:
        return sum(v for (_, u), v in self._bytes.items() if u == unit)
