"""Reading dataset files: a JSON list or JSON Lines, addressed by record position.

``open_dataset(path)`` looks at the file once and returns a :class:`DatasetSource` that
knows how many records there are and yields any range of them, so the work units
("records ``[start, stop)`` -> one shard") can each read just their own slice.

* JSON Lines (``.jsonl``/``.ndjson``): one object per line; blank lines are skipped and are
  not records. Opening scans the file once and keeps the byte offset of every record line
  (8 bytes a record, ``array('q')``); ``read_range`` seeks to its first line and parses only
  its own lines, so memory and time do not grow with the file. A line that is not valid JSON
  or not an object is yielded as a :class:`RecordError` ("malformed record") at its index;
  the other records keep their positions.
* JSON (``.json``): a top-level list. Opening streams through the file once (UTF-8 decoded
  incrementally, each element parsed with ``json.JSONDecoder.raw_decode`` and dropped) and
  keeps the byte offset where every element starts, plus where the last one ends
  (``array('q')``, 8 bytes a record); ``read_range`` reads just the bytes of its own
  elements. Neither opening nor reading holds the whole list in memory, so a JSON list
  scales like JSONL; a file that is not valid JSON as a whole is still refused at open.

Offsets are kept in memory only, per process, keyed by the file's path, size and mtime
(:func:`open_dataset` reuses them): a worker process indexes a file once however many units
it runs, forked workers inherit the parent's index, and other processes can be handed it
(:func:`share_offsets` / :func:`adopt_offsets`; the Ray runner does this).

Any other extension is sniffed: a file whose first non-blank character is ``[`` is JSON,
``{`` is JSONL. Problems that make the whole file unusable (missing, empty, not a list, not
valid JSON) raise :class:`DatasetError`; a bad record never does.

Parquet files (``.parquet``, or starting with ``PAR1``) and ``datasets.save_to_disk``
folders (a folder with ``state.json``) are read by :mod:`mvprep.arrow_sources` (pyarrow, the
``parquet`` extra), rows addressed by position the same way.

A data file may be an object-store URL (``s3://bucket/data.jsonl``, see
:mod:`mvshards.storage`): it is read with ranged GETs, its size and ETag stand in for the
file's size and mtime, and its image paths are relative to its "folder" (prefix) there.
``save_to_disk`` folders must be local.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mvprep.json_index import JsonListError, index_json_list, read_elements
from mvprep.records import MALFORMED, RecordError, json_type_name
from mvshards.storage import Location, ObjectPath, location, open_read, read_range

DatasetFormat = Literal["json", "jsonl", "parquet", "hf-disk"]
Offsets = array | np.ndarray
"""``array('q')`` as indexed here, or an int64 numpy view handed over by another process."""
RawRecord = dict[str, Any] | RecordError
"""What ``read_range`` yields per index: the raw record object, or why it is unreadable."""
_BOM = b"\xef\xbb\xbf"
_PARQUET_MAGIC = b"PAR1"
_SNIFF_BYTES = 4096


class DatasetError(Exception):
    """The dataset file as a whole cannot be used (one line, naming the file and the fix)."""


class DatasetSource:
    """An opened dataset file.

    ``path`` is the data file, ``root`` its folder (image paths are relative to it),
    ``num_records`` the number of records, ``format`` ``"json"``, ``"jsonl"``, ``"parquet"``
    or ``"hf-disk"``, ``offsets`` where the records start: byte offsets, or the first rows
    of Parquet row groups / Arrow files (see the subclasses).
    """

    path: Location
    root: Location
    num_records: int
    format: DatasetFormat
    offsets: Offsets
    _stamp: tuple[int, int]

    def read_range(self, start: int, stop: int) -> Iterator[tuple[int, RawRecord]]:
        """Yield ``(index, record)`` for every index in ``[start, stop)`` exactly once, in order.

        ``record`` is the raw object, or a :class:`RecordError` when the record could not
        even be parsed. The range is clipped to ``[0, num_records)``.
        """
        raise NotImplementedError

    def _open(self, path: Location, indexer: Any) -> None:
        """Set ``path``/``root`` and index the file once (cached per process)."""
        self.path = path
        self.root = path.absolute().parent
        self._stamp = _stamp(path)
        self.offsets = _cached_offsets(path, self._stamp, self.format, indexer)

    def _check_range(self, start: int, stop: int) -> tuple[int, int]:
        """Clip ``[start, stop)`` to the records, after checking the file did not change."""
        if start < 0 or stop < start:
            raise ValueError(f"bad record range [{start}, {stop}) for {self.path}")
        stop = min(stop, self.num_records)
        if start < stop and _stamp(self.path) != self._stamp:
            raise DatasetError(
                f"{self.path} changed since it was indexed ({self.num_records} records); do "
                "not edit the data file during a build (start again to re-index it)"
            )
        return min(start, stop), stop

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, num_records={self.num_records})"


class JsonListSource(DatasetSource):
    """A JSON file holding a list of records, with a byte-offset index of its elements."""

    format: DatasetFormat = "json"

    def __init__(self, path: Location) -> None:
        self._open(path, _index_json)  # offsets[i]: element i's byte offset; [n]: the end
        self.num_records = len(self.offsets) - 1

    def read_range(self, start: int, stop: int) -> Iterator[tuple[int, RawRecord]]:
        start, stop = self._check_range(start, stop)
        if start == stop:
            return
        for index, record in read_elements(self.path, self.offsets, start, stop):
            if isinstance(record, dict):
                yield index, record
            else:
                yield index, _not_an_object(record, index, self.path, "list element")


class JsonLinesSource(DatasetSource):
    """A JSON Lines file with a byte-offset index of its non-blank lines."""

    format: DatasetFormat = "jsonl"

    def __init__(self, path: Location) -> None:
        self._open(path, _index_lines)  # offsets[i]: byte offset of record i's line
        self.num_records = len(self.offsets)

    def read_range(self, start: int, stop: int) -> Iterator[tuple[int, RawRecord]]:
        start, stop = self._check_range(start, stop)
        if start == stop:
            return
        with open_read(self.path) as f:
            f.seek(self.offsets[start])
            for index in range(start, stop):
                pos = self.offsets[index]
                if f.tell() != pos:  # blank lines in between
                    f.seek(pos)
                line = f.readline()
                yield index, _parse_line(line, index, self.path, pos)


def open_dataset(path: Location | str) -> DatasetSource:
    """Open a dataset file (JSON list, JSON Lines, Parquet; a path or a URL) or a
    ``datasets.save_to_disk`` folder; see the module docstring."""
    path = location(path)
    fmt = detect_format(path)
    if fmt == "json":
        return JsonListSource(path)
    if fmt == "jsonl":
        return JsonLinesSource(path)
    from mvprep.arrow_sources import ArrowFolderSource, ParquetSource  # imports this module

    if fmt == "parquet":
        return ParquetSource(path)
    return ArrowFolderSource(path)


def detect_format(path: Location) -> DatasetFormat:
    """How ``path`` is read: ``json``, ``jsonl``, ``parquet`` or ``hf-disk``."""
    if isinstance(path, ObjectPath):
        if path.is_file():
            return _detect_format(path)
        if (path / "state.json").is_file():
            raise DatasetError(
                f"{path} is a datasets.save_to_disk folder in an object store: copy it to a "
                "local folder, or write it as Parquet files (Dataset.to_parquet)"
            )
        raise DatasetError(f"dataset file {path} not found; check the URL")
    if not path.exists():
        raise DatasetError(f"dataset file {path} not found; check the path")
    if path.is_dir():
        if (path / "state.json").is_file():
            return "hf-disk"
        raise DatasetError(
            f"dataset path {path} is not a file or a datasets.save_to_disk folder (no "
            "state.json); give the .json, .jsonl or .parquet file"
        )
    if not path.is_file():
        raise DatasetError(f"dataset path {path} is not a file; give the .json or .jsonl file")
    return _detect_format(path)


def check_input_format(path: Path | str, input_format: str) -> None:
    """DatasetError when ``--input-format`` names a container (``parquet``, ``hf-disk``)
    that ``path`` is not; record shapes are checked per record."""
    if input_format not in ("parquet", "hf-disk"):
        return
    found = detect_format(location(path))
    if found != input_format:
        raise DatasetError(
            f"--input-format {input_format}, but {path} is read as {found}; give a "
            f"{'.parquet file' if input_format == 'parquet' else 'save_to_disk folder'} "
            "or --input-format auto"
        )


def _detect_format(path: Location) -> DatasetFormat:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return "json"
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    head = read_range(path, 0, _SNIFF_BYTES)
    if head.startswith(_PARQUET_MAGIC):
        return "parquet"
    head = head.removeprefix(_BOM).lstrip()
    if not head:
        raise DatasetError(f"dataset file {path} is empty; it must hold records")
    if head[:1] == b"[":
        return "json"
    if head[:1] == b"{":
        return "jsonl"
    raise DatasetError(
        f"cannot tell the format of {path}: it starts with neither '[' (a JSON list) nor "
        "'{' (JSON Lines); name it .json or .jsonl"
    )


def _index_json(path: Location) -> array:
    try:
        return index_json_list(path)
    except JsonListError as exc:
        raise DatasetError(str(exc)) from None


_CACHE_SIZE = 2
_offsets_cache: OrderedDict[tuple[str, str, int, int], Offsets] = OrderedDict()
"""(format, absolute path, size, mtime_ns) -> offsets; this process's memory only."""


@dataclass(frozen=True)
class SharedOffsets:
    """A source's offsets in a form another process can adopt without re-indexing (a Ray
    runner puts it in the object store once; numpy makes the tasks' copies zero-copy)."""

    key: tuple[str, str, int, int]
    offsets: np.ndarray


def share_offsets(source: DatasetSource) -> SharedOffsets:
    """The offsets of an opened source, for :func:`adopt_offsets` in another process."""
    key = (source.format, str(source.path.absolute()), *source._stamp)
    return SharedOffsets(key, np.asarray(source.offsets, dtype=np.int64))


def adopt_offsets(shared: SharedOffsets) -> bool:
    """Use offsets indexed elsewhere for the same file; False (and nothing cached) when the
    file here is not the one they were made from (other size or mtime)."""
    fmt, path, size, mtime = shared.key
    try:
        if _stamp(location(path)) != (size, mtime):
            return False
    except (OSError, ValueError):
        return False
    if shared.key not in _offsets_cache:
        _offsets_cache[shared.key] = shared.offsets
        while len(_offsets_cache) > _CACHE_SIZE:
            _offsets_cache.popitem(last=False)
    return True


def _cached_offsets(
    path: Location, stamp: tuple[int, int], fmt: str, index: Callable[[Location], array]
) -> Offsets:
    """The offsets of ``path`` as of ``stamp``, computed at most once per process and stamp."""
    key = (fmt, str(path.absolute()), *stamp)
    offsets = _offsets_cache.get(key)
    if offsets is None:
        offsets = index(path)
        _offsets_cache[key] = offsets
        while len(_offsets_cache) > _CACHE_SIZE:
            _offsets_cache.popitem(last=False)
    else:
        _offsets_cache.move_to_end(key)
    return offsets


def _index_lines(path: Location) -> array:
    offsets = array("q")
    pos = 0
    local = not isinstance(path, ObjectPath)
    with open(path, "rb", buffering=1 << 20) if local else open_read(path) as f:
        for line in f:
            body = line.removeprefix(_BOM) if pos == 0 else line
            if body.strip():
                offsets.append(pos)
            pos += len(line)
    if not offsets:
        raise DatasetError(f"dataset file {path} is empty; it must hold one record per line")
    return offsets


def _parse_line(line: bytes, index: int, path: Location, pos: int) -> dict[str, Any] | RecordError:
    """Parse the line of record ``index`` (at byte ``pos``) or describe why it is malformed."""
    if pos == 0:
        line = line.removeprefix(_BOM)
    try:
        obj = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return RecordError(
            MALFORMED,
            f"record {index} ({path.name}, line at byte {pos}) is not valid JSON: {exc}; "
            "fix or remove that line",
        )
    if not isinstance(obj, dict):
        return _not_an_object(obj, index, path, f"line at byte {pos}")
    return obj


def _not_an_object(obj: Any, index: int, path: Location, where: str) -> RecordError:
    return RecordError(
        MALFORMED,
        f"record {index} ({path.name}, {where}) is a JSON {json_type_name(obj)}, not an object; "
        "each record must be one object with 'conversations'",
    )


def _stamp(path: Location) -> tuple[int, int]:
    """Size and mtime of a file; of a folder (save_to_disk), the total size of its files and
    the latest mtime, so rewriting a file in it counts as a change. Of an object, its size
    and a number made from its version (ETag) and modification time."""
    if isinstance(path, ObjectPath):
        found = path.stat()
        version = f"{found.version}@{found.st_mtime_ns}".encode()
        return found.st_size, int(hashlib.sha256(version).hexdigest()[:15], 16)
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        return st.st_size, st.st_mtime_ns
    size, mtime = 0, st.st_mtime_ns
    with os.scandir(path) as it:
        for entry in it:
            if entry.is_file():
                est = entry.stat()
                size += est.st_size
                mtime = max(mtime, est.st_mtime_ns)
    return size, mtime
