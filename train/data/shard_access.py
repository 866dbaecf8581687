"""Random access to a sample's members in its shard, by key: one read per sample.

The trainer reads samples out of order (its schedule says which, by key). A sample's members
are contiguous in the tar (see :mod:`mvshards.schema`), so a sample is one read of its
*span*: the bytes from its first member's header to its last member's padded end, a seek and
a read in a local file, one ranged GET in an object store (``s3://...``,
:mod:`mvshards.storage`). The member headers are then parsed out of those bytes.

Where a sample's span lies comes from the index: an entry written by this mvprep records
every sample's byte range (:class:`mvshards.index.SampleRanges`), so no tar header is read
apart from the sample's own, and a stored shard costs exactly one GET per sample. A span
that does not hold exactly that sample's members raises :class:`ShardReadError`.

An index of an older mvprep records no ranges: then a shard's tar headers are scanned once
and each sample's span kept; a shard in a store gets its headers scanned over the network
once per process (the table is kept for later epochs: a run's shards do not change, the
index's sizes are checked when it starts): a walk from header to header through the storage
layer's buffered range reader. Its block size trades requests for bytes (:func:`walk_block`):
a shard of large samples is walked in small blocks (:data:`HEADER_BLOCK`) that fetch the
headers and skip the image bytes between them; one of small samples (the usual case) in large
ones (:data:`mvshards.storage.READ_BLOCK`), as a stream, since skipping less than about a
request's worth of bytes costs more than reading it. A shard copied whole to a local cache
(:class:`ShardCopies`) is read (and, without ranges, scanned) locally instead.

A shard that does not hold what its index says raises :class:`ShardReadError`, a one-line
error naming the shard, the sample and ``mvprep verify``; a store that refuses or keeps
failing a read raises :class:`mvshards.storage.StorageError` naming the URL.
"""

from __future__ import annotations

import io
import tarfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from mvshards.index import SampleRanges
from mvshards.storage import READ_BLOCK, Location, ObjectPath, StorageError, location, read_range
from mvshards.tario import split_member_name

HEADER_BLOCK = 64 << 10
"""Bytes one ranged GET fetches while walking the tar headers of a shard of large samples."""
STREAM_WALK_BELOW = 2 << 20
"""Mean sample size under which a shard's header walk streams it in large blocks instead:
about the bytes one S3 connection moves in the latency of one request (~30 ms at ~70 MB/s)."""


def walk_block(num_bytes: int, num_samples: int) -> int:
    """The ranged-GET size for walking the headers of a stored shard of ``num_bytes`` bytes
    holding ``num_samples`` samples (see :data:`STREAM_WALK_BELOW`)."""
    if num_samples and num_bytes / num_samples < STREAM_WALK_BELOW:
        return READ_BLOCK
    return HEADER_BLOCK


class ShardReadError(Exception):
    """A shard does not hold what its index says (one line, naming the shard, the sample and
    the fix: ``mvprep verify``)."""

    def __init__(self, shard: Location, key: str | None, problem: str) -> None:
        what = f"sample {key} {problem}" if key is not None else problem
        super().__init__(
            f"{shard}: {what}; the shard is damaged or changed since the index "
            f"was written: run `mvprep verify {shard.parent}` and rebuild the shards it names"
        )


@dataclass(frozen=True)
class SampleSpan:
    """Where one sample lies in its tar: bytes ``[start, stop)`` hold its members' headers and
    data; ``members`` are ``(ext, data offset, size)`` with offsets in the tar."""

    start: int
    stop: int
    members: tuple[tuple[str, int, int], ...]

    def split(self, data: bytes) -> dict[str, bytes]:
        """The members (``ext -> bytes``) out of the span's bytes."""
        return {
            ext: data[offset - self.start : offset - self.start + size]
            for ext, offset, size in self.members
        }


MemberTable = dict[str, SampleSpan]
"""Sample key -> its span, for one shard."""

_STORED_TABLES: dict[str, MemberTable] = {}
"""The member tables of the stored shards this process has walked, by URL."""


def scan_members(handle: BinaryIO) -> MemberTable:
    """Every sample's span in the tar read through the seekable ``handle`` (headers only:
    member data is skipped by seeking)."""
    with tarfile.open(fileobj=handle, mode="r:") as tar:
        return member_table(tar)


def member_table(tar: tarfile.TarFile) -> MemberTable:
    """Every sample's span among the members of ``tar`` (all of them are read first)."""
    found: dict[str, list[tuple[int, str, int, int]]] = {}
    for member in tar.getmembers():
        parts = split_member_name(member.name) if member.isfile() else None
        if parts is None:
            continue
        key, ext = parts
        found.setdefault(key, []).append((member.offset, ext, member.offset_data, member.size))
    return {
        key: SampleSpan(
            start=min(m[0] for m in rows),
            stop=max(m[2] + m[3] for m in rows),
            members=tuple((ext, offset, size) for _, ext, offset, size in rows),
        )
        for key, rows in found.items()
    }


def remember_table(shard: Location, table: MemberTable) -> None:
    """Keep the table of a stored shard walked elsewhere (the exact-length recount) for the
    readers of this process."""
    if isinstance(shard, ObjectPath):
        _STORED_TABLES[str(shard)] = table


def open_shard(shard: Location, block: int = HEADER_BLOCK) -> BinaryIO:
    """A seekable reader of a shard: the local file, or ranged GETs of ``block`` bytes."""
    if isinstance(shard, ObjectPath):
        return shard.open("rb", buffering=block)
    return open(shard, "rb")  # noqa: SIM115 - the caller closes it


class ShardCopies(Protocol):
    """Local copies of stored shards (:class:`mvtrain.data.shard_cache.ShardCache`)."""

    def find(self, shard_id: int) -> Path | None:
        """The local copy of shard ``shard_id`` if there is one, else None (no download)."""

    def fetch(self, shard_id: int) -> Path | None:
        """The local copy of shard ``shard_id``, downloaded whole first when it should be;
        None to read it from the store."""

    def release(self, shard_id: int) -> None:
        """This reader needs shard ``shard_id`` no more (a spool may delete its copy)."""


class ShardAccess:
    """Random access to a sample's members by key; one read (one ranged GET from a store) per
    sample, at the byte range the index records, else after one header scan per shard. Safe
    to use from several threads. A shard that cannot be read as its index says raises
    :class:`ShardReadError`."""

    def __init__(
        self,
        shard_paths: Sequence[Location],
        copies: ShardCopies | None = None,
        walk_blocks: Sequence[int] = (),
        ranges: Sequence[SampleRanges | None] = (),
    ) -> None:
        self.shard_paths = [location(p) for p in shard_paths]
        self.copies = copies
        self.walk_blocks = list(walk_blocks)
        """Per stored shard the GET size of its header walk (:func:`walk_block`; default
        :data:`HEADER_BLOCK`)."""
        self.ranges = list(ranges)
        """Per shard its samples' byte ranges from the index
        (:attr:`mvshards.index.ShardInfo.sample_ranges`); None or absent: scan its headers."""
        self._tables: dict[str, MemberTable] = {}
        """The tables of local files (and copies) by path; stored shards': module-wide."""
        self._locks: dict[int, threading.Lock] = {}
        self._guard = threading.Lock()

    def _lock(self, shard_id: int) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(shard_id, threading.Lock())

    def source(self, shard_id: int) -> Location:
        """Where shard ``shard_id`` is read from now: its file, its local copy (downloaded
        whole first when the copies say so), or its object in the store."""
        path = self.shard_paths[shard_id]
        if not isinstance(path, ObjectPath) or self.copies is None:
            return path
        with self._lock(shard_id):
            return self.copies.fetch(shard_id) or path

    def table(self, shard_id: int, key: str = "(the first)") -> MemberTable:
        """The member table of shard ``shard_id`` as read from :meth:`source`."""
        where = self.source(shard_id)
        tables = _STORED_TABLES if isinstance(where, ObjectPath) else self._tables
        table = tables.get(str(where))
        if table is None:
            with self._lock(shard_id):
                table = tables.get(str(where))
                if table is None:
                    block = HEADER_BLOCK
                    if shard_id < len(self.walk_blocks):
                        block = self.walk_blocks[shard_id]
                    table = tables[str(where)] = _scan(where, key, block)
        return table

    def members(self, shard_id: int, key: str) -> dict[str, bytes]:
        """Sample ``key``'s members (``ext -> bytes``) from shard ``shard_id``."""
        where = self.source(shard_id)
        ranges = self.ranges[shard_id] if shard_id < len(self.ranges) else None
        if ranges is not None:
            return _read_recorded(where, key, ranges)
        span = self.table(shard_id, key).get(key)
        if span is None:
            raise ShardReadError(where, key, "is not in it")
        data = _read_span(where, span)
        if len(data) != span.stop - span.start:
            raise ShardReadError(where, key, "is cut short")
        out = span.split(data)
        if "json" not in out:
            raise ShardReadError(where, key, "has no .json member")
        return out

    def release(self, shard_id: int) -> None:
        """This reader needs shard ``shard_id`` no more (a spooled copy may go)."""
        if self.copies is None:
            return
        with self._lock(shard_id):
            copy = self.copies.find(shard_id)
            self.copies.release(shard_id)
            if copy is not None:
                self._tables.pop(str(copy), None)


def _scan(where: Location, key: str, block: int) -> MemberTable:
    """The member table of the shard at ``where`` (:func:`scan_members`)."""
    try:
        with open_shard(where, block) as handle:
            return scan_members(handle)
    except StorageError:
        raise
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ShardReadError(where, key, f"cannot be read ({exc})") from exc


def _read_span(where: Location, span: SampleSpan) -> bytes:
    """A sample's bytes: one ranged GET, or one seek and read."""
    return read_range(where, span.start, span.stop)


def _read_recorded(where: Location, key: str, ranges: SampleRanges) -> dict[str, bytes]:
    """Sample ``key``'s members read at the byte range the index records for it."""
    found = ranges.span(key)
    if found is None:
        raise ShardReadError(where, key, "is not in it")
    start, stop = found
    if stop <= start:
        raise ShardReadError(where, key, f"has the empty byte range [{start}, {stop}) in the index")
    data = read_range(where, start, stop)
    if len(data) != stop - start:
        raise ShardReadError(where, key, "is cut short")
    return split_sample(where, key, start, data)


def split_sample(where: Location, key: str, start: int, data: bytes) -> dict[str, bytes]:
    """The members (``ext -> bytes``) of sample ``key`` out of its span's bytes ``data`` (read
    at offset ``start`` of the shard ``where``): the span must hold that sample's members and
    nothing else, from a header at its first byte to the padded end of its last member."""
    where_bytes = f"bytes [{start}, {start + len(data)})"
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            table = member_table(tar)
    except (tarfile.TarError, EOFError) as exc:
        raise ShardReadError(where, key, f"cannot be read at {where_bytes} ({exc})") from exc
    span = table.get(key)
    if span is None or len(table) != 1 or span.start != 0 or _padded(span.stop) != len(data):
        held = ", ".join(sorted(table)) or "no whole member"
        raise ShardReadError(
            where, key, f"is not at {where_bytes} where the index says (they hold {held})"
        )
    out = span.split(data)
    if "json" not in out:
        raise ShardReadError(where, key, "has no .json member")
    return out


def _padded(end: int) -> int:
    """``end`` rounded up to the tar block size."""
    return -(-end // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
