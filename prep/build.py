"""``mvprep build`` as a library call: plan units, skip finished ones, run the rest.

Resumable and crash-safe: a unit counts as finished only when its shard exists, its index
entry exists, and the shard's size and sha256 match the entry (the entry is written after
the shard is renamed into place). Anything else is redone from scratch, and because a unit's
bytes depend only on its records and the options, a re-run after ``kill -9`` at any moment
produces the same shards as an uninterrupted build.

Runners (``runner=``): ``"local"`` (:class:`mvprep.pool.UnitPool`, worker processes on this
machine) or ``"ray"`` (:class:`mvprep.runners.ray_runner.RayRunner`, a local Ray or a
cluster). ``part=`` restricts a run to one share of the units (:mod:`mvprep.partition`);
a part never writes the dataset files, ``mvprep merge`` (:mod:`mvprep.merge`) does, with
:func:`finish_dataset`, the same function a whole build ends with.

``options.out_dir`` may be an object-store URL (:mod:`mvshards.storage`). A store has no
rename, so the commit point of a unit is its index entry: the shard is uploaded whole
(visible complete or not at all), then the entry is written. A shard without an entry, or
whose size or sha256 differs from its entry, is unfinished and rebuilt (overwritten), so a
re-run after ``kill -9`` mid-upload writes the same objects as an uninterrupted build.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from mvprep.imaging import extension_for
from mvprep.inputs import open_inputs
from mvprep.options import BuildOptions
from mvprep.partition import Part, write_marker
from mvprep.pool import RetryPolicy, UnitPool
from mvprep.runners.journal import journal_path
from mvprep.unit import WORKER_DIED, UnitSpec, plan_units, run_unit
from mvshards.hf import write_dataset_card
from mvshards.index import (
    BUILD_FILE,
    INDEX_DIR,
    UNIT_DIGITS,
    IndexMismatchError,
    ShardEntry,
    check_build_params,
    entry_path,
    read_entry,
    shard_name,
    write_manifest,
    write_rejects,
)
from mvshards.storage import (
    Location,
    ObjectPath,
    StorageError,
    create_whole,
    list_sizes,
    location,
    sha256_of,
    size_of,
)


@dataclass
class BuildResult:
    """What a build did: all entries of the dataset, and what this run itself processed."""

    out_dir: Location
    entries: list[ShardEntry]
    processed_units: list[int]
    skipped_units: list[int]
    failed_units: dict[int, str]
    worker_deaths: list[str] = field(default_factory=list)
    wall_seconds: float = 0.0
    images_this_run: int = 0
    token_counts_exact: bool = True
    """False when counted without a tokenizer: the counts are estimates (upper bounds)."""
    inputs: list[dict[str, Any]] = field(default_factory=list)
    """Per data file: name, path, records, global record range (``Inputs.describe``)."""
    part: Part | None = None

    @property
    def ok(self) -> bool:
        return not self.failed_units


class Listing:
    """What an object-store OUT holds, listed once (``index/`` names, shard sizes), so that
    checking many units costs two LISTs instead of a request or more per unit. A local OUT
    is not listed (os calls are cheap): every question goes to the file system."""

    def __init__(self, out: Location) -> None:
        self.entries: set[str] | None = None
        self.sizes: dict[str, int] | None = None
        if isinstance(out, ObjectPath):
            self.entries = set(list_sizes(out / INDEX_DIR))
            self.sizes = list_sizes(out)

    def may_have_entry(self, out: Location, unit: int) -> bool:
        return self.entries is None or entry_path(out, unit).name in self.entries

    def size(self, out: Location, name: str) -> int | None:
        return size_of(out / name) if self.sizes is None else self.sizes.get(name)


def unit_is_finished(
    out: Location, spec: UnitSpec, listing: Listing | None = None
) -> ShardEntry | None:
    """The unit's entry when its shard is complete and matches it, else None."""
    if listing is not None and not listing.may_have_entry(out, spec.unit):
        return None
    entry = read_entry(out, spec.unit)
    if entry is None or entry.record_range != [spec.start, spec.stop]:
        return None
    shard = out / entry.shard
    size = size_of(shard) if listing is None else listing.size(out, entry.shard)
    if size != entry.num_bytes:
        return None
    if sha256_of(shard) != entry.sha256:
        return None
    return entry


def remove_stale_temporaries(out: Location, units: Iterable[int] | None = None) -> None:
    """Drop ``*.tmp`` files a killed build left behind (never visible as shards).

    With ``units``, only those units' temporaries (shard, entry, attempt journal): other
    parts may be writing theirs into the same folder right now. An object store has none
    (a shard is spooled locally in an anonymous file; an unfinished multipart upload is
    invisible: a bucket lifecycle rule removes it), only the Ray attempt journals kept on
    local disk (:func:`mvprep.runners.journal.journal_path`).
    """
    if isinstance(out, ObjectPath):
        folders: tuple[Path, ...] = (journal_path(out, 0).parent,)
    else:
        folders = (out, out / INDEX_DIR)
    if units is None and not isinstance(out, ObjectPath):
        for pattern in ("*.tmp", "index/*.tmp"):
            for path in out.glob(pattern):
                path.unlink(missing_ok=True)
        return
    wanted = None if units is None else {f"{u:0{UNIT_DIGITS}d}" for u in units}
    for folder in folders:
        if not folder.is_dir():
            continue
        with os.scandir(folder) as it:
            for item in it:
                name = item.name
                if name.endswith(".tmp") and (wanted is None or name.partition(".")[0] in wanted):
                    Path(item.path).unlink(missing_ok=True)


def claim_build_params(out: Location | str, params: dict[str, Any]) -> None:
    """Write ``OUT/build.json`` if absent, else check it against ``params``; safe to race.

    Parts started at the same time on several machines all call this: the file is created
    atomically if absent (:func:`mvshards.storage.create_whole`: a hard link of a whole file
    locally, also on NFS; a conditional PUT in an object store), so exactly one writer wins
    and the others compare with what it wrote (:class:`mvshards.index.IndexMismatchError`
    when the options differ).
    """
    out = location(out)
    if check_build_params(out, params):
        return
    body = json.loads(json.dumps(params, sort_keys=True))
    data = json.dumps(body, ensure_ascii=False, sort_keys=True, indent=2).encode()
    create_whole(out / BUILD_FILE, data)
    for _ in range(50):  # the exclusive-create fallback may show a half-written file briefly
        try:
            check_build_params(out, params)
            return
        except IndexMismatchError as exc:
            if "unreadable" not in str(exc):
                raise
            time.sleep(0.1)
    check_build_params(out, params)


def finish_dataset(
    out: Location, params: dict[str, Any], entries: list[ShardEntry], image_format: str
) -> dict[str, Any]:
    """Write ``rejects.jsonl``, ``manifest.json`` and the HF dataset card for a complete set
    of unit entries; return the manifest. A whole build and ``mvprep merge`` both end here,
    so their files are byte-identical."""
    entries = sorted(entries, key=lambda e: e.unit)
    write_rejects(out, entries)
    manifest = write_manifest(out, params, entries, extra={})
    max_images = manifest["totals"]["max_images_per_sample"]
    write_dataset_card(out, max_images, extension_for(image_format))
    return manifest


def build(
    options: BuildOptions,
    workers: int = 1,
    progress: bool = True,
    policy: RetryPolicy | None = None,
    units: Iterable[int] | None = None,
    write_dataset_files: bool = True,
    runner: str = "local",
    ray_address: str | None = None,
    part: Part | None = None,
) -> BuildResult:
    """Build (or finish building) the shards for ``options``; return what happened.

    ``units`` restricts the run to some unit numbers; ``part`` to one part's share (and
    writes ``OUT/parts/`` markers). ``write_dataset_files`` writes ``manifest.json``,
    ``rejects.jsonl`` and the dataset card when every unit of the dataset is finished (never
    for a part: ``mvprep merge`` does that). ``runner`` is ``"local"`` (``workers``
    processes) or ``"ray"`` (``ray_address``, or a local Ray with ``workers`` CPUs).
    """
    started = time.perf_counter()
    out = location(options.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / INDEX_DIR).mkdir(exist_ok=True)
    params = options.params()
    claim_build_params(out, params)

    inputs = open_inputs(options.data_paths)
    all_specs = plan_units(inputs.num_records, options.samples_per_shard)
    wanted = set(units) if units is not None else None
    specs = [
        s
        for s in all_specs
        if (wanted is None or s.unit in wanted) and (part is None or part.owns(s.unit))
    ]
    partial = wanted is not None or part is not None
    remove_stale_temporaries(out, [s.unit for s in specs] if partial else None)
    if part is not None:
        write_marker(out, part, "running", inputs.num_records, len(all_specs))

    finished: dict[int, ShardEntry] = {}
    todo: list[UnitSpec] = []
    listing = Listing(out)
    for spec in specs:
        entry = unit_is_finished(out, spec, listing)
        if entry is not None:
            finished[spec.unit] = entry
        else:
            todo.append(spec)
    skipped = sorted(finished)

    result = BuildResult(out, [], [], skipped, {})
    result.token_counts_exact = options.tokenizer is not None
    result.inputs = inputs.describe()
    result.part = part
    records_todo = sum(s.stop - s.start for s in todo)
    bar = tqdm(
        total=records_todo,
        unit="rec",
        desc="mvprep build",
        disable=not progress or not todo,
        dynamic_ncols=True,
        smoothing=0.1,
    )
    images = 0
    last_postfix = 0.0

    def on_image() -> None:
        nonlocal images, last_postfix
        images += 1
        now = time.perf_counter()
        if now - last_postfix > 0.5:
            last_postfix = now
            bar.set_postfix_str(f"{images / max(now - started, 1e-9):.1f} img/s", refresh=False)

    def on_death(spec: UnitSpec, why: str) -> None:
        result.worker_deaths.append(why)
        bar.write(f"mvprep: {why}; retrying")

    callbacks = {
        "on_image": on_image,
        "on_record_done": lambda: bar.update(1),
        "on_death": on_death,
    }
    if runner == "local":
        pool: Any = UnitPool(workers, run_unit, args=(options,), policy=policy, **callbacks)
    elif runner == "ray":
        from mvprep.runners.ray_runner import RayRunner  # Ray is optional: import it lazily

        pool = RayRunner(workers, options, policy=policy, address=ray_address, **callbacks)
    else:
        raise ValueError(f"unknown runner {runner!r}; use 'local' or 'ray'")
    try:
        for outcome in pool.run(todo):
            unit = outcome.spec.unit
            if outcome.storage_error is not None:  # the store refuses: stop, one line
                raise StorageError(outcome.storage_error)
            if outcome.result is not None:
                finished[unit] = outcome.result
                result.processed_units.append(unit)
            elif outcome.gave_up:  # kept killing workers: reject its records, write the rest
                entry = run_unit(_skip_everything(outcome.spec, outcome.failure), options)
                finished[unit] = entry
                result.processed_units.append(unit)
                bar.update(sum(1 for r in entry.rejects if r["reason"] == WORKER_DIED))
            else:
                result.failed_units[unit] = outcome.failure or "unknown failure"
                bar.write(f"mvprep: unit {unit} ({shard_name(unit)}) failed:\n{outcome.failure}")
    finally:
        bar.close()

    result.entries = [finished[u] for u in sorted(finished)]
    result.images_this_run = images
    complete = len(finished) == len(all_specs)
    if write_dataset_files and part is None and complete and not result.failed_units:
        finish_dataset(out, params, result.entries, options.image_format)
    if part is not None:
        state = "failed" if result.failed_units else "done"
        failed = list(result.failed_units)
        write_marker(out, part, state, inputs.num_records, len(all_specs), failed)
    result.wall_seconds = time.perf_counter() - started
    return result


def _skip_everything(spec: UnitSpec, why: str | None) -> UnitSpec:
    reason = f"{why}; the unit killed its worker every time it was tried"
    return UnitSpec(
        spec.unit, spec.start, spec.stop, {i: reason for i in range(spec.start, spec.stop)}
    )
