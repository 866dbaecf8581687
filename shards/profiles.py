"""Model profiles: the arithmetic that names one MiniCPM-V family.

A profile fixes the slice scale, the patch size, the multiple that resize targets are
rounded to, and how many LLM tokens one (sub)image costs. Two families are served:

* ``minicpmv-2.6`` -- MiniCPM-V 2.6, MiniCPM-o 2.6, 4.0, 4.5 (``trust_remote_code``):
  sizes are multiples of 14, every (sub)image costs 64 query tokens plus its two
  bracket tokens (``<image>``/``</image>`` or ``<slice>``/``</slice>``).
* ``minicpmv-4.6`` -- MiniCPM-V 4.6 / 4.7 (native ``MiniCPMV4_6*`` in transformers):
  sizes are multiples of 56, a (sub)image costs ``patches // 16`` tokens ("16x"
  downsampling, the default) plus its two brackets. ``minicpmv-4.6-4x`` is the same model
  run with ``downsample_mode="4x"``: multiples of 28 and ``patches // 4`` tokens.

For both, a sliced image adds one newline token between slice rows, and an image id
``<image_id>k</image_id>`` costs ``2 + len(str(k))`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mvshards.families import NATIVE_46, REMOTE_26, Family

ImageIdForm = Literal["finetune", "inference", "none"]
"""Where an ``<image_id>k</image_id>`` prefix is written.

* ``finetune``: the official fine-tuning code of the 2.6 family -- only sliced images
  carry an id, and only sliced images are numbered.
* ``inference``: the chat/inference processor -- every image carries an id, every image
  is numbered.
* ``none``: no image id at all.
"""


@dataclass(frozen=True)
class Profile:
    """The numbers that define one model family's image arithmetic."""

    name: str
    family: Family
    """The code base the profile's model runs on (:mod:`mvshards.families`)."""
    scale_resolution: int
    patch_size: int
    size_multiple: int
    query_tokens: int | None
    """Fixed query tokens per (sub)image (2.6 resampler); None when tokens follow patches."""
    patch_tokens_divisor: int | None
    """Tokens per (sub)image = patches // divisor (4.6 family); None for the 2.6 family."""
    default_image_id_form: ImageIdForm
    grid_ties_prefer_more_rows: bool
    """Grid search order of the family's code: the 2.6 code enumerates ``cols`` ascending and
    keeps the first best grid; the 4.6 code enumerates ``rows`` ascending and, on an exact
    tie, takes the grid with more rows."""

    def tokens_per_subimage(self, patch_grid: tuple[int, int] | list[int]) -> int:
        """LLM tokens of one (sub)image's query span, brackets excluded."""
        if self.query_tokens is not None:
            return self.query_tokens
        assert self.patch_tokens_divisor is not None
        rows, cols = patch_grid
        return (rows * cols) // self.patch_tokens_divisor


PROFILES: dict[str, Profile] = {
    "minicpmv-2.6": Profile(
        name="minicpmv-2.6",
        family=REMOTE_26,
        scale_resolution=448,
        patch_size=14,
        size_multiple=14,
        query_tokens=64,
        patch_tokens_divisor=None,
        default_image_id_form="finetune",
        grid_ties_prefer_more_rows=False,
    ),
    "minicpmv-4.6": Profile(
        name="minicpmv-4.6",
        family=NATIVE_46,
        scale_resolution=448,
        patch_size=14,
        size_multiple=56,
        query_tokens=None,
        patch_tokens_divisor=16,
        default_image_id_form="inference",
        grid_ties_prefer_more_rows=True,
    ),
    "minicpmv-4.6-4x": Profile(
        name="minicpmv-4.6-4x",
        family=NATIVE_46,
        scale_resolution=448,
        patch_size=14,
        size_multiple=28,
        query_tokens=None,
        patch_tokens_divisor=4,
        default_image_id_form="inference",
        grid_ties_prefer_more_rows=True,
    ),
}

DEFAULT_PROFILE = "minicpmv-4.6"


def get_profile(name: str) -> Profile:
    """Return the profile called ``name`` or raise ``ValueError`` listing the known ones."""
    try:
        return PROFILES[name]
    except KeyError:
        known = ", ".join(sorted(PROFILES))
        raise ValueError(f"unknown profile {name!r}; known profiles: {known}") from None
