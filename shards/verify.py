"""``mvprep verify``: re-hash and re-read every shard of a build against its index.

Checks, each failure a one-line problem naming the shard (and key):

* the manifest, every index entry and ``rejects.jsonl`` exist and agree with each other;
* every shard's sha256 and size match its entry (one streaming pass per shard);
* the shard's samples, in order, are the entry's sample rows: same count, same keys, and
  each sample's JSON parses (:meth:`SampleMeta.from_json`) and gives the same index row;
* every member the JSON names exists, and no other member does;
* each sample's byte range the entry records (``sample_offsets``, when it has them) is where
  the sample lies: from its first member's header to its last member's padded data end;
* stored images have exactly ``source_size`` / ``refine_size`` (PIL reads the headers only;
  skipped, with a warning, when Pillow is not installed);
* every input record index in ``[0, records)`` is in exactly one place: a sample key or a
  reject, inside its unit's record range.

OUT may be an object-store URL (:mod:`mvshards.storage`): shards are streamed with ranged
GETs. A ``.tar`` without an index entry (an unfinished upload's leftover) is only a warning.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from mvshards.index import (
    MANIFEST_FILE,
    REJECTS_FILE,
    DatasetIndexError,
    ShardEntry,
    dataset_totals,
    entry_path,
    read_entry,
    read_manifest,
)
from mvshards.schema import SampleMeta
from mvshards.storage import Location, location, open_read
from mvshards.tario import TMP_SUFFIX, group_samples, split_member_name

try:  # soft: only the image-size check needs it
    from PIL import Image
except ImportError:  # pragma: no cover - Pillow is a dependency of mvkit
    Image = None  # type: ignore[assignment]

_TOTALS_CHECKED = ("records", "samples", "rejects", "shards", "bytes", "images")


@dataclass
class VerifyReport:
    """The outcome of :func:`verify_dataset`: problems (each names its shard/key) and counts."""

    out: Location
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    shards: int = 0
    samples: int = 0
    images: int = 0
    rejects: int = 0
    records: int = 0
    bytes_hashed: int = 0
    image_sizes_checked: bool = True

    @property
    def ok(self) -> bool:
        return not self.problems

    def format_report(self, max_problems: int = 50) -> str:
        """A human summary: one line of counts, then warnings and problems."""
        head = (
            f"{self.out}: {self.shards} shards, {self.samples} samples, {self.images} images, "
            f"{self.rejects} rejects, {self.records} records, "
            f"{self.bytes_hashed / 1e9:.3f} GB re-hashed"
        )
        lines = [("OK " if self.ok else "FAILED ") + head]
        lines += [f"  warning: {w}" for w in self.warnings]
        if self.problems:
            lines.append(f"  {len(self.problems)} problem(s):")
            lines += [f"  - {p}" for p in self.problems[:max_problems]]
            if len(self.problems) > max_problems:
                lines.append(f"  ... and {len(self.problems) - max_problems} more")
        return "\n".join(lines)


class _HashingReader:
    """A read-only file wrapper that hashes and counts every byte read through it."""

    def __init__(self, raw: BinaryIO) -> None:
        self.raw = raw
        self.digest = hashlib.sha256()
        self.num_bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.digest.update(data)
        self.num_bytes += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass


def _stream_members(
    tar: tarfile.TarFile, extents: dict[str, tuple[int, int]]
) -> Iterator[tuple[str, bytes]]:
    """Every regular member as ``(name, bytes)``; ``extents`` gets, per sample key, the bytes
    from its first member's header to its last member's padded data end."""
    for info in tar:
        if info.isfile():
            split = split_member_name(info.name)
            if split is not None:
                end = info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                start = extents.get(split[0], (info.offset, 0))[0]
                extents[split[0]] = (start, end)
            f = tar.extractfile(info)
            assert f is not None
            yield info.name, f.read()


def _check_range(
    where: str, seen: int, key: str, found: tuple[int, int], entry: ShardEntry
) -> list[str]:
    """The problem with sample ``seen``'s recorded byte range (it lies at ``found``), if any."""
    offsets = entry.sample_offsets
    if offsets is None or seen + 1 >= len(offsets):
        return []
    start, stop = offsets[seen], offsets[seen + 1]
    if (start, stop) == found:
        return []
    return [
        f"{where}: sample {key} lies at bytes [{found[0]}, {found[1]}) of the tar, its index "
        f"entry records [{start}, {stop})"
    ]


def _image_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as im:
        return im.size


def _check_sample(
    where: str, key: str, members: dict[str, bytes], row: list[Any] | None
) -> tuple[list[str], int]:
    """Problems of one sample, and how many of its images are stored."""
    problems: list[str] = []
    if "json" not in members:
        return [f"{where}: sample {key} has no {key}.json member"], 0
    try:
        obj = json.loads(members["json"])
        meta = SampleMeta.from_json(obj)
    except Exception as exc:  # any malformed JSON is a problem to report, never a crash
        return [f"{where}: {key}.json does not parse ({type(exc).__name__}: {exc})"], 0
    if meta.key != key:
        problems.append(f"{where}: {key}.json says key {meta.key!r}")
    for name in ("num_images", "num_patches", "num_image_tokens", "num_tokens"):
        derived = len(meta.images) if name == "num_images" else getattr(meta, name)
        if obj.get(name) != derived:
            problems.append(f"{where}: {key}.json {name} {obj.get(name)} != {derived} summed")
    if row is not None and meta.index_row() != list(row):
        problems.append(f"{where}: {key} index row {list(row)} != {meta.index_row()} in its JSON")
    expected = {"json"}
    images = 0
    for i, image in enumerate(meta.images):
        wanted = [(image.source_member, image.layout.source_size, "source")]
        if image.refine_member is not None or image.layout.refine_size is not None:
            wanted.append((image.refine_member, image.layout.refine_size, "refine"))
        for member, size, what in wanted:
            prefix = f"{key}."
            if member is None or size is None or not member.startswith(prefix):
                problems.append(f"{where}: {key} image {i} has bad {what} member {member!r}")
                continue
            ext = member[len(prefix) :]
            expected.add(ext)
            if ext not in members:
                problems.append(f"{where}: {key} image {i}: member {member} is missing")
                continue
            images += what == "source"
            if Image is None:
                continue
            try:
                stored = _image_size(members[ext])
            except Exception as exc:
                problems.append(f"{where}: {member} is not a readable image ({exc})")
                continue
            if stored != tuple(size):
                problems.append(
                    f"{where}: {member} is {stored[0]}x{stored[1]}, its {what}_size is "
                    f"{size[0]}x{size[1]}"
                )
    for ext in sorted(set(members) - expected):
        problems.append(f"{where}: member {key}.{ext} is not named by {key}.json")
    return problems, images


def check_shard(out: Location | str, entry: ShardEntry) -> tuple[list[str], int, int]:
    """Re-hash and re-read one shard against its entry: ``(problems, images, bytes read)``."""
    path = location(out) / entry.shard
    where = entry.shard
    if not path.is_file():
        return [f"{where}: shard file is missing"], 0, 0
    problems: list[str] = []
    images = 0
    seen = 0
    extents: dict[str, tuple[int, int]] = {}
    with open_read(path) as raw:
        reader = _HashingReader(raw)
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:  # type: ignore[call-overload]
                for key, members in group_samples(_stream_members(tar, extents)):
                    row = entry.samples[seen] if seen < len(entry.samples) else None
                    if row is not None and row[0] != key:
                        problems.append(f"{where}: sample {seen} is {key}, the index says {row[0]}")
                        row = None
                    if row is not None:
                        problems += _check_range(where, seen, key, extents[key], entry)
                    sample_problems, sample_images = _check_sample(where, key, members, row)
                    problems += sample_problems
                    images += sample_images
                    seen += 1
        except (tarfile.TarError, EOFError, ValueError, OSError) as exc:
            problems.append(f"{where}: unreadable tar after {seen} samples ({exc})")
        reader.drain()
    if reader.digest.hexdigest() != entry.sha256:
        problems.insert(0, f"{where}: sha256 differs from the index (the file changed)")
    if reader.num_bytes != entry.num_bytes:
        problems.insert(0, f"{where}: {reader.num_bytes} bytes, the index says {entry.num_bytes}")
    if seen != entry.num_samples:
        problems.append(f"{where}: {seen} samples in the tar, the index says {entry.num_samples}")
    return problems, images, reader.num_bytes


def _check_records(report: VerifyReport, entries: list[ShardEntry], records: int) -> None:
    """Every record index in exactly one place, and inside its unit's range."""
    count = bytearray(records)
    for entry in entries:
        start, stop = entry.record_range
        places = [(row[0], f"sample {row[0]}") for row in entry.samples]
        places += [(r["index"], f"reject of record {r['index']}") for r in entry.rejects]
        for raw_index, what in places:
            try:
                index = int(raw_index)
            except (TypeError, ValueError):
                report.problems.append(f"{entry.shard}: {what} does not name a record index")
                continue
            if not start <= index < stop:
                report.problems.append(
                    f"{entry.shard}: {what} is outside the unit's records [{start}, {stop})"
                )
            if 0 <= index < records:
                count[index] = min(count[index] + 1, 255)
    missing = [i for i, c in enumerate(count) if c == 0]
    doubled = [i for i, c in enumerate(count) if c > 1]
    for indices, what in ((missing, "in no shard and no reject"), (doubled, "in several places")):
        if indices:
            shown = ", ".join(map(str, indices[:10]))
            more = f" ({len(indices)} in all)" if len(indices) > 10 else ""
            report.problems.append(f"records {shown}{more} are {what}")


def _check_rejects_file(report: VerifyReport, out: Location, entries: list[ShardEntry]) -> None:
    path = out / REJECTS_FILE
    if not path.is_file():
        report.problems.append(f"{REJECTS_FILE} is missing: re-run mvprep build to write it")
        return
    try:
        lines = [json.loads(line) for line in path.read_text("utf-8").splitlines() if line]
        listed = [int(r["index"]) for r in lines]
    except (ValueError, KeyError, TypeError) as exc:
        report.problems.append(f"{REJECTS_FILE} does not parse ({exc})")
        return
    expected = sorted(int(r["index"]) for e in entries for r in e.rejects)
    if listed != expected:
        report.problems.append(
            f"{REJECTS_FILE} lists {len(listed)} rejects, the index entries {len(expected)} "
            "(or other records): re-run mvprep build to rewrite it"
        )


def verify_dataset(out: Location | str) -> VerifyReport:
    """Check a finished build in ``out`` completely; never raises on a bad dataset (an
    unreachable store raises :class:`mvshards.storage.StorageError`)."""
    out = location(out)
    report = VerifyReport(out=out, image_sizes_checked=Image is not None)
    if Image is None:
        report.warnings.append("Pillow is not installed: image sizes were not checked")
    try:
        manifest = read_manifest(out)
        listed = list(manifest["shards"])
        records = int(manifest["totals"]["records"])
    except (DatasetIndexError, KeyError, TypeError, ValueError) as exc:
        report.problems.append(f"{MANIFEST_FILE}: {exc}")
        return report
    report.records = records
    entries: list[ShardEntry] = []
    for item in listed:
        unit = int(item["unit"])
        entry = read_entry(out, unit)
        if entry is None:
            report.problems.append(f"{item['shard']}: index entry {entry_path(out, unit)} missing")
            continue
        if (entry.sha256, entry.num_samples) != (item["sha256"], item["num_samples"]):
            report.problems.append(f"{item['shard']}: index entry and {MANIFEST_FILE} disagree")
        entries.append(entry)
    for entry in entries:
        problems, images, num_bytes = check_shard(out, entry)
        report.problems += problems
        report.shards += 1
        report.samples += entry.num_samples
        report.images += images
        report.rejects += len(entry.rejects)
        report.bytes_hashed += num_bytes
    if len(entries) == len(listed):
        totals = dataset_totals(entries)
        for name in _TOTALS_CHECKED:
            if totals[name] != manifest["totals"].get(name):
                report.problems.append(
                    f"{MANIFEST_FILE}: totals.{name} is {manifest['totals'].get(name)}, "
                    f"the entries sum to {totals[name]}"
                )
    _check_records(report, entries, records)
    _check_rejects_file(report, out, entries)
    names = {item["shard"] for item in listed}
    for path in sorted(out.glob("*.tar")):
        if path.name not in names:
            report.warnings.append(
                f"{path.name} is not in {MANIFEST_FILE} (left from another run, or an "
                "unfinished upload: ignored)"
            )
    for path in sorted(out.glob("*" + TMP_SUFFIX)):
        report.warnings.append(f"{path.name} is an unfinished temporary file")
    return report
