"""The ``--output`` folder of ``mvtrain run``: one run per folder.

A folder that already holds a run's files is refused unless ``--resume`` (continue that run)
or ``--overwrite`` (delete those files first) is given, so two runs never mix in one
``metrics.jsonl``. :func:`check_output` reads the folder and writes nothing: every rank calls
it before any rank writes there, so all ranks see the same files and decide alike.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from mvtrain.checkpoint import newest_checkpoint
from mvtrain.run_config import RunConfig

log = logging.getLogger("mvtrain")

RUN_FILES = (
    "metrics.jsonl",
    "run.json",
    "events.jsonl",
    "skipped.jsonl",
    "restart.json",
    "deepspeed_config.json",
    "report.png",
    "checkpoints",
    "hf",
    "tensorboard",
)
"""What a run writes in its folder (besides ``params-rank*.sha256``); ``--overwrite`` deletes
these and nothing else. ``cache/`` (exact token lengths, keyed by tokenizer and index) is
kept, as is anything else in the folder (e.g. a ``--batch-log`` file)."""

DIGESTS = "params-rank*.sha256"


def run_files(output: Path) -> list[Path]:
    """The run files present in ``output`` (see :data:`RUN_FILES`), sorted by name."""
    output = Path(output)
    if not output.is_dir():
        return []
    found = [output / name for name in RUN_FILES if (output / name).exists()]
    return sorted([*found, *output.glob(DIGESTS)])


def resume_checkpoint(output: Path) -> tuple[int, str]:
    """``(step, tag)`` of the newest complete checkpoint in ``output``; ValueError when
    there is none to resume from."""
    found = newest_checkpoint(Path(output))
    if found is None:
        raise ValueError(
            f"--resume: {output} has no complete checkpoint to resume from; drop "
            "--resume to start a new run"
        )
    return found


def check_output(config: RunConfig) -> list[Path]:
    """The run files ``--overwrite`` must delete (none otherwise); raises ValueError when the
    folder holds a run and neither ``--resume`` nor ``--overwrite`` was given, or when
    ``--resume`` (outside a dry run) finds no complete checkpoint. Writes nothing."""
    output = Path(config.output)
    if config.resume:
        if not config.dry_run:
            resume_checkpoint(output)
        return []
    found = run_files(output)
    if found and not config.overwrite:
        names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in found)
        raise ValueError(
            f"{output} already holds a run ({names}): pass --resume to continue it, or "
            "--overwrite to delete those files and start a new run there"
        )
    return found


def clear_run_files(paths: list[Path]) -> None:
    """Delete ``paths`` (files and folders :func:`check_output` listed) and log each one."""
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    if paths:
        log.warning("--overwrite: deleted %s", ", ".join(str(p) for p in paths))
