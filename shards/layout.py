"""MiniCPM-V adaptive slice layout: pure arithmetic, no pixels.

This reproduces, in IEEE doubles with Python semantics (``round`` is half-to-even,
``int`` truncates), what the models' own image processors compute:

* ``fit(L, p) = max(round(L / p) * p, p)``
* best size of ``(w, h)`` at scale ``S``: if ``w*h > S*S`` or upscaling is allowed, keep the
  aspect ratio ``r = w / h`` with ``h = int(S / sqrt(r))`` and ``w = int(h * r)``; then fit both
  sides to the profile's multiple.
* grid: ``m = min(ceil(w*h / S^2), max_slice_nums)``; no slicing when ``m <= 1``; otherwise
  among the slice counts ``m-1, m, m+1`` (not 1, not above the cap) and every
  ``[cols, rows]`` factorisation (cols ascending) pick the first grid with the smallest
  ``|log(w/h) - log(cols/rows)|``.
* the source (overview) image is the best size, upscaled only when the image is not sliced;
  the refine image is the best upscaled size of one grid cell (original size fitted to a
  multiple of the grid) times the grid. Slices are equal cells, row-major, top row first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from mvshards.profiles import ImageIdForm, Profile

Size = tuple[int, int]
"""``(width, height)`` in pixels."""


def max_slice_nums_for_res(max_res: int) -> int:
    """``--max-res R`` means ``max_slice_nums = floor((R / 448) ** 2)`` (1344 -> 9)."""
    if max_res < 448:
        raise ValueError(f"--max-res must be at least 448 (one 448x448 view), got {max_res}")
    return math.floor((max_res / 448) ** 2)


def _fit(length: float, multiple: int) -> int:
    return max(round(length / multiple) * multiple, multiple)


def best_size(w: float, h: float, scale: int, multiple: int, upscale: bool) -> Size:
    """Resize target for ``(w, h)`` under the area ``scale**2``, fitted to ``multiple``."""
    if w * h > scale * scale or upscale:
        ratio = w / h
        h = int(scale / math.sqrt(ratio))
        w = int(h * ratio)
    return _fit(w, multiple), _fit(h, multiple)


def best_grid(
    w: int, h: int, scale: int, max_slice_nums: int, ties_prefer_more_rows: bool = False
) -> Size | None:
    """``(cols, rows)`` of the slice grid, or None when the image is not sliced.

    ``ties_prefer_more_rows`` selects the 4.6 family's enumeration (rows ascending, an exact
    tie goes to more rows); otherwise the 2.6 family's (cols ascending, first best wins).
    """
    multiple = min(math.ceil(w * h / (scale * scale)), max_slice_nums)
    if multiple <= 1:
        return None
    log_ratio = math.log(w / h)
    best: Size = (1, 1)
    min_error = math.inf
    for count in (multiple - 1, multiple, multiple + 1):
        if count == 1 or count > max_slice_nums:
            continue
        for first in range(1, count + 1):
            if count % first:
                continue
            cols, rows = (
                (count // first, first) if ties_prefer_more_rows else (first, count // first)
            )
            error = abs(log_ratio - math.log(cols / rows))
            if error < min_error or (
                ties_prefer_more_rows and error == min_error and rows > best[1]
            ):
                best, min_error = (cols, rows), error
    return best


@dataclass(frozen=True)
class SliceLayout:
    """Where one image's pixels go: the overview, the slice grid, and the patch grids."""

    original_size: Size
    source_size: Size
    grid: Size | None
    refine_size: Size | None
    slice_sizes: list[Size] = field(default_factory=list)
    tgt_sizes: list[tuple[int, int]] = field(default_factory=list)
    """Patch grids ``(rows, cols) = (H/14, W/14)``, the source first, then every slice."""

    @property
    def num_patches(self) -> int:
        return sum(r * c for r, c in self.tgt_sizes)

    @property
    def num_slices(self) -> int:
        return len(self.slice_sizes)

    def slice_boxes(self) -> list[tuple[int, int, int, int]]:
        """Crop boxes ``(left, top, right, bottom)`` of every slice in the refine image."""
        if self.grid is None or self.refine_size is None:
            return []
        cols, rows = self.grid
        cell_w, cell_h = self.refine_size[0] // cols, self.refine_size[1] // rows
        return [
            (c * cell_w, r * cell_h, (c + 1) * cell_w, (r + 1) * cell_h)
            for r in range(rows)
            for c in range(cols)
        ]

    def to_dict(self) -> dict[str, Any]:
        """The golden field names, sizes as ``[w, h]`` lists."""
        return {
            "source_size": list(self.source_size),
            "grid": list(self.grid) if self.grid else None,
            "refine_size": list(self.refine_size) if self.refine_size else None,
            "slice_sizes": [list(s) for s in self.slice_sizes],
            "tgt_sizes": [list(t) for t in self.tgt_sizes],
            "num_patches": self.num_patches,
        }


def compute_layout(w: int, h: int, profile: Profile, max_slice_nums: int) -> SliceLayout:
    """The slice layout the model's image processor computes for a ``w x h`` image."""
    if w <= 0 or h <= 0:
        raise ValueError(f"image size must be positive, got {w}x{h}")
    if max_slice_nums < 1:
        raise ValueError(f"max_slice_nums must be >= 1, got {max_slice_nums}")
    scale, multiple, patch = profile.scale_resolution, profile.size_multiple, profile.patch_size
    grid = best_grid(w, h, scale, max_slice_nums, profile.grid_ties_prefer_more_rows)
    if grid is None:
        source = best_size(w, h, scale, multiple, upscale=True)
        return SliceLayout((w, h), source, None, None, [], [_patch_grid(source, patch)])
    source = best_size(w, h, scale, multiple, upscale=False)
    cols, rows = grid
    refine_w, refine_h = _fit(w, cols), _fit(h, rows)
    cell = best_size(refine_w / cols, refine_h / rows, scale, multiple, upscale=True)
    refine = (cell[0] * cols, cell[1] * rows)
    slices = [cell] * (cols * rows)
    tgt = [_patch_grid(source, patch)] + [_patch_grid(cell, patch)] * len(slices)
    return SliceLayout((w, h), source, grid, refine, slices, tgt)


def _patch_grid(size: Size, patch: int) -> tuple[int, int]:
    return size[1] // patch, size[0] // patch


def image_id_tokens(image_id: int) -> int:
    """``<image_id>k</image_id>``: two brackets plus one token per digit of ``k``."""
    return 2 + len(str(image_id))


def num_image_tokens(layout: SliceLayout, profile: Profile, image_id: int | None) -> int:
    """LLM tokens of one image's placeholder; ``image_id=None`` writes no id."""
    tokens = 2 + profile.tokens_per_subimage(layout.tgt_sizes[0])
    if layout.grid is not None:
        rows = layout.grid[1]
        tokens += sum(2 + profile.tokens_per_subimage(t) for t in layout.tgt_sizes[1:])
        tokens += rows - 1
    if image_id is not None:
        tokens += image_id_tokens(image_id)
    return tokens


def assign_image_ids(layouts: list[SliceLayout], form: ImageIdForm) -> list[int | None]:
    """The image id each image of one sample carries under ``form`` (None: no id)."""
    ids: list[int | None] = []
    counter = 0
    for layout in layouts:
        if form == "none" or (form == "finetune" and layout.grid is None):
            ids.append(None)
            continue
        ids.append(counter)
        counter += 1
    return ids
