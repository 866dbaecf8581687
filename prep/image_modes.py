"""Pixel operations behind :mod:`mvprep.imaging` (import them from there): PIL mode -> RGB
rules, EXIF orientation on arrays, ``resize_rgb`` and ``encode_image``, plus byte-level
format sniffing, JPEG chroma-subsampling names, and the cheap "is this stream complete?"
checks that gate the OpenCV paths.

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

import contextlib
import io
import math
from collections.abc import Iterator

import cv2
import numpy as np
from PIL import Image

from mvshards.processes import keep_freed_memory

ORIENTATION_TAG = 0x0112  # EXIF "Orientation"
HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1")

__all__ = [
    "AA_MIN_SHRINK",
    "GRAY_MODES",
    "HEIF_BRANDS",
    "JPEG_SUBSAMPLINGS",
    "ORIENTATION_TAG",
    "aa_kernel",
    "composite_over_white",
    "configure_process",
    "cubic_weights",
    "encode_image",
    "extension_for",
    "jpeg_is_complete",
    "jpeg_subsampling",
    "orient",
    "pil_to_rgb",
    "png_is_complete",
    "rescale16",
    "resize_oriented",
    "resize_outputs",
    "resize_rgb",
    "sniff_format",
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


def _has_transparency(im: Image.Image) -> bool:
    """``Image.has_transparency_data`` (Pillow >= 10.1), with a fallback for older Pillow."""
    if hasattr(im, "has_transparency_data"):
        return bool(im.has_transparency_data)
    alpha_modes = ("LA", "La", "PA", "RGBA", "RGBa")
    return (
        im.mode in alpha_modes
        or "transparency" in im.info
        or (im.mode == "P" and im.palette is not None and im.palette.mode.endswith("A"))
    )


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
    if _has_transparency(im):
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
    thumbnail's own EOI inside APP1 is skipped), then looks for FFD9 after it, searching from
    the end (a complete file ends with it, so this costs microseconds). Entropy-coded data
    byte-stuffs every 0xFF, so FFD9 after the scan header can only be a real EOI. False does
    not mean the file is bad, only that the OpenCV path is not trusted with it (OpenCV 4.x
    returns a grey-filled image for a cut JPEG; PIL raises, so PIL decides).
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


def sniff_format(data: bytes) -> str | None:
    """Name the image format a damaged stream claims to be by its magic bytes, else None."""
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    dib_header_sizes = (12, 40, 52, 56, 64, 108, 124)
    if data[:2] == b"BM" and int.from_bytes(data[14:18], "little") in dib_header_sizes:
        return "BMP"
    if data[4:8] == b"ftyp":
        return "HEIF" if data[8:12] in HEIF_BRANDS else "ISO-BMFF"
    return None


AA_MIN_SHRINK = 1.15
"""Below this shrink factor plain bicubic is already at least as close to an ideal
(antialiased) resize as prefilter + bicubic (measured on photos and screenshots)."""


def cubic_weights(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Keys cubic kernel (a = -0.5, as PIL's BICUBIC and OpenCV's INTER_CUBIC use)."""
    x = np.abs(x)
    near = (a + 2) * x**3 - (a + 3) * x**2 + 1
    far = a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def aa_kernel(f: float) -> np.ndarray:
    """1-D prefilter for an ``f``-times shrink: the cubic kernel stretched by ``f`` (what PIL's
    antialiased BICUBIC convolves with), sampled at the input pixels, taps of zero weight
    dropped, normalised to sum 1."""
    if f <= AA_MIN_SHRINK:
        return np.ones(1, np.float32)
    r = math.ceil(2 * f) - 1  # largest offset with |d / f| < 2
    w = cubic_weights(np.arange(-r, r + 1, dtype=np.float64) / f)
    return (w / w.sum()).astype(np.float32)


_PROCESS_CONFIGURED = False
HEAP_MMAP_THRESHOLD = 32 << 20
"""Allocations up to this size come from the kept heap (the most glibc's own adaptive rule
ever allows on 64-bit): every buffer of a 12 MP photo decoded at 1/2 (9 MB) or of a 3 MP
photo decoded at full scale."""
HEAP_TRIM_THRESHOLD = 128 << 20
"""Freed heap a process keeps before glibc hands memory back: about 4x the working set of a
12 MP photo, so it is reused from one image to the next; also the most it holds idle."""


@contextlib.contextmanager
def opencv_safe_to_fork() -> Iterator[None]:
    """While inside, this process's OpenCV runs one thread, so children forked meanwhile can
    use OpenCV: a child forked while OpenCV's thread pool is up inherits the pool without its
    threads and hangs in its first ``cv2.setNumThreads`` (a notebook that resized with OpenCV
    before calling ``build()``). The pool is stopped here, in the parent, where its threads
    exist; the thread count is restored on exit."""
    before = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        cv2.setNumThreads(before)


def configure_process(keep_heap: bool = True) -> None:
    """Per-process set-up for the pixel work, done once, on the first call (later calls,
    whatever they ask, change nothing): OpenCV runs one thread (the build runs one worker
    process per core; OpenCV's own threads would only add contention and CPU time), and
    with ``keep_heap`` (default) malloc keeps freed pixel buffers
    (:func:`mvshards.processes.keep_freed_memory`).
    Every entry point of :mod:`mvprep.imaging` that touches pixels calls it."""
    global _PROCESS_CONFIGURED
    if not _PROCESS_CONFIGURED:
        cv2.setNumThreads(1)
        if keep_heap:
            keep_freed_memory(HEAP_MMAP_THRESHOLD, HEAP_TRIM_THRESHOLD)
        _PROCESS_CONFIGURED = True


def resize_rgb(rgb: np.ndarray, size: tuple[int, int], antialias: bool = True) -> np.ndarray:
    """Resize an HxWx3 uint8 array to exactly ``size`` = (w, h), one resampling step.

    Rule, with f the shrink factor per axis (input / output):
    - max f > 2: pixel-area averaging (``cv2.INTER_AREA``); a fixed 4-tap cubic would alias.
    - otherwise bicubic (``cv2.INTER_CUBIC``); with ``antialias`` (default) each axis with
      f > :data:`AA_MIN_SHRINK` is first low-passed with the cubic kernel stretched by f, so
      the result matches PIL's antialiased BICUBIC (within ~1 dB PSNR on photos, where plain
      cubic falls 5-10 dB behind at f = 1.5-2 and aliases text). Costs ~4 ms per 3 MP input.
      ``antialias=False`` gives plain cubic (cheapest).
    Returns ``rgb`` itself when the size already matches.
    """
    w, h = int(size[0]), int(size[1])
    if w < 1 or h < 1:
        raise ValueError(f"resize_rgb: target size must be positive, got {size}")
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"resize_rgb: expected HxWx3 uint8, got {rgb.shape} {rgb.dtype}")
    ih, iw = rgb.shape[:2]
    if (iw, ih) == (w, h):
        return rgb
    configure_process()
    src = np.ascontiguousarray(rgb)
    fx, fy = iw / w, ih / h
    if max(fx, fy) > 2.0:
        return cv2.resize(src, (w, h), interpolation=cv2.INTER_AREA)
    if antialias and max(fx, fy) > AA_MIN_SHRINK:
        kx, ky = aa_kernel(fx), aa_kernel(fy)
        src = cv2.sepFilter2D(src, -1, kx, ky, borderType=cv2.BORDER_REFLECT)
    return cv2.resize(src, (w, h), interpolation=cv2.INTER_CUBIC)


def resize_oriented(
    pixels: np.ndarray, size: tuple[int, int], orientation: int, antialias: bool = True
) -> np.ndarray:
    """``resize_rgb(orient(pixels, orientation), size, antialias)`` for pixels in STORED
    orientation, computed the cheap way round where that gives the same image.

    When no axis is enlarged, the pixels are resized to the stored orientation's size and
    the EXIF ``orientation`` is applied to the small result: the same image up to integer
    rounding (+-2 levels), since the resize is separable and mirror-symmetric and a rotation
    or flip only swaps or mirrors its axes, and it saves most of the rotation's cost (~2.5 ms
    per 3 MP decode). OpenCV's ``INTER_AREA`` is not mirror-symmetric on an enlarged axis,
    so then the (small) input is oriented first.
    """
    sw, sh = stored_size(size, orientation)
    if orientation == 1 or sw > pixels.shape[1] or sh > pixels.shape[0]:
        return resize_rgb(orient(pixels, orientation), size, antialias)
    return orient(resize_rgb(pixels, (sw, sh), antialias), orientation)


def resize_outputs(
    pixels: np.ndarray,
    orientation: int,
    source_size: tuple[int, int],
    refine_size: tuple[int, int] | None = None,
    *,
    from_refine: bool = True,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The stored images of one decoded image: ``(source, refine)``, each oriented and of
    exactly its (w, h) size (``refine`` None when ``refine_size`` is None).

    Pixels in STORED orientation, as :func:`resize_oriented` takes them. When the refine
    image is at least the source size and no larger than the pixels on both axes, and
    ``from_refine`` (default), the source is resized from the (stored-orientation) refine
    image rather than from the decode: for a 12 MP photo at ``--max-res 1344`` that is a 3x
    integer shrink of 1.8 MP instead of a 4x shrink of 3 MP (~3 ms instead of ~10 ms), within
    0.1 dB PSNR of the direct resize against a full-decode Lanczos reference. Otherwise each
    image is ``resize_oriented(pixels, size, orientation)``.
    """
    if refine_size is None:
        return resize_oriented(pixels, source_size, orientation), None
    rw, rh = stored_size(refine_size, orientation)
    sw, sh = stored_size(source_size, orientation)
    ph, pw = pixels.shape[:2]
    if from_refine and sw <= rw <= pw and sh <= rh <= ph:
        refine = resize_rgb(pixels, (rw, rh))
        source = resize_rgb(refine, (sw, sh))
        return orient(source, orientation), orient(refine, orientation)
    return (
        resize_oriented(pixels, source_size, orientation),
        resize_oriented(pixels, refine_size, orientation),
    )


_EXTENSIONS = {"jpeg": "jpg", "jpg": "jpg", "png": "png", "webp": "webp"}


def _norm_fmt(fmt: str) -> str:
    f = fmt.lower()
    if f not in _EXTENSIONS:
        raise ValueError(f"image format must be jpeg, png or webp, got {fmt!r}")
    return "jpeg" if f == "jpg" else f


def extension_for(fmt: str) -> str:
    """File extension (no dot) for an output format: jpeg -> jpg, png -> png, webp -> webp."""
    return _EXTENSIONS[_norm_fmt(fmt)]


WEBP_METHOD = 4  # libwebp effort 0-6, pinned: the bytes depend on it (4 is Pillow's default)

JPEG_SUBSAMPLINGS: dict[str, int] = {
    "4:4:4": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444,
    "4:2:2": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_422,
    "4:2:0": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420,
    "4:4:0": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_440,
    "4:1:1": cv2.IMWRITE_JPEG_SAMPLING_FACTOR_411,
}
"""JPEG chroma subsampling name -> OpenCV's sampling-factor constant (what ``encode_image``
accepts)."""


_SAMPLING_NAMES = {
    (1, 1): "4:4:4",
    (2, 1): "4:2:2",
    (2, 2): "4:2:0",
    (1, 2): "4:4:0",
    (4, 1): "4:1:1",
}

GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"})
"""PIL modes whose RGB conversion (module rules) is gray: R = G = B, flat chroma."""


def jpeg_subsampling(im: Image.Image) -> str | None:
    """Chroma subsampling (a key of :data:`JPEG_SUBSAMPLINGS`) of an opened YCbCr JPEG, from
    its frame header (``im.layer``: per component id, h, v, table); None for anything else
    (other formats, gray or CMYK JPEGs, unusual factors)."""
    layer = getattr(im, "layer", None)
    if im.format not in ("JPEG", "MPO") or im.mode != "RGB" or not layer or len(layer) != 3:
        return None
    (_, h0, v0, _), (_, h1, v1, _), (_, h2, v2, _) = layer
    if (h1, v1) != (h2, v2) or h0 % h1 or v0 % v1:
        return None
    return _SAMPLING_NAMES.get((h0 // h1, v0 // v1))


def encode_image(
    rgb: np.ndarray,
    fmt: str,
    quality: int = 95,
    subsampling: str = "4:4:4",
    *,
    bgr: bool = False,
) -> bytes:
    """Encode an HxWx3 uint8 RGB array as ``fmt`` ("jpeg", "png" or "webp").

    JPEG: ``quality`` (1-100), chroma ``subsampling`` (a key of :data:`JPEG_SUBSAMPLINGS`;
    4:4:4 by default, which never bleeds colour across text edges), baseline. PNG: lossless,
    zlib level 3. WebP: lossy at ``quality`` (1-100), effort :data:`WEBP_METHOD`
    (``subsampling`` is ignored for PNG and WebP, ``quality`` for PNG). ``bgr=True``: the
    array holds B, G, R (as ``decode_stored(..., bgr=True)`` returns it), which spares
    OpenCV's encoders a channel swap. Deterministic: no metadata or timestamps, equal input
    gives equal bytes.
    """
    f = _norm_fmt(fmt)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"encode_image: expected HxWx3 uint8, got {rgb.shape} {rgb.dtype}")
    if subsampling not in JPEG_SUBSAMPLINGS:
        raise ValueError(
            f"JPEG subsampling must be one of {', '.join(JPEG_SUBSAMPLINGS)}, got {subsampling!r}"
        )
    configure_process()
    if f == "webp":
        pixels = np.ascontiguousarray(rgb)
        if bgr:
            pixels = cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)
        buf = io.BytesIO()
        if not 1 <= quality <= 100:
            raise ValueError(f"WebP quality must be 1-100, got {quality}")
        Image.fromarray(pixels, "RGB").save(
            buf, "WEBP", lossless=False, quality=int(quality), method=WEBP_METHOD
        )
        return buf.getvalue()
    pixels = np.ascontiguousarray(rgb)
    if not bgr:
        pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR)
    if f == "jpeg":
        if not 1 <= quality <= 100:
            raise ValueError(f"JPEG quality must be 1-100, got {quality}")
        params = [
            cv2.IMWRITE_JPEG_QUALITY, int(quality),
            cv2.IMWRITE_JPEG_SAMPLING_FACTOR, JPEG_SUBSAMPLINGS[subsampling],
            cv2.IMWRITE_JPEG_OPTIMIZE, 0,
            cv2.IMWRITE_JPEG_PROGRESSIVE, 0,
        ]  # fmt: skip
        ok, out = cv2.imencode(".jpg", pixels, params)
    else:
        ok, out = cv2.imencode(".png", pixels, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise RuntimeError(f"OpenCV failed to encode a {rgb.shape} image as {f}")
    return out.tobytes()
