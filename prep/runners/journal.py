"""The attempt journal of a unit run as a Ray task: who died, on which record, how often.

Ray re-runs a task whose worker died (``max_retries``) with the same arguments and tells the
new attempt nothing. So each attempt appends short lines to
``OUT/index/NNNNNN.attempts.tmp`` (one ``write`` on an ``O_APPEND`` descriptor each, no
fsync: a killed process's writes stay in the page cache, and NFS flushes them on close):

    begin <unix time> <host> <pid>   an attempt starts
    rec <index>                      it starts record <index>
    ok                               it finished that record
    timeout <seconds>                the driver's deadline cancelled it (written by the driver)
    ioerror                          it raised OSError (Ray retries those)
    end                              it finished the unit (then the file is removed)

The next attempt reads the journal before it starts: an earlier attempt with no ``end`` or
``ioerror`` died, on its last ``rec`` without an ``ok`` (or between records). Deaths are
judged exactly as the local pool judges them (:class:`mvprep.pool.RetryPolicy`): a record
that was being processed at ``record_deaths`` deaths is skipped as a "worker died" reject;
``unit_deaths`` deaths with no record to blame give the unit up. The file ends in ``.tmp``:
never part of a dataset, removed with the other temporaries when a build starts.

An object store cannot append, so with an object-store ``--out`` the journals live in a
local folder instead: ``$MVPREP_JOURNAL_DIR`` (or the system temporary folder) /
``mvprep-journal/<hash of OUT>/``. On one machine (a local Ray) that is exact; on a
multi-node cluster set ``MVPREP_JOURNAL_DIR`` to a folder every node shares, or a retry on
another node does not see which record killed the earlier attempt (Ray's own retry limit
then gives the unit up) and the driver cannot time out units running on other nodes.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from mvprep.pool import RetryPolicy
from mvshards.index import INDEX_DIR, UNIT_DIGITS
from mvshards.storage import Location, ObjectPath, location

JOURNAL_SUFFIX = ".attempts.tmp"
JOURNAL_DIR_ENV = "MVPREP_JOURNAL_DIR"
"""Where the journals of an object-store ``--out`` go (default: the temporary folder)."""


def journal_path(out: Location | str, unit: int) -> Path:
    """``OUT/index/NNNNNN.attempts.tmp``; for an object-store OUT a local file (see above)."""
    name = f"{unit:0{UNIT_DIGITS}d}{JOURNAL_SUFFIX}"
    out = location(out)
    if isinstance(out, ObjectPath):
        root = Path(os.environ.get(JOURNAL_DIR_ENV) or tempfile.gettempdir()) / "mvprep-journal"
        return root / hashlib.sha256(out.url.encode()).hexdigest()[:16] / name
    return out / INDEX_DIR / name


@dataclass
class Attempt:
    """One attempt as its journal lines describe it."""

    started: float
    where: str
    """``pid N on HOST``."""
    record: int | None = None
    """The record it was processing when its lines stop (None: between records)."""
    ended: bool = False
    """It finished the unit or raised an exception: not a death."""
    timeout: float | None = None


def read_attempts(path: Path) -> list[Attempt]:
    """Parse a journal (missing file: no attempts; torn or unknown lines are ignored)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    attempts: list[Attempt] = []
    for line in text.splitlines():
        kind, _, arg = line.partition(" ")
        try:
            if kind == "begin":
                started, host, pid = arg.split(" ")
                attempts.append(Attempt(float(started), f"pid {int(pid)} on {host}"))
            elif not attempts:
                continue
            elif kind == "rec":
                attempts[-1].record = int(arg)
            elif kind == "ok":
                attempts[-1].record = None
            elif kind == "timeout":
                attempts[-1].timeout = float(arg)
            elif kind in ("end", "ioerror"):
                attempts[-1].ended = True
        except ValueError:
            continue
    return attempts


@dataclass
class History:
    """What earlier attempts of a unit mean for the next one."""

    deaths: list[str] = field(default_factory=list)
    """One note per earlier attempt that died (for the driver's log and counts)."""
    skips: dict[int, str] = field(default_factory=dict)
    """Records to reject as "worker died" without a try: record index -> error text."""
    gave_up: str | None = None
    """Set when the unit killed its worker ``unit_deaths`` times with no record to blame."""
    io_errors: int = 0


def judge(unit: int, attempts: list[Attempt], policy: RetryPolicy) -> History:
    """Count the deaths in ``attempts`` the way :class:`mvprep.pool.UnitPool` does."""
    history = History()
    record_deaths: Counter[int] = Counter()
    unit_deaths = 0
    for attempt in attempts:
        if attempt.ended:
            continue
        if attempt.timeout is not None:
            why = f"unit {unit} timed out after {attempt.timeout:g}s"
        else:
            why = f"worker running unit {unit} died"
        if attempt.record is not None:
            why += f" on record {attempt.record}"
        history.deaths.append(f"{why} ({attempt.where})")
        if attempt.record is not None:
            n = record_deaths[attempt.record] = record_deaths[attempt.record] + 1
            if n >= policy.record_deaths:
                history.skips[attempt.record] = f"{why}; killed its worker {n} times"
        else:
            unit_deaths += 1
            if unit_deaths >= policy.unit_deaths:
                history.gave_up = why
    return history


class Journal:
    """The task side: judge the earlier attempts, then log this one."""

    def __init__(self, out: Location, unit: int) -> None:
        self.unit = unit
        self.path = journal_path(out, unit)
        self._fd: int | None = None

    def begin(self, policy: RetryPolicy) -> History:
        """Judge the earlier attempts and start logging this one."""
        attempts = read_attempts(self.path)
        history = judge(self.unit, attempts, policy)
        history.io_errors = _count_lines(self.path, "ioerror")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._write(f"begin {time.time():.3f} {socket.gethostname()} {os.getpid()}")
        return history

    def _write(self, line: str) -> None:
        if self._fd is not None:
            os.write(self._fd, (line + "\n").encode())

    def record(self, index: int) -> None:
        self._write(f"rec {index}")

    def record_done(self) -> None:
        self._write("ok")

    def io_error(self) -> int:
        """Log an OSError of this attempt; return how many attempts have had one."""
        self._write("ioerror")
        return _count_lines(self.path, "ioerror")

    def end(self) -> None:
        self._write("end")

    def finish(self) -> None:
        """The unit is written: the journal is no longer needed."""
        self.end()
        self.close()
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def running_since(out: Location, unit: int) -> float | None:
    """Unix time the unit's latest attempt began, when that attempt is still open."""
    attempts = read_attempts(journal_path(out, unit))
    if not attempts or attempts[-1].ended:
        return None
    return attempts[-1].started


def mark_timeout(out: Location, unit: int, seconds: float) -> None:
    """Note (driver side) that the running attempt is being cancelled for its deadline."""
    with contextlib.suppress(FileNotFoundError):
        fd = os.open(journal_path(out, unit), os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, f"timeout {seconds:g}\n".encode())
        finally:
            os.close(fd)


def _count_lines(path: Path, kind: str) -> int:
    try:
        return sum(1 for line in path.read_text(errors="replace").splitlines() if line == kind)
    except FileNotFoundError:
        return 0
