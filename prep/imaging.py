"""Pixels for the offline stage: read, probe, decode (oriented RGB), resize, encode.

The rules, in the order an image meets them:

1. ``read_image_bytes`` reads the whole file (one syscall-sized read; the sha256 and the
   decoder both work from these bytes).
2. ``probe_image`` parses the header only: format, stored mode, EXIF orientation, size and
   (JPEG) chroma subsampling.
   Formats: JPEG (and MPO, the multi-picture JPEG many phones write), PNG, WebP, GIF (first
   frame), BMP, TIFF (first page), AVIF where Pillow has it, HEIC/HEIF only when
   ``pillow-heif`` is installed (``pip install 'mvkit[heic]'``). The pixel limit
   (``max_pixels``, default :data:`DEFAULT_MAX_PIXELS`) applies to the stored size, before
   any pixel is decoded.
3. ``decode_rgb`` fully decodes (so a truncated file fails here, never later) to HxWx3 uint8
   RGB with the EXIF orientation applied -- the orientation found by the probe, applied once
   by us (OpenCV is told to ignore it). JPEGs decode at 1/2, 1/4 or 1/8 scale in the DCT
   domain (libjpeg-turbo via OpenCV, or PIL ``draft`` for CMYK) when the result stays at
   least ``min_size`` in both dimensions: reading the entropy-coded data dominates, so 1/2
   scale costs ~half of a full decode, and the scaled IDCT is a clean low-pass. 8-bit RGB/gray
   PNGs without transparency also decode through OpenCV (about 2x faster than PIL here).
   Everything else goes through PIL. Mode conversion rules, including the transparency rule
   (composite over white), are in :mod:`mvprep.image_modes`. ``decode_stored`` is the same
   decode without the orientation step (and optionally in B-G-R order, what OpenCV's encoders
   take): the builder resizes in stored orientation and rotates the small outputs
   (``resize_oriented``), which is cheaper than rotating a 12 MP decode and gives the same
   image up to rounding.
4. ``resize_rgb`` does one resize from the decoded image: pixel-area averaging
   (``cv2.INTER_AREA``) when shrinking more than 2x on either axis, where a fixed 4-tap cubic
   would alias (text, fine patterns); otherwise bicubic (``cv2.INTER_CUBIC``), for shrinks
   above 1.15x after a low-pass with the stretched cubic kernel, which makes it an
   antialiased bicubic like PIL's (plain cv2 cubic at 1.5-2x shrink is 5-10 dB PSNR worse
   than PIL's bicubic against a Lanczos reference and visibly aliases text). Sizes are
   (width, height) everywhere.
5. ``encode_image`` writes JPEG (quality 95 default; chroma subsampling 4:4:4 unless told
   otherwise: no colour bleeding on text; baseline, standard Huffman tables), PNG (lossless,
   zlib level 3) or WebP (lossy at the same quality, effort ``WEBP_METHOD``). No metadata,
   no timestamps: equal pixels give equal bytes. ``output_subsampling`` is the builder's
   choice per input: the input's own for a colour JPEG with subsampled chroma, 4:2:0 for
   gray, else 4:4:4.

Imaging paths (recorded in ``build.json`` as ``imaging_path``; a resume, ``--part`` or merge
with another path is refused): ``opencv`` is the path above; ``simplejpeg`` (the optional
``mvkit[fastjpeg]`` extra) decodes JPEGs with simplejpeg's libjpeg-turbo instead, at the same
1/k scales, falling back to the OpenCV and PIL decoders where it refuses a file. Measured on
this machine (``scripts/bench_prep.py``, its stage table) both give identical pixels; a 12 MP
photo at 1/2 scale costs the same with either (~60 ms, of which ~43 ms is entropy decoding:
what a 1/8 decode costs), at full scale simplejpeg is faster (~71 ms against ~87 ms).
Another libjpeg-turbo build may round differently, hence the record.
:func:`default_imaging_path` picks ``simplejpeg`` when it is installed.

Process set-up (:func:`mvprep.image_modes.configure_process`, on the first call that touches
pixels): OpenCV's internal thread pool is set to 1 thread, since the build runs one worker
process per core (extra threads only add contention and CPU time; a caller that wants them may
call ``cv2.setNumThreads`` after the first call into this module), and glibc's malloc is told
to keep freed multi-MB buffers for the next image instead of returning them to the kernel,
which saves the page faults of every decode and resize buffer (1700-3200 per 12 MP photo,
8-16 ms of CPU in ``scripts/bench_prep.py``). Neither changes an output byte.

Pillow's own decompression-bomb limit is process-global; when a caller asks for a larger
``max_pixels`` than Pillow allows, this module raises Pillow's limit to match (never lowers).
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from mvprep.image_modes import (
    AA_MIN_SHRINK,
    GRAY_MODES,
    JPEG_SUBSAMPLINGS,
    ORIENTATION_TAG,
    configure_process,
    encode_image,
    extension_for,
    jpeg_is_complete,
    jpeg_subsampling,
    orient,
    pil_to_rgb,
    png_is_complete,
    resize_oriented,
    resize_outputs,
    resize_rgb,
    sniff_format,
    stored_size,
)

__all__ = [
    "AA_MIN_SHRINK",
    "DEFAULT_MAX_PIXELS",
    "ERROR_REASONS",
    "IMAGING_PATHS",
    "SUPPORTED_FORMATS",
    "ImageError",
    "ImageHeader",
    "JPEG_SUBSAMPLINGS",
    "check_imaging_path",
    "decode_rgb",
    "decode_stored",
    "default_imaging_path",
    "encode_image",
    "extension_for",
    "output_subsampling",
    "probe_image",
    "read_image_bytes",
    "resize_oriented",
    "resize_outputs",
    "resize_rgb",
]


DEFAULT_MAX_PIXELS: int = 100_000_000
"""Default pixel limit (stored width x height). 100 MP admits every mainstream camera and
phone photo (<= 61 MP; 200 MP phone modes need ``--max-pixels``) and panoramas such as
20000x5000, while bounding the worst case: a full (non-JPEG) decode of 100 MP is 300 MB of
RGB, ~1 GB peak with mode conversion -- safe for one worker per core on 4 GB/core machines.
Pillow's own warning threshold is 89.5 MP, of the same order."""

ERROR_REASONS = (
    "missing file",
    "empty file",
    "not an image",
    "truncated image",
    "decompression bomb",
    "unsupported format",
    "unreadable file",
)

SUPPORTED_FORMATS = frozenset(
    {"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "DIB", "TIFF", "AVIF", "HEIF"}
)
"""PIL format names accepted by :func:`probe_image`."""

_JPEG_FORMATS = ("JPEG", "MPO")
_CV2_SCALE_FLAGS = {1: 0, 2: 16, 4: 32, 8: 64}  # IMREAD_REDUCED_* without the colour bit
# OpenCV >= 4.11 can decode straight to RGB; older builds decode BGR and we swap.
_CV2_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)
_CV2_RGB_FLAG = _CV2_RGB or cv2.IMREAD_COLOR
IMAGING_PATHS = ("opencv", "simplejpeg")
"""The decoders a build may use (``BuildOptions.imaging_path``, ``--imaging-path``)."""
FASTJPEG_HINT = "pip install 'mvkit[fastjpeg]'"

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)


class ImageError(Exception):
    """Bad input image. ``.reason``: one-line category (one of :data:`ERROR_REASONS`) used
    in rejects; ``str(exc)``: the detail (names the file and the fix)."""

    def __init__(self, reason: str, detail: str):
        if reason not in ERROR_REASONS:
            raise ValueError(f"unknown ImageError reason {reason!r}")
        super().__init__(detail)
        self.reason = reason

    def __reduce__(self):  # keep reason across process boundaries (pickle)
        return (type(self), (self.reason, str(self)))


@dataclass(frozen=True)
class ImageHeader:
    """What the probe learnt without decoding pixels."""

    size: tuple[int, int]  # (w, h) AFTER EXIF orientation is applied
    format: str  # PIL format name, e.g. "JPEG"
    mode: str  # PIL mode as stored, e.g. "RGB", "CMYK", "I;16"
    orientation: int  # EXIF orientation tag value 1-8, 1 when absent or invalid
    subsampling: str | None = None
    """Chroma subsampling of a 3-component (YCbCr) JPEG as stored, a key of
    ``JPEG_SUBSAMPLINGS`` ("4:2:0" for most phone photos); None for every other image
    (lossless formats, gray or CMYK JPEGs, unusual sampling factors)."""


# ---------------------------------------------------------------------------- helpers


def _prefix(name: str) -> str:
    return f"{name}: " if name else ""


def _allow_pixels(pixels: int) -> None:
    """Raise Pillow's process-global bomb limit so images up to ``pixels`` open (never lower)."""
    current = Image.MAX_IMAGE_PIXELS
    if current is not None and pixels > current:
        Image.MAX_IMAGE_PIXELS = pixels


def _ensure_heif() -> bool:
    """Register pillow-heif's opener if the package is importable; True when available."""
    try:
        import pillow_heif  # optional extra, imported only when needed
    except ImportError:
        return False
    pillow_heif.register_heif_opener()
    return True


def _open(data: bytes, name: str) -> Image.Image:
    """``Image.open`` on bytes with errors mapped to :class:`ImageError` (header only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            return Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as exc:
            raise ImageError("decompression bomb", f"{_prefix(name)}{exc}") from exc
        except UnidentifiedImageError as exc:
            claimed = sniff_format(data)
            if claimed == "HEIF":
                if _ensure_heif():
                    return Image.open(io.BytesIO(data))
                raise ImageError(
                    "unsupported format",
                    f"{_prefix(name)}HEIC/HEIF image; install mvkit[heic] (pillow-heif) "
                    "to read it, or convert it to JPEG",
                ) from exc
            if claimed == "ISO-BMFF":
                raise ImageError(
                    "unsupported format",
                    f"{_prefix(name)}ISO media file (brand {data[8:12]!r}) that Pillow "
                    "cannot read; convert it to JPEG or PNG",
                ) from exc
            if claimed is not None:
                raise ImageError(
                    "truncated image",
                    f"{_prefix(name)}{claimed} signature but the header is cut or damaged; "
                    "re-export or re-download the file",
                ) from exc
            raise ImageError(
                "not an image",
                f"{_prefix(name)}not a recognised image (starts with {data[:12]!r}); "
                "check the path or re-export the file as JPEG/PNG",
            ) from exc
        except _DECODE_ERRORS as exc:
            claimed = sniff_format(data)
            if claimed is None:  # e.g. a text file that happens to start with "BM"
                raise ImageError(
                    "not an image",
                    f"{_prefix(name)}not a recognised image (starts with {data[:12]!r}): {exc}",
                ) from exc
            raise ImageError(
                "truncated image", f"{_prefix(name)}{claimed} header cannot be parsed: {exc}"
            ) from exc


def _orientation(im: Image.Image) -> int:
    """EXIF orientation from the header alone (PNG: only an eXIf chunk before the pixels)."""
    try:
        # Image.getexif, not PngImageFile.getexif: the latter decodes the whole image to
        # look for an eXIf chunk after the pixel data.
        value = Image.Image.getexif(im).get(ORIENTATION_TAG, 1)
    except Exception:  # malformed EXIF must not reject a decodable image
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


# ---------------------------------------------------------------------------- public API


def read_image_bytes(path: Path) -> bytes:
    """Return the whole file at ``path``.

    Raises ImageError "missing file", "empty file" or "unreadable file" (a directory, no
    permission, an I/O error).
    """
    from mvshards.storage import location  # a path or an object-store URL

    path = location(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise ImageError(
            "missing file",
            f"{path}: no such file; image paths are relative to the data file's folder",
        ) from exc
    except IsADirectoryError as exc:
        raise ImageError("unreadable file", f"{path}: is a directory, not an image") from exc
    except OSError as exc:
        raise ImageError(
            "unreadable file", f"{path}: cannot be read ({exc.strerror or exc})"
        ) from exc
    if not data:
        raise ImageError("empty file", f"{path}: file is empty (0 bytes); re-copy it")
    return data


def probe_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "") -> ImageHeader:
    """Parse the header of an encoded image without decoding its pixels.

    ``name`` is used only in messages. Raises ImageError "empty file", "not an image",
    "truncated image" (recognised signature, damaged header), "unsupported format" or
    "decompression bomb" (stored width x height above ``max_pixels``).
    """
    if not data:
        raise ImageError("empty file", f"{_prefix(name)}file is empty (0 bytes)")
    _allow_pixels(max_pixels)
    im = _open(data, name)
    fmt = im.format or "?"
    if fmt not in SUPPORTED_FORMATS:
        raise ImageError(
            "unsupported format",
            f"{_prefix(name)}format {fmt} is not supported "
            f"(use one of {', '.join(sorted(SUPPORTED_FORMATS))})",
        )
    w, h = im.size
    if fmt == "TIFF":  # recent Pillow reports TIFF sizes already oriented: use the IFD's
        w, h = int(im.tag_v2.get(256, w)), int(im.tag_v2.get(257, h))
    if w < 1 or h < 1:
        raise ImageError("not an image", f"{_prefix(name)}{fmt} header says {w}x{h} pixels")
    if w * h > max_pixels:
        raise ImageError(
            "decompression bomb",
            f"{_prefix(name)}{w}x{h} = {w * h / 1e6:.1f} MP exceeds the pixel limit "
            f"{max_pixels} ({max_pixels / 1e6:g} MP); raise --max-pixels if it is genuine",
        )
    orientation = _orientation(im)
    return ImageHeader(
        stored_size((w, h), orientation), fmt, im.mode, orientation, jpeg_subsampling(im)
    )


def output_subsampling(header: ImageHeader) -> str:
    """JPEG chroma subsampling for the images made from this one: the input's own for a
    colour JPEG that subsamples its chroma (the outputs keep the chroma-to-luma resolution
    the camera chose; measured on 12 MP phone photos: ~30% fewer bytes and ~3 ms less CPU
    per image, ~2 dB lower RGB PSNR than a 4:4:4 store of the downscaled image); 4:2:0 for
    gray inputs (their chroma is flat, so nothing is lost); 4:4:4 for everything else
    (PNG screenshots, 4:4:4 JPEGs, palette art: colour edges stay sharp)."""
    if header.subsampling is not None:
        return header.subsampling
    return "4:2:0" if header.mode in GRAY_MODES else "4:4:4"


def _reduction(header: ImageHeader, min_size: tuple[int, int]) -> int:
    """Largest JPEG scale denominator (8, 4, 2 or 1) whose output covers ``min_size``."""
    if header.format not in _JPEG_FORMATS:
        return 1
    w, h = stored_size(header.size, header.orientation)
    mw, mh = stored_size(min_size, header.orientation)
    for k in (8, 4, 2):
        # k <= both sides keeps PIL's draft (which sizes by floor division) at exactly 1/k
        if k <= min(w, h) and -(-w // k) >= mw and -(-h // k) >= mh:
            return k
    return 1


def _cv2_decode(data: bytes, k: int, bgr: bool) -> np.ndarray | None:
    """OpenCV decode at scale 1/k, RGB (BGR when ``bgr``), orientation NOT applied; None when
    OpenCV fails."""
    flags = _CV2_SCALE_FLAGS[k] | cv2.IMREAD_IGNORE_ORIENTATION
    flags |= cv2.IMREAD_COLOR if bgr else _CV2_RGB_FLAG
    try:
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error:
        return None
    if arr is None or arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
        return None
    return arr if bgr or _CV2_RGB else cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)


def _simplejpeg() -> Any | None:
    """The simplejpeg module when installed (optional extra ``fastjpeg``), else None."""
    try:
        import simplejpeg  # optional extra, imported only when asked for
    except ImportError:
        return None
    return simplejpeg


def default_imaging_path() -> str:
    """``simplejpeg`` when the package is installed, else ``opencv``."""
    return "simplejpeg" if _simplejpeg() is not None else "opencv"


def check_imaging_path(path: str) -> str:
    """Return ``path`` when it names an imaging path this machine can run; else ValueError
    (one line: what is missing and the fix)."""
    if path not in IMAGING_PATHS:
        raise ValueError(f"--imaging-path must be one of {', '.join(IMAGING_PATHS)}, got {path!r}")
    if path == "simplejpeg" and _simplejpeg() is None:
        raise ValueError(
            "imaging path simplejpeg needs the simplejpeg package, which is not installed here: "
            f"{FASTJPEG_HINT}, or build into a new --out with --imaging-path opencv"
        )
    return path


def _sj_decode(data: bytes, size: tuple[int, int], k: int, bgr: bool) -> np.ndarray | None:
    """simplejpeg decode at exactly 1/k of the stored ``size`` (w, h), orientation NOT
    applied; None when simplejpeg is missing or refuses the file (strict: also on the
    warnings libjpeg recovers from), so the OpenCV and PIL paths decide."""
    sj = _simplejpeg()
    if sj is None:
        return None
    try:
        arr = sj.decode_jpeg(
            data, "BGR" if bgr else "RGB", min_width=-(-size[0] // k), min_height=-(-size[1] // k)
        )
    except (ValueError, RuntimeError, OSError):
        return None
    return arr if arr.ndim == 3 and arr.shape[2] == 3 and arr.dtype == np.uint8 else None


def _png_fast_ok(data: bytes, header: ImageHeader) -> bool:
    if header.format != "PNG" or header.mode not in ("RGB", "L") or not png_is_complete(data):
        return False
    idat = data.find(b"IDAT")
    return idat > 0 and data.find(b"tRNS", 0, idat) == -1


def _pil_decode(data: bytes, header: ImageHeader, k: int, name: str) -> tuple[np.ndarray, bool]:
    """PIL decode (JPEG ``draft`` at 1/k when k > 1), any mode -> RGB. Returns the array and
    whether PIL already applied the orientation (recent Pillow does for TIFF, and then
    deletes the tag), else the array is in stored orientation."""
    if header.format == "HEIF":
        _ensure_heif()
    w, h = stored_size(header.size, header.orientation)
    _allow_pixels(w * h)  # the probe has vetted this size
    im = _open(data, name)
    if k > 1 and im.format in _JPEG_FORMATS:
        im.draft("RGB" if im.mode == "RGB" else None, (max(1, w // k), max(1, h // k)))
    tags = getattr(im, "tag_v2", None)
    had_tag = tags is not None and ORIENTATION_TAG in tags
    try:
        im.load()
        oriented = had_tag and ORIENTATION_TAG not in im.tag_v2
        return pil_to_rgb(im), oriented
    except _DECODE_ERRORS as exc:
        if isinstance(exc, ValueError) and "conversion" in str(exc):
            raise ImageError(
                "unsupported format", f"{_prefix(name)}{im.mode} pixels cannot become RGB: {exc}"
            ) from exc
        raise ImageError(
            "truncated image",
            f"{_prefix(name)}{header.format} data is cut or corrupt ({exc}); "
            "re-export or re-download the file",
        ) from exc


def decode_stored(
    data: bytes,
    header: ImageHeader,
    min_size: tuple[int, int],
    name: str = "",
    *,
    bgr: bool = False,
    imaging_path: str = "opencv",
) -> tuple[np.ndarray, int]:
    """Decode ``data`` (probed as ``header``) to HxWx3 uint8 pixels in STORED orientation.

    Returns ``(pixels, orientation)``: RGB pixels (B, G, R when ``bgr``: what OpenCV's
    encoders take, no channel swap) and the EXIF orientation still to apply to them (1 when
    the decoder already applied it). Applying it after resizing the pixels to the stored
    orientation's size (``mvprep.image_modes.resize_oriented``) gives the same image as
    orienting first, at a fraction of the cost for a 12 MP photo. Decode scale and errors as
    :func:`decode_rgb`. ``imaging_path`` (:data:`IMAGING_PATHS`): ``simplejpeg`` decodes
    JPEGs with simplejpeg first (ValueError when it is not installed).
    """
    configure_process()
    k = _reduction(header, min_size)
    arr = None
    sw, sh = stored_size(header.size, header.orientation)
    if header.format in _JPEG_FORMATS and header.mode in ("RGB", "L"):
        if jpeg_is_complete(data):  # else PIL decides: it raises on truncation
            if check_imaging_path(imaging_path) == "simplejpeg":
                arr = _sj_decode(data, (sw, sh), k, bgr)
            if arr is None or arr.shape[:2] != (-(-sh // k), -(-sw // k)):
                arr = _cv2_decode(data, k, bgr)
    elif _png_fast_ok(data, header):
        arr = _cv2_decode(data, 1, bgr)
    orientation = header.orientation
    if arr is None or arr.shape[:2] != (-(-sh // k), -(-sw // k)):
        arr, oriented = _pil_decode(data, header, k, name)
        if oriented:
            sw, sh = header.size
            orientation = 1
        if bgr:
            arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    dh, dw = arr.shape[:2]
    scale = next((s for s in (1, 2, 4, 8) if (dw, dh) == (-(-sw // s), -(-sh // s))), None)
    if scale is None:
        raise ImageError(
            "truncated image",
            f"{_prefix(name)}decoded {dw}x{dh} pixels but the header says {sw}x{sh}; "
            "the file is inconsistent, re-export it",
        )
    return arr, orientation


def decode_rgb(
    data: bytes, header: ImageHeader, min_size: tuple[int, int], name: str = ""
) -> np.ndarray:
    """Decode ``data`` (probed as ``header``) to an HxWx3 uint8 RGB array, EXIF-oriented.

    JPEGs decode at 1/2, 1/4 or 1/8 scale when the result is still >= ``min_size`` (w, h in
    oriented coordinates: the largest size the caller will resize to) in both dimensions;
    other formats decode at full size. The result is (ceil(H/k), ceil(W/k)) for the chosen
    scale 1/k. Raises ImageError "truncated image" for cut or corrupt data, "unsupported
    format" for pixels that have no RGB conversion or HEIC without pillow-heif.
    """
    arr, orientation = decode_stored(data, header, min_size, name)
    return orient(arr, orientation)
