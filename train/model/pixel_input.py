"""A micro-batch's pixels: uint8 from the loader to the device, the model's float input there.

Host side: the loader decodes every stored image to uint8 ``[H, W, 3]`` and cuts slices as
views (:mod:`mvtrain.data.pixels`); collating packs all (sub)images of the micro-batch into
one uint8 :class:`PixelPack` in *patch rows*: ``rows[i, p, j, c]`` is channel ``c`` of pixel
``(i, j)`` of patch ``p``, the patches of every (sub)image in batch order, each one's
row-major. Packing moves whole pixel rows (row ``r*14 + i`` of a (sub)image lands in
``rows[i]``): the byte copy any packing costs, no float work. The pack is pinned and copied to
the device as uint8, a quarter of the bytes of the float pixels.

Device side: :func:`model_inputs` -- the one conversion, used by the training step, the
evaluation, the micro-batches an out-of-memory error re-collates (they go through the step),
the memory probe, ``scripts/gpu_check.py`` and :meth:`collate` of the adapters (CPU, for
checks) -- copies a collated batch to the device and turns each pack there into the float32
pixels in one expression (:func:`patches_from_rows`): channels first, every byte through the
family's normalisation table, giving ``[3, 14, P*14]``, the processors' NaViT
``reshape_by_patch`` layout (element ``[c, i, p*14 + j]``). What differs per family is data
on the pack: the table (``Family.pixels``) and the form (``Family.navit_packing``): the 4.6
family takes that one tensor as ``[1, 3, 14, sum L_i*14]``, the 2.6 family per-sample lists of
per-(sub)image ``[3, 14, L_i*14]`` (views of it).

Normalisation, bit for bit, by the family's :class:`~mvshards.families.PixelNorm`:

* 4.6 family: as ``MiniCPMV4_6ImageProcessorPil`` -- ``rescale`` (uint8 to float64 times
  1/255, cast to float32) then ``normalize`` with ``IMAGENET_STANDARD_MEAN``/``STD`` (0.5,
  0.5) in float32: ``(x - 0.5) / 0.5``.
* 2.6 family: as the official fine-tuning transform (``ToTensor`` + ``Normalize`` with the
  Inception mean/std, also 0.5/0.5): ``x / 255`` in float32, then ``(x - 0.5) / 0.5``.

Both are per-value functions of the uint8 input, so each is a 256-entry table computed on the
host with exactly those float operations (:func:`norm_table`), and the device only looks
values up: a gather does no arithmetic, so the result is identical on every device, with no
dependence on how a GPU rounds a division. The 4.6 processor slices the *uint8* refine image
and normalises each slice, which is the same as normalising first and slicing after.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import torch

from mvshards.families import Family, PixelNorm
from mvtrain.data.pixels import PATCH_SIZE


@cache
def norm_table(norm: PixelNorm) -> torch.Tensor:
    """The 256-entry float32 table of ``norm``: every uint8 value through its exact float ops."""
    values = np.arange(256, dtype=np.uint8)
    if norm.rescale_in_float64:
        x = (values.astype(np.float64) * (1 / 255)).astype(np.float32)
    else:
        x = values.astype(np.float32) / np.float32(255)
    mean, std = np.float32(norm.mean), np.float32(norm.std)
    return torch.from_numpy(((x - mean) / std).astype(np.float32))


@cache
def _table_on(norm: PixelNorm, device: torch.device) -> torch.Tensor:
    return norm_table(norm).to(device)


def patches_from_rows(rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """uint8 patch rows ``[14, P, 14, 3]`` -> float32 ``[1, 3, 14, P*14]`` on their device:
    channels first (a uint8 copy), every byte through ``table`` (an int32 index, a gather)."""
    values = table.index_select(0, rows.permute(3, 0, 1, 2).reshape(-1).int())
    return values.view(1, 3, PATCH_SIZE, rows.shape[1] * PATCH_SIZE)


@dataclass
class PixelPack:
    """Every (sub)image of one micro-batch as uint8 patch rows, with its layout."""

    rows: torch.Tensor
    """uint8 ``[14, P, 14, 3]`` (see the module doc)."""
    grids: tuple[tuple[int, int], ...]
    """Per (sub)image in batch order: its patch grid ``(H/14, W/14)``."""
    per_sample: tuple[int, ...]
    """(Sub)images per sample (row) of the micro-batch."""
    norm: PixelNorm
    """The family's normalisation."""
    navit_packing: bool
    """The family's model takes one packed tensor; False: per-sample lists of (sub)images."""

    @classmethod
    def pack(cls, images: Sequence[Sequence[torch.Tensor]], family: Family) -> PixelPack:
        """Pack ``images[s]`` -- sample ``s``'s (sub)images, uint8 ``[H, W, 3]`` (views are
        fine) -- for ``family``."""
        grids: list[tuple[int, int]] = []
        for image in (im for sample in images for im in sample):
            h, w, c = image.shape
            if image.dtype != torch.uint8 or c != 3 or h % PATCH_SIZE or w % PATCH_SIZE:
                raise ValueError(
                    f"expected uint8 [H, W, 3] images with H and W multiples of {PATCH_SIZE}, "
                    f"got {image.dtype} {list(image.shape)}"
                )
            grids.append((h // PATCH_SIZE, w // PATCH_SIZE))
        total = sum(r * c for r, c in grids)
        rows = torch.empty((PATCH_SIZE, total, PATCH_SIZE, 3), dtype=torch.uint8)
        start = 0
        flat = (im for sample in images for im in sample)
        for image, (r, c) in zip(flat, grids, strict=True):
            target = rows[:, start : start + r * c].view(PATCH_SIZE, r, c, PATCH_SIZE, 3)
            target.copy_(image.view(r, PATCH_SIZE, c, PATCH_SIZE, 3).transpose(0, 1))
            start += r * c
        return cls(
            rows, tuple(grids), tuple(len(s) for s in images), family.pixels, family.navit_packing
        )

    @property
    def num_patches(self) -> int:
        return int(self.rows.shape[1])

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> PixelPack:
        """The same pack with ``fn`` applied to its rows (pinning, copying to a device)."""
        return dataclasses.replace(self, rows=fn(self.rows))

    def values(self) -> Any:
        """The model's ``pixel_values`` of this pack, made on the rows' device: float32
        ``[1, 3, 14, sum L_i*14]`` (NaViT packing), else per sample the list of its
        (sub)images' ``[3, 14, L_i*14]``."""
        values = patches_from_rows(self.rows, _table_on(self.norm, self.rows.device))
        if self.navit_packing:
            return values
        views = iter(values[0].split([r * c * PATCH_SIZE for r, c in self.grids], dim=-1))
        return [[next(views) for _ in range(n)] for n in self.per_sample]


def map_tensors(value: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``value`` with ``fn`` applied to every tensor in it (lists, dicts, pixel packs)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, PixelPack):
        return value.map_rows(fn)
    if isinstance(value, list):
        return [map_tensors(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    return value


def to_device(inputs: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    """``inputs`` on ``device`` as they are (a pack stays uint8); copies from pinned memory do
    not block the host."""
    return map_tensors(dict(inputs), lambda t: t.to(device, non_blocking=True))


def model_inputs(batch: Mapping[str, Any], device: torch.device | str) -> dict[str, Any]:
    """The model's inputs on ``device`` from a collated batch: every tensor copied there (the
    pixels as uint8), then each :class:`PixelPack` made into the model's float32
    ``pixel_values`` there. The one host-to-model conversion (see the module doc)."""
    moved = to_device(batch, device)
    return {k: v.values() if isinstance(v, PixelPack) else v for k, v in moved.items()}
