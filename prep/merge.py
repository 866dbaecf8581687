"""``mvprep merge OUT``: after all ``--part i/n`` builds, write the dataset files.

Merging moves no data: every part already wrote its shards and index entries into OUT.
``merge`` checks that every unit of the plan is finished (entry present, record range and
shard size matching; ``verify_hashes`` also re-hashes every shard), then writes
``rejects.jsonl``, ``manifest.json`` and the dataset card with
:func:`mvprep.build.finish_dataset`, the same function a whole build ends with, so the result
is byte-identical to a one-machine build. An incomplete set is refused with the missing
parts and shards named. Running it again rewrites the same bytes (idempotent).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mvprep.build import Listing, finish_dataset, unit_is_finished
from mvprep.inputs import open_inputs
from mvprep.partition import part_of, read_markers
from mvprep.readers import DatasetError
from mvprep.unit import UnitSpec, plan_units
from mvshards.index import (
    DatasetIndexError,
    IndexMissingError,
    ShardEntry,
    read_build_params,
    read_entry,
    shard_name,
)
from mvshards.storage import Location, location

_LISTED = 10
"""Missing shards named in the message (the count is always given)."""


class MergeIncompleteError(DatasetIndexError):
    """Some units are not finished; the message names the parts and shards to (re)run."""


@dataclass
class MergeResult:
    """What merge wrote: the manifest and the entries it summarises."""

    out: Location
    manifest: dict[str, Any]
    entries: list[ShardEntry]


def merge(out: Location | str, verify_hashes: bool = False) -> MergeResult:
    """Write the dataset files of OUT once every unit is finished; see the module docstring."""
    out = location(out)
    params = read_build_params(out)
    if params is None:
        raise IndexMissingError(
            f"{out} has no build.json: no build ran there; run mvprep build DATA --out {out} "
            "--part i/n for every part first"
        )
    markers = read_markers(out)
    num_records = _num_records(out, params, markers)
    specs = plan_units(num_records, int(params["samples_per_shard"]))
    entries: list[ShardEntry] = []
    missing: list[int] = []
    listing = Listing(out)
    for spec in specs:
        if verify_hashes:
            entry = unit_is_finished(out, spec, listing)
        else:
            entry = _looks_finished(out, spec, listing)
        if entry is None:
            missing.append(spec.unit)
        else:
            entries.append(entry)
    if missing:
        raise MergeIncompleteError(_describe_missing(out, missing, len(specs), markers))
    manifest = finish_dataset(out, params, entries, str(params["image_format"]))
    return MergeResult(out=out, manifest=manifest, entries=entries)


def _looks_finished(out: Location, spec: UnitSpec, listing: Listing) -> ShardEntry | None:
    """The unit's entry when it matches the unit and its shard has the entry's size."""
    if not listing.may_have_entry(out, spec.unit):
        return None
    entry = read_entry(out, spec.unit)
    if entry is None or entry.record_range != [spec.start, spec.stop]:
        return None
    if listing.size(out, entry.shard) != entry.num_bytes:
        return None
    return entry


def _num_records(out: Location, params: dict[str, Any], markers: list[dict[str, Any]]) -> int:
    """The record count the parts planned with (from their markers), else the data files'."""
    counts = {int(m["num_records"]) for m in markers if "num_records" in m}
    if len(counts) > 1:
        raise MergeIncompleteError(
            f"the parts in {out}/parts planned with different record counts "
            f"({sorted(counts)}): the data file changed between parts; rebuild into a new --out"
        )
    if counts:
        return counts.pop()
    try:
        data = params["data_path"]  # one path, or a list of them (several data files)
        return open_inputs(data if isinstance(data, list) else [data]).num_records
    except (DatasetError, ValueError) as exc:
        raise IndexMissingError(
            f"cannot plan the units of {out}: no part markers in {out}/parts and the data file "
            f"cannot be read ({exc})"
        ) from None


def _describe_missing(
    out: Location, missing: list[int], num_units: int, markers: list[dict[str, Any]]
) -> str:
    shards = ", ".join(shard_name(u) for u in missing[:_LISTED])
    if len(missing) > _LISTED:
        shards += f", ... ({len(missing)} in all)"
    text = (
        f"{out} is incomplete, not merged: {len(missing)} of {num_units} shards are missing or "
        f"unfinished ({shards})"
    )
    for count in sorted({int(m["parts"]) for m in markers}):
        parts = sorted({part_of(u, count) for u in missing})
        states = {int(m["part"]): m.get("state") for m in markers if int(m["parts"]) == count}
        named = ", ".join(
            f"{p}/{count}" + (f" ({states[p]})" if p in states else " (never started)")
            for p in parts
        )
        text += f"; parts to run (again): {named}"
    return (
        text + f"; re-run mvprep build DATA --out {out} with the same options and --part i/n "
        "for those parts (or without --part), then mvprep merge again"
    )
