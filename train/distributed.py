"""Process-group facts for one training process: rank, world size, the backend, collectives.

``mvtrain run`` works under ``torchrun``/``deepspeed`` launchers (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT in the environment) and as a single plain process (the
variables are filled in for a world of one). gloo is used without CUDA, nccl with it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_env() -> None:
    """Fill RANK/WORLD_SIZE/MASTER_* for a single process started without a launcher."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", os.environ["RANK"])
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


ALLOC_CONF_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")
"""The CUDA caching allocator's settings, as torch reads them (the second is the newer name)."""

DEFAULT_ALLOC_CONF = "expandable_segments:True"
"""Our default allocator setting: segments that grow instead of fragmenting under batches of
varying shapes."""


def alloc_conf_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to add to ``environ`` for training processes:
    ``PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`` unless either allocator variable is
    already set (the user's choice is kept), else nothing."""
    if any(name in environ for name in ALLOC_CONF_VARS):
        return {}
    return {ALLOC_CONF_VARS[0]: DEFAULT_ALLOC_CONF}


def ensure_alloc_conf() -> dict[str, str]:
    """Apply :func:`alloc_conf_env` to this process (before its first CUDA allocation, when
    torch reads it); the allocator variables now in force."""
    os.environ.update(alloc_conf_env(os.environ))
    return {name: os.environ[name] for name in ALLOC_CONF_VARS if name in os.environ}


def dist_info() -> DistInfo:
    ensure_env()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    return DistInfo(
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        local_rank=int(os.environ["LOCAL_RANK"]),
        backend=backend,
    )


def device_for(info: DistInfo) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def _all_reduce(value: float | int, device: torch.device, op: dist.ReduceOp) -> float:
    """Reduce a number over all ranks with ``op`` (identity without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return float(t.item())


def all_reduce_sum(value: float | int, device: torch.device) -> float:
    return _all_reduce(value, device, dist.ReduceOp.SUM)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_gather_rows(values: list[float | torch.Tensor], device: torch.device) -> list[list[float]]:
    """Every rank's ``values`` (numbers or 0-d tensors), read on the host once."""
    row = torch.stack(
        [
            v.detach().to(device=device, dtype=torch.float64)
            if isinstance(v, torch.Tensor)
            else torch.tensor(v, dtype=torch.float64, device=device)
            for v in values
        ]
    )
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [row.tolist()]
    rows = [torch.empty_like(row) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, row)
    return torch.stack(rows).tolist()


def name_cpu_accelerator() -> None:
    """Without CUDA, tell DeepSpeed its accelerator is the CPU (``DS_ACCELERATOR=cpu``) so
    each rank does not warn that it could not detect one; a value the user set stays."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
