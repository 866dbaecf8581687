"""The work unit: a fixed run of input records -> exactly one shard and its index entry.

Unit ``u`` holds records ``[u * samples_per_shard, (u + 1) * samples_per_shard)`` and writes
``NNNNNN.tar`` (``NNNNNN = u``) then ``index/NNNNNN.json`` (with each sample's byte range in
the tar, as the writer saw it). The same function runs under every
runner, so the output never depends on how many workers there were or which one ran it.
"""

from __future__ import annotations

import os
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mvprep.imaging import ImageError, check_imaging_path
from mvprep.inputs import open_inputs
from mvprep.options import BuildOptions
from mvprep.records import RecordError, normalize_record
from mvprep.sample_builder import SampleTooLongError, build_sample
from mvprep.tokens import make_token_counter
from mvshards.image_table import IMAGE_TABLE_KEY, add_image_rows, new_image_table
from mvshards.index import ShardEntry, shard_name, write_entry
from mvshards.storage import location
from mvshards.tario import ShardWriter

WORKER_DIED = "worker died"
"""Reject reason of a record that killed its worker process every time it was tried."""

FAULT_ENV = "MVPREP_FAULT"
"""Fault injection for tests, ``ACTION:TARGET`` (never set it outside tests):

* ``kill:ID``   -- a worker that reaches the record with this ``id`` SIGKILLs itself, as the
  kernel's OOM killer would;
* ``hang:ID``   -- it sleeps forever on that record (for ``--unit-timeout``);
* ``kill-commit:UNIT`` -- it SIGKILLs itself just before committing that unit's shard, a
  death no record can be blamed for.
"""


def _inject_fault(action: str, target: str) -> None:
    fault = os.environ.get(FAULT_ENV, "")
    if fault != f"{action}:{target}":
        return
    if action == "hang":
        while True:
            time.sleep(3600)
    os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class UnitSpec:
    """Which records a unit holds, and which of them must be rejected without a try."""

    unit: int
    start: int
    stop: int
    skip: dict[int, str] = field(default_factory=dict)
    """record index -> error text, for records already known to kill workers."""


def plan_units(num_records: int, samples_per_shard: int) -> list[UnitSpec]:
    """Every unit of a dataset, in order; the last one may be short."""
    return [
        UnitSpec(unit=u, start=start, stop=min(start + samples_per_shard, num_records))
        for u, start in enumerate(range(0, num_records, samples_per_shard))
    ]


@dataclass
class UnitEvents:
    """Callbacks a runner passes in to watch a unit from outside its process."""

    on_record: Callable[[int], None] = lambda index: None
    """Called with a record's index just before it is processed."""
    on_image: Callable[[], None] = lambda: None
    on_record_done: Callable[[], None] = lambda: None


def _reject(
    index: int,
    record_id: str,
    reason: str,
    error: str,
    raw: Any,
    source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    reject = {"index": index, "id": record_id, "reason": reason, "error": error, "record": raw}
    if source is not None:  # several data files: which file, which record of it
        reject["source"] = source
    return reject


def _record_id(index: int, raw: Any) -> str:
    if isinstance(raw, dict) and raw.get("id") is not None:
        return str(raw["id"])
    return str(index)


def run_unit(spec: UnitSpec, options: BuildOptions, events: UnitEvents | None = None) -> ShardEntry:
    """Process one unit and write its shard and index entry; return the entry.

    Bad input never raises: every record of the unit ends as a sample in the shard or as a
    reject in the entry. Only I/O on the output folder (disk full, permissions) raises.
    """
    events = events or UnitEvents()
    # a worker that cannot run the build's imaging path fails the unit (never other bytes)
    check_imaging_path(options.imaging_path or "opencv")
    started_wall, started_cpu = time.perf_counter(), time.process_time()
    inputs = open_inputs(options.data_paths)
    counter = make_token_counter(options.tokenizer, options.profile)

    out = location(options.out_dir)
    rows: list[list[Any]] = []
    channels: list[str | None] = []
    rejects: list[dict[str, Any]] = []
    num_images = image_bytes = 0
    image_table = new_image_table()  # per image: slices, original size... (image_table)
    with ShardWriter(out / shard_name(spec.unit)) as writer:
        for index, raw, file in inputs.read_range(spec.start, spec.stop):
            events.on_record(index)
            record_id = _record_id(index, raw)
            source = inputs.source_of(index)
            if index in spec.skip:
                why = spec.skip[index]
                rejects.append(_reject(index, record_id, WORKER_DIED, why, raw, source))
                events.on_record_done()
                continue
            _inject_fault("kill", record_id)
            _inject_fault("hang", record_id)
            try:
                if isinstance(raw, RecordError):
                    raise raw
                record = normalize_record(index, raw, options.input_format)
                sample = build_sample(
                    record, file.root, options, counter, events.on_image, source=source
                )
            except (RecordError, ImageError, SampleTooLongError) as exc:
                raw_obj = None if isinstance(raw, RecordError) else raw
                rejects.append(_reject(index, record_id, exc.reason, str(exc), raw_obj, source))
            except Exception as exc:  # a bug or a codec failure: reject, never crash the build
                reason = f"internal error: {type(exc).__name__}"
                error = traceback.format_exc()
                rejects.append(_reject(index, record_id, reason, error, raw, source))
            else:
                for name in sorted(sample.members):
                    writer.add(name, sample.members[name])
                rows.append(sample.meta.index_row())
                channels.append(sample.meta.channel)
                add_image_rows(image_table, sample.meta.images)
                num_images += sample.num_images
                image_bytes += sum(
                    len(v) for k, v in sample.members.items() if not k.endswith(".json")
                )
            events.on_record_done()
        if len(spec.skip) < spec.stop - spec.start:
            _inject_fault("kill-commit", str(spec.unit))
        info = writer.commit()

    entry = ShardEntry(
        unit=spec.unit,
        shard=shard_name(spec.unit),
        record_range=[spec.start, spec.stop],
        sha256=info.sha256,
        num_bytes=info.num_bytes,
        num_samples=len(rows),
        samples=rows,
        rejects=rejects,
        stats={
            "images": num_images,
            "image_bytes": image_bytes,
            "wall_seconds": round(time.perf_counter() - started_wall, 3),
            "cpu_seconds": round(time.process_time() - started_cpu, 3),
            IMAGE_TABLE_KEY: image_table,
        },
        channels=channels if any(c is not None for c in channels) else None,
        sample_offsets=list(info.sample_offsets),  # one ranged read per sample, no walk
    )
    write_entry(out, entry)
    return entry
