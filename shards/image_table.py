"""The per-image table of an index entry: numbers about every image, without opening a tar.

``mvprep build`` stores it in each shard entry's ``stats[IMAGE_TABLE_KEY]`` as one list per
:data:`IMAGE_COLUMNS` name, one value per image: the images of the shard's samples in shard
order, each sample's images in order (a sample's image count is its index row's
``num_images``). ``mvprep stats`` reads slices and original resolutions from it; the planner
reads the 2.6 family's slice costs from it (:func:`sample_slice_costs`). Entries written
before the table existed have none: readers get None and fall back.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from mvshards.schema import ImageEntry

IMAGE_TABLE_KEY = "image_table"
"""Key of the per-image columns in a shard entry's ``stats``."""
IMAGE_COLUMNS = ("slices", "width", "height", "patches", "max_subimage_patches")
"""Per image: slices (0 = not sliced), original width and height, vision patches (source +
slices) and the patches of its largest (sub)image (the 2.6 family pads every slice to it)."""

ImageColumns = dict[str, np.ndarray]
""":data:`IMAGE_COLUMNS` name -> int64 array, one value per image."""


def new_image_table() -> dict[str, list[int]]:
    """An empty per-shard image table: one list per :data:`IMAGE_COLUMNS` name."""
    return {name: [] for name in IMAGE_COLUMNS}


def add_image_rows(table: dict[str, list[int]], images: Iterable[ImageEntry]) -> None:
    """Append one value per column for each image of one sample (``SampleMeta.images``, in
    image order)."""
    for image in images:
        layout = image.layout
        table["slices"].append(layout.num_slices)
        table["width"].append(layout.original_size[0])
        table["height"].append(layout.original_size[1])
        table["patches"].append(layout.num_patches)
        table["max_subimage_patches"].append(max((r * c for r, c in layout.tgt_sizes), default=0))


def read_image_table(stats: dict[str, Any] | None, num_images: int) -> ImageColumns | None:
    """The table of an entry's ``stats`` as int64 columns; None when it has none or its
    columns do not hold ``num_images`` values each (an entry from an older mvprep)."""
    table = (stats or {}).get(IMAGE_TABLE_KEY)
    if not isinstance(table, dict) or not all(
        isinstance(table.get(name), list) and len(table[name]) == num_images
        for name in IMAGE_COLUMNS
    ):
        return None
    return {name: np.asarray(table[name], dtype=np.int64) for name in IMAGE_COLUMNS}


def concat_columns(parts: list[ImageColumns]) -> ImageColumns:
    """The columns of several entries, in entry order."""
    return {
        name: np.concatenate([p[name] for p in parts]) if parts else np.zeros(0, np.int64)
        for name in IMAGE_COLUMNS
    }


def sample_slice_costs(
    images_per_sample: np.ndarray, columns: ImageColumns
) -> tuple[np.ndarray, np.ndarray]:
    """Per sample ``(slices, max_patches_per_slice)`` as :class:`mvshards.cost.SampleCost`
    counts them: every image's source plus its slices, and the largest (sub)image's patches
    (0, 0 for a text-only sample). ``images_per_sample`` sums to the table's length."""
    images = np.asarray(images_per_sample, dtype=np.int64)
    owner = np.repeat(np.arange(len(images)), images)
    subimages = np.bincount(owner, weights=columns["slices"] + 1, minlength=len(images))
    largest = np.zeros(len(images), dtype=np.int64)
    np.maximum.at(largest, owner, columns["max_subimage_patches"])
    return subimages.astype(np.int64), largest
