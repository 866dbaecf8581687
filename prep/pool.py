"""A process pool that survives its workers dying.

``multiprocessing.Pool`` waits forever for a task whose worker was killed (the kernel's OOM
killer on a huge image, a segfault in a codec), and ``ProcessPoolExecutor`` fails every
pending task at once. Here every worker is a plain process with its own pipe: the parent
waits on the pipes and on the process sentinels together, so a death is seen at once and
blamed on the one unit (and the one record) the dead worker was holding.

Policy (see :class:`RetryPolicy`): a unit whose worker died is retried; a record that was
being processed when its worker died ``record_deaths`` times is then skipped as a reject
("worker died") and the unit retried without it; a unit that keeps killing workers with no
record to blame (``unit_deaths`` times) ends with all its records rejected by the caller.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from mvprep.image_modes import opencv_safe_to_fork
from mvprep.unit import UnitEvents, UnitSpec
from mvshards.processes import die_with_parent
from mvshards.storage import StorageError


@dataclass(frozen=True)
class RetryPolicy:
    record_deaths: int = 2
    """Worker deaths on the same record before that record is rejected as 'worker died'."""
    unit_deaths: int = 3
    """Worker deaths of one unit with no record to blame before the unit is given up."""
    unit_timeout: float | None = None
    """Seconds one unit may run before its worker is killed (counted as a death)."""


@dataclass
class UnitOutcome:
    """How a unit ended: ``result`` from the unit function, or ``failure`` text."""

    spec: UnitSpec
    result: Any = None
    failure: str | None = None
    deaths: list[str] = field(default_factory=list)
    gave_up: bool = False
    """True when the unit kept killing its workers and the pool stopped retrying it."""
    storage_error: str | None = None
    """Set when the unit failed with a :class:`mvshards.storage.StorageError` (the store
    refused or kept failing, retries done): one line; the build stops with it."""


def _worker_main(
    conn: Connection, fn: Callable[..., Any], args: tuple[Any, ...], ppid: int
) -> None:
    die_with_parent()
    if os.getppid() != ppid:  # the parent died before prctl took effect
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides about Ctrl-C
    while True:
        try:
            spec = conn.recv()
        except EOFError:
            return
        if spec is None:
            return
        events = UnitEvents(
            on_record=lambda index: conn.send(("record", index)),
            on_image=lambda: conn.send(("image", None)),
            on_record_done=lambda: conn.send(("record_done", None)),
        )
        try:
            result = fn(spec, *args, events=events)
        except StorageError as exc:
            conn.send(("storage_error", str(exc)))
        except BaseException:
            conn.send(("error", traceback.format_exc()))
        else:
            conn.send(("done", result))


@dataclass
class _Worker:
    process: mp.process.BaseProcess
    conn: Connection
    spec: UnitSpec | None = None
    record: int | None = None
    started: float = 0.0


class UnitPool:
    """Run unit functions in ``workers`` processes; yield each unit's outcome as it ends.

    ``fn(spec, *args, events=UnitEvents)`` runs in the worker. Progress callbacks
    (``on_image``, ``on_record_done``) run in the parent as the worker reports.
    """

    def __init__(
        self,
        workers: int,
        fn: Callable[..., Any],
        args: tuple[Any, ...] = (),
        policy: RetryPolicy | None = None,
        on_image: Callable[[], None] = lambda: None,
        on_record_done: Callable[[], None] = lambda: None,
        on_death: Callable[[UnitSpec, str], None] = lambda spec, why: None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"--workers must be >= 1, got {workers}")
        self.workers = workers
        self.fn, self.args = fn, args
        self.policy = policy or RetryPolicy()
        self.on_image, self.on_record_done, self.on_death = on_image, on_record_done, on_death
        # fork: cheapest; run() keeps the parent's OpenCV at one thread meanwhile
        # (image_modes.opencv_safe_to_fork), so a parent that used OpenCV's thread pool before
        # (a notebook) forks children that can use OpenCV.
        method = "fork" if sys.platform.startswith("linux") else "spawn"
        self._ctx = mp.get_context(method)

    def _start_worker(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=_worker_main, args=(child, self.fn, self.args, os.getpid()), daemon=True
        )
        process.start()
        child.close()
        return _Worker(process=process, conn=parent)

    def run(self, specs: list[UnitSpec]) -> Iterator[UnitOutcome]:
        pending = list(reversed(specs))
        record_deaths: dict[tuple[int, int], int] = {}
        unit_deaths: dict[int, int] = {}
        death_notes: dict[int, list[str]] = {}
        skips: dict[int, dict[int, str]] = {spec.unit: dict(spec.skip) for spec in specs}
        forking = contextlib.ExitStack()
        if self._ctx.get_start_method() == "fork":
            forking.enter_context(opencv_safe_to_fork())
        pool = [self._start_worker() for _ in range(min(self.workers, len(specs)))]
        try:
            while pending or any(w.spec is not None for w in pool):
                for worker in pool:
                    if worker.spec is None and pending:
                        spec = pending.pop()
                        spec = UnitSpec(spec.unit, spec.start, spec.stop, skips[spec.unit])
                        worker.spec, worker.record, worker.started = spec, None, time.monotonic()
                        worker.conn.send(spec)
                # wait() only paces the loop: every worker is drained below
                wait(
                    [w.conn for w in pool] + [w.process.sentinel for w in pool],
                    timeout=self._wait_timeout(pool),
                )
                for i, worker in enumerate(pool):
                    outcome, died = self._drain(worker)
                    if outcome is not None:
                        outcome.deaths = death_notes.pop(outcome.spec.unit, [])
                        yield outcome
                        continue
                    timed_out = self._timed_out(worker)
                    if not (died or timed_out):
                        continue
                    spec, record = worker.spec, worker.record
                    worker.process.kill()
                    worker.process.join()
                    code = worker.process.exitcode
                    pool[i] = self._start_worker()
                    if spec is None:  # died while idle: nothing lost
                        continue
                    if timed_out:
                        why = f"unit {spec.unit} timed out after {self.policy.unit_timeout}s"
                    else:
                        why = f"worker running unit {spec.unit} died ({_describe_exit(code)})"
                    if record is not None:
                        why += f" on record {record}"
                    self.on_death(spec, why)
                    death_notes.setdefault(spec.unit, []).append(why)
                    if self._blame(spec, record, why, skips, record_deaths, unit_deaths):
                        notes = death_notes.pop(spec.unit, [])
                        yield UnitOutcome(spec=spec, failure=why, deaths=notes, gave_up=True)
                    else:
                        pending.append(spec)
        finally:
            for worker in pool:
                with contextlib.suppress(BrokenPipeError, OSError):
                    worker.conn.send(None)
            for worker in pool:
                worker.process.join(timeout=2)
                if worker.process.is_alive():
                    worker.process.kill()
                    worker.process.join()
            forking.close()

    def _wait_timeout(self, pool: list[_Worker]) -> float | None:
        if self.policy.unit_timeout is None:
            return None
        busy = [w.started for w in pool if w.spec is not None]
        if not busy:
            return None
        return max(0.0, min(busy) + self.policy.unit_timeout - time.monotonic()) + 0.05

    def _timed_out(self, worker: _Worker) -> bool:
        return (
            self.policy.unit_timeout is not None
            and worker.spec is not None
            and time.monotonic() - worker.started > self.policy.unit_timeout
        )

    def _drain(self, worker: _Worker) -> tuple[UnitOutcome | None, bool]:
        """Read everything the worker has sent; return (finished outcome, worker died)."""
        while True:
            try:
                if not worker.conn.poll():
                    return None, not worker.process.is_alive()
                kind, payload = worker.conn.recv()
            except (EOFError, OSError):
                return None, True
            if kind == "record":
                worker.record = payload
            elif kind == "image":
                self.on_image()
            elif kind == "record_done":
                worker.record = None
                self.on_record_done()
            elif kind in ("done", "error", "storage_error"):
                spec, worker.spec, worker.record = worker.spec, None, None
                assert spec is not None
                if kind == "done":
                    return UnitOutcome(spec=spec, result=payload), False
                storage_error = payload if kind == "storage_error" else None
                return UnitOutcome(spec=spec, failure=payload, storage_error=storage_error), False

    def _blame(
        self,
        spec: UnitSpec,
        record: int | None,
        why: str,
        skips: dict[int, dict[int, str]],
        record_deaths: dict[tuple[int, int], int],
        unit_deaths: dict[int, int],
    ) -> bool:
        """Count a death against the record (or the unit); True when the unit is given up."""
        if record is not None:
            n = record_deaths[(spec.unit, record)] = record_deaths.get((spec.unit, record), 0) + 1
            if n >= self.policy.record_deaths:
                skips[spec.unit][record] = f"{why}; killed its worker {n} times"
            return False
        n = unit_deaths[spec.unit] = unit_deaths.get(spec.unit, 0) + 1
        return n >= self.policy.unit_deaths


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "no exit code"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
