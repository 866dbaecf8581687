"""``mvtrain report``: one PNG of a run, from ``OUT/metrics.jsonl`` and ``OUT/run.json``.

Panels (x = optimizer step): loss; learning rate; tokens/s; token and patch efficiency
(real / padded, running over the run); token and patch budget utilisation (padded cost per
micro-batch / budget, running) against the budget line at 1.0; and peak GPU memory per step
(``torch.cuda.max_memory_allocated`` and, when logged, ``max_memory_reserved`` -- what an
out-of-memory error is about; both only on CUDA) against the planned memory line.
The planned line is ``memory_budget`` when given, else the first of
:data:`PLANNED_MEMORY_KEYS` found in ``run.json`` (top level or under ``"memory"``); a CPU
run says so in that panel instead.

A resumed run appends the steps it re-ran: the last record of a step wins. Rendered with
matplotlib's Agg canvas at a fixed size: :data:`FIGSIZE` inches x :data:`DPI`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mvshards.units import GiB as GIB
from mvshards.units import parse_bytes as parse_bytes  # re-exported (tests import it here)

FIGSIZE = (15.0, 8.0)
DPI = 100
PLANNED_MEMORY_KEYS = ("predicted_peak_bytes", "memory_budget_bytes", "gpu_mem_bytes")
"""Where a planned per-GPU memory figure may sit in ``run.json`` (bytes)."""


class ReportError(Exception):
    """The run folder has nothing to report; the message names it and the fix."""


@dataclass
class RunReport:
    """What the report was drawn from."""

    png: Path
    steps: list[int]
    series: dict[str, list[float | None]]
    """Metric name -> value per step (None where a step lacks it)."""
    token_budget: int | None
    patch_budget: int | None
    memory_budget: int | None
    panels: list[str] = field(default_factory=list)
    """Titles of the panels that have data."""


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records of ``metrics.jsonl`` by step, the last record of each step winning."""
    by_step: dict[int, dict[str, Any]] = {}
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        raise ReportError(
            f"{path} does not exist: run `mvtrain run --output {Path(path).parent}` first"
        ) from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            by_step[int(record["step"])] = record
        except (ValueError, KeyError, TypeError):
            if number == len(lines):  # a run killed mid-write leaves a torn last line
                continue
            raise ReportError(f"{path}:{number} is not a metrics record: {line[:80]!r}") from None
    if not by_step:
        raise ReportError(f"{path} holds no steps yet: let the run finish a step")
    return [by_step[s] for s in sorted(by_step)]


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def planned_memory(run: dict[str, Any]) -> int | None:
    """The planned peak bytes per GPU recorded in ``run.json``, if any."""
    for place in (run, run.get("memory") or {}, run.get("plan_memory") or {}):
        for key in PLANNED_MEMORY_KEYS:
            if isinstance(place, dict) and _int(place.get(key)) is not None:
                return _int(place[key])
    return None


def _panel(
    ax: Any,
    steps: list[int],
    lines: list[tuple[str, list[Any]]],
    title: str,
    empty: str = "not logged",
) -> bool:
    from matplotlib.ticker import MaxNLocator

    drawn = False
    for label, values in lines:
        pts = [(s, v) for s, v in zip(steps, values, strict=True) if v is not None]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o" if len(pts) <= 50 else None, markersize=3, label=label)
            drawn = True
    ax.set_title(title)
    ax.set_xlabel("step")
    if not drawn:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return False
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(ax.get_lines()) > 1:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return drawn


def write_report(out: Path, png: Path | None = None, memory_budget: int | None = None) -> RunReport:
    """Draw the report of run folder ``out`` to ``png`` (default ``out/report.png``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out)
    records = read_metrics(out / "metrics.jsonl")
    run_file = out / "run.json"
    run = json.loads(run_file.read_text()) if run_file.exists() else {}
    config = run.get("config", {})
    memory_budget = memory_budget if memory_budget is not None else planned_memory(run)
    steps = [int(r["step"]) for r in records]
    names = (
        "loss",
        "lr",
        "tokens_per_s",
        "token_efficiency",
        "patch_efficiency",
        "token_budget_utilisation",
        "patch_budget_utilisation",
        "max_memory_allocated",
        "max_memory_reserved",
    )
    series = {n: [r.get(n) for r in records] for n in names}
    report = RunReport(
        png=Path(png) if png is not None else out / "report.png",
        steps=steps,
        series=series,
        token_budget=_int(config.get("token_budget")),
        patch_budget=_int(config.get("patch_budget")),
        memory_budget=memory_budget,
    )
    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    _draw_panels(fig.subplots(2, 3), report, memory_budget)
    engine = run.get("engine", "?")
    fig.suptitle(
        f"{out}: {len(steps)} steps, engine {engine}, world size {run.get('world_size', '?')}, "
        f"token budget {report.token_budget}, patch budget {report.patch_budget}"
    )
    report.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(report.png, dpi=DPI)
    return report


def _draw_panels(axes: Any, report: RunReport, memory_budget: int | None) -> None:
    """The six panels: loss, lr, tokens/s, efficiency, budget use, GPU memory."""
    steps, series = report.steps, report.series
    plain = [
        (axes[0, 0], [("loss", series["loss"])], "loss"),
        (axes[0, 1], [("lr", series["lr"])], "learning rate"),
        (axes[0, 2], [("tokens/s", series["tokens_per_s"])], "real tokens / s (all ranks)"),
        (
            axes[1, 0],
            [("token", series["token_efficiency"]), ("patch", series["patch_efficiency"])],
            "efficiency: real / padded (running)",
        ),
        (
            axes[1, 1],
            [
                (f"tokens (budget {report.token_budget})", series["token_budget_utilisation"]),
                (f"patches (budget {report.patch_budget})", series["patch_budget_utilisation"]),
            ],
            "budget utilisation: padded / budget (running)",
        ),
    ]
    axes[1, 1].axhline(1.0, color="crimson", linestyle="--", linewidth=1.2, label="budget")
    for ax, lines, title in plain:
        if _panel(ax, steps, lines, title):
            report.panels.append(title)
    axes[1, 0].set_ylim(0, 1.05)
    axes[1, 1].set_ylim(0, 1.1)
    peaks = [
        ("allocated", series["max_memory_allocated"]),
        ("reserved", series["max_memory_reserved"]),
    ]
    _memory_panel(axes[1, 2], steps, peaks, memory_budget, report)


def _memory_panel(
    ax: Any,
    steps: list[int],
    peaks: list[tuple[str, list[Any]]],
    budget: int | None,
    report: RunReport,
) -> None:
    """Allocated and reserved peaks per step (each when logged) against the planned line."""
    title = "peak GPU memory per step (GiB)"
    lines = [(name, [v / GIB if v is not None else None for v in values]) for name, values in peaks]
    logged = [v for _, values in lines for v in values if v is not None]
    if logged and budget is not None:
        ax.axhline(budget / GIB, color="crimson", linestyle="--", label="planned")
        ax.set_ylim(0, max(max(logged), budget / GIB) * 1.1)
    empty = "no GPU memory logged\n(a CPU run)"
    if _panel(ax, steps, lines, title, empty):
        report.panels.append(title)
        if budget is None:
            ax.text(0.5, 0.05, "no planned line", ha="center", transform=ax.transAxes)


def format_report(report: RunReport) -> str:
    """A few lines for the terminal: first/last loss, mean tokens/s, final efficiency."""

    def last(name: str) -> Any:
        values = [v for v in report.series[name] if v is not None]
        return values[-1] if values else None

    losses = [v for v in report.series["loss"] if v is not None]
    speeds = [v for v in report.series["tokens_per_s"] if v is not None]
    parts = [f"steps {len(report.steps)}"]
    if losses:
        parts.append(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    if speeds:
        parts.append(f"tokens/s mean {sum(speeds) / len(speeds):,.0f}")
    for name in ("token_efficiency", "patch_efficiency"):
        if last(name) is not None:
            parts.append(f"{name.replace('_', ' ')} {last(name):.3f}")
    peaks = [v for v in report.series["max_memory_allocated"] if v is not None]
    if peaks:
        parts.append(f"peak memory {max(peaks) / GIB:.2f} GiB")
    reserved = [v for v in report.series["max_memory_reserved"] if v is not None]
    if reserved:
        parts.append(f"peak reserved {max(reserved) / GIB:.2f} GiB")
    return ", ".join(parts) + f"\nwrote {report.png}"
