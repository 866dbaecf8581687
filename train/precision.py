"""Training precision: one ``--dtype`` for ``mvtrain plan`` and ``mvtrain run``.

``auto`` is bf16 where CUDA supports it and fp32 otherwise (CPU, pre-Ampere cards). What each
engine does with it:

* DeepSpeed: parameters in the dtype, its own fp32 master copy and gradient partitions
  (``bf16``/``fp16`` sections of the generated config); buffers (RoPE ``inv_freq``...) keep
  the dtype they were built in.
* plain torch: fp32 weights (the master copy), forward under ``torch.autocast`` in bf16;
  fp16 needs loss scaling, which the plain engine does not do: it is refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from mvtrain.run_config import DTYPES, check_dtype

__all__ = ["DTYPES", "check_dtype"]  # defined with the options (no torch import there)

_TORCH = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(name: str, cuda_bf16: bool | None = None) -> str:
    """``bf16``/``fp16``/``fp32`` for a ``--dtype`` value; ``auto`` asks CUDA (or
    ``cuda_bf16``, when given) whether bf16 is supported."""
    if check_dtype(name) != "auto":
        return name
    if cuda_bf16 is None:
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return "bf16" if cuda_bf16 else "fp32"


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a resolved name (``bf16``/``fp16``/``fp32``)."""
    return _TORCH[resolve_dtype(name)]


def bytes_per_element(name: str) -> int:
    """2 for bf16/fp16, 4 for fp32."""
    return torch_dtype(name).itemsize


TORCH_ENGINE_FP16 = (
    "the torch engine has no loss scaling for fp16: use --dtype bf16 or the DeepSpeed engine"
)


@dataclass(frozen=True)
class Precision:
    """What one engine does with a resolved ``--dtype`` (recorded in ``run.json``)."""

    dtype: str
    """The resolved ``--dtype``: ``bf16``, ``fp16`` or ``fp32``."""
    weights: str
    """The dtype of the model's floating-point parameters."""
    autocast: str | None
    """The dtype the forward runs in under ``torch.autocast``; None: no autocast."""

    def as_dict(self) -> dict[str, str | None]:
        return asdict(self)


def engine_precision(name: str, deepspeed: bool, cuda_bf16: bool | None = None) -> Precision:
    """The precision handling of ``--dtype name`` under DeepSpeed or the plain torch engine.

    Raises ``ValueError`` (:data:`TORCH_ENGINE_FP16`) for fp16 on the plain torch engine.
    """
    dtype = resolve_dtype(name, cuda_bf16)
    if deepspeed:
        return Precision(dtype=dtype, weights=dtype, autocast=None)
    if dtype == "fp16":
        raise ValueError(TORCH_ENGINE_FP16)
    return Precision(dtype=dtype, weights="fp32", autocast=None if dtype == "fp32" else dtype)


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast every floating-point parameter of ``model`` to ``dtype`` in place; buffers (RoPE
    ``inv_freq``...) and integer parameters are left as they are."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


@contextmanager
def buffers_kept(model: nn.Module) -> Iterator[None]:
    """Undo, on exit, any change the body makes to the dtype or values of ``model``'s
    floating-point buffers (DeepSpeed before 0.19 calls ``module.bfloat16()``/``.half()``,
    which casts buffers too; its ``buffer_dtype`` option does so later)."""
    saved = {
        (id(module), key): (module, buf.detach().clone())
        for module in model.modules()
        for key, buf in module._buffers.items()
        if buf is not None and buf.is_floating_point()
    }
    yield
    for (_, key), (module, original) in saved.items():
        current = module._buffers.get(key)
        if current is None:
            continue
        if current.dtype != original.dtype or not torch.equal(
            current.detach(), original.to(current.device)
        ):
            module._buffers[key] = original.to(current.device)
