"""DeepSpeed ZeRO-1/2 engine state for another world size.

A ZeRO-1/2 checkpoint holds each rank's partition of the fp32 master weights and of the
optimizer state (``zero_pp_rank_R_mp_rank_00_optim_states.pt``), and DeepSpeed refuses to
load it on another data-parallel world size. DeepSpeed's universal checkpoint
(:mod:`deepspeed.checkpoint.ds_to_universal`) stores the same state per parameter,
unpartitioned; an engine configured with ``"checkpoint": {"load_universal": true}`` loads it
and partitions it for its own world size (the learning-rate scheduler's state comes with
it). Rank 0 converts a checkpoint once, into ``step-N/universal/`` (kept, so a second resume
on that world size reuses it), while the other ranks wait.

ZeRO stage 0 keeps the optimizer state whole (nothing to re-partition), and so does the plain
torch engine.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import shutil
from pathlib import Path
from typing import Any

from mvtrain.distributed import DistInfo, barrier

log = logging.getLogger("mvtrain")

UNIVERSAL = "universal"
"""The folder in a checkpoint's folder that holds its universal (unpartitioned) copy."""


def needs_repartition(
    saved_world_size: int, world_size: int, use_deepspeed: bool, zero_stage: int
) -> bool:
    """Whether the checkpoint's engine state must be re-partitioned to load here."""
    return use_deepspeed and zero_stage in (1, 2) and saved_world_size != world_size


def universal_config(user_config: dict[str, Any]) -> dict[str, Any]:
    """``user_config`` (the ``--deepspeed-config`` keys) asking DeepSpeed to load a
    universal checkpoint."""
    checkpoint = {**user_config.get("checkpoint", {}), "load_universal": True}
    return {**user_config, "checkpoint": checkpoint}


def convert_to_universal(folder: Path, info: DistInfo) -> str:
    """Make ``folder/universal/`` from the ZeRO checkpoint in ``folder`` (rank 0, unless it
    is there already; the other ranks wait); the tag to load it by, relative to ``folder``."""
    target = Path(folder) / UNIVERSAL
    if info.is_main and not target.is_dir():
        work = target.with_name(UNIVERSAL + ".tmp")  # the converter writes a file beside it
        shutil.rmtree(work, ignore_errors=True)
        log.warning(
            "re-partitioning %s for %d ranks (universal checkpoint)", folder, info.world_size
        )
        _ds_to_universal(Path(folder), work / UNIVERSAL)
        (work / UNIVERSAL).rename(target)
        shutil.rmtree(work)
    barrier()
    return UNIVERSAL


def _ds_to_universal(source: Path, target: Path) -> None:
    """DeepSpeed's converter, in this process, its progress output kept back (shown when it
    fails). Our checkpoints lack the ``universal_checkpoint_info`` a Megatron-style client
    saves: a plain data-parallel model needs none but the version, which it injects."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(
        input_folder=str(source),
        output_folder=str(target),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    said = io.StringIO()
    try:
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            ds_to_universal.main(args)
    except Exception:
        log.error("DeepSpeed's universal checkpoint conversion said:\n%s", said.getvalue())
        raise
