"""Pixel-level helpers behind :mod:`mvprep.imaging`: PIL mode -> RGB rules, EXIF orientation
on arrays, and cheap "is this stream complete?" checks that gate the OpenCV fast paths.

Mode rules (the single documented conversion of every PIL mode to 8-bit RGB):

- ``RGB``: as stored. ``L``: gray copied to R, G and B. ``1``: 0 -> 0, 1 -> 255.
- Anything with transparency (``RGBA``, ``LA``, ``PA``, ``La``, ``RGBa``, ``P`` with a
  transparent index or an alpha palette, ``RGB``/``L`` with a PNG ``tRNS`` colour key):
  straight-alpha composite over **white**: ``out = round((c * a + 255 * (255 - a)) / 255)``.
  White rather than black because most such images are logos, diagrams and screenshots with
  dark ink, which stay legible on white (and it is what a browser shows on a plain page).
- ``I;16`` (and ``I;16B``/``L``/``N``): full-range linear rescale, ``round(v * 255 / 65535)``
  (PIL's own ``convert("RGB")`` clips instead, which turns most 16-bit images near-white).
- ``I`` (32-bit int, how PIL presents many 16-bit TIFFs): clipped to 0..65535, then as ``I;16``.
- ``F`` (32-bit float): taken as intensities in [0, 1]; clipped, NaN -> 0, then x255 rounded.
- High-bit modes ignore a ``tRNS`` key (rare; PIL cannot composite them losslessly).
- Everything else PIL can convert (``CMYK`` incl. Adobe-inverted JPEGs, ``YCbCr``, ``RGBX``,
  ``P`` without transparency, ``HSV``): ``PIL.Image.convert("RGB")``.
No colour management: ICC profiles are ignored and values are taken as sRGB (as the
official fine-tuning code does).
"""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image

ORIENTATION_TAG = 0x0112  # EXIF "Orientation"

__all__ = [
    "ORIENTATION_TAG",
    "composite_over_white",
    "jpeg_is_complete",
    "orient",
    "pil_to_rgb",
    "png_is_complete",
    "rescale16",
    "stored_size",
]


def stored_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """Map an (w, h) between oriented and stored coordinates (orientations 5-8 swap axes;
    the map is its own inverse)."""
    return (size[1], size[0]) if orientation in (5, 6, 7, 8) else (size[0], size[1])


def orient(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation (1-8) to an HxWxC array; returns a C-contiguous array.

    Matches ``PIL.ImageOps.exif_transpose``: 2 mirror left-right, 3 rotate 180,
    4 mirror top-bottom, 5 transpose, 6 rotate 90 clockwise, 7 transverse,
    8 rotate 90 counter-clockwise. Any other value leaves the array as it is.
    """
    if orientation == 2:
        return cv2.flip(arr, 1)
    if orientation == 3:
        return cv2.rotate(arr, cv2.ROTATE_180)
    if orientation == 4:
        return cv2.flip(arr, 0)
    if orientation == 5:
        return cv2.transpose(arr)
    if orientation == 6:
        return cv2.rotate(arr, cv2.ROTATE_90_CLOCKWISE)
    if orientation == 7:
        return cv2.flip(cv2.transpose(arr), -1)
    if orientation == 8:
        return cv2.rotate(arr, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return np.ascontiguousarray(arr)


def rescale16(values: np.ndarray) -> np.ndarray:
    """Full-range 16-bit -> 8-bit: ``round(v * 255 / 65535)`` for integer ``v`` in 0..65535."""
    v = values.astype(np.uint32)
    return ((v * 255 + 32767) // 65535).astype(np.uint8)


def composite_over_white(rgba: np.ndarray) -> np.ndarray:
    """Straight-alpha composite of an HxWx4 uint8 RGBA array over white -> HxWx3 uint8."""
    c = rgba[:, :, :3].astype(np.uint16)
    a = rgba[:, :, 3:4].astype(np.uint16)
    # c*a + 255*(255-a) <= 65025, so uint16 cannot overflow (+127 rounds to nearest).
    out = (c * a + 255 * (255 - a) + 127) // 255
    return out.astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(np.ascontiguousarray(gray, np.uint8), cv2.COLOR_GRAY2RGB)


def pil_to_rgb(im: Image.Image) -> np.ndarray:
    """Convert a loaded PIL image of any mode to an HxWx3 uint8 RGB array (module rules).

    Raises ``ValueError`` for a mode PIL cannot convert to RGB.
    """
    mode = im.mode
    if mode.startswith("I;16"):
        return _gray_to_rgb(rescale16(np.asarray(im)))
    if mode == "I":
        return _gray_to_rgb(rescale16(np.clip(np.asarray(im), 0, 65535)))
    if mode == "F":
        f = np.nan_to_num(np.asarray(im, np.float32), nan=0.0, posinf=1.0, neginf=0.0)
        return _gray_to_rgb(np.rint(np.clip(f, 0.0, 1.0) * 255.0).astype(np.uint8))
    if im.has_transparency_data:
        return composite_over_white(np.asarray(im.convert("RGBA")))
    if mode == "RGB":
        return np.array(im)  # writable copy
    if mode == "L":
        return _gray_to_rgb(np.asarray(im))
    if mode == "1":
        return _gray_to_rgb(np.asarray(im, np.uint8) * np.uint8(255))
    return np.array(im.convert("RGB"))


def jpeg_is_complete(data: bytes) -> bool:
    """True when a JPEG stream reaches its end-of-image marker after the first scan.

    Walks the marker segments up to the first SOS (segment lengths are explicit, so an EXIF
    thumbnail's own EOI inside APP1 is skipped), then looks for FFD9 after it (searching from
    the end: a complete file ends with it, so this costs microseconds): entropy-coded data
    byte-stuffs every 0xFF, so FFD9 after the scan header can only be a real EOI. A False here does
    not mean the file is bad, only that the fast path must not be trusted with it.
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return False
    i = 2
    while i + 4 <= n:
        if data[i] != 0xFF:
            return False
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xDA:  # start of scan
            return data.rfind(b"\xff\xd9") > i  # from the end: fast for complete files
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return False


_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def png_is_complete(data: bytes) -> bool:
    """True when a PNG stream ends with its IEND chunk (a cut file does not)."""
    return data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(_PNG_IEND)
