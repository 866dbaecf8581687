"""Local copies of shards that live in an object store: ``--cache-dir``, and the spool.

A stored shard is copied whole, in large ranged GETs (:data:`mvshards.storage.READ_BLOCK`),
into a local folder under a name made of its URL, its size and its index sha256, so a later
epoch or run (or another rank on the node) reuses it, and a rebuilt shard (another sha) or
another bucket never does. The copy is hashed while it is written and checked against the
index before it gets its name (temporary file, fsync, rename): a name in the folder always
holds the whole, verified shard. Processes sharing the folder take a lock per shard, so one
downloads while the others wait for its copy.

:class:`ShardCache` is the folder; :class:`CachedCopies` tells the reader
(:class:`mvtrain.data.shard_access.ShardAccess`) which shards to copy: every stored shard for
``--cache-dir``; for a *spool* (a temporary folder, no ``--cache-dir``) only the shards the
rank reads most of, each deleted once the rank has read its last sample there.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from mvshards.storage import READ_BLOCK, Location, ObjectPath, fsync_dir
from mvtrain.data.shard_access import ShardReadError

ShardStamp = tuple[int, str]
"""What the index says of a shard: ``(num_bytes, sha256)``."""


class ShardCache:
    """A folder of whole shards copied from a store (see the module docstring)."""

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def path_for(self, shard: ObjectPath, stamp: ShardStamp) -> Path:
        """The copy's name: the shard's name, then a digest of its URL, size and sha256."""
        size, sha = stamp
        digest = hashlib.sha256(f"{shard.url}\n{size}\n{sha}".encode()).hexdigest()[:24]
        return self.folder / f"{shard.stem}.{digest}.tar"

    def find(self, shard: ObjectPath, stamp: ShardStamp) -> Path | None:
        """The copy of ``shard`` when the folder has it (its size checked), else None."""
        path = self.path_for(shard, stamp)
        try:
            return path if path.stat().st_size == stamp[0] else None
        except FileNotFoundError:
            return None

    def fetch(self, shard: ObjectPath, stamp: ShardStamp) -> Path:
        """The copy of ``shard``, downloaded first when the folder lacks it (one process at a
        time per shard; the others wait and take its copy)."""
        found = self.find(shard, stamp)
        if found is not None:
            return found
        path = self.path_for(shard, stamp)
        with open(path.with_name(path.name + ".lock"), "a+b") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            found = self.find(shard, stamp)
            if found is not None:
                return found
            _download(shard, stamp, path)
        return path

    def drop(self, shard: ObjectPath, stamp: ShardStamp) -> None:
        """Delete the copy of ``shard`` (and its lock file)."""
        path = self.path_for(shard, stamp)
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".lock").unlink(missing_ok=True)


def _download(shard: ObjectPath, stamp: ShardStamp, path: Path) -> None:
    """Copy ``shard`` whole to ``path``: hashed, checked against ``stamp``, then renamed."""
    size, sha = stamp
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    digest = hashlib.sha256()
    written = 0
    try:
        with shard.open("rb", buffering=READ_BLOCK) as src, open(tmp, "wb") as dst:
            while chunk := src.read(READ_BLOCK):
                digest.update(chunk)
                dst.write(chunk)
                written += len(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        if written != size or (sha and digest.hexdigest() != sha):
            raise ShardReadError(
                shard,
                None,
                f"holds {written} bytes with sha256 {digest.hexdigest()[:16]}..., its index "
                f"entry says {size} bytes with sha256 {sha[:16]}...",
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


class CachedCopies:
    """Which stored shards a reader copies whole into ``cache`` (the
    :class:`mvtrain.data.shard_access.ShardCopies` a :class:`ShardAccess` asks).

    ``whole(shard_id)`` says whether to copy a shard it does not have yet; with ``spool``
    the folder is a temporary one: a copy is deleted when the reader releases its shard,
    and the folder when the reader closes.
    """

    def __init__(
        self,
        shard_paths: Sequence[Location],
        stamps: Sequence[ShardStamp],
        cache: ShardCache,
        whole: Callable[[int], bool] = lambda _: True,
        spool: bool = False,
    ) -> None:
        self.shard_paths, self.stamps, self.cache = list(shard_paths), list(stamps), cache
        self.whole, self.spool = whole, spool

    @classmethod
    def temporary(
        cls,
        shard_paths: Sequence[Location],
        stamps: Sequence[ShardStamp],
        whole: Callable[[int], bool],
    ) -> CachedCopies:
        """A spool in a new temporary folder (deleted by :meth:`close`)."""
        folder = tempfile.mkdtemp(prefix="mvtrain-spool-")
        return cls(shard_paths, stamps, ShardCache(folder), whole, spool=True)

    def _stored(self, shard_id: int) -> ObjectPath | None:
        path = self.shard_paths[shard_id]
        return path if isinstance(path, ObjectPath) and shard_id < len(self.stamps) else None

    def find(self, shard_id: int) -> Path | None:
        shard = self._stored(shard_id)
        return None if shard is None else self.cache.find(shard, self.stamps[shard_id])

    def fetch(self, shard_id: int) -> Path | None:
        shard = self._stored(shard_id)
        if shard is None:
            return None
        found = self.cache.find(shard, self.stamps[shard_id])
        if found is not None or not self.whole(shard_id):
            return found
        return self.cache.fetch(shard, self.stamps[shard_id])

    def release(self, shard_id: int) -> None:
        shard = self._stored(shard_id)
        if self.spool and shard is not None:
            self.cache.drop(shard, self.stamps[shard_id])

    def close(self) -> None:
        """Delete a spool's folder (a ``--cache-dir`` stays)."""
        if self.spool:
            shutil.rmtree(self.cache.folder, ignore_errors=True)
