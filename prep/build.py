"""``mvprep build`` as a library call: plan units, skip finished ones, run the rest.

Resumable and crash-safe: a unit counts as finished only when its shard exists, its index
entry exists, and the shard's size and sha256 match the entry (the entry is written after
the shard is renamed into place). Anything else is redone from scratch, and because a unit's
bytes depend only on its records and the options, a re-run after ``kill -9`` at any moment
produces the same shards as an uninterrupted build.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from mvprep.imaging import extension_for
from mvprep.options import BuildOptions
from mvprep.pool import RetryPolicy, UnitPool
from mvprep.readers import open_dataset
from mvprep.unit import WORKER_DIED, UnitSpec, plan_units, run_unit
from mvshards.hf import write_dataset_card
from mvshards.index import (
    ShardEntry,
    check_build_params,
    read_entry,
    shard_name,
    write_build_params,
    write_manifest,
    write_rejects,
)
from mvshards.tario import sha256_file


@dataclass
class BuildResult:
    """What a build did: all entries of the dataset, and what this run itself processed."""

    out_dir: Path
    entries: list[ShardEntry]
    processed_units: list[int]
    skipped_units: list[int]
    failed_units: dict[int, str]
    worker_deaths: list[str] = field(default_factory=list)
    wall_seconds: float = 0.0
    images_this_run: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed_units


def unit_is_finished(out: Path, spec: UnitSpec) -> ShardEntry | None:
    """The unit's entry when its shard is complete and matches it, else None."""
    entry = read_entry(out, spec.unit)
    if entry is None or entry.record_range != [spec.start, spec.stop]:
        return None
    shard = out / entry.shard
    if not shard.is_file() or shard.stat().st_size != entry.num_bytes:
        return None
    if sha256_file(shard) != entry.sha256:
        return None
    return entry


def remove_stale_temporaries(out: Path) -> None:
    """Drop ``*.tmp`` files a killed build left behind (never visible as shards)."""
    for pattern in ("*.tmp", "index/*.tmp"):
        for path in out.glob(pattern):
            path.unlink(missing_ok=True)


def build(
    options: BuildOptions,
    workers: int = 1,
    progress: bool = True,
    policy: RetryPolicy | None = None,
    units: Iterable[int] | None = None,
    write_dataset_files: bool = True,
) -> BuildResult:
    """Build (or finish building) the shards for ``options``; return what happened.

    ``units`` restricts the run to some unit numbers (used by partial runners);
    ``write_dataset_files`` writes ``manifest.json`` and ``rejects.jsonl`` when every unit
    of the dataset is finished.
    """
    started = time.perf_counter()
    out = Path(options.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "index").mkdir(exist_ok=True)
    params = options.params()
    check_build_params(out, params)
    write_build_params(out, params)
    remove_stale_temporaries(out)

    source = open_dataset(Path(options.data_path))
    all_specs = plan_units(source.num_records, options.samples_per_shard)
    wanted = set(units) if units is not None else None
    specs = [s for s in all_specs if wanted is None or s.unit in wanted]

    finished: dict[int, ShardEntry] = {}
    todo: list[UnitSpec] = []
    for spec in specs:
        entry = unit_is_finished(out, spec)
        if entry is not None:
            finished[spec.unit] = entry
        else:
            todo.append(spec)
    skipped = sorted(finished)

    result = BuildResult(out, [], [], skipped, {})
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

    pool = UnitPool(
        workers,
        run_unit,
        args=(options,),
        policy=policy,
        on_image=on_image,
        on_record_done=lambda: bar.update(1),
        on_death=on_death,
    )
    try:
        for outcome in pool.run(todo):
            unit = outcome.spec.unit
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
    if write_dataset_files and complete and not result.failed_units:
        write_rejects(out, result.entries)
        manifest = write_manifest(out, params, result.entries, extra={})
        max_images = manifest["totals"]["max_images_per_sample"]
        write_dataset_card(out, max_images, extension_for(options.image_format))
    result.wall_seconds = time.perf_counter() - started
    return result


def _skip_everything(spec: UnitSpec, why: str | None) -> UnitSpec:
    reason = f"{why}; the unit killed its worker every time it was tried"
    return UnitSpec(
        spec.unit, spec.start, spec.stop, {i: reason for i in range(spec.start, spec.stop)}
    )
