"""The picture of ``mvprep stats --png``: one PNG, four panels, from the index arrays.

Panels: tokens per sample (histogram), patches per sample (histogram), tokens x patches
(2-D histogram, log colour scale, with the budgets that hold the p99 sample as dashed
lines), and slices per image (bar chart; a note when the index has no per-image table).
Rendered with matplotlib's Agg canvas (no pyplot, no display), at a fixed size:
:data:`FIGSIZE` inches x :data:`DPI` = 1200 x 900 pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mvprep.stats import IndexArrays
from mvshards.families import get_family

FIGSIZE = (12.0, 9.0)
DPI = 100
BINS = 60


def _hist(ax: Any, values: np.ndarray, pcts: dict[str, Any], title: str, colour: str) -> None:
    if values.size == 0:
        ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(title)
        return
    ax.hist(values, bins=min(BINS, max(int(np.unique(values).size), 1)), color=colour)
    for name, style in (("p50", ":"), ("p99", "--"), ("max", "-")):
        value = pcts[name]
        ax.axvline(value, color="black", linestyle=style, linewidth=1.2, label=f"{name} {value:,}")
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(title)
    ax.set_ylabel("samples")


def _joint(ax: Any, fig: Any, arrays: IndexArrays, stats: dict[str, Any]) -> None:
    from matplotlib.colors import LogNorm

    ax.set_title("tokens x patches per sample")
    ax.set_xlabel("tokens")
    ax.set_ylabel("patches")
    if arrays.tokens.size == 0:
        return
    counts, xedges, yedges = np.histogram2d(arrays.tokens, arrays.patches, bins=BINS)
    counts = np.ma.masked_equal(counts, 0)
    mesh = ax.pcolormesh(
        xedges, yedges, counts.T, norm=LogNorm(vmin=1, vmax=max(counts.max(), 1)), cmap="viridis"
    )
    fig.colorbar(mesh, ax=ax, label="samples")
    ax.set_xlim(xedges[0], xedges[-1] * 1.04 + 1)
    ax.set_ylim(yedges[0], yedges[-1] * 1.04 + 1)
    p99 = stats["budgets"]["p99"]
    ax.axvline(p99["token_budget"], color="crimson", linestyle="--", linewidth=1.2)
    packed = not get_family(stats["budgets"]["cost_model"]).cost.pads_subimages
    if packed and p99["patch_budget"] is not None:  # padded costs are not raw patches
        ax.axhline(p99["patch_budget"], color="crimson", linestyle="--", linewidth=1.2)
    ax.text(
        0.99,
        0.02,
        "dashed: budgets holding the p99 sample",
        transform=ax.transAxes,
        ha="right",
        fontsize=8,
        color="crimson",
    )


def _slices(ax: Any, arrays: IndexArrays) -> None:
    ax.set_title("slices per image")
    cols = arrays.image_columns
    if cols is None or cols["slices"].size == 0:
        why = "no images" if cols is not None else "index has no per-image table:\nrebuild"
        ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes)
        return
    counts = np.bincount(cols["slices"])
    ax.bar(np.arange(counts.size), counts, color="tab:green")
    ax.set_xlabel("slices (0 = not sliced)")
    ax.set_ylabel("images")
    ax.set_xticks(np.arange(counts.size))


def plot_stats(arrays: IndexArrays, stats: dict[str, Any], png: Path) -> Path:
    """Write the four-panel PNG of ``stats`` (from :func:`mvprep.stats.dataset_stats`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    p = stats["percentiles"]
    _hist(axes[0, 0], arrays.tokens, p["tokens_per_sample"], "tokens per sample", "tab:blue")
    _hist(axes[0, 1], arrays.patches, p["patches_per_sample"], "patches per sample", "tab:orange")
    _joint(axes[1, 0], fig, arrays, stats)
    _slices(axes[1, 1], arrays)
    c = stats["counts"]
    fig.suptitle(
        f"{stats['dataset']}: {c['samples']:,} samples, {c['images']:,} images, "
        f"{c['rejects']:,} rejects ({stats['profile']})"
    )
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=DPI)
    return png
