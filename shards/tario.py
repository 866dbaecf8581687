"""Deterministic WebDataset tar shards: an atomic writer and a streaming reader.

A shard written by :class:`ShardWriter` depends only on the members added, in the order
added: every header carries the same fixed fields (GNU tar format, ``mtime`` =
:data:`FIXED_MTIME`, uid/gid 0, empty owner names, mode ``0o644``, no PAX records), so equal
input gives byte-equal shards whenever and wherever they are written.

The writer streams into ``NAME.tmp`` while hashing, then ``commit()`` fsyncs, renames to
the final name and fsyncs the folder: a shard under its final name is always complete. A
writer left without ``commit()`` (an exception, a ``kill -9``) leaves no final file.

For a shard in an object store (an :class:`~mvshards.storage.ObjectPath`; stores have no
rename) the writer streams into an anonymous local temporary file (gone with the process,
even after ``kill -9``) while hashing, and ``commit()`` uploads it whole
(:func:`mvshards.storage.upload_file`: one PUT or a multipart upload completed at the end),
so the object appears complete or not at all. Whether a shard is *finished* is decided by
its index entry, written after the upload (see :mod:`mvprep.build`).

Members follow the WebDataset rule: the sample key is the member name up to the first dot,
the extension is the rest (``000000042.src0.jpg`` -> key ``000000042``, ext ``src0.jpg``).
A sample's members are contiguous, so the writer knows where each sample lies as it writes
(:attr:`ShardFileInfo.sample_offsets`): what the index records so a reader fetches a sample
with one read of its byte range, without walking the tar's headers.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from mvshards.storage import TMP_SUFFIX as TMP_SUFFIX  # re-exported: older importers
from mvshards.storage import (
    Location,
    ObjectPath,
    location,
    open_read,
    sha256_of,
    upload_file,
    write_whole,
)
from mvshards.storage import fsync_dir as fsync_dir

FIXED_MTIME = 0
"""Modification time (seconds since the epoch) written into every member header."""
MEMBER_MODE = 0o644
TAR_FORMAT = tarfile.GNU_FORMAT
"""GNU tar headers: no PAX records (PAX would add access/change times); long names, should
one ever occur, use GNU's ``././@LongLink`` entries, which are deterministic too."""

_NAME_RE = re.compile(r"^([^./]+)\.([^/]+)$")
"""``key.ext``: a key without dots or slashes, then a non-empty extension."""
_KEY_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
"""WebDataset's own split (``webdataset.tariterators.base_plus_ext``), used when reading."""


@dataclass(frozen=True)
class ShardFileInfo:
    """A committed shard: where it is and what its bytes are."""

    path: Location
    sha256: str
    """Hex digest of the whole tar file."""
    num_bytes: int
    num_members: int
    sample_offsets: tuple[int, ...] = ()
    """Sample ``i`` (in the order written) lies at bytes ``[sample_offsets[i],
    sample_offsets[i + 1])``: its first member's header to its last member's padded data end;
    one more offset than samples (the last: where the end-of-archive blocks start)."""


def split_member_name(name: str) -> tuple[str, str] | None:
    """``(key, ext)`` of a member name by the WebDataset rule; None when it has no dot."""
    match = _KEY_RE.match(name)
    if not match:
        return None
    return match.group(1), match.group(2)


class _HashingFile:
    """A write-only file wrapper that hashes and counts every byte on the way to disk."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.digest = hashlib.sha256()
        self.num_bytes = 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.num_bytes += len(data)
        return self.raw.write(data)

    def tell(self) -> int:
        return self.num_bytes

    def flush(self) -> None:
        self.raw.flush()


write_atomic = write_whole
"""Write a file or object whole: readers see the old or all the new bytes (see
:func:`mvshards.storage.write_whole`)."""


class ShardWriter:
    """Writes one shard atomically; use as a context manager.

    ``add()`` members in strictly increasing name order (samples in key order, each
    sample's members sorted), then ``commit()``. Leaving the ``with`` block without a
    commit, or calling ``abort()``, removes the temporary file.
    """

    def __init__(self, final_path: Location | str) -> None:
        self.final_path: Location = location(final_path)
        self.tmp_path: Path | None = None
        if isinstance(self.final_path, ObjectPath):  # spooled here, uploaded by commit()
            self._raw: BinaryIO | None = tempfile.TemporaryFile()  # noqa: SIM115 - closed in commit/abort
        else:
            self.tmp_path = self.final_path.with_name(self.final_path.name + TMP_SUFFIX)
            self._raw = open(self.tmp_path, "wb")  # noqa: SIM115 - closed in commit/abort
        self._hashing = _HashingFile(self._raw)
        self._tar: tarfile.TarFile | None = tarfile.TarFile(
            fileobj=self._hashing,  # type: ignore[arg-type]
            mode="w",
            format=TAR_FORMAT,
            encoding="utf-8",
        )
        self._last_name: str | None = None
        self._last_key: str | None = None
        self._num_members = 0
        self._sample_starts: list[int] = []
        self._end = 0
        """Bytes written so far: where the next member's header starts."""
        self._info: ShardFileInfo | None = None

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._info is None:
            self.abort()

    @property
    def num_members(self) -> int:
        return self._num_members

    def add(self, name: str, data: bytes) -> None:
        """Append member ``name`` holding ``data``; names must strictly increase."""
        if self._tar is None:
            raise RuntimeError(f"{self.final_path}: add() after commit() or abort()")
        match = _NAME_RE.match(name)
        if not match:
            raise ValueError(
                f"{self.final_path}: member name {name!r} is not 'key.ext' "
                "(a key without dots or slashes, then an extension)"
            )
        if self._last_name is not None and name <= self._last_name:
            raise ValueError(
                f"{self.final_path}: member {name!r} added after {self._last_name!r}; members "
                "must be added in strictly increasing name order (samples in key order, "
                "each sample's members sorted)"
            )
        key = match.group(1)
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = FIXED_MTIME
        info.mode = MEMBER_MODE
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.type = tarfile.REGTYPE
        if key != self._last_key:
            self._sample_starts.append(self._end)  # a new sample starts at this header
            self._last_key = key
        self._tar.addfile(info, io.BytesIO(data))
        self._end = self._tar.offset
        self._last_name = name
        self._num_members += 1

    def add_sample(self, key: str, members: dict[str, bytes]) -> None:
        """Append one sample: ``members`` maps extensions (``json``, ``src0.jpg``) to bytes."""
        for ext in sorted(members):
            self.add(f"{key}.{ext}", members[ext])

    def commit(self) -> ShardFileInfo:
        """Finish the tar, make it durable and give it its final name."""
        if self._tar is None or self._raw is None:
            raise RuntimeError(f"{self.final_path}: commit() after commit() or abort()")
        try:
            self._tar.close()
            self._tar = None
            self._raw.flush()
            if isinstance(self.final_path, ObjectPath):
                upload_file(self._raw, self.final_path)
                self._raw.close()
                self._raw = None
            else:
                assert self.tmp_path is not None
                os.fsync(self._raw.fileno())
                self._raw.close()
                self._raw = None
                os.replace(self.tmp_path, self.final_path)
                fsync_dir(self.final_path.parent)
        except BaseException:
            self.abort()
            raise
        self._info = ShardFileInfo(
            path=self.final_path,
            sha256=self._hashing.digest.hexdigest(),
            num_bytes=self._hashing.num_bytes,
            num_members=self._num_members,
            sample_offsets=(*self._sample_starts, self._end),
        )
        return self._info

    def abort(self) -> None:
        """Drop everything written so far; the final path is left untouched."""
        self._tar = None  # never close(): that would write the end-of-archive blocks
        if self._raw is not None:
            self._raw.close()
            self._raw = None
        if self.tmp_path is not None:
            self.tmp_path.unlink(missing_ok=True)


def iter_members(path: Location | str) -> Iterator[tuple[str, bytes]]:
    """Every regular member of a tar (a file or an object), in order, as ``(name, bytes)``."""
    with open_read(location(path)) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
        for info in tar:
            if not info.isfile():
                continue
            f = tar.extractfile(info)
            assert f is not None
            yield info.name, f.read()


def group_samples(
    members: Iterator[tuple[str, bytes]],
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group consecutive members by key: ``(key, {ext: bytes})`` per sample.

    Members without a dot in their name are skipped, as WebDataset does. A repeated
    extension within one sample raises ValueError.
    """
    key: str | None = None
    sample: dict[str, bytes] = {}
    for name, data in members:
        split = split_member_name(name)
        if split is None:
            continue
        member_key, ext = split
        if key is not None and member_key != key:
            yield key, sample
            sample = {}
        key = member_key
        if ext in sample:
            raise ValueError(f"duplicate member {name!r} in sample {key!r}")
        sample[ext] = data
    if key is not None:
        yield key, sample


def iter_shard(path: Location | str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Every sample of a shard in file order, as ``(key, {ext: bytes})``."""
    yield from group_samples(iter_members(path))


def read_sample(path: Location | str, key: str) -> dict[str, bytes]:
    """The members of sample ``key`` in shard ``path`` (a linear scan); KeyError if absent."""
    for sample_key, sample in iter_shard(path):
        if sample_key == key:
            return sample
    raise KeyError(f"{path}: no sample with key {key!r}")


def sha256_file(path: Location | str, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's (or object's) bytes."""
    return sha256_of(location(path), chunk_size)
