"""The table a build prints at the end: what went where, how big, how fast."""

from __future__ import annotations

from collections import Counter

import numpy as np

from mvprep.build import BuildResult
from mvshards.index import REJECTS_FILE


def _percentiles(values: list[int]) -> str:
    if not values:
        return "-"
    arr = np.asarray(values)
    p50, p95 = np.percentile(arr, [50, 95], method="nearest")
    return f"{int(p50)} / {int(p95)} / {int(arr.max())}"


def summarize(result: BuildResult) -> dict[str, object]:
    """Numbers of the whole dataset (every finished unit) plus this run's speed."""
    entries = result.entries
    rejects = Counter(r["reason"] for e in entries for r in e.rejects)
    rows = [row for e in entries for row in e.samples]
    records = sum(e.record_range[1] - e.record_range[0] for e in entries)
    cpu = sum(e.stats.get("cpu_seconds", 0.0) for e in entries if e.unit in result.processed_units)
    return {
        "records": records,
        "samples": len(rows),
        "rejects": sum(rejects.values()),
        "rejects_by_reason": dict(sorted(rejects.items())),
        "shards": len(entries),
        "gb_written": sum(e.num_bytes for e in entries) / 1e9,
        "images": sum(e.stats.get("images", 0) for e in entries),
        "units_built": len(result.processed_units),
        "units_skipped": len(result.skipped_units),
        "units_failed": len(result.failed_units),
        "worker_deaths": len(result.worker_deaths),
        "images_per_second": result.images_this_run / result.wall_seconds
        if result.wall_seconds
        else 0.0,
        "worker_cpu_seconds": cpu,
        "tokens": [row[1] for row in rows],
        "patches": [row[2] for row in rows],
    }


def format_summary(result: BuildResult) -> str:
    s = summarize(result)
    lines = [
        ("output", str(result.out_dir)),
        ("records", f"{s['records']}"),
        ("samples", f"{s['samples']}"),
        ("rejects", f"{s['rejects']}"),
    ]
    for reason, count in s["rejects_by_reason"].items():  # type: ignore[union-attr]
        lines.append((f"  {reason}", f"{count}"))
    if s["rejects"]:
        lines.append(("  each one, with its record", str(result.out_dir / REJECTS_FILE)))
    lines += [
        ("shards", f"{s['shards']} ({s['units_built']} built, {s['units_skipped']} already done)"),
        ("written", f"{s['gb_written']:.3f} GB"),
        ("images", f"{s['images']}"),
        ("images/s (this run)", f"{s['images_per_second']:.1f}"),
        ("tokens p50/p95/max", _percentiles(s["tokens"])),  # type: ignore[arg-type]
        ("patches p50/p95/max", _percentiles(s["patches"])),  # type: ignore[arg-type]
    ]
    if s["worker_deaths"]:
        lines.append(("worker deaths", f"{s['worker_deaths']}"))
    if result.failed_units:
        lines.append(("FAILED units", ", ".join(str(u) for u in sorted(result.failed_units))))
    width = max(len(k) for k, _ in lines)
    rule = "-" * (width + 2 + max(len(v) for _, v in lines))
    body = "\n".join(f"{k.ljust(width)}  {v}" for k, v in lines)
    return f"{rule}\n{body}\n{rule}"
