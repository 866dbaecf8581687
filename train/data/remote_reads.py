"""How the loader reads its samples when shards live in an object store: the read settings,
the choice per shard (ranged GETs, or the whole shard), and a bounded read-ahead.

A rank's schedule is known before it reads anything (the plan says which samples each of its
micro-batches holds), so :func:`open_reads` is handed the whole list of ``(shard, key)`` reads
in the order the loader will ask for them, and:

* **per shard, ranged GETs or the whole shard.** A sample is one ranged GET of its span
  (:class:`~mvtrain.data.shard_access.ShardAccess`), at the byte range the index records
  (:attr:`SampleLocator.shard_ranges <mvtrain.batching.sources.SampleLocator.shard_ranges>`;
  an older index: after one walk of the shard's headers). A shard the reader takes at least
  :attr:`ReadSettings.stream_fraction` of is instead copied whole in large GETs, into a
  temporary spool deleted as soon as its last sample was read. With ``--cache-dir`` every
  stored shard is copied whole into that folder and kept, for later epochs and runs
  (:mod:`mvtrain.data.shard_cache`).
* **read-ahead.** The next :attr:`ReadSettings.read_ahead` reads of the schedule are in
  flight at once in a small thread pool, so the network's latency overlaps the training
  step; at most that many samples wait in memory. ``0`` reads each sample when asked.

Shards on a local disk are read as before (no thread, no copy). The settings reach every
process of a run (ranks, DataLoader workers) through the environment (:data:`READS_ENV`, set
by :func:`use_read_settings`), as the storage options do
(:func:`mvshards.storage.use_storage_options`).
"""

from __future__ import annotations

import json
import os
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mvshards.storage import ObjectPath
from mvtrain.data.shard_access import ShardAccess, walk_block
from mvtrain.data.shard_cache import CachedCopies, ShardCache, ShardStamp

READS_ENV = "MVTRAIN_SHARD_READS"
"""The read settings of this process and the processes it starts (JSON)."""
DEFAULT_READ_AHEAD = 8
"""Reads in flight at once by default (``--read-ahead``)."""
STREAM_FRACTION = 0.5
"""A reader that takes at least this fraction of a stored shard's samples copies it whole."""


@dataclass(frozen=True)
class ReadSettings:
    """``--cache-dir``, ``--read-ahead`` and the whole-shard threshold."""

    cache_dir: Path | None = None
    read_ahead: int = DEFAULT_READ_AHEAD
    stream_fraction: float = STREAM_FRACTION

    def __post_init__(self) -> None:
        if self.read_ahead < 0:
            raise ValueError(f"--read-ahead must be >= 0, got {self.read_ahead}")

    def to_json(self) -> str:
        obj: dict[str, Any] = asdict(self)
        obj["cache_dir"] = str(self.cache_dir) if self.cache_dir is not None else None
        return json.dumps(obj, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ReadSettings:
        obj = json.loads(text)
        folder = obj.get("cache_dir")
        return cls(
            cache_dir=Path(folder) if folder else None,
            read_ahead=int(obj.get("read_ahead", DEFAULT_READ_AHEAD)),
            stream_fraction=float(obj.get("stream_fraction", STREAM_FRACTION)),
        )


def use_read_settings(settings: ReadSettings) -> None:
    """Make ``settings`` this process's, and that of the processes it starts."""
    if settings.cache_dir is not None:
        settings = ReadSettings(
            settings.cache_dir.resolve(), settings.read_ahead, settings.stream_fraction
        )
    os.environ[READS_ENV] = settings.to_json()


def read_settings() -> ReadSettings:
    """This process's read settings (the defaults when none were set)."""
    text = os.environ.get(READS_ENV)
    return ReadSettings.from_json(text) if text else ReadSettings()


def shard_cache() -> ShardCache | None:
    """The ``--cache-dir`` folder of this process, None without one."""
    folder = read_settings().cache_dir
    return ShardCache(folder) if folder is not None else None


class ScheduledReads:
    """The reads of one schedule, in order, ``depth`` of them in flight at once (see the
    module docstring); asked in another order, it reads directly. Releases a shard once
    its last scheduled sample has been handed out."""

    def __init__(self, access: ShardAccess, order: Sequence[tuple[int, str]], depth: int) -> None:
        self.access, self.order, self.depth = access, list(order), depth
        self.remaining = Counter(shard for shard, _ in self.order)
        self.pending: deque[tuple[tuple[int, str], Future[dict[str, bytes]]]] = deque()
        self.next = 0
        self.pool = (
            ThreadPoolExecutor(depth, thread_name_prefix="mvtrain-read") if depth > 0 else None
        )
        self._fill()

    def _fill(self) -> None:
        while self.pool is not None and len(self.pending) < self.depth:
            if self.next >= len(self.order):
                return
            item = self.order[self.next]
            self.next += 1
            self.pending.append((item, self.pool.submit(self.access.members, *item)))

    def members(self, shard_id: int, key: str) -> dict[str, bytes]:
        """Sample ``key``'s members, as :meth:`ShardAccess.members`."""
        item = (shard_id, key)
        if self.pending and self.pending[0][0] == item:
            result = self.pending.popleft()[1].result()
        elif self.pool is None and self.next < len(self.order) and self.order[self.next] == item:
            self.next += 1
            result = self.access.members(shard_id, key)
        else:
            return self.access.members(shard_id, key)
        self.remaining[shard_id] -= 1
        if self.remaining[shard_id] == 0:
            self.access.release(shard_id)
        self._fill()
        return result

    def close(self) -> None:
        """Stop reading ahead (reads already running finish)."""
        for _, future in self.pending:
            future.cancel()
        self.pending.clear()
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def schedule_order(plan: Any, positions: Sequence[int], locator: Any) -> list[tuple[int, str]]:
    """``(shard position, key)`` of every sample the micro-batches ``positions`` of ``plan``
    read, in the order :class:`mvtrain.data.loader.PlannedBatches` reads them."""
    order = []
    for position in positions:
        for cost in plan.batches[position].samples:
            shard, key, _ = locator.locate(cost.key)
            order.append((shard, key))
    return order


def whole_shards(
    order: Sequence[tuple[int, str]], shard_sizes: Sequence[int], fraction: float
) -> set[int]:
    """The shards of which ``order`` reads at least ``fraction`` of the samples."""
    taken = Counter(shard for shard, _ in set(order))
    return {s for s, n in taken.items() if shard_sizes[s] and n >= fraction * shard_sizes[s]}


@contextmanager
def open_reads(plan: Any, positions: Sequence[int], locator: Any) -> Iterator[Any]:
    """The reader of micro-batches ``positions`` of ``plan`` (what ``PlannedBatches`` calls
    ``access``): a plain :class:`ShardAccess` when every shard is local, else
    :class:`ScheduledReads` over stored shards as the module docstring says."""
    paths = list(locator.shard_paths)
    ranges = list(getattr(locator, "shard_ranges", ()))  # from the index: no header walk
    if not any(isinstance(p, ObjectPath) for p in paths):
        yield ShardAccess(paths, ranges=ranges)
        return
    settings = read_settings()
    order = schedule_order(plan, positions, locator)
    stamps: list[ShardStamp] = list(getattr(locator, "shard_stamps", ()))
    sizes = [0] * len(paths)
    for shard, count in Counter(int(s) for s in locator.shard_ids).items():
        sizes[shard] = count
    copies: CachedCopies | None = None
    if stamps and settings.cache_dir is not None:
        copies = CachedCopies(paths, stamps, ShardCache(settings.cache_dir))
    elif stamps:
        whole = whole_shards(order, sizes, settings.stream_fraction)
        if whole:
            copies = CachedCopies.temporary(paths, stamps, whole.__contains__)
    blocks = [walk_block(size, n) for (size, _), n in zip(stamps, sizes, strict=False)]
    access = ShardAccess(paths, copies, blocks, ranges)
    reads = ScheduledReads(access, order, settings.read_ahead)
    try:
        yield reads
    finally:
        reads.close()
        if copies is not None:
            copies.close()
