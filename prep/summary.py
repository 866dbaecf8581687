"""The table a build prints at the end: what went where, how big, how fast."""

from __future__ import annotations

from collections import Counter

import numpy as np

from mvprep.build import BuildResult
from mvprep.tokens import ESTIMATE_LABEL
from mvshards.index import INDEX_DIR, REJECTS_FILE

TOP_REASONS = 3
"""Reject reasons named in a failure message (the most frequent first)."""


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
    records = f"{s['records']}"
    if len(result.inputs) > 1:
        records += " (" + ", ".join(f"{i['file']} {i['records']}" for i in result.inputs) + ")"
    tokens = _percentiles(s["tokens"])  # type: ignore[arg-type]
    if not result.token_counts_exact and s["tokens"]:
        tokens += f" ({ESTIMATE_LABEL})"
    lines = [
        ("output", str(result.out_dir)),
        ("records", records),
        ("samples", f"{s['samples']}"),
        ("rejects", f"{s['rejects']}"),
    ]
    for reason, count in s["rejects_by_reason"].items():  # type: ignore[union-attr]
        lines.append((f"  {reason}", f"{count}"))
    if s["rejects"]:
        lines.append(("  each one, with its record", rejects_location(result)))
    lines += [
        ("shards", f"{s['shards']} ({s['units_built']} built, {s['units_skipped']} already done)"),
        ("written", f"{s['gb_written']:.3f} GB"),
        ("images", f"{s['images']}"),
        ("images/s (this run)", f"{s['images_per_second']:.1f}"),
        ("tokens p50/p95/max", tokens),
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


def rejects_location(result: BuildResult) -> str:
    """Where the rejects of ``result`` are, each with its record."""
    if result.part is not None:  # a part writes no dataset files: its rejects are in its entries
        return (
            f"{result.out_dir / INDEX_DIR}/*.json of part {result.part} ('rejects'); "
            f"{result.out_dir / REJECTS_FILE} after mvprep merge"
        )
    return str(result.out_dir / REJECTS_FILE)


def top_reasons(by_reason: Counter[str] | dict[str, int], top: int = TOP_REASONS) -> str:
    """``"no conversations 3, unknown role 2 and 1 more reason"``: the most frequent first
    (ties by name)."""
    ranked = sorted(by_reason.items(), key=lambda item: (-item[1], item[0]))
    text = ", ".join(f"{reason} {count}" for reason, count in ranked[:top])
    more = len(ranked) - top
    if more > 0:
        text += f" and {more} more reason{'s' if more > 1 else ''}"
    return text


def reject_failure(result: BuildResult, max_reject_rate: float | None = None) -> str | None:
    """The one-line error when the build (or this part of it) rejected every record, or more
    than ``max_reject_rate`` of them; None when it is fine."""
    records = sum(e.record_range[1] - e.record_range[0] for e in result.entries)
    by_reason = Counter(str(r["reason"]) for e in result.entries for r in e.rejects)
    rejects = sum(by_reason.values())
    if not records or not rejects:
        return None
    scope = f"part {result.part}: " if result.part is not None else ""
    where = f"; each reject with its record: {rejects_location(result)}"
    if rejects == records:
        return (
            f"{scope}all {records} records were rejected, no sample was written "
            f"({top_reasons(by_reason)}){where}"
        )
    if max_reject_rate is not None and rejects / records > max_reject_rate:
        return (
            f"{scope}{rejects} of {records} records were rejected ({rejects / records:.1%}), "
            f"more than --max-reject-rate {max_reject_rate:g} ({top_reasons(by_reason)}){where}"
        )
    return None
