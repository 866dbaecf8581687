"""Seeded test-image generators shared by the test suite, the bench script and the demo data.

Everything here is deterministic for a given seed and needs only numpy, OpenCV and Pillow
(scikit-image is used only by :func:`real_photo`, imported lazily).

- :func:`make_photo` -- photo-like RGB: a 1/f-like multi-octave colour field, shapes with
  hard edges that shift the local colour, sensor noise; a 12 MP q90 JPEG of it is 3-4 MB and
  decodes like a phone photo (generating 12 MP takes ~1-3 s: cache files in a bench).
- :func:`make_screenshot` -- UI/document-like RGB: flat panels, thin rules and dense
  text-like glyph strokes with pixel-sharp edges.
- :func:`save_jpeg` / :func:`save_image` -- write arrays or PIL images in a given format and
  mode, optionally with an EXIF orientation tag (value 1-8).
- :func:`real_photo` -- one of scikit-image's bundled real photographs as an RGB array.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np
from PIL import Image

EXIF_ORIENTATION_TAG = 0x0112

__all__ = [
    "EXIF_ORIENTATION_TAG",
    "make_photo",
    "make_screenshot",
    "real_photo",
    "save_image",
    "save_jpeg",
]


def _uniform_noise(rng: np.random.Generator, shape: tuple, std: float) -> np.ndarray:
    """Zero-mean uniform float32 noise with standard deviation ``std`` (fast to draw)."""
    out = rng.random(shape, dtype=np.float32)
    out -= 0.5
    out *= std * 12**0.5
    return out


def make_photo(w: int, h: int, seed: int = 0) -> np.ndarray:
    """Return an (h, w, 3) uint8 photo-like image, deterministic for ``seed``.

    A multi-octave random field (each octave half the scale of the previous, amplitude
    x0.78: roughly the 1/f spectrum of natural images; luminance-dominated, weaker chroma),
    plus filled ellipses and rectangles of many sizes (sharp edges) and sensor-like pixel
    noise. At 4032x3024 a quality-90 4:2:0 JPEG of it is ~3-4 MB, like a phone photo.
    """
    if w < 1 or h < 1:
        raise ValueError(f"make_photo: size must be positive, got {w}x{h}")
    rng = np.random.default_rng(seed)
    # Pyramid synthesis: start from a tiny random grid, then repeatedly upsample x2 and add
    # finer, weaker noise -- cost ~1.3x one full-size pass.
    levels = max(1, int(np.ceil(np.log2(max(w, h) / 4))))
    gh, gw = max(2, -(-h >> levels) + 1), max(2, -(-w >> levels) + 1)
    amp = 40.0
    mix = np.array([1.0, 0.35, 0.35], np.float32)  # luma, two chroma axes
    acc = _uniform_noise(rng, (gh, gw, 3), amp) * mix
    for _ in range(levels):
        amp *= 0.78
        gh, gw = gh * 2, gw * 2
        acc = cv2.resize(acc, (gw, gh), interpolation=cv2.INTER_CUBIC)
        acc += _uniform_noise(rng, (gh, gw, 3), amp) * mix
    acc = acc[:h, :w]
    # (luma, c1, c2) -> RGB, around a random mean colour.
    to_rgb = np.array([[1.0, 1.0, 0.0], [1.0, -0.5, 0.87], [1.0, -0.5, -0.87]], np.float32)
    img = cv2.transform(np.ascontiguousarray(acc), to_rgb)
    img += rng.uniform(90, 160, 3).astype(np.float32)
    # Shapes shift the local colour but keep the texture (objects are not flat paint).
    shapes = np.zeros((h, w, 3), np.float32)
    for _ in range(int(rng.integers(20, 60))):
        color = tuple(float(c) for c in rng.uniform(-70, 70, 3))
        cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
        scale = float(rng.choice([0.02, 0.05, 0.1, 0.2]))
        rx, ry = max(1, int(w * scale * rng.random())), max(1, int(h * scale * rng.random()))
        if rng.random() < 0.5:
            cv2.ellipse(shapes, (cx, cy), (rx, ry), float(rng.uniform(0, 180)), 0, 360, color, -1)
        else:
            cv2.rectangle(shapes, (cx - rx, cy - ry), (cx + rx, cy + ry), color, -1)
    img += shapes
    img += _uniform_noise(rng, (h, w, 3), 3.0)
    return np.clip(img, 0, 255).round().astype(np.uint8)


def make_screenshot(w: int, h: int, seed: int = 0) -> np.ndarray:
    """Return an (h, w, 3) uint8 screenshot-like image, deterministic for ``seed``.

    Flat light panels, 1-px rules, and lines of random OpenCV Hershey "text" (letters and
    digits, 1-px strokes, no anti-aliasing) -- the sharp detail that cubic-over-2x aliases.
    """
    if w < 1 or h < 1:
        raise ValueError(f"make_screenshot: size must be positive, got {w}x{h}")
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), 250, np.uint8)
    alphabet = np.array(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 "))
    y = 0
    while y < h:
        panel_h = int(rng.integers(40, 200))
        shade = tuple(int(c) for c in rng.integers(215, 256, 3))
        cv2.rectangle(img, (0, y), (w - 1, min(h - 1, y + panel_h)), shade, -1)
        cv2.line(img, (0, y), (w - 1, y), (120, 120, 120), 1)
        ty = y + 18
        while ty < min(h, y + panel_h):
            n = int(rng.integers(10, 120))
            text = "".join(rng.choice(alphabet, n))
            ink = tuple(int(c) for c in rng.integers(0, 90, 3))
            x0 = int(rng.integers(2, 40))
            cv2.putText(img, text, (x0, ty), cv2.FONT_HERSHEY_PLAIN, 1.0, ink, 1, cv2.LINE_8)
            ty += 16
        y += panel_h
    return img


def real_photo(name: str = "astronaut") -> np.ndarray:
    """Return one of scikit-image's bundled photos (``astronaut``, ``chelsea``, ``coffee``,
    ``rocket``...) as an (h, w, 3) uint8 RGB array. Needs scikit-image (test extra)."""
    from skimage import data as skdata  # noqa: PLC0415 - optional, slow import

    arr = np.asarray(getattr(skdata, name)())
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3]).astype(np.uint8)


def _exif_bytes(orientation: int | None) -> bytes | None:
    if orientation is None:
        return None
    if not 1 <= orientation <= 8:
        raise ValueError(f"EXIF orientation must be 1-8, got {orientation}")
    exif = Image.Exif()
    exif[EXIF_ORIENTATION_TAG] = orientation
    return exif.tobytes()


def save_jpeg(
    path: Path | str | BinaryIO,
    rgb: np.ndarray | Image.Image,
    quality: int = 90,
    exif_orientation: int | None = None,
    progressive: bool = False,
    subsampling: int = 2,
) -> Path:
    """Write ``rgb`` (HxWx3 uint8 array or PIL image) as a JPEG to a path or binary file
    object; return the ``Path`` (or the file object).

    ``exif_orientation`` (1-8) stores that EXIF tag; the pixels are written as given (i.e. as
    the camera sensor stored them), so a reader must apply the tag. ``subsampling`` is PIL's
    code (2 = 4:2:0, as phones write).
    """
    im = rgb if isinstance(rgb, Image.Image) else Image.fromarray(np.asarray(rgb, np.uint8))
    kwargs: dict = {"quality": quality, "progressive": progressive}
    if im.mode != "CMYK":
        kwargs["subsampling"] = subsampling
    exif = _exif_bytes(exif_orientation)
    if exif is not None:
        kwargs["exif"] = exif
    target = path if hasattr(path, "write") else Path(path)
    im.save(target, "JPEG", **kwargs)
    return target


def _to_mode(rgb: np.ndarray, mode: str) -> Image.Image:
    """Build a PIL image of ``mode`` from an HxWx3 (or HxWx4 for alpha modes) uint8 array."""
    arr = np.asarray(rgb, np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    base = Image.fromarray(arr[:, :, :3], "RGB")
    gray = np.asarray(base.convert("L"))
    alpha = arr[:, :, 3] if arr.shape[2] == 4 else None
    if mode == "I;16":
        return Image.fromarray(gray.astype(np.uint16) * np.uint16(257))  # dtype -> I;16
    if mode == "I":
        return Image.fromarray(gray.astype(np.int32) * 257)  # dtype -> I
    if mode == "F":
        return Image.fromarray(gray.astype(np.float32) / np.float32(255.0))  # dtype -> F
    if mode in ("RGBA", "LA", "PA") and alpha is not None:
        rgba = Image.fromarray(np.dstack([arr[:, :, :3], alpha]), "RGBA")
        if mode == "RGBA":
            return rgba
        if mode == "LA":
            return rgba.convert("LA")
        p = base.quantize(colors=64)
        p.putalpha(Image.fromarray(alpha, "L"))  # P + alpha band -> PA
        return p
    if mode == "P":
        return base.quantize(colors=64)
    return base.convert(mode)


def save_image(
    path: Path | str | BinaryIO,
    rgb_or_pil: np.ndarray | Image.Image,
    fmt: str,
    mode: str | None = None,
    exif_orientation: int | None = None,
    **save_kwargs,
) -> Path:
    """Write an image with Pillow in format ``fmt`` (``"PNG"``, ``"JPEG"``, ``"WEBP"``,
    ``"GIF"``, ``"BMP"``, ``"TIFF"``; case-insensitive) and PIL ``mode`` to a path or binary
    file object; return the ``Path`` (or the file object).

    ``rgb_or_pil``: a PIL image (saved as is, converted to ``mode`` if given) or an HxWx3 /
    HxWx4 uint8 array (HxWx4 carries alpha for ``RGBA``, ``LA`` and ``PA``). Array modes:
    ``I;16`` and ``I`` hold the gray value times 257 (full 16-bit range), ``F`` gray / 255.
    Extra keyword arguments go to ``PIL.Image.save`` (e.g. ``transparency=0`` for ``P``).
    """
    fmt_u = fmt.upper()
    if isinstance(rgb_or_pil, Image.Image):
        im = rgb_or_pil if mode is None or rgb_or_pil.mode == mode else rgb_or_pil.convert(mode)
    else:
        arr = np.asarray(rgb_or_pil, np.uint8)
        if mode is None:
            mode = "RGBA" if arr.ndim == 3 and arr.shape[2] == 4 else "RGB"
        im = _to_mode(arr, mode)
    exif = _exif_bytes(exif_orientation)
    if exif is not None and fmt_u == "TIFF":  # TIFF keeps the tag in its own IFD
        save_kwargs.setdefault("tiffinfo", {EXIF_ORIENTATION_TAG: exif_orientation})
    elif exif is not None:
        save_kwargs.setdefault("exif", exif)
    target = path if hasattr(path, "write") else Path(path)
    im.save(target, fmt_u, **save_kwargs)
    return target
