"""Parquet files and ``datasets.save_to_disk`` folders as dataset sources (needs pyarrow).

Rows are records, addressed by position like the lines of a JSONL file, so the work units
(records ``[start, stop)`` -> one shard), ``--part``, the Ray runner and resume work
unchanged. Each row becomes a dict of its columns (``batch.to_pylist()``), in any record
shape :mod:`mvprep.records` reads: e.g. ``messages`` + ``images``, ``conversations`` +
``images``, or ``conversations`` + ``image``.

Images: a Hugging Face ``datasets`` Image column is a struct ``{bytes: binary, path:
string}`` (or a list of them). Every binary value of a row becomes an
:class:`mvprep.records.ImageBytes`: a short label saying where it came from,
``<bytes:train.parquet[12].images[0]>`` (file or folder name, the row's position in it, the
column and list position), carrying the bytes. That label is the image's ``path`` in the
sample and what a reject's stored record shows. A struct whose ``bytes`` are null is read
from its ``path`` (relative to the Parquet file's folder, or to the save_to_disk folder).
Other values that JSON cannot hold (timestamps, decimals) become strings.

Memory stays bounded whatever the file size: opening reads only the Parquet footer (row
counts per row group) or walks the record batches of the memory-mapped Arrow files;
``read_range`` reads the row groups (Parquet, streamed page by page) or the memory-mapped
batches that hold its rows and turns at most :data:`BATCH_ROWS` rows at a time into dicts.
"""

from __future__ import annotations

import contextlib
import datetime
import decimal
import json
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mvprep.readers import DatasetError, DatasetFormat, DatasetSource, RawRecord
from mvprep.records import ImageBytes
from mvshards.storage import Location, ObjectPath, StorageError, open_read

BATCH_ROWS = 32
"""Rows turned into Python dicts at a time (images are often ~1 MB each)."""
STATE_FILE = "state.json"
"""The file that marks a ``datasets.save_to_disk`` folder (lists its Arrow files)."""
_READ_BUFFER = 1 << 20


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet  # noqa: F401 - binds pyarrow.parquet
    except ImportError:
        raise DatasetError(
            "reading Parquet/Arrow data needs pyarrow: pip install 'mvkit[parquet]'"
        ) from None
    return pyarrow


def plain_row(row: dict[str, Any], where: str) -> dict[str, Any]:
    """A row as ``to_pylist`` gives it -> a JSON-safe record (binary -> ImageBytes)."""
    return {key: _plain(value, f"{where}.{key}") for key, value in row.items()}


def _plain(value: Any, loc: str) -> Any:
    if value is None or isinstance(value, str | bool | int | float):
        return value
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key == "bytes" and isinstance(item, bytes):  # an Image struct: label the struct
                out[key] = ImageBytes(f"<bytes:{loc}>", item)
            else:
                out[key] = _plain(item, f"{loc}.{key}")
        return out
    if isinstance(value, list | tuple):
        return [_plain(item, f"{loc}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, bytes | bytearray):
        return ImageBytes(f"<bytes:{loc}>", bytes(value))
    if isinstance(value, datetime.date | datetime.time | datetime.timedelta | decimal.Decimal):
        return str(value)
    return str(value)


class ParquetSource(DatasetSource):
    """A Parquet file; ``offsets[g]`` is the first row of row group ``g``, ``[-1]`` the total."""

    format: DatasetFormat = "parquet"

    def __init__(self, path: Location) -> None:
        _pyarrow()
        self._open(path, _index_parquet)
        self.num_records = int(self.offsets[-1])

    def read_range(self, start: int, stop: int) -> Iterator[tuple[int, RawRecord]]:
        start, stop = self._check_range(start, stop)
        if start == stop:
            return
        pa = _pyarrow()
        groups = [
            g
            for g in range(len(self.offsets) - 1)
            if self.offsets[g] < stop and self.offsets[g + 1] > start
        ]
        with _parquet_input(self.path) as source:
            pf = pa.parquet.ParquetFile(source, pre_buffer=False, buffer_size=_READ_BUFFER)
            try:
                row = int(self.offsets[groups[0]])
                batches = pf.iter_batches(batch_size=BATCH_ROWS, row_groups=groups)
                yield from _rows(batches, row, start, stop, self.path.name)
            finally:
                pf.close()


class ArrowFolderSource(DatasetSource):
    """A ``datasets.save_to_disk`` folder: its Arrow files (``state.json`` order) as one
    sequence of rows; ``offsets[f]`` is the first row of file ``f``, ``[-1]`` the total.
    Image paths (structs without bytes) are relative to the folder itself."""

    format: DatasetFormat = "hf-disk"

    def __init__(self, path: Path) -> None:
        _pyarrow()
        self._open(path, _index_folder)
        self.root = path.absolute()
        self.files = _arrow_files(path)
        self.num_records = int(self.offsets[-1])

    def read_range(self, start: int, stop: int) -> Iterator[tuple[int, RawRecord]]:
        start, stop = self._check_range(start, stop)
        if start == stop:
            return
        pa = _pyarrow()
        for f, file in enumerate(self.files):
            first, end = int(self.offsets[f]), int(self.offsets[f + 1])
            if end <= start or first >= stop:
                continue
            with pa.memory_map(str(file)) as source:
                batches = _open_ipc(pa, source, file)
                yield from _rows(batches, first, start, stop, self.path.name)


def _rows(
    batches: Any, row: int, start: int, stop: int, name: str
) -> Iterator[tuple[int, RawRecord]]:
    """Yield ``(index, record)`` for rows ``[start, stop)`` of ``batches`` (the first batch's
    first row being ``row``), converting at most BATCH_ROWS rows at a time."""
    for batch in batches:
        n = batch.num_rows
        lo, hi = max(start - row, 0), min(stop - row, n)
        for chunk in range(lo, hi, BATCH_ROWS):
            size = min(BATCH_ROWS, hi - chunk)
            for k, item in enumerate(batch.slice(chunk, size).to_pylist()):
                index = row + chunk + k
                yield index, plain_row(item, f"{name}[{index}]")
        row += n
        if row >= stop:
            return


@contextlib.contextmanager
def _parquet_input(path: Location) -> Iterator[Any]:
    """What pyarrow reads: the path of a local file (its own fast I/O), else a seekable
    reader over the object (:func:`mvshards.storage.open_read`)."""
    if isinstance(path, ObjectPath):
        with open_read(path) as f:
            yield f
    else:
        yield str(path)


def _index_parquet(path: Location) -> array:
    pa = _pyarrow()
    try:
        with _parquet_input(path) as source:
            meta = pa.parquet.read_metadata(source)
    except StorageError:
        raise
    except (OSError, pa.ArrowException) as exc:
        raise DatasetError(f"{path} is not a readable Parquet file: {exc}") from None
    offsets = array("q", [0])
    for g in range(meta.num_row_groups):
        offsets.append(offsets[-1] + meta.row_group(g).num_rows)
    if offsets[-1] == 0:
        raise DatasetError(f"dataset file {path} has no rows; it must hold records")
    return offsets


def _arrow_files(folder: Path) -> list[Path]:
    try:
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        names = [item["filename"] for item in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DatasetError(
            f"{folder / STATE_FILE} cannot be read as a datasets.save_to_disk state ({exc}); "
            "save the dataset again with Dataset.save_to_disk"
        ) from None
    files = [folder / name for name in names]
    for file in files:
        if not file.is_file():
            raise DatasetError(f"{folder}: {file.name} (listed in {STATE_FILE}) is missing")
    return files


def _open_ipc(pa: Any, source: Any, file: Path) -> Any:
    try:
        return pa.ipc.open_stream(source)  # what datasets writes
    except pa.ArrowInvalid:
        try:
            source.seek(0)
            reader = pa.ipc.open_file(source)
        except pa.ArrowInvalid as exc:
            raise DatasetError(f"{file} is not an Arrow file: {exc}") from None
        return (reader.get_batch(i) for i in range(reader.num_record_batches))


def _index_folder(path: Path) -> array:
    pa = _pyarrow()
    offsets = array("q", [0])
    for file in _arrow_files(path):
        rows = 0
        with pa.memory_map(str(file)) as source:
            for batch in _open_ipc(pa, source, file):
                rows += batch.num_rows
        offsets.append(offsets[-1] + rows)
    if offsets[-1] == 0:
        raise DatasetError(f"dataset folder {path} has no rows; it must hold records")
    return offsets
