"""Training engines: DeepSpeed ZeRO-0/1/2 (generated config, user JSON overrides) or plain torch.

Both take a loss that is already normalised the way we want it -- the sum of token losses of
a micro-batch divided by the label-token count of the whole accumulation window over ALL
ranks -- so the gradients must be SUMMED over micro-batches and ranks, never averaged again:

* DeepSpeed divides by the accumulation steps unless ``scale_wrt_gas=False``, and ZeRO
  averages gradients over data-parallel ranks; the DeepSpeed engine multiplies the loss by
  the world size so that average becomes the sum.
* The plain engine accumulates and all-reduces with SUM itself.

The effective DeepSpeed config (generated, then the user's JSON merged in) must keep ZeRO
stage 0, 1 or 2, and rank 0 writes it to ``OUT/deepspeed_config.json``.

Precision (``--dtype``, :mod:`mvtrain.precision`): DeepSpeed trains bf16/fp16 parameters
with its own fp32 master copy; the plain engine keeps fp32 parameters and runs the forward
under ``torch.autocast``. Buffers keep their dtype under both.

On machines without CUDA, DeepSpeed's CPU communication backend would JIT-compile a
shared-memory op at start (minutes on a small machine) that ZeRO training never uses; we
replace its builder with one that returns None before the process group starts.
"""

from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from mvtrain.deepspeed_config import deepspeed_config, write_deepspeed_config
from mvtrain.distributed import DistInfo
from mvtrain.precision import (
    Precision,
    buffers_kept,
    cast_parameters,
    engine_precision,
    torch_dtype,
)


class Engine(Protocol):
    module: nn.Module
    name: str
    precision: Precision

    def __call__(self, **kwargs: Any) -> Any: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> None: ...
    def zero_grad(self) -> None: ...
    def save(self, folder: Path, tag: str) -> None: ...
    def load(self, folder: Path, tag: str) -> None: ...
    def current_lr(self) -> float: ...


def deepspeed_available() -> bool:
    try:
        importlib.import_module("deepspeed")
    except ImportError:
        return False
    return True


def skip_cpu_shm_op_build() -> None:
    """Stop DeepSpeed compiling its CPU shared-memory comm op when there is no CUDA."""
    if torch.cuda.is_available():
        return
    comm_torch = importlib.import_module("deepspeed.comm.torch")
    comm_torch.build_shm_op = lambda: None


def init_process_group(info: DistInfo, use_deepspeed: bool, timeout_minutes: float = 60.0) -> None:
    """Start the default process group (DeepSpeed's, or torch's when more than one rank).

    ``timeout_minutes`` bounds how long a collective waits for the other ranks (torch's
    defaults: 10 minutes under NCCL, 30 under gloo) -- rank 0 alone recounts token lengths
    and exports while the others wait in a barrier. Nothing happens if a group exists.
    """
    if dist.is_initialized():
        return
    timeout = timedelta(minutes=timeout_minutes)
    if use_deepspeed:
        import deepspeed

        # DeepSpeed's ZeRO calls torch's deprecated all_gather_into_tensor every step: one
        # FutureWarning per rank that the user can do nothing about
        warnings.filterwarnings(
            "ignore", message=".*all_gather_into_tensor.* is deprecated", category=FutureWarning
        )
        skip_cpu_shm_op_build()
        deepspeed.init_distributed(dist_backend=info.backend, timeout=timeout)
    elif info.world_size > 1:
        dist.init_process_group(backend=info.backend, timeout=timeout)


def lr_lambda(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up then cosine decay to 10% of the peak."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """torch AdamW over trainable parameters (no compiled op: FusedAdam/CPUAdam would JIT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: check --lora / --freeze-vision")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=False)


class DeepSpeedEngine:
    """DeepSpeed ZeRO engine around a model and a torch optimizer."""

    name = "deepspeed"

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        config: dict[str, Any],
        info: DistInfo,
        precision: Precision,
        config_path: Path | None = None,
    ) -> None:
        """``config_path``: where rank 0 writes ``config`` before DeepSpeed starts (none:
        not written)."""
        import deepspeed

        self.info, self.config, self.precision = info, config, precision
        if config_path is not None and info.is_main:
            write_deepspeed_config(config_path, config)
        with buffers_kept(model):  # DeepSpeed may cast them with the parameters
            self._engine, _, _, _ = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config
            )
        self.module = self._engine.module

    def __call__(self, **kwargs: Any) -> Any:
        return self._engine(**kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        self._engine.backward(loss * self.info.world_size, scale_wrt_gas=False)

    def step(self) -> None:
        self._engine.step()

    def zero_grad(self) -> None:
        self._engine.zero_grad()

    def save(self, folder: Path, tag: str) -> None:
        self._engine.save_checkpoint(str(folder), tag=tag)

    def load(self, folder: Path, tag: str) -> None:
        path, _ = self._engine.load_checkpoint(str(folder), tag=tag)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint {tag!r} in {folder}")

    def current_lr(self) -> float:
        return float(self._engine.get_lr()[0])


class TorchEngine:
    """Plain torch: gradients accumulate over ``backward`` calls; ``step`` (once per window)
    sums them over ranks, clips and updates.

    Mixed precision: the parameters are the fp32 master copy and the forward runs under
    ``torch.autocast`` in ``precision.autocast`` (bf16), so AdamW updates far below a bf16
    weight's resolution are kept.
    """

    name = "torch"

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        grad_clip: float,
        info: DistInfo,
        precision: Precision,
    ) -> None:
        self.module = model
        self.optimizer, self.scheduler = optimizer, scheduler
        self.grad_clip, self.info, self.precision = grad_clip, info, precision
        if info.world_size > 1:  # start from identical weights on every rank
            for tensor in list(model.parameters()) + list(model.buffers()):
                dist.broadcast(tensor.data, src=0)

    def __call__(self, **kwargs: Any) -> Any:
        if self.precision.autocast is None:
            return self.module(**kwargs)
        device_type = next(self.module.parameters()).device.type
        with torch.autocast(device_type, dtype=torch_dtype(self.precision.autocast)):
            return self.module(**kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        """The accumulation boundary: sum gradients over ranks, clip, update."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        if self.info.world_size > 1:
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def save(self, folder: Path, tag: str) -> None:
        target = Path(folder) / tag
        target.mkdir(parents=True, exist_ok=True)
        if self.info.is_main:
            state = {
                "model": self.module.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
            }
            tmp = target / "engine.pt.tmp"
            torch.save(state, tmp)
            tmp.replace(target / "engine.pt")

    def load(self, folder: Path, tag: str) -> None:
        state = torch.load(Path(folder) / tag / "engine.pt", map_location="cpu", weights_only=False)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


def make_engine(
    model: nn.Module,
    info: DistInfo,
    *,
    use_deepspeed: bool,
    lr: float,
    weight_decay: float,
    warmup_steps: int,
    total_steps: int,
    grad_accum: int,
    grad_clip: float = 1.0,
    zero_stage: int = 2,
    dtype: str = "fp32",
    user_config: dict[str, Any] | None = None,
    config_path: Path | None = None,
) -> Engine:
    """The engine for ``model`` training in ``dtype`` (a ``--dtype`` value; see
    :func:`mvtrain.precision.engine_precision`). The model's floating-point parameters are
    cast to the dtype the engine keeps them in first; its buffers are never cast.
    ``config_path``: where the DeepSpeed engine writes its effective config (rank 0)."""
    precision = engine_precision(dtype, use_deepspeed)
    cast_parameters(model, torch_dtype(precision.weights))
    optimizer = make_optimizer(model, lr, weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup_steps, total_steps))
    if use_deepspeed:
        config = deepspeed_config(grad_accum, zero_stage, precision.dtype, grad_clip, user_config)
        return DeepSpeedEngine(model, optimizer, scheduler, config, info, precision, config_path)
    return TorchEngine(model, optimizer, scheduler, grad_clip, info, precision)
