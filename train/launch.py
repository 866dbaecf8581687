"""Starting and ending training processes on this machine: ``--nproc-per-node N`` starts N
ranks of the same command, watches them, and reports how the run ended, once.

The ranks get what ``torchrun`` would give them on one node (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``), one intra-op thread
and the CUDA allocator default, and die with the launcher (Linux parent-death signal: a
``kill -9`` of the launcher leaves no rank training on as an orphan; ranks of any launcher,
``torchrun`` too, also watch their parent pid: :func:`watch_parent`). A SIGTERM or Ctrl-C of
the launcher is passed on to the ranks.

When a rank fails, the others get :data:`GRACE_S` seconds to end by themselves (a failure
that every rank detects, such as an empty plan, ends them all), then SIGTERM, then SIGKILL:
a rank blocked in a collective the failed one left would otherwise wait for the collective
timeout. Each rank hands its failure to the launcher as a small JSON file instead of printing
it (:func:`report_failure`), and the launcher prints the cause once: the expected failures
(one line each, the same line from several ranks once), else the earliest unexpected one
with its traceback; the other ranks' errors (a connection reset because a peer left) are
consequences and are shown only with ``--debug``. Multi-node runs use ``torchrun`` directly
(``torchrun ... -m mvtrain.cli run ...``); each rank then prints its own failure.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mvshards.command_line import Failure, debug_enabled, print_failure
from mvshards.processes import die_with_parent

ERROR_DIR_ENV = "MVTRAIN_ERROR_DIR"
"""Set for ranks this launcher started: the folder where a failing rank writes its failure."""

GRACE_S = 3.0
"""Seconds the other ranks get to end by themselves once one rank failed."""

TERM_S = 5.0
"""Seconds between SIGTERM and SIGKILL when ending the ranks."""

PROG = "mvtrain"


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``mvtrain ARGV`` as ``nproc`` ranks on this machine; the exit code of the run
    (0, or the code of the failure it reports)."""
    from mvtrain.distributed import free_port

    port = free_port()
    base = launch_env(os.environ)
    with tempfile.TemporaryDirectory(prefix="mvtrain-ranks-") as errors:
        ranks = [
            subprocess.Popen(
                [sys.executable, "-m", "mvtrain.cli", *argv],
                env=rank_env(base, rank, nproc, port, errors),
                preexec_fn=die_with_parent,
            )
            for rank in range(nproc)
        ]
        codes, ended_by_us, ended_at = _watch(ranks)
        failures = _read_failures(Path(errors))
    return _report(codes, ended_by_us, failures, ended_at)


def launch_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The training processes' environment: ``environ`` plus one intra-op thread and the
    CUDA allocator default (each unless already set)."""
    from mvtrain.distributed import alloc_conf_env

    return {
        **environ,
        "OMP_NUM_THREADS": environ.get("OMP_NUM_THREADS", "1"),
        **alloc_conf_env(environ),
    }


def rank_env(
    base: Mapping[str, str], rank: int, nproc: int, port: int, error_dir: str
) -> dict[str, str]:
    """The environment of rank ``rank`` of ``nproc`` on this machine."""
    return {
        **base,
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        "GROUP_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        ERROR_DIR_ENV: error_dir,
    }


def _watch(ranks: list[subprocess.Popen[Any]]) -> tuple[list[int], set[int], list[float]]:
    """Wait for every rank; end the rest once one fails. The exit codes, the ranks this
    launcher ended, and when each rank was seen to end (``time.time()``)."""
    failed_at: float | None = None
    ended: set[int] = set()
    ended_at: list[float | None] = [None] * len(ranks)
    term_at: float | None = None
    stop = False

    def on_signal(signum: int, _frame: Any) -> None:
        nonlocal stop
        stop = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            codes = [r.poll() for r in ranks]
            for i, code in enumerate(codes):
                if code is not None and ended_at[i] is None:
                    ended_at[i] = time.time()
            if all(c is not None for c in codes):
                return (
                    [int(c) for c in codes if c is not None],
                    ended,
                    [t for t in ended_at if t is not None],
                )
            now = time.monotonic()
            if failed_at is None and (stop or any(c not in (None, 0) for c in codes)):
                failed_at = now if not stop else now - GRACE_S
            if failed_at is not None and term_at is None and now - failed_at >= GRACE_S:
                term_at = now
                for i, rank in enumerate(ranks):
                    if rank.poll() is None:
                        ended.add(i)
                        rank.send_signal(signal.SIGTERM)
            if term_at is not None and now - term_at >= TERM_S:
                for rank in ranks:
                    if rank.poll() is None:
                        rank.kill()
            time.sleep(0.05)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def _read_failures(folder: Path) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for path in sorted(folder.glob("rank-*.json")):
        try:
            row = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        out[int(row["rank"])] = row
    return out


def _report(
    codes: list[int],
    ended_by_us: set[int],
    failures: dict[int, dict[str, Any]],
    ended_at: list[float] | None = None,
) -> int:
    """Print how the run ended (nothing when it succeeded); the launcher's exit code.

    The cause: every expected failure (one line each, once); else a rank killed by a signal
    from outside (not by this launcher); else the earliest bug (with its traceback); else a
    rank that exited non-zero without a word. What other ranks hit after the cause (a peer
    gone) is not shown (``--debug`` shows every traceback)."""
    if all(code == 0 for code in codes):
        return 0
    debug = debug_enabled()
    if debug:
        for rank, failure in sorted(failures.items()):
            if failure["traceback"]:
                print(f"--- rank {rank} ---\n{failure['traceback']}", file=sys.stderr, end="")
    expected = [(r, f) for r, f in sorted(failures.items()) if f["expected"]]
    if expected:
        messages = list(dict.fromkeys(f["message"] for _, f in expected))
        for message in messages:
            ranks = [r for r, f in expected if f["message"] == message]
            where = "" if len(messages) == 1 else f"rank {ranks[0]}: "
            print_failure(PROG, Failure(where + message, 1, expected=True))
        return int(expected[0][1]["code"]) or 1
    times = ended_at or [0.0] * len(codes)
    causes: list[tuple[int, float, int, Failure, int]] = []  # (priority, time, rank, ...)
    for rank, code in enumerate(codes):
        if code != 0 and rank not in failures and rank not in ended_by_us:
            exit_code = 128 - code if code < 0 else code
            message = f"rank {rank} {_describe_exit(code)}"
            # a rank killed from outside (OOM killer, kill -9) is the cause of what the
            # others hit next (a peer gone), even when they report it within the same poll
            priority = 0 if code < 0 else 2
            causes.append(
                (priority, times[rank], rank, Failure(message, exit_code, False), exit_code)
            )
    for rank, failure in failures.items():
        code = int(failure["code"]) or 1
        tb = "" if debug else failure["traceback"]
        message = f"rank {rank}: {failure['message']}"
        causes.append((1, failure["time"], rank, Failure(message, code, False, tb), code))
    if not causes:  # only ranks this launcher ended: say so rather than nothing
        rank = next(r for r, c in enumerate(codes) if c != 0)
        failure = Failure(f"rank {rank} {_describe_exit(codes[rank])}", 1, False)
        causes.append((3, 0.0, rank, failure, 1))
    _, _, _, failure, code = min(causes, key=lambda c: (c[0], c[1], c[2]))
    print_failure(PROG, failure)
    return code


def _describe_exit(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
        hint = " (the out-of-memory killer? see `dmesg`)" if -code == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {code} without a message"


def report_failure(prog: str, failure: Failure) -> None:
    """How a command of this package makes a failure known: a rank this launcher started
    writes it for the launcher; any other process prints it (prefixed with its rank when it
    is one of several)."""
    folder = os.environ.get(ERROR_DIR_ENV)
    rank = int(os.environ.get("RANK", "0"))
    if folder:
        row = {**failure.__dict__, "rank": rank, "time": time.time()}
        path = Path(folder) / f"rank-{rank}.json"
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(row), encoding="utf-8")
            os.replace(tmp, path)
            return
        except OSError:
            pass
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        failure = Failure(
            f"rank {rank}: {failure.message}", failure.code, failure.expected, failure.traceback
        )
    print_failure(prog, failure)


def watch_parent(interval_s: float = 1.0) -> None:
    """End this rank (SIGKILL) within ``interval_s`` of its parent's death, whatever started
    it: ``torchrun`` starts ranks in sessions of their own, so a ``kill -9`` of torchrun would
    leave them training as orphans. A daemon thread compares the parent pid with the first."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="mvtrain-watch-parent", daemon=True).start()


def exit_now(message: str, code: int) -> None:
    """Report ``message`` and end this process at once, skipping interpreter shutdown: other
    ranks may be blocked in a collective this one left, and a process group torn down with
    pending work can wait for it forever. The launcher then ends the other ranks."""
    sys.stdout.flush()
    report_failure(PROG, Failure(message, code, expected=True))
    sys.stderr.flush()
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
