"""Stored source/refine images -> uint8 (sub)images, one per view, with their patch grids.

A shard stores, per image, the source (overview) image at ``layout.source_size`` and, when
sliced, the refine image at ``layout.refine_size``. Here they are decoded (PIL, RGB), checked
against the stored layout, and the refine image is cut into ``layout.slice_boxes()`` -- views
of the decoded array: no second decode, no copy. Every (sub)image stays uint8 ``[H, W, 3]``
with its patch grid ``(rows, cols) = (H/14, W/14)`` next to it; collating packs them
(:class:`mvtrain.model.pixel_input.PixelPack`) and the training device normalises and
patchifies them (:func:`mvtrain.model.pixel_input.model_inputs`).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping

import numpy as np
import torch
from PIL import Image

from mvshards.schema import SampleMeta

PATCH_SIZE = 14


class PixelError(ValueError):
    """A stored image does not match its sample's layout (one line naming key and member)."""


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


def _tensor(rgb: np.ndarray) -> torch.Tensor:
    """``rgb`` as a tensor sharing its memory. PIL's arrays are read-only (they wrap the decoded
    bytes); nothing writes to these tensors -- collating copies out of them -- so torch's
    warning about read-only arrays does not apply."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(rgb)


def sample_pixels(
    meta: SampleMeta, members: Mapping[str, bytes]
) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
    """Every (sub)image of ``meta`` in vision order, and its patch grid.

    Returns ``(images, tgt_sizes)``: per image its source then its slices (row-major, top
    row first), each uint8 ``[H, W, 3]`` (a slice is a view of its decoded refine image);
    ``tgt_sizes[i] = (H/14, W/14)``, checked against the stored ``layout.tgt_sizes``.
    """
    images: list[torch.Tensor] = []
    tgt_sizes: list[tuple[int, int]] = []
    for entry in meta.images:
        layout = entry.layout
        src = decode_rgb(
            _member_bytes(members, meta.key, entry.source_member),
            meta.key,
            entry.source_member,
            layout.source_size,
        )
        views = [_tensor(src)]
        if layout.grid is not None:
            if entry.refine_member is None or layout.refine_size is None:
                raise PixelError(
                    f"sample {meta.key}: an image with a {layout.grid} grid has no refine "
                    "member; the shard is malformed -- rebuild it"
                )
            ref = _tensor(
                decode_rgb(
                    _member_bytes(members, meta.key, entry.refine_member),
                    meta.key,
                    entry.refine_member,
                    layout.refine_size,
                )
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
        images += views
        tgt_sizes += grids
    return images, tgt_sizes
