"""Stored source/refine images -> normalised NaViT patch tensors, one per (sub)image.

A shard stores, per image, the source (overview) image at ``layout.source_size`` and, when
sliced, the refine image at ``layout.refine_size``. Here they are decoded (PIL, RGB), checked
against the stored layout, the refine image is cut into ``layout.slice_boxes()`` (a crop of
the decoded array, no second decode), every (sub)image is normalised and reshaped into the
NaViT layout ``[3, patch, H*W/patch]`` (``reshape_by_patch`` of the processors), and its patch
grid ``(rows, cols) = (H/patch, W/patch)`` is returned next to it.

Normalisation, bit for bit, by the family's :class:`~mvshards.families.PixelNorm`:

* 4.6 family: as ``MiniCPMV4_6ImageProcessorPil`` -- ``rescale`` (uint8 to float64 times
  1/255, cast to float32) then ``normalize`` with ``IMAGENET_STANDARD_MEAN``/``STD`` (0.5,
  0.5) in float32: ``(x - 0.5) / 0.5``.
* 2.6 family: as the official fine-tuning transform (``ToTensor`` + ``Normalize`` with the
  Inception mean/std, also 0.5/0.5): ``x / 255`` in float32, then ``(x - 0.5) / 0.5``.

Both are per-value functions of the uint8 input, so each is applied as a 256-entry lookup
table computed with exactly those float operations: identical results, one gather per pixel.
The 4.6 processor slices the *uint8* refine image and normalises each slice, which is the
same as normalising first and slicing after (the normalisation is per value).
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from functools import cache

import numpy as np
import torch
from PIL import Image

from mvshards.families import NATIVE_46, Family, PixelNorm
from mvshards.schema import SampleMeta

PATCH_SIZE = 14


class PixelError(ValueError):
    """A stored image does not match its sample's layout (one line naming key and member)."""


@cache
def _lut(norm: PixelNorm) -> np.ndarray:
    """The 256-entry table of ``norm``: every uint8 value through its exact float ops."""
    values = np.arange(256, dtype=np.uint8)
    if norm.rescale_in_float64:
        x = (values.astype(np.float64) * (1 / 255)).astype(np.float32)
    else:
        x = values.astype(np.float32) / np.float32(255)
    mean, std = np.float32(norm.mean), np.float32(norm.std)
    return ((x - mean) / std).astype(np.float32)


def normalise(rgb: np.ndarray, family: Family = NATIVE_46) -> np.ndarray:
    """``[H, W, 3]`` uint8 -> ``[H, W, 3]`` float32, normalised as ``family``'s processor."""
    if rgb.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {rgb.dtype}")
    return _lut(family.pixels)[rgb]


def reshape_by_patch(hwc: np.ndarray, patch: int = PATCH_SIZE) -> torch.Tensor:
    """``[H, W, C]`` -> ``[C, patch, H*W/patch]``: the processors' NaViT patch layout.

    Element ``[c, i, (r * (W/patch) + q) * patch + j]`` is pixel ``(r*patch + i, q*patch + j)``
    of channel ``c``: patches row-major, each patch's rows stacked along dimension 1.
    """
    h, w, c = hwc.shape
    if h % patch or w % patch:
        raise ValueError(f"image {w}x{h} is not a multiple of the patch size {patch}")
    out = hwc.reshape(h // patch, patch, w // patch, patch, c).transpose(4, 1, 0, 2, 3)
    return torch.from_numpy(np.ascontiguousarray(out).reshape(c, patch, -1))


def _member_bytes(members: Mapping[str, bytes], key: str, member: str) -> bytes:
    """A member's bytes from ``{ext: bytes}`` (as ``iter_shard`` gives) or full names."""
    prefix = f"{key}."
    ext = member[len(prefix) :] if member.startswith(prefix) else member
    data = members.get(ext)
    if data is None:
        data = members.get(member)
    if data is None:
        raise PixelError(
            f"sample {key}: member {member} is missing from the shard; re-run `mvprep verify` "
            "and rebuild the shard"
        )
    return data


def decode_rgb(data: bytes, key: str, member: str, size: tuple[int, int]) -> np.ndarray:
    """Decode one stored image to ``[H, W, 3]`` uint8 and check it is ``size`` (w, h)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            rgb = im if im.mode == "RGB" else im.convert("RGB")
            arr = np.asarray(rgb)
    except Exception as exc:  # any decoder failure means a broken member
        raise PixelError(f"sample {key}: member {member} does not decode ({exc})") from exc
    got = (arr.shape[1], arr.shape[0])
    if got != tuple(size):
        raise PixelError(
            f"sample {key}: member {member} is {got[0]}x{got[1]}, its layout says "
            f"{size[0]}x{size[1]}; the shard does not match its JSON -- rebuild it"
        )
    return arr


def sample_pixels(
    meta: SampleMeta, members: Mapping[str, bytes], family: Family = NATIVE_46
) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
    """Every (sub)image of ``meta`` in vision order, and its patch grid.

    Returns ``(patches, tgt_sizes)``: per image its source then its slices (row-major, top
    row first), each ``[3, 14, H*W/14]`` float32; ``tgt_sizes[i] = (H/14, W/14)``, checked
    against the stored ``layout.tgt_sizes``.
    """
    patches: list[torch.Tensor] = []
    tgt_sizes: list[tuple[int, int]] = []
    for entry in meta.images:
        layout = entry.layout
        src = decode_rgb(
            _member_bytes(members, meta.key, entry.source_member),
            meta.key,
            entry.source_member,
            layout.source_size,
        )
        views = [normalise(src, family)]
        if layout.grid is not None:
            if entry.refine_member is None or layout.refine_size is None:
                raise PixelError(
                    f"sample {meta.key}: an image with a {layout.grid} grid has no refine "
                    "member; the shard is malformed -- rebuild it"
                )
            ref = normalise(
                decode_rgb(
                    _member_bytes(members, meta.key, entry.refine_member),
                    meta.key,
                    entry.refine_member,
                    layout.refine_size,
                ),
                family,
            )
            views += [
                ref[top:bottom, left:right] for left, top, right, bottom in layout.slice_boxes()
            ]
        grids = [(v.shape[0] // PATCH_SIZE, v.shape[1] // PATCH_SIZE) for v in views]
        if grids != [tuple(t) for t in layout.tgt_sizes]:
            raise PixelError(
                f"sample {meta.key}: image {entry.source_member} gives patch grids {grids}, its "
                f"layout says {layout.tgt_sizes}; the shard is malformed -- rebuild it"
            )
        patches += [reshape_by_patch(v) for v in views]
        tgt_sizes += grids
    return patches, tgt_sizes
