"""``--part i/n``: a deterministic share of the work units, for Slurm arrays or any scheduler.

Part ``i`` of ``n`` (1-based, like ``SLURM_ARRAY_TASK_ID`` with ``--array=1-n``) owns the
units ``u`` with ``u % n == i - 1`` (round robin, so parts get equal shares even when
the cost of units drifts along the input). The split depends only on ``i``, ``n`` and the
number of records: parts need no shared state besides the output folder, may run in any
order, at the same time, on different machines, and each writes only its own shards, index
entries and ``parts/NNNN-of-NNNN.json`` marker. ``mvprep merge`` then checks that every unit
is finished and writes the dataset files.

The marker is informative (what a part holds, whether it ended, which units failed); it
lets ``merge`` name missing parts. Whether a unit is finished is always decided from its
shard and index entry, never from a marker.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from dataclasses import dataclass
from typing import Any

from mvshards.storage import Location, location
from mvshards.tario import write_atomic

PARTS_DIR = "parts"
_PART_RE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Part:
    """Part ``index`` (1-based) of ``count``."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if self.count < 1 or not 1 <= self.index <= self.count:
            raise ValueError(
                f"--part {self.index}/{self.count}: need 1 <= i <= n (parts are numbered "
                "from 1, e.g. --part 1/16 ... --part 16/16)"
            )

    def owns(self, unit: int) -> bool:
        """True when unit ``unit`` belongs to this part."""
        return unit % self.count == self.index - 1

    def units(self, num_units: int) -> list[int]:
        """This part's unit numbers among ``range(num_units)``."""
        return list(range(self.index - 1, num_units, self.count))

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_part(text: str) -> Part:
    """``"3/16"`` -> ``Part(3, 16)``; ValueError with the expected form otherwise."""
    match = _PART_RE.match(text)
    if not match:
        raise ValueError(f"--part {text!r}: expected i/n, e.g. --part 3/16 (1-based)")
    return Part(int(match.group(1)), int(match.group(2)))


def part_of(unit: int, count: int) -> int:
    """The 1-based part of ``count`` that owns ``unit``."""
    return unit % count + 1


def marker_path(out: Location | str, part: Part) -> Location:
    """``OUT/parts/0003-of-0016.json``."""
    return location(out) / PARTS_DIR / f"{part.index:04d}-of-{part.count:04d}.json"


def write_marker(
    out: Location | str,
    part: Part,
    state: str,
    num_records: int,
    num_units: int,
    failed_units: list[int] | None = None,
) -> None:
    """Atomically write this part's marker (``state``: ``"running"``, ``"done"``, ``"failed"``)."""
    path = marker_path(out, part)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "part": part.index,
        "parts": part.count,
        "state": state,
        "num_records": num_records,
        "num_units": num_units,
        "units": part.units(num_units),
        "failed_units": sorted(failed_units or []),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_atomic(path, json.dumps(body, indent=1, sort_keys=True).encode())


def read_markers(out: Location | str) -> list[dict[str, Any]]:
    """Every readable part marker in ``OUT/parts`` (unreadable ones are skipped)."""
    markers = []
    for path in sorted((location(out) / PARTS_DIR).glob("*-of-*.json")):
        try:
            body = json.loads(path.read_bytes())
            Part(int(body["part"]), int(body["parts"]))
        except (ValueError, KeyError, TypeError):
            continue
        markers.append(body)
    return markers
