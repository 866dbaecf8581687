"""Starting and ending training processes: re-run a command under torchrun on this
machine, the environment its processes get, and ending one at once when a collective it left
would block its shutdown."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping


def launch(nproc: int, argv: list[str]) -> int:
    """Re-run this command under torchrun with ``nproc`` processes on this machine."""
    from mvtrain.distributed import free_port

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        "mvtrain.cli",
        *argv,
    ]
    return subprocess.call(cmd, env=launch_env(os.environ))


def launch_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The training processes' environment: ``environ`` plus one intra-op thread and the
    CUDA allocator default (each unless already set)."""
    from mvtrain.distributed import alloc_conf_env

    return {
        **environ,
        "OMP_NUM_THREADS": environ.get("OMP_NUM_THREADS", "1"),
        **alloc_conf_env(environ),
    }


def exit_now(message: str, code: int) -> None:
    """Print ``message`` and end this process at once, skipping interpreter shutdown: other
    ranks may be blocked in a collective this one left, and a process group torn down with
    pending work can wait for it forever. The launcher then ends the other ranks."""
    sys.stdout.flush()
    print(message, file=sys.stderr, flush=True)
    os._exit(code)


def strip_nproc(argv: list[str]) -> list[str]:
    """``argv`` without ``--nproc-per-node N`` (the launched processes must not launch)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--nproc-per-node":
            skip = True
            continue
        if arg.startswith("--nproc-per-node="):
            continue
        out.append(arg)
    return out
