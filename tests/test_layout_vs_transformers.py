"""``minicpmv-4.6`` layouts equal transformers' own ``MiniCPMV4_6ImageProcessorPil``.

Two levels of comparison, both property tests with a fixed (derandomized) search:

* the real processor call on actual images where that is cheap (``w, h <= 2500``): its
  ``target_sizes``, ``grids``, ``num_patches_per_image`` and ``pixel_values`` shape, and its
  placeholder text (``MiniCPMV4_6Processor.replace_image_token``) against our token count;
* the processor's own arithmetic methods (``get_sliced_grid``, ``find_best_resize``,
  ``get_refine_size``) for sizes up to 10000 x 10000 and extreme aspect ratios.

Both in the default "16x" mode (profile ``minicpmv-4.6``) and "4x" (``minicpmv-4.6-4x``).
transformers speaks ``(height, width)`` and grids ``[rows, cols]``; we speak ``(w, h)`` and
``(cols, rows)``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image

from mvshards.layout import SliceLayout, compute_layout, num_image_tokens
from mvshards.profiles import get_profile

pil_module = pytest.importorskip(
    "transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6",
    reason="transformers with MiniCPM-V 4.6 support (>= 5.x) is needed for this reference test",
)
processing_module = pytest.importorskip("transformers.models.minicpmv4_6.processing_minicpmv4_6")

PROCESSOR = pil_module.MiniCPMV4_6ImageProcessorPil()
SCALE, PATCH = 448, 14
MODES = {"16x": "minicpmv-4.6", "4x": "minicpmv-4.6-4x"}

# Placeholder tokens of one character each, so len(text) is the token count (the
# tokenizer splits digits of the image id one per token).
TOKENS = SimpleNamespace(
    image_token="I",
    image_start_token="<",
    image_end_token=">",
    slice_start_token="[",
    slice_end_token="]",
    image_id_start_token="{",
    image_id_end_token="}",
    slice_mode=True,
)

SQUARES = [448, 449, 500, 633, 634, 700, 896, 897, 1000, 1343, 1344, 1345, 2000]
"""Square sides: 449..633 make ``m = 2`` where ``[1, 2]`` and ``[2, 1]`` tie exactly."""

THRESHOLDS = [
    (w + dw, h + dh)
    for k in range(1, 11)
    for (w, h) in [(448 * k, 448), (448, 448 * k), (224 * k, 896)]
    for dw, dh in [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)]
]
"""Sizes with ``w*h`` on and next to ``448^2 * k``, where the slice count steps up."""

EXTREMES = [
    (1, 1),
    (1, 2),
    (2, 1),
    (3, 5),
    (5, 3),
    (1, 8000),
    (8000, 3),
    (3, 8000),
    (10000, 1),
    (1, 10000),
    (10000, 10000),
    (9999, 7),
    (4000, 3000),
    (3000, 4000),
    (4032, 3024),
    (1080, 2400),
]


def reference_from_methods(w: int, h: int, max_slice_nums: int, mode: str) -> dict[str, Any]:
    """The processor's own arithmetic for a ``w x h`` image, in our conventions."""
    size_hw = (h, w)
    grid = PROCESSOR.get_sliced_grid(size_hw, max_slice_nums, SCALE)
    src_h, src_w = PROCESSOR.find_best_resize(
        size_hw, SCALE, PATCH, downsample_mode=mode, allow_upscale=grid is None
    )
    out: dict[str, Any] = {
        "source_size": (src_w, src_h),
        "grid": None,
        "refine_size": None,
        "slice_sizes": [],
        "tgt_sizes": [(src_h // PATCH, src_w // PATCH)],
    }
    if grid is not None:
        rows, cols = grid
        ref_h, ref_w = PROCESSOR.get_refine_size(
            size_hw, grid, SCALE, PATCH, downsample_mode=mode, allow_upscale=True
        )
        cell_h, cell_w = ref_h // rows, ref_w // cols
        out["grid"] = (cols, rows)
        out["refine_size"] = (ref_w, ref_h)
        out["slice_sizes"] = [(cell_w, cell_h)] * (rows * cols)
        out["tgt_sizes"] += [(cell_h // PATCH, cell_w // PATCH)] * (rows * cols)
    return out


def ours(layout: SliceLayout) -> dict[str, Any]:
    return {
        "source_size": tuple(layout.source_size),
        "grid": tuple(layout.grid) if layout.grid else None,
        "refine_size": tuple(layout.refine_size) if layout.refine_size else None,
        "slice_sizes": [tuple(s) for s in layout.slice_sizes],
        "tgt_sizes": [tuple(t) for t in layout.tgt_sizes],
    }


def run_processor(w: int, h: int, max_slice_nums: int, mode: str) -> Any:
    """The real preprocessing call on a solid-colour ``w x h`` image."""
    image = Image.new("RGB", (w, h), (90, 160, 30))
    return PROCESSOR(
        images=[image],
        max_slice_nums=max_slice_nums,
        downsample_mode=mode,
        input_data_format="channels_last",  # 1- or 3-pixel sides would fool the guesser
        return_tensors="np",
    )


def placeholder_tokens(processed: Any, mode: str) -> int:
    """Tokens of image 0's placeholder as the transformers processor writes it, id included."""
    proc_cls = processing_module.MiniCPMV4_6Processor
    divisor = 4 if mode == "4x" else 16
    text = proc_cls.replace_image_token(TOKENS, processed, image_idx=0, image_token_divisor=divisor)
    (with_id,) = proc_cls._prepend_local_ids(TOKENS, [TOKENS.image_token], [text], "I")
    return len(with_id)


def check_real_processor(w: int, h: int, max_slice_nums: int, mode: str) -> None:
    profile = get_profile(MODES[mode])
    layout = compute_layout(w, h, profile, max_slice_nums)
    out = run_processor(w, h, max_slice_nums, mode)
    where = f"{w}x{h} max_slice_nums={max_slice_nums} mode={mode}"

    target_sizes = [tuple(int(v) for v in t) for t in out["target_sizes"]]
    assert target_sizes == [tuple(t) for t in layout.tgt_sizes], where
    rows_cols = out["grids"][0]
    assert (None if list(rows_cols) == [0, 0] else (rows_cols[1], rows_cols[0])) == layout.grid, (
        where
    )
    assert out["num_patches_per_image"] == [1 + layout.num_slices], where
    assert out["pixel_values"].shape == (1, 3, PATCH, PATCH * layout.num_patches), where
    # Sizes are multiples of 14, so the patch grids pin the pixel sizes down exactly.
    th, tw = target_sizes[0]
    assert layout.source_size == (tw * PATCH, th * PATCH), where
    if layout.grid is not None:
        cols, rows = layout.grid
        ch, cw = target_sizes[1]
        assert layout.refine_size == (cw * PATCH * cols, ch * PATCH * rows), where
    assert num_image_tokens(layout, profile, 0) == placeholder_tokens(out, mode), where


def check_methods(w: int, h: int, max_slice_nums: int, mode: str) -> None:
    layout = compute_layout(w, h, get_profile(MODES[mode]), max_slice_nums)
    expected = reference_from_methods(w, h, max_slice_nums, mode)
    assert ours(layout) == expected, f"{w}x{h} max_slice_nums={max_slice_nums} mode={mode}"


small_side = st.integers(min_value=1, max_value=2500)
large_side = st.one_of(
    st.integers(min_value=1, max_value=10000),
    st.integers(min_value=1, max_value=16),
    st.integers(min_value=400, max_value=1400),
)
slice_cap = st.one_of(st.sampled_from([1, 4, 9]), st.integers(min_value=1, max_value=16))


@pytest.mark.slow
@settings(max_examples=250, deadline=None, derandomize=True)
@given(w=small_side, h=small_side, max_slice_nums=slice_cap)
@example(w=633, h=633, max_slice_nums=9)  # [1,2] vs [2,1] exact tie: 4.6 takes more rows
@example(w=449, h=449, max_slice_nums=9)
@example(w=1344, h=1344, max_slice_nums=9)
@example(w=1345, h=1345, max_slice_nums=9)
@example(w=896, h=448, max_slice_nums=9)
@example(w=896, h=449, max_slice_nums=4)
@example(w=1, h=2500, max_slice_nums=9)
@example(w=2500, h=3, max_slice_nums=9)
@example(w=3, h=3, max_slice_nums=9)
def test_real_processor_16x(w: int, h: int, max_slice_nums: int) -> None:
    check_real_processor(w, h, max_slice_nums, "16x")


@pytest.mark.slow
@settings(max_examples=100, deadline=None, derandomize=True)
@given(w=small_side, h=small_side, max_slice_nums=slice_cap)
@example(w=633, h=633, max_slice_nums=9)
@example(w=1000, h=300, max_slice_nums=9)
@example(w=2500, h=2500, max_slice_nums=4)
def test_real_processor_4x(w: int, h: int, max_slice_nums: int) -> None:
    check_real_processor(w, h, max_slice_nums, "4x")


@pytest.mark.slow
@settings(max_examples=600, deadline=None, derandomize=True)
@given(w=large_side, h=large_side, max_slice_nums=slice_cap, mode=st.sampled_from(sorted(MODES)))
def test_processor_methods(w: int, h: int, max_slice_nums: int, mode: str) -> None:
    check_methods(w, h, max_slice_nums, mode)


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("max_slice_nums", [1, 2, 4, 9])
def test_explicit_sizes(mode: str, max_slice_nums: int) -> None:
    """Squares (exact grid ties), slicing thresholds and extreme aspect ratios."""
    sizes = [(s, s) for s in SQUARES] + THRESHOLDS + EXTREMES
    failures = []
    for w, h in sizes:
        try:
            check_methods(w, h, max_slice_nums, mode)
        except AssertionError as e:
            failures.append(f"{e}\n  expected {reference_from_methods(w, h, max_slice_nums, mode)}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("side", [449, 500, 633])
def test_square_tie_goes_to_more_rows(side: int) -> None:
    """A square with 2 slices: ``[1, 2]`` and ``[2, 1]`` tie; the 4.6 code keeps 2 rows."""
    assert PROCESSOR.get_sliced_grid((side, side), 9, SCALE) == [2, 1]
    assert compute_layout(side, side, get_profile("minicpmv-4.6"), 9).grid == (1, 2)


def test_slice_pixels_match_processor() -> None:
    """Source resize, refine resize and ``slice_boxes`` order reproduce the processor's pixels."""
    rng = np.random.default_rng(0)
    w, h = 1500, 700
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    layout = compute_layout(w, h, get_profile("minicpmv-4.6"), 9)
    assert layout.grid is not None and layout.refine_size is not None
    out = PROCESSOR(images=[image], max_slice_nums=9, return_tensors="np")

    refine = image.resize(layout.refine_size, Image.Resampling.BICUBIC)
    views = [image.resize(layout.source_size, Image.Resampling.BICUBIC)]
    views += [refine.crop(box) for box in layout.slice_boxes()]
    parts = []
    for view in views:
        arr = np.asarray(view).transpose(2, 0, 1).astype(np.float32) / 255.0
        arr = (arr - 0.5) / 0.5  # IMAGENET_STANDARD mean/std
        parts.append(PROCESSOR.reshape_by_patch(arr, PATCH))
    mine = np.concatenate(parts, axis=-1)
    assert mine.shape == out["pixel_values"][0].shape
    np.testing.assert_allclose(mine, out["pixel_values"][0], atol=1e-6)
