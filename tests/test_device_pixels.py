"""uint8 to the device: the model's inputs made from the loader's uint8 batch equal, bit for
bit, what the float path before it made on the host (kept here as the reference).

Samples are real: stored-size PNGs of random noise (lossless, so the decoded pixels are known)
with layouts from ``compute_layout``, read back by ``sample_pixels`` (slices are views of the
refine image) and collated by the family's adapter; the conversion is
:func:`mvtrain.model.pixel_input.model_inputs` on the CPU, the one the step runs on its device.
Both families; unsliced, 2x1, 1x2 and 2x2-sliced images, a two-image sample, text-only samples;
mixed, image-only and text-only batches.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from mvshards.families import NATIVE_46, REMOTE_26, Family, PixelNorm
from mvshards.layout import compute_layout, num_image_tokens
from mvshards.profiles import get_profile
from mvshards.schema import ImageEntry, SampleMeta, refine_member, sample_key, source_member
from mvtrain.data.loader import make_micro_batch
from mvtrain.data.pixels import sample_pixels
from mvtrain.data.sample import LoadedSample
from mvtrain.data.tokenize import TokenizedSample
from mvtrain.model.adapters import adapter_for
from mvtrain.model.pixel_input import PixelPack, model_inputs, to_device

PROFILES = {NATIVE_46: "minicpmv-4.6", REMOTE_26: "minicpmv-2.6"}
SAMPLES: dict[str, list[tuple[int, int]]] = {
    "unsliced": [(300, 200)],
    "wide": [(900, 500)],  # 2x1 slices
    "tall": [(400, 700)],  # 1x2 slices
    "square": [(1000, 1000)],  # 2x2 slices
    "two": [(300, 200), (900, 500)],
    "text": [],
    "text2": [],
}
BATCHES = {
    "mixed": ["wide", "text", "unsliced", "two", "tall"],
    "images": ["square", "unsliced"],
    "text_only": ["text", "text2"],
}


def _png(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def _sample(index: int, name: str, family: Family) -> tuple[LoadedSample, list[np.ndarray]]:
    """Sample ``name`` stored for ``family`` and read back; with the arrays it stored, per
    image its source then (when sliced) its refine image."""
    profile = get_profile(PROFILES[family])
    rng = np.random.default_rng(index)
    key = sample_key(index)
    members: dict[str, bytes] = {}
    stored: list[np.ndarray] = []
    images = []
    for i, (w, h) in enumerate(SAMPLES[name]):
        layout = compute_layout(w, h, profile, 4)
        src, ref = source_member(key, i, "png"), None
        sizes = [(src, layout.source_size)]
        if layout.refine_size is not None:
            ref = refine_member(key, i, "png")
            sizes.append((ref, layout.refine_size))
        for member, (sw, sh) in sizes:
            stored.append(rng.integers(0, 256, (sh, sw, 3), dtype=np.uint8))
            members[member.split(".", 1)[1]] = _png(stored[-1])
        tokens = num_image_tokens(layout, profile, None)
        images.append(ImageEntry(f"{name}_{i}.png", "0" * 64, layout, None, tokens, src, ref))
    conversations = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    meta = SampleMeta(key, name, conversations, images, image_names=["<image>"] * len(images))
    pixels, grids = sample_pixels(meta, members)
    n = 6 + 2 * len(grids) + index
    ids = [int(x) for x in rng.integers(5, 90, n)]
    spans = [(1 + 2 * k, 2 + 2 * k) for k in range(len(grids))]
    return LoadedSample(meta, TokenizedSample(key, ids, ids, spans), pixels, grids), stored


@pytest.fixture(scope="module")
def samples() -> dict[Family, dict[str, tuple[LoadedSample, list[np.ndarray]]]]:
    return {
        family: {name: _sample(i, name, family) for i, name in enumerate(SAMPLES)}
        for family in PROFILES
    }


# --- the float path before this change: the reference ----------------------------------


def _normalised(rgb: np.ndarray, family: Family) -> np.ndarray:
    """``[H, W, 3]`` uint8 -> float32 by the processor's own float ops on every value."""
    if family.pixels.rescale_in_float64:  # transformers' rescale, then normalize
        x = (rgb.astype(np.float64) * (1 / 255)).astype(np.float32)
    else:  # torchvision ToTensor, then Normalize
        x = rgb.astype(np.float32) / np.float32(255)
    return (x - np.float32(0.5)) / np.float32(0.5)


def _reshape_by_patch(hwc: np.ndarray, patch: int = 14) -> torch.Tensor:
    h, w, c = hwc.shape
    out = hwc.reshape(h // patch, patch, w // patch, patch, c).transpose(4, 1, 0, 2, 3)
    return torch.from_numpy(np.ascontiguousarray(out).reshape(c, patch, -1))


def _reference_pixels(batch: list[LoadedSample], family: Family) -> Any:
    per_sample = [
        [_reshape_by_patch(_normalised(p.numpy(), family)) for p in s.pixel_values] for s in batch
    ]
    if not family.navit_packing:  # the official data_collator: per-sample lists
        return per_sample
    patches = [p for row in per_sample for p in row]
    return torch.cat(patches, dim=-1).unsqueeze(0) if patches else None


def _assert_same(ours: Any, ref: Any) -> None:
    if isinstance(ref, torch.Tensor):
        assert isinstance(ours, torch.Tensor) and ours.dtype == ref.dtype == torch.float32
        assert ours.shape == ref.shape and torch.equal(ours, ref)
    elif isinstance(ref, list):
        assert isinstance(ours, list) and len(ours) == len(ref)
        for a, b in zip(ours, ref, strict=True):
            _assert_same(a, b)
    else:
        assert ours is ref is None


# --- tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(PROFILES), ids=str)
def test_device_batch_equals_the_float_path(samples: dict[Family, Any], family: Family) -> None:
    adapter = adapter_for(family)
    for batch_name, names in BATCHES.items():
        batch = [samples[family][n][0] for n in names]
        host = adapter.host_batch(batch)
        pack = host["pixel_values"]
        grids = [g for s in batch for g in s.tgt_sizes]
        if grids or not family.navit_packing:
            assert isinstance(pack, PixelPack) and pack.rows.dtype == torch.uint8
            assert list(pack.grids) == grids
            assert pack.per_sample == tuple(len(s.tgt_sizes) for s in batch)
            assert pack.rows.nbytes == 3 * 14 * 14 * sum(r * c for r, c in grids)
        else:
            assert pack is None
        # what the step gets: uint8 copied as it is, the float pixels made after the copy
        moved = to_device(host, "cpu")
        assert moved["pixel_values"] is None or moved["pixel_values"].rows.dtype == torch.uint8
        inputs = model_inputs(host, "cpu")
        _assert_same(inputs["pixel_values"], _reference_pixels(batch, family))
        for key, value in host.items():  # every other input as the adapter collated it
            if key != "pixel_values":
                assert type(inputs[key]) is type(value), (batch_name, key)
        assert set(inputs) == set(host)
        micro = make_micro_batch(0, batch, 1.0, adapter)
        assert micro.has_images == bool(grids)
        if batch_name == "mixed":  # the CPU views of the same conversion
            _assert_same(adapter.collate(batch)["pixel_values"], inputs["pixel_values"])
            _assert_same(micro.inputs["pixel_values"], inputs["pixel_values"])


@pytest.mark.parametrize("family", list(PROFILES), ids=str)
def test_loaded_pixels_are_the_stored_uint8_crops(
    samples: dict[Family, Any], family: Family
) -> None:
    """What the loader keeps: the decoded source and the refine image's slices, uint8 views."""
    for name in SAMPLES:
        sample, stored = samples[family][name]
        k = 0
        views = iter(sample.pixel_values)
        for entry in sample.meta.images:
            assert torch.equal(next(views), torch.from_numpy(stored[k]))
            k += 1
            if entry.layout.grid is None:
                continue
            refine = stored[k]
            memory = set()
            for left, top, right, bottom in entry.layout.slice_boxes():
                view = next(views)
                assert view.dtype == torch.uint8
                assert torch.equal(view, torch.from_numpy(refine[top:bottom, left:right]))
                memory.add(view.untyped_storage().data_ptr())
                assert view.untyped_storage().nbytes() == refine.nbytes  # a view, no copy
            assert len(memory) == 1
            k += 1
        assert next(views, None) is None and k == len(stored)


def test_the_comparison_catches_a_swapped_slice_and_a_wrong_normalisation(
    samples: dict[Family, Any],
) -> None:
    """Same shapes, other values: two slices swapped, or another std in the table."""
    batch = [samples[NATIVE_46]["square"][0]]
    ref = _reference_pixels(batch, NATIVE_46)
    swapped = list(batch[0].pixel_values)
    swapped[1], swapped[2] = swapped[2], swapped[1]
    with pytest.raises(AssertionError):
        _assert_same(PixelPack.pack([swapped], NATIVE_46).values(), ref)
    pack = PixelPack.pack([batch[0].pixel_values], NATIVE_46)
    _assert_same(pack.values(), ref)
    other = dataclasses.replace(pack, norm=PixelNorm(rescale_in_float64=True, std=0.25))
    with pytest.raises(AssertionError):
        _assert_same(other.values(), ref)


def test_pack_refuses_what_is_not_a_uint8_patch_multiple() -> None:
    with pytest.raises(ValueError, match="multiples of 14"):
        PixelPack.pack([[torch.zeros((28, 30, 3), dtype=torch.uint8)]], NATIVE_46)
    with pytest.raises(ValueError, match="uint8"):
        PixelPack.pack([[torch.zeros((28, 28, 3))]], NATIVE_46)
