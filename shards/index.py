"""The index beside the shards: what the trainer plans from without opening a tar.

Output folder layout::

    OUT/NNNNNN.tar          shards, NNNNNN = unit number
    OUT/index/NNNNNN.json   one ShardEntry per finished shard (written after its rename)
    OUT/build.json          build parameters, written when a build starts
    OUT/manifest.json       params + totals + shard list, written when the build is complete
    OUT/rejects.jsonl       every rejected record in record order, written at the end

Every file is written atomically (temporary file, fsync, rename), so a reader sees either
nothing or a whole file. Shard entries are the source of truth for samples and rejects; the
manifest is their summary plus the build parameters.

OUT may be an object-store URL (``s3://bucket/prefix``, see :mod:`mvshards.storage`): every
file is then one object written whole (one PUT), and since a store has no rename, the index
entry is the commit point of its shard: a shard object without an entry is unfinished, and
every reader (the trainer, ``verify``, ``merge``, a resumed build) ignores it.
"""

from __future__ import annotations

import json
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

import mvshards
from mvshards.image_table import ImageColumns, concat_columns, read_image_table, sample_slice_costs
from mvshards.storage import Location, ObjectPath, list_sizes, location, size_of
from mvshards.tario import write_atomic

INDEX_DIR = "index"
BUILD_FILE = "build.json"
MANIFEST_FILE = "manifest.json"
REJECTS_FILE = "rejects.jsonl"
MANIFEST_VERSION = 1
UNIT_DIGITS = 6

_OPTION_NAMES = {"image_format": "--format", "data_path": "the input file"}
"""How a build parameter is named in messages when it is not simply ``--key-with-dashes``."""


class DatasetIndexError(Exception):
    """Base of the index errors: the message names the folder or file and the fix."""


class IndexMismatchError(DatasetIndexError):
    """An output folder holds a build made with other parameters."""


class IndexMissingError(DatasetIndexError):
    """An output folder has no finished, consistent index."""


class ShardFilesError(DatasetIndexError):
    """A shard file is missing or its size is not the one its index entry records."""


class CorruptEntryWarning(UserWarning):
    """An index entry file exists but cannot be read; its unit is treated as not finished."""


def shard_name(unit: int) -> str:
    """File name of unit ``unit``'s shard: ``000003.tar``."""
    return f"{unit:0{UNIT_DIGITS}d}.tar"


def entry_path(out: Location | str, unit: int) -> Location:
    """``OUT/index/NNNNNN.json``."""
    return location(out) / INDEX_DIR / f"{unit:0{UNIT_DIGITS}d}.json"


@dataclass
class ShardEntry:
    """The index entry of one finished shard: its file, its samples and its rejects."""

    unit: int
    shard: str
    """File name of the shard, relative to OUT."""
    record_range: list[int]
    """``[start, stop)`` input record indices this unit covered."""
    sha256: str
    num_bytes: int
    num_samples: int
    samples: list[list[Any]] = field(default_factory=list)
    """One row per sample in shard order: ``[key, num_tokens, num_patches, num_images]``."""
    rejects: list[dict[str, Any]] = field(default_factory=list)
    """``{"index", "id", "reason", "error", "record"}`` per rejected record of the unit."""
    stats: dict[str, Any] = field(default_factory=dict)
    """Per-shard numbers (images, image bytes, seconds, CPU seconds...) and the per-image
    table (:mod:`mvshards.image_table`)."""
    channels: list[str | None] | None = None
    """Per sample, parallel to :attr:`samples`: its channel (None: it has none). None (and
    absent from the JSON, so such entries are byte-identical to older ones and older readers
    ignore the key) when no sample of the shard has a channel."""
    sample_offsets: list[int] | None = None
    """Where the samples lie in the tar, one more than samples: sample ``i`` is bytes
    ``[sample_offsets[i], sample_offsets[i + 1])``, its first member's header to its last
    member's padded data end (:attr:`mvshards.tario.ShardFileInfo.sample_offsets`), so a
    reader fetches it with one ranged read and no header walk. None (and absent from the
    JSON) in entries of an older mvprep: readers then walk the tar's headers."""

    def image_columns(self) -> ImageColumns | None:
        """The entry's per-image table; None when it has none (an older mvprep)."""
        return read_image_table(self.stats, sum(row[3] for row in self.samples))

    def to_json(self) -> dict[str, Any]:
        obj = asdict(self)
        for key in ("channels", "sample_offsets"):
            if obj[key] is None:
                del obj[key]
        return obj

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ShardEntry:
        """Parse and type-check an entry; raises ValueError/KeyError/TypeError when malformed."""
        start, stop = (int(v) for v in obj["record_range"])
        samples = [[str(k), int(t), int(p), int(n)] for k, t, p, n in obj["samples"]]
        rejects = list(obj["rejects"])
        for reject in rejects:
            if not isinstance(reject, dict) or not isinstance(reject.get("index"), int):
                raise ValueError(f"malformed reject {reject!r}")
        entry = cls(
            unit=int(obj["unit"]),
            shard=str(obj["shard"]),
            record_range=[start, stop],
            sha256=str(obj["sha256"]),
            num_bytes=int(obj["num_bytes"]),
            num_samples=int(obj["num_samples"]),
            samples=samples,
            rejects=rejects,
            stats=dict(obj.get("stats") or {}),
            channels=_channels(obj.get("channels"), len(samples)),
            sample_offsets=_offsets(obj.get("sample_offsets"), len(samples)),
        )
        if entry.num_samples != len(samples):
            raise ValueError(f"num_samples {entry.num_samples} but {len(samples)} sample rows")
        return entry


def _channels(value: Any, num_samples: int) -> list[str | None] | None:
    """An entry's ``channels`` checked: None, or one string-or-None per sample row."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != num_samples:
        raise ValueError(f"channels is not a list of {num_samples} entries, one per sample")
    if not all(c is None or isinstance(c, str) for c in value):
        raise ValueError("channels holds something other than strings and nulls")
    return list(value)


def _offsets(value: Any, num_samples: int) -> list[int] | None:
    """An entry's ``sample_offsets`` checked for shape: None, or ``num_samples + 1`` integers
    (whether they match the tar is ``mvprep verify``'s question)."""
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != num_samples + 1:
        raise ValueError(f"sample_offsets is not a list of {num_samples + 1} offsets")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value):
        raise ValueError("sample_offsets holds something other than non-negative integers")
    return list(value)


def _dumps(obj: Any, indent: int | None = None) -> bytes:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, indent=indent).encode("utf-8")


def write_entry(out: Location | str, entry: ShardEntry) -> None:
    """Atomically write ``OUT/index/NNNNNN.json`` (call only after the shard is renamed)."""
    path = entry_path(out, entry.unit)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, _dumps(entry.to_json()))


def read_entry(out: Location | str, unit: int) -> ShardEntry | None:
    """The entry of ``unit``; None when missing, or (with a warning) when unreadable."""
    path = entry_path(out, unit)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        entry = ShardEntry.from_json(json.loads(raw))
        if entry.unit != unit:
            raise ValueError(f"it says unit {entry.unit}")
    except (ValueError, KeyError, TypeError) as exc:
        warnings.warn(
            f"{path}: unreadable index entry ({type(exc).__name__}: {exc}); "
            "its unit counts as not finished and will be rebuilt",
            CorruptEntryWarning,
            stacklevel=2,
        )
        return None
    return entry


def _normalise(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` as it reads back from JSON (tuples become lists, keys strings)."""
    return json.loads(json.dumps(params, sort_keys=True))


def write_build_params(out: Location | str, params: dict[str, Any]) -> None:
    """Atomically write ``OUT/build.json``: only options that change the output bytes."""
    write_atomic(location(out) / BUILD_FILE, _dumps(_normalise(params), indent=2))


def read_build_params(out: Location | str) -> dict[str, Any] | None:
    """``OUT/build.json``, or None when the folder has none."""
    path = location(out) / BUILD_FILE
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise IndexMismatchError(
            f"{path} is unreadable ({exc}): use a new --out, or delete {path} to rebuild there"
        ) from exc


def _option(key: str) -> str:
    return _OPTION_NAMES.get(key, "--" + key.replace("_", "-"))


def check_build_params(out: Location | str, params: dict[str, Any]) -> bool:
    """Raise IndexMismatchError when OUT was built with other ``params``.

    Returns True when OUT already has ``build.json`` with equal parameters, False when it
    has none (a new build).
    """
    existing = read_build_params(out)
    if existing is None:
        return False
    wanted = _normalise(params)
    diffs = [
        f"{_option(key)} {json.dumps(existing.get(key, '(unset)'))}, this run asks for "
        f"{json.dumps(wanted.get(key, '(unset)'))}"
        for key in sorted(set(existing) | set(wanted))
        if existing.get(key, "(unset)") != wanted.get(key, "(unset)")
    ]
    if diffs:
        raise IndexMismatchError(
            f"{out} was built with " + "; ".join(diffs) + ": use a new --out or the same options"
        )
    return True


def dataset_totals(entries: list[ShardEntry]) -> dict[str, Any]:
    """Totals over all entries: records, samples, rejects (and by reason), bytes, counts."""
    by_reason = Counter(str(r.get("reason")) for e in entries for r in e.rejects)
    return {
        "records": sum(e.record_range[1] - e.record_range[0] for e in entries),
        "samples": sum(e.num_samples for e in entries),
        "rejects": sum(len(e.rejects) for e in entries),
        "rejects_by_reason": dict(sorted(by_reason.items())),
        "shards": len(entries),
        "bytes": sum(e.num_bytes for e in entries),
        "images": sum(row[3] for e in entries for row in e.samples),
        "patches": sum(row[2] for e in entries for row in e.samples),
        "tokens": sum(row[1] for e in entries for row in e.samples),
        "max_images_per_sample": max((row[3] for e in entries for row in e.samples), default=0),
    }


def write_manifest(
    out: Location | str, params: dict[str, Any], entries: list[ShardEntry], extra: dict[str, Any]
) -> dict[str, Any]:
    """Atomically write ``OUT/manifest.json`` for a complete build; return what was written.

    ``extra`` holds free-form run facts (wall time, host...) and is kept under ``"extra"``.
    """
    entries = sorted(entries, key=lambda e: e.unit)
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "tool": "mvkit",
        "tool_version": mvshards.__version__,
        "params": _normalise(params),
        "totals": dataset_totals(entries),
        "shards": [
            {
                "unit": e.unit,
                "shard": e.shard,
                "sha256": e.sha256,
                "num_bytes": e.num_bytes,
                "num_samples": e.num_samples,
                "num_rejects": len(e.rejects),
                "record_range": list(e.record_range),
            }
            for e in entries
        ],
        "extra": _normalise(extra),
    }
    write_atomic(location(out) / MANIFEST_FILE, _dumps(manifest, indent=1))
    return manifest


def read_manifest(out: Location | str) -> dict[str, Any]:
    """``OUT/manifest.json``; IndexMissingError when the build did not finish."""
    path = location(out) / MANIFEST_FILE
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise IndexMissingError(
            f"{out} has no {MANIFEST_FILE}: the build did not finish; "
            "re-run mvprep build to complete it"
        ) from None
    except ValueError as exc:
        raise IndexMissingError(
            f"{path} is unreadable ({exc}): re-run mvprep build to rewrite it"
        ) from exc


def write_rejects(out: Location | str, entries: list[ShardEntry]) -> int:
    """Atomically write ``OUT/rejects.jsonl`` in record order; return the number of lines."""
    rejects = sorted((r for e in entries for r in e.rejects), key=lambda r: r["index"])
    lines = [json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rejects]
    write_atomic(location(out) / REJECTS_FILE, "".join(lines).encode("utf-8"))
    return len(lines)


@dataclass(frozen=True, eq=False)
class SampleRanges:
    """Where the samples of one shard lie in its tar (its entry's
    :attr:`ShardEntry.sample_offsets`): sample ``keys[i]`` is bytes
    ``[offsets[i], offsets[i + 1])``."""

    keys: np.ndarray
    """The shard's sample keys in shard order (a view of :attr:`DatasetIndex.keys`)."""
    offsets: np.ndarray
    """int64, one more than keys."""

    def __len__(self) -> int:
        return len(self.keys)

    def span(self, key: str) -> tuple[int, int] | None:
        """``(start, stop)`` of sample ``key``; None when the shard has no such sample."""
        i = int(np.searchsorted(self.keys, key))  # keys increase within a shard
        if not (i < len(self.keys) and self.keys[i] == key):
            found = np.flatnonzero(self.keys == key)  # an index not in key order
            if not len(found):
                return None
            i = int(found[0])
        return int(self.offsets[i]), int(self.offsets[i + 1])


@dataclass(frozen=True)
class ShardInfo:
    """One shard as the manifest lists it."""

    unit: int
    path: Location
    """The shard: a local ``Path`` or an :class:`~mvshards.storage.ObjectPath` (read it with
    :func:`mvshards.storage.open_read` / :func:`~mvshards.storage.read_range`)."""
    sha256: str
    num_bytes: int
    num_samples: int
    num_rejects: int
    record_range: tuple[int, int]
    sample_ranges: SampleRanges | None = field(default=None, compare=False, repr=False)
    """Where each sample lies in the tar; None for an entry of an older mvprep (read the
    tar's headers instead)."""


@dataclass
class DatasetIndex:
    """A finished dataset's index, loaded without opening a tar.

    Samples are in dataset order (shard by shard, key order within a shard) as parallel
    arrays: ``keys[i]`` lives in ``shards[shard_ids[i]]`` and has ``num_tokens[i]`` tokens,
    ``num_patches[i]`` patches and ``num_images[i]`` images. Images, in the same order, have
    the per-image table's columns when every entry has one.
    """

    out: Location
    params: dict[str, Any]
    manifest: dict[str, Any]
    shards: list[ShardInfo]
    keys: np.ndarray
    """Sample keys, numpy unicode array."""
    shard_ids: np.ndarray
    """int32 position in ``shards`` of each sample."""
    num_tokens: np.ndarray
    num_patches: np.ndarray
    num_images: np.ndarray
    image_columns: ImageColumns | None = None
    """The per-image table over all images; None when an entry lacks it."""
    missing_image_table: list[str] = field(default_factory=list)
    """Entry files without a usable per-image table (built by an older mvprep)."""
    channels: np.ndarray | None = None
    """Per sample its channel (numpy unicode array, ``""``: none; a channel is never empty);
    None when no sample has one (entries without ``channels``, e.g. older builds)."""

    def __len__(self) -> int:
        return len(self.keys)

    def sample_channels(self) -> np.ndarray:
        """:attr:`channels`, or all ``""`` (no channel) when the index has none."""
        if self.channels is None:
            return np.full(len(self.keys), "", dtype=str)
        return self.channels

    def channel_names(self) -> list[str]:
        """The distinct channels of the samples, sorted (empty when none has one)."""
        if self.channels is None:
            return []
        return sorted(str(c) for c in np.unique(self.channels) if c)

    def slice_costs(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Per sample ``(slices, max_patches_per_slice)`` from the per-image table (see
        :func:`mvshards.image_table.sample_slice_costs`); None without the table."""
        if self.image_columns is None:
            return None
        return sample_slice_costs(self.num_images, self.image_columns)

    @property
    def totals(self) -> dict[str, Any]:
        return self.manifest["totals"]

    def shard_paths(self) -> list[Location]:
        return [s.path for s in self.shards]

    def check_shard_files(self) -> None:
        """Raise :class:`ShardFilesError` (one line: the first bad shard, how many are bad,
        the fix) when a shard file is missing or its size differs from its entry's: a cheap
        stat of each file (one listing in an object store), before anything reads them
        (``mvprep verify`` checks contents)."""
        bad: list[str] = []
        listed = list_sizes(self.out) if isinstance(self.out, ObjectPath) else None
        for shard in self.shards:
            if listed is not None and shard.path.parent == self.out:
                size = listed.get(shard.path.name)
            else:
                size = size_of(shard.path)
            if size is None:
                bad.append(f"{shard.path} is missing")
                continue
            if size != shard.num_bytes:
                bad.append(f"{shard.path} is {size} bytes, its index entry says {shard.num_bytes}")
        if bad:
            more = f" (and {len(bad) - 1} more shards)" if len(bad) > 1 else ""
            raise ShardFilesError(
                f"{bad[0]}{more}: the shards changed since the build; run `mvprep verify "
                f"{self.out}` and re-run the build to rewrite what it reports"
            )

    def sample_rows(self) -> list[list[Any]]:
        """``[key, num_tokens, num_patches, num_images]`` per sample, in dataset order."""
        return [
            [str(k), int(t), int(p), int(n)]
            for k, t, p, n in zip(
                self.keys, self.num_tokens, self.num_patches, self.num_images, strict=True
            )
        ]


def _listed_entry(out: Location, item: dict[str, Any]) -> ShardEntry:
    """The entry of a shard the manifest lists; IndexMissingError when missing or stale."""
    unit = int(item["unit"])
    entry = read_entry(out, unit)
    if entry is None:
        raise IndexMissingError(
            f"{entry_path(out, unit)} is missing or unreadable but {MANIFEST_FILE} lists "
            f"{item['shard']}: re-run mvprep build to complete it"
        )
    if entry.sha256 != item["sha256"] or entry.num_samples != item["num_samples"]:
        raise IndexMissingError(
            f"{entry_path(out, unit)} does not match {MANIFEST_FILE} (sha256 or sample "
            "count differ): the folder was partly rebuilt; re-run mvprep build"
        )
    return entry


def load_index(out: Location | str) -> DatasetIndex:
    """Load ``manifest.json`` and every shard entry of a finished build; opens no tar.

    Raises IndexMissingError when the build did not finish or an entry is missing or does
    not match the manifest.
    """
    out = location(out)
    manifest = read_manifest(out)
    shards: list[ShardInfo] = []
    keys: list[str] = []
    shard_ids: list[int] = []
    rows: list[tuple[int, int, int]] = []
    tables: list[ImageColumns] = []
    missing: list[str] = []
    channels: list[str] = []
    any_channel = False
    offsets: list[list[int] | None] = []
    for position, item in enumerate(manifest["shards"]):
        entry = _listed_entry(out, item)
        shards.append(
            ShardInfo(
                unit=entry.unit,
                path=out / entry.shard,
                sha256=entry.sha256,
                num_bytes=entry.num_bytes,
                num_samples=entry.num_samples,
                num_rejects=len(entry.rejects),
                record_range=(entry.record_range[0], entry.record_range[1]),
            )
        )
        offsets.append(entry.sample_offsets)
        for key, tokens, patches, images in entry.samples:
            keys.append(key)
            shard_ids.append(position)
            rows.append((tokens, patches, images))
        if entry.channels is None:
            channels += [""] * entry.num_samples
        else:
            any_channel = any_channel or any(entry.channels)
            channels += [c or "" for c in entry.channels]
        columns = entry.image_columns()
        if columns is None:
            missing.append(str(entry_path(out, entry.unit)))
        else:
            tables.append(columns)
    table = np.array(rows, dtype=np.int64).reshape(-1, 3)
    key_array = np.array(keys, dtype=str)
    shards = _with_ranges(shards, offsets, key_array)
    return DatasetIndex(
        out=out,
        params=manifest["params"],
        manifest=manifest,
        shards=shards,
        keys=key_array,
        shard_ids=np.array(shard_ids, dtype=np.int32),
        num_tokens=table[:, 0].copy(),
        num_patches=table[:, 1].copy(),
        num_images=table[:, 2].copy(),
        image_columns=None if missing else concat_columns(tables),
        missing_image_table=missing,
        channels=np.array(channels, dtype=str) if any_channel else None,
    )


def _with_ranges(
    shards: list[ShardInfo], offsets: list[list[int] | None], keys: np.ndarray
) -> list[ShardInfo]:
    """``shards`` with their :class:`SampleRanges` (those whose entry records offsets);
    ``keys``: every sample's key, shard by shard."""
    out: list[ShardInfo] = []
    start = 0
    for shard, found in zip(shards, offsets, strict=True):
        stop = start + shard.num_samples
        if found is not None:
            ranges = SampleRanges(keys[start:stop], np.array(found, dtype=np.int64))
            shard = replace(shard, sample_ranges=ranges)
        out.append(shard)
        start = stop
    return out
