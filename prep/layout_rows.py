"""``mvprep layout`` as a library call: the slice layout of image sizes, as golden rows."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from mvshards.layout import assign_image_ids, compute_layout, num_image_tokens
from mvshards.profiles import get_profile


def layout_row(w: int, h: int, profile_name: str, max_slice_nums: int) -> dict[str, Any]:
    """One image size's layout with the golden field names and its token count.

    ``num_image_tokens`` is the profile's default form for the image as the only image of
    a sample (fine-tuning form for 2.6: an id only when sliced; inference form for 4.6).
    """
    profile = get_profile(profile_name)
    layout = compute_layout(w, h, profile, max_slice_nums)
    (image_id,) = assign_image_ids([layout], profile.default_image_id_form)
    return {
        "w": w,
        "h": h,
        "profile": profile.name,
        "max_slice_nums": max_slice_nums,
        **layout.to_dict(),
        "num_image_tokens": num_image_tokens(layout, profile, image_id),
    }


def parse_size_lines(lines: Iterable[str]) -> Iterator[tuple[int, int]]:
    """``"W H"`` per line (also ``WxH`` or ``W,H``); blank lines and ``#`` comments skipped."""
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        parts = text.replace("x", " ").replace(",", " ").split()
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"line {number}: expected 'W H' (two positive integers), got {line!r}")
        yield int(parts[0]), int(parts[1])
