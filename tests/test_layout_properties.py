"""Invariants of ``compute_layout`` that hold for every profile and every image size."""

from __future__ import annotations

import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mvshards.layout import (
    assign_image_ids,
    compute_layout,
    max_slice_nums_for_res,
    num_image_tokens,
)
from mvshards.profiles import PROFILES, get_profile

PROFILE_NAMES = sorted(PROFILES)
SCALE = 448

side = st.one_of(
    st.integers(min_value=1, max_value=10000),
    st.integers(min_value=1, max_value=64),
    st.integers(min_value=300, max_value=1500),
)
slice_cap = st.integers(min_value=1, max_value=16)
profile_name = st.sampled_from(PROFILE_NAMES)
SETTINGS = settings(max_examples=300, deadline=None, derandomize=True)


@SETTINGS
@given(w=side, h=side, max_slice_nums=slice_cap, name=profile_name)
@example(w=1, h=1, max_slice_nums=9, name="minicpmv-2.6")
@example(w=448, h=448, max_slice_nums=9, name="minicpmv-4.6")
@example(w=448, h=449, max_slice_nums=9, name="minicpmv-4.6")
@example(w=1344, h=1345, max_slice_nums=9, name="minicpmv-2.6")
@example(w=1, h=10000, max_slice_nums=9, name="minicpmv-4.6-4x")
@example(w=10000, h=3, max_slice_nums=16, name="minicpmv-2.6")
def test_layout_invariants(w: int, h: int, max_slice_nums: int, name: str) -> None:
    profile = get_profile(name)
    mult, patch = profile.size_multiple, profile.patch_size
    layout = compute_layout(w, h, profile, max_slice_nums)

    assert layout.original_size == (w, h)
    expected_slicing = min(math.ceil(w * h / SCALE**2), max_slice_nums) > 1
    assert (layout.grid is not None) == expected_slicing
    assert (layout.refine_size is not None) == expected_slicing

    sw, sh = layout.source_size
    assert sw % mult == 0 and sh % mult == 0 and sw > 0 and sh > 0
    assert layout.tgt_sizes[0] == (sh // patch, sw // patch)
    assert mult % patch == 0, "sizes must be whole patches"

    if layout.grid is None:
        assert layout.slice_sizes == [] and len(layout.tgt_sizes) == 1
        assert layout.slice_boxes() == []
    else:
        cols, rows = layout.grid
        assert layout.refine_size is not None
        rw, rh = layout.refine_size
        assert 2 <= cols * rows <= max_slice_nums
        assert len(layout.slice_sizes) == cols * rows == layout.num_slices
        cell = layout.slice_sizes[0]
        assert all(s == cell for s in layout.slice_sizes)
        assert cell[0] % mult == 0 and cell[1] % mult == 0
        assert (cell[0] * cols, cell[1] * rows) == (rw, rh)
        assert rw % mult == 0 and rh % mult == 0
        assert layout.tgt_sizes[1:] == [(cell[1] // patch, cell[0] // patch)] * (cols * rows)

    assert layout.num_patches == sum(r * c for r, c in layout.tgt_sizes)
    d = layout.to_dict()
    assert d["num_patches"] == layout.num_patches
    assert d["source_size"] == [sw, sh]


@SETTINGS
@given(w=side, h=side, max_slice_nums=slice_cap, name=profile_name)
def test_slice_boxes_tile_refine_image(w: int, h: int, max_slice_nums: int, name: str) -> None:
    layout = compute_layout(w, h, get_profile(name), max_slice_nums)
    boxes = layout.slice_boxes()
    if layout.grid is None:
        assert boxes == []
        return
    assert layout.refine_size is not None
    rw, rh = layout.refine_size
    cols, rows = layout.grid
    assert len(boxes) == cols * rows
    for i, (left, top, right, bottom) in enumerate(boxes):
        assert (right - left, bottom - top) == layout.slice_sizes[i]
        assert 0 <= left < right <= rw and 0 <= top < bottom <= rh
        # row-major, top row first
        assert (left, top) == ((i % cols) * (rw // cols), (i // cols) * (rh // rows))
    assert sum((r - lft) * (b - t) for lft, t, r, b in boxes) == rw * rh
    xs = sorted({b[0] for b in boxes} | {b[2] for b in boxes})
    ys = sorted({b[1] for b in boxes} | {b[3] for b in boxes})
    assert xs[0] == 0 and xs[-1] == rw and len(xs) == cols + 1
    assert ys[0] == 0 and ys[-1] == rh and len(ys) == rows + 1


@SETTINGS
@given(w=side, h=side, max_slice_nums=slice_cap, name=profile_name)
def test_token_counts(w: int, h: int, max_slice_nums: int, name: str) -> None:
    """Brackets + queries per (sub)image, a newline between slice rows, then the image id."""
    profile = get_profile(name)
    layout = compute_layout(w, h, profile, max_slice_nums)
    if profile.query_tokens is not None:
        per_view = [2 + profile.query_tokens] * len(layout.tgt_sizes)
    else:
        assert profile.patch_tokens_divisor is not None
        per_view = [2 + r * c // profile.patch_tokens_divisor for r, c in layout.tgt_sizes]
    newlines = layout.grid[1] - 1 if layout.grid else 0
    base = sum(per_view) + newlines
    assert num_image_tokens(layout, profile, None) == base
    assert num_image_tokens(layout, profile, 0) == base + 3
    assert num_image_tokens(layout, profile, 12) == base + 4


def test_assign_image_ids_forms() -> None:
    p = get_profile("minicpmv-2.6")
    small, big = compute_layout(300, 300, p, 9), compute_layout(2000, 1500, p, 9)
    layouts = [small, big, small, big]
    assert assign_image_ids(layouts, "inference") == [0, 1, 2, 3]
    assert assign_image_ids(layouts, "finetune") == [None, 0, None, 1]
    assert assign_image_ids(layouts, "none") == [None] * 4
    assert assign_image_ids([], "inference") == []


def test_max_slice_nums_for_res() -> None:
    assert max_slice_nums_for_res(1344) == 9
    assert max_slice_nums_for_res(896) == 4
    assert max_slice_nums_for_res(448) == 1
    values = [max_slice_nums_for_res(r) for r in range(448, 4000)]
    assert values == sorted(values), "must be monotonic in the resolution"
    assert all(
        v == math.floor((r / 448) ** 2) for r, v in zip(range(448, 4000), values, strict=True)
    )
    with pytest.raises(ValueError):
        max_slice_nums_for_res(447)
    with pytest.raises(ValueError):
        max_slice_nums_for_res(0)


@pytest.mark.parametrize(
    ("w", "h", "max_slice_nums"),
    [(0, 10, 9), (10, 0, 9), (-5, 10, 9), (10, -1, 9), (10, 10, 0), (10, 10, -3)],
)
@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_invalid_input_raises(w: int, h: int, max_slice_nums: int, name: str) -> None:
    with pytest.raises(ValueError):
        compute_layout(w, h, get_profile(name), max_slice_nums)


def test_unknown_profile_raises() -> None:
    with pytest.raises(ValueError, match="known profiles"):
        get_profile("minicpmv-9.9")


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_known_layouts(name: str) -> None:
    """Fixed points that do not depend on the profile's rounding multiple."""
    p = get_profile(name)
    assert compute_layout(448, 448, p, 9).source_size == (448, 448)
    assert compute_layout(448, 448, p, 9).grid is None
    assert compute_layout(1344, 1344, p, 9).grid == (3, 3)
    assert compute_layout(1344, 1344, p, 9).refine_size == (1344, 1344)
    assert compute_layout(1344, 1344, p, 4).grid == (2, 2)
    assert compute_layout(1344, 1344, p, 1).grid is None
    assert compute_layout(1792, 448, p, 9).grid == (4, 1)
    assert compute_layout(448, 1792, p, 9).grid == (1, 4)
