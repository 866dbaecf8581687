"""Several data files as one input: ``mvprep build a.json b.jsonl c.json --out DIR``.

The files are read with :func:`mvprep.readers.open_dataset` (each file's format is detected
on its own, so any mix works) and numbered as one sequence, in the order given: the records
of the first file are ``0 .. n0-1``, those of the second ``n0 .. n0+n1-1``, and so on. That
global position is a record's index everywhere a build uses one: its sample key, the work
units (records ``[start, stop)`` -> one shard, a unit may span two files), ``--part``, the
index entries and ``rejects.jsonl``. So:

* keys are unique across the files and stable (a file's keys depend only on the files
  before it), and a one-file build is exactly what it always was;
* a build of ``a.json b.jsonl`` writes the same shards as a build of one file holding the
  same records in the same order, except that each sample's JSON (and each reject) also says
  where it came from: ``"source": {"file": "b.jsonl", "index": 12}``, the file's path
  relative to the folder that holds all the input files, and the record's position in that
  file (0-based). One-file builds carry no ``source`` (their bytes are unchanged; the key is
  the position in the file);
* each record's image paths are relative to its own data file's folder (and
  ``--allow-outside-root`` is judged against that folder).

The same file given twice is refused (it would duplicate every sample under other keys;
weight sources at training time instead).

Opening indexes every file once (see :mod:`mvprep.readers`); the opened set is kept per
process, keyed by the files' paths, sizes and mtimes, so a worker process running many
units indexes nothing again, forked workers inherit the parent's, and a Ray task adopts the
driver's (:func:`share_inputs` / :func:`adopt_inputs`).
"""

from __future__ import annotations

import bisect
import os
import posixpath
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mvprep.readers import (
    DatasetError,
    DatasetSource,
    RawRecord,
    SharedOffsets,
    _stamp,
    adopt_offsets,
    open_dataset,
    share_offsets,
)
from mvshards.storage import Location, ObjectPath, location


@dataclass(frozen=True)
class InputFile:
    """One data file of a build: the opened source, its recorded name, its first record's
    global index."""

    source: DatasetSource
    name: str
    """The file as samples and rejects name it: relative to the inputs' common folder."""
    start: int

    @property
    def stop(self) -> int:
        return self.start + self.source.num_records

    @property
    def root(self) -> Location:
        """The folder (or URL prefix) the file's image paths are relative to."""
        return self.source.root


class Inputs:
    """The data files of one build, numbered as one sequence of records."""

    def __init__(self, files: Sequence[InputFile]) -> None:
        if not files:
            raise DatasetError("no data file given; name at least one .json or .jsonl file")
        self.files = tuple(files)
        self.num_records = self.files[-1].stop
        self._starts = [f.start for f in self.files]

    @property
    def multi(self) -> bool:
        """True with several files: samples and rejects then record their source."""
        return len(self.files) > 1

    def locate(self, index: int) -> tuple[InputFile, int]:
        """The file holding global record ``index`` and the record's position in it."""
        if not 0 <= index < self.num_records:
            raise IndexError(f"record {index} is not in [0, {self.num_records})")
        file = self.files[bisect.bisect_right(self._starts, index) - 1]
        return file, index - file.start

    def source_of(self, index: int) -> dict[str, Any] | None:
        """``{"file", "index"}`` of global record ``index``; None for a one-file build."""
        if not self.multi:
            return None
        file, local = self.locate(index)
        return {"file": file.name, "index": local}

    def read_range(self, start: int, stop: int) -> Iterator[tuple[int, RawRecord, InputFile]]:
        """Yield ``(global index, record, file)`` for every index in ``[start, stop)``, in order
        (clipped to the records), reading each file only over its own share of the range."""
        stop = min(stop, self.num_records)
        for file in self.files:
            lo, hi = max(start, file.start), min(stop, file.stop)
            if lo >= hi:
                continue
            for local, raw in file.source.read_range(lo - file.start, hi - file.start):
                yield file.start + local, raw, file

    def describe(self) -> list[dict[str, Any]]:
        """Per file: its name, path, record count and global record range (for messages)."""
        return [
            {
                "file": f.name,
                "path": str(f.source.path),
                "records": f.source.num_records,
                "record_range": [f.start, f.stop],
            }
            for f in self.files
        ]

    def __repr__(self) -> str:
        return f"Inputs({[f.name for f in self.files]!r}, num_records={self.num_records})"


def input_names(paths: Sequence[Location | str]) -> list[str]:
    """How each file is named in samples and rejects: its path relative to the deepest folder
    (or URL prefix) holding all of them (``a.json``, ``more/b.jsonl``), so the names do not
    depend on the current folder a build (or a part of it) was started from. Files in
    different stores are named by their full path or URL."""
    resolved = [location(p).resolve() for p in paths]
    if len(resolved) == 1:
        return [resolved[0].name]
    local = [p for p in resolved if isinstance(p, Path)]
    if len(local) == len(resolved):
        common = Path(os.path.commonpath([str(p.parent) for p in local]))
        return [p.relative_to(common).as_posix() for p in local]
    objects = [p for p in resolved if isinstance(p, ObjectPath)]
    if len(objects) == len(resolved) and len({(p.protocol, p.bucket) for p in objects}) == 1:
        base = posixpath.commonpath([posixpath.dirname(p.path) for p in objects])
        return [posixpath.relpath(p.path, base) for p in objects]
    return [str(p) for p in resolved]


def check_distinct(paths: Sequence[Location | str]) -> None:
    """ValueError when a file is given twice (the same file after resolving links)."""
    seen: dict[Location, str] = {}
    for p in paths:
        resolved = location(p).resolve()
        if resolved in seen:
            raise ValueError(
                f"data file {p} is given twice (also as {seen[resolved]}); give each file once "
                "(to weight a source, use mvtrain's --shards DIR:WEIGHT on separate builds)"
            )
        seen[resolved] = str(p)


_CACHE_SIZE = 2
_cache: OrderedDict[tuple[tuple[str, int, int], ...], Inputs] = OrderedDict()
"""(absolute path, size, mtime_ns) per file -> the opened inputs; this process only."""


def _key(paths: Sequence[Location]) -> tuple[tuple[str, int, int], ...] | None:
    try:
        stamps = [_stamp(p) if isinstance(p, ObjectPath) else _local_stamp(p) for p in paths]
    except OSError:
        return None  # let open_dataset name the missing file
    return tuple(
        (str(p.absolute()), size, mtime) for p, (size, mtime) in zip(paths, stamps, strict=True)
    )


def _local_stamp(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def _remember(key: tuple[tuple[str, int, int], ...] | None, inputs: Inputs) -> None:
    if key is None:
        return
    _cache[key] = inputs
    _cache.move_to_end(key)
    while len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)


def open_inputs(paths: Sequence[Location | str] | Location | str) -> Inputs:
    """Open the data files (one or several; paths or URLs) as one numbered sequence of records.

    Raises :class:`mvprep.readers.DatasetError` when a file cannot be used (naming it).
    """
    if isinstance(paths, str | Path | ObjectPath):
        paths = [paths]
    paths = [location(p) for p in paths]
    check_distinct(paths)
    key = _key(paths)
    cached = _cache.get(key) if key is not None else None
    if cached is not None:
        _cache.move_to_end(key)  # type: ignore[arg-type]
        return cached
    names = input_names(paths)
    files: list[InputFile] = []
    start = 0
    for path, name in zip(paths, names, strict=True):
        source = open_dataset(path)
        files.append(InputFile(source=source, name=name, start=start))
        start += source.num_records
    inputs = Inputs(files)
    _remember(key, inputs)
    return inputs


def share_inputs(inputs: Inputs) -> list[SharedOffsets]:
    """The files' offsets, for :func:`adopt_inputs` in another process (no re-scan there)."""
    return [share_offsets(f.source) for f in inputs.files]


def adopt_inputs(shared: Sequence[SharedOffsets], paths: Sequence[Location | str]) -> None:
    """Use offsets indexed by another process for ``paths``: each file is opened right after
    its offsets are adopted, and the opened set is kept for :func:`open_inputs`. A file that
    changed since is simply indexed again when opened."""
    paths = [location(p) for p in paths]
    key = _key(paths)
    if key is None or key in _cache:
        return
    check_distinct(paths)
    files: list[InputFile] = []
    start = 0
    for path, name, offsets in zip(paths, input_names(paths), shared, strict=True):
        adopt_offsets(offsets)
        source = open_dataset(path)
        files.append(InputFile(source=source, name=name, start=start))
        start += source.num_records
    _remember(key, Inputs(files))
