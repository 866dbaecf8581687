"""The ``--output`` folder of ``mvtrain run``: one run per folder.

A folder that already holds a run's files is refused unless ``--resume`` (continue that run)
or ``--overwrite`` (delete those files first) is given, so two runs never mix in one
``metrics.jsonl``; and while a run is live it holds ``OUT/run.lock`` (:func:`take_run_lock`),
so a second run on the folder, even with ``--resume`` or ``--overwrite``, is refused.
:func:`check_output` reads the folder and writes nothing: every rank calls
it before any rank writes there, so all ranks see the same files and decide alike.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import socket
import time
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
    "best",
    "best.new",
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


LOCK_FILE = "run.lock"
"""``OUT/run.lock``: who runs in the folder now (host, pid, start time)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def take_run_lock(output: Path) -> Path:
    """Hold ``OUT/run.lock`` for this process (created atomically; this process's pid, host
    and start time in it). Refused (ValueError naming the holder) when another live process
    holds it, or one on another host (which this host cannot check); a lock whose holder died
    on this host is taken over with a warning. The lock file is removed when this process
    exits normally (:func:`release_run_lock`); after a kill the next run takes it over."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    path = output / LOCK_FILE
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            if holder is None:
                continue  # being written or removed just now: look again
            same_host = holder.get("host") == me["host"]
            if same_host and holder.get("pid") == me["pid"]:
                return path  # this process already holds it (an earlier run in a notebook)
            if not same_host or _alive(int(holder.get("pid", -1))):
                raise _in_use(output, path, holder, same_host) from None
            log.warning(
                "%s: taking over the lock of mvtrain pid %s, which is no longer running",
                path,
                holder.get("pid"),
            )
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(me, handle)
        atexit.register(release_run_lock, path)
        return path
    raise ValueError(f"{path}: could not take the run lock (it keeps changing); try again")


def _in_use(output: Path, path: Path, holder: dict, same_host: bool) -> ValueError:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    elsewhere = "" if same_host else f" (another host: if that run is dead, delete {path})"
    return ValueError(
        f"{output} is in use by mvtrain pid {holder.get('pid')} on host {holder.get('host')} "
        f"since {since}{elsewhere}: wait for that run to end or stop it; one run per output "
        "folder"
    )


def release_run_lock(path: Path) -> None:
    """Remove ``path`` if this process holds it."""
    holder = _read_lock(path)
    if holder is not None and (holder.get("host"), holder.get("pid")) == (
        socket.gethostname(),
        os.getpid(),
    ):
        Path(path).unlink(missing_ok=True)


def _read_lock(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
