"""``mvtrain report``: one PNG of a run, from ``OUT/metrics.jsonl`` and ``OUT/run.json``.

Panels (x = optimizer step): loss, with the eval loss (``--eval-shards``: at step 0, every
``--eval-every`` steps and at the end) when logged; loss per group (each channel or source's
training loss, and its eval loss dashed); learning rate; tokens/s; token and patch efficiency
(real / padded, running over the run); token and patch budget utilisation (padded cost per
micro-batch / budget, running) against the budget line at 1.0; and peak GPU memory per step
(``torch.cuda.max_memory_allocated`` and, when logged, ``max_memory_reserved`` -- what an
out-of-memory error is about; both only on CUDA) against the planned memory line.
The planned line is ``memory_budget`` when given, else the first of
:data:`PLANNED_MEMORY_KEYS` found in ``run.json`` (top level or under ``"memory"``); a CPU
run says so in that panel instead.

A step's eval is in its record (step 0: an eval alone). A resumed run appends the steps it
re-ran: the last record of a step wins. Rendered with
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
TRAIN_GROUP_KEYS = ("loss_by_source", "loss_by_channel")
"""Where a training record holds each loss group's loss."""
EVAL_GROUP_KEY = "eval_loss_by_channel"
"""Where a record with an eval holds each group's eval loss."""
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
    styles: dict[str, dict[str, Any]] | None = None,
) -> bool:
    """Draw each ``(label, values per step)`` (``styles[label]``: extra ``plot`` arguments)."""
    from matplotlib.ticker import MaxNLocator

    drawn = False
    for label, values in lines:
        pts = [(s, v) for s, v in zip(steps, values, strict=True) if v is not None]
        if pts:
            xs, ys = zip(*pts, strict=True)
            style = {"marker": "o" if len(pts) <= 50 else None, "markersize": 3}
            style.update((styles or {}).get(label, {}))
            ax.plot(xs, ys, label=label, **style)
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
        "eval_loss",
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
    series.update(group_series(records))
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
    _draw_panels(fig.subplots(2, 4), report, memory_budget)
    engine = run.get("engine", "?")
    trained = sum(v is not None for v in series["tokens_per_s"])  # step 0: an eval alone
    fig.suptitle(
        f"{out}: {trained} steps, engine {engine}, world size {run.get('world_size', '?')}, "
        f"token budget {report.token_budget}, patch budget {report.patch_budget}"
    )
    report.png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(report.png, dpi=DPI)
    return report


def group_series(records: list[dict[str, Any]]) -> dict[str, list[float | None]]:
    """Per loss group, its training loss per step as ``loss/GROUP`` and its eval loss as
    ``eval_loss/GROUP`` (None where a step lacks it), groups in first-seen order."""
    found: dict[str, None] = {}
    for record in records:
        for key in (*TRAIN_GROUP_KEYS, EVAL_GROUP_KEY):
            prefix = "eval_loss" if key == EVAL_GROUP_KEY else "loss"
            for group in record.get(key) or {}:
                found[f"{prefix}/{group}"] = None
    out: dict[str, list[float | None]] = {}
    for name in found:
        prefix, group = name.split("/", 1)
        keys = (EVAL_GROUP_KEY,) if prefix == "eval_loss" else TRAIN_GROUP_KEYS
        out[name] = [
            next((r[k][group] for k in keys if group in (r.get(k) or {})), None) for r in records
        ]
    return out


def _group_lines(series: dict[str, list[Any]]) -> tuple[list[Any], dict[str, dict[str, Any]]]:
    """The per-group panel's lines: each group's training loss, its eval loss dashed in the
    same colour."""
    from matplotlib import rcParams

    colours = rcParams["axes.prop_cycle"].by_key()["color"]
    groups = list(dict.fromkeys(n.split("/", 1)[1] for n in series if "/" in n))
    lines: list[Any] = []
    styles: dict[str, dict[str, Any]] = {}
    for i, group in enumerate(groups):
        colour = colours[i % len(colours)]
        for prefix, label, dash in (
            ("loss", f"train {group}", "-"),
            ("eval_loss", f"eval {group}", "--"),
        ):
            if f"{prefix}/{group}" in series:
                lines.append((label, series[f"{prefix}/{group}"]))
                styles[label] = {"color": colour, "linestyle": dash}
    return lines, styles


def _draw_panels(axes: Any, report: RunReport, memory_budget: int | None) -> None:
    """The panels: loss (and eval loss), loss per group, lr, tokens/s, efficiency, budget
    use, GPU memory."""
    steps, series = report.steps, report.series
    group_lines, group_styles = _group_lines(series)
    if _panel(
        axes[0, 1],
        steps,
        group_lines,
        "loss per group (eval dashed)",
        "no per-group loss logged",
        group_styles,
    ):
        report.panels.append("loss per group (eval dashed)")
    plain = [
        (axes[0, 0], [("train", series["loss"]), ("eval", series["eval_loss"])], "loss"),
        (axes[0, 2], [("lr", series["lr"])], "learning rate"),
        (axes[0, 3], [("tokens/s", series["tokens_per_s"])], "real tokens / s (all ranks)"),
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
    axes[1, 3].axis("off")


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
    trained = [
        s for s, v in zip(report.steps, report.series["tokens_per_s"], strict=True) if v is not None
    ]
    parts = [f"steps {len(trained)}"]
    if losses:
        parts.append(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    evals = [
        (s, v)
        for s, v in zip(report.steps, report.series["eval_loss"], strict=True)
        if v is not None
    ]
    if evals:
        best = min(evals, key=lambda e: e[1])
        parts.append(
            f"eval loss {evals[0][1]:.4f} -> {evals[-1][1]:.4f} (best {best[1]:.4f} at step "
            f"{best[0]})"
        )
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
