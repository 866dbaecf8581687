"""Tests for mvprep.imaging on bad input: missing, empty, truncated and corrupt files,
decompression bombs, unsupported formats (real files written to tmp_path)."""

from __future__ import annotations

import io
import pickle
import struct
import zlib

import pytest
from imagegen import make_photo, save_image, save_jpeg
from imaging_fixtures import load, psnr
from PIL import Image

from mvprep import imaging
from mvprep.image_modes import jpeg_is_complete
from mvprep.imaging import (
    DEFAULT_MAX_PIXELS,
    ERROR_REASONS,
    ImageError,
    ImageHeader,
    decode_rgb,
    probe_image,
    read_image_bytes,
)

# ------------------------------------------------------------------------- bad input


def reason_of(fn, *args, **kw) -> ImageError:
    with pytest.raises(ImageError) as info:
        fn(*args, **kw)
    assert info.value.reason in ERROR_REASONS and str(info.value)
    return info.value


def test_missing_empty_and_directory(tmp_path):
    assert reason_of(read_image_bytes, tmp_path / "nope.jpg").reason == "missing file"
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert reason_of(read_image_bytes, tmp_path / "empty.jpg").reason == "empty file"
    assert reason_of(probe_image, b"").reason == "empty file"
    (tmp_path / "dir.jpg").mkdir()
    assert reason_of(read_image_bytes, tmp_path / "dir.jpg").reason == "unreadable file"


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("BMW is a car maker. This is not a picture.\n" * 20)
    err = reason_of(probe_image, read_image_bytes(path), name="notes.jpg")
    assert err.reason == "not an image" and "notes.jpg" in str(err)


def jpeg_with_thumbnail_segment(main: bytes, thumb: bytes) -> bytes:
    """Insert an APP1 segment holding a complete JPEG (like an EXIF thumbnail) after SOI."""
    payload = b"Exif\x00\x00" + thumb
    return main[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + main[2:]


def test_truncated_jpeg(tmp_path):
    buf = io.BytesIO()
    save_jpeg(buf, make_photo(320, 240, 12), quality=90)
    data = buf.getvalue()
    thumb = io.BytesIO()
    save_jpeg(thumb, make_photo(16, 12, 13))
    with_thumb = jpeg_with_thumbnail_segment(data, thumb.getvalue())
    assert jpeg_is_complete(data) and jpeg_is_complete(with_thumb)
    for blob in (data, with_thumb):
        for cut in (len(blob) // 3, len(blob) * 2 // 3, len(blob) - 2):
            path = tmp_path / "cut.jpg"
            path.write_bytes(blob[:cut])
            assert not jpeg_is_complete(blob[:cut])
            for min_size in ((320, 240), (80, 60)):  # full and reduced decode paths
                header = probe_image(read_image_bytes(path), name="cut.jpg")
                err = reason_of(decode_rgb, read_image_bytes(path), header, min_size)
                assert err.reason == "truncated image"
    path.write_bytes(data[:300])  # cut inside the header segments
    assert reason_of(load, path).reason == "truncated image"
    prog = io.BytesIO()
    save_jpeg(prog, make_photo(320, 240, 12), progressive=True)
    path.write_bytes(prog.getvalue()[: len(prog.getvalue()) // 2])
    assert reason_of(load, path, (80, 60)).reason == "truncated image"


def test_pil_fallback_matches_opencv_path(tmp_path, monkeypatch):
    """When OpenCV cannot decode (other builds, odd files), PIL's draft path gives the same
    size and nearly the same pixels, orientation included."""
    path = save_jpeg(tmp_path / "f.jpg", make_photo(200, 120, 18), 92, exif_orientation=8)
    data = read_image_bytes(path)
    header = probe_image(data)
    fast = [decode_rgb(data, header, m) for m in ((120, 200), (50, 90), (1, 1))]
    monkeypatch.setattr(imaging, "_cv2_decode", lambda data, k, bgr: None)
    slow = [decode_rgb(data, header, m) for m in ((120, 200), (50, 90), (1, 1))]
    for a, b in zip(fast, slow, strict=True):
        assert a.shape == b.shape and psnr(a, b) > 40
    assert [a.shape[:2] for a in slow] == [(200, 120), (100, 60), (25, 15)]


@pytest.mark.parametrize(
    ("fmt", "ext"),
    [("PNG", "png"), ("GIF", "gif"), ("BMP", "bmp"), ("TIFF", "tif"), ("WEBP", "webp")],
)
def test_truncated_other_formats(tmp_path, fmt, ext):
    rgb = make_photo(200, 150, 14)
    buf = io.BytesIO()
    save_image(buf, rgb, fmt)
    data = buf.getvalue()
    path = tmp_path / f"cut.{ext}"
    path.write_bytes(data[: len(data) // 2])
    assert reason_of(load, path).reason == "truncated image"


def png_header_only(w: int, h: int) -> bytes:
    """A PNG whose IHDR claims w x h (RGB, 8-bit) with one empty IDAT: no pixel data."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(tag + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))  # fmt: skip


def test_decompression_bomb(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # restored after
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header_only(100_000, 100_000))  # 10 GP claimed, 60 bytes on disk
    err = reason_of(probe_image, read_image_bytes(bomb), name="bomb.png")
    assert err.reason == "decompression bomb" and "bomb.png" in str(err)
    assert reason_of(probe_image, png_header_only(20_000, 6_000)).reason == "decompression bomb"
    # a caller may raise the limit past Pillow's own hard limit (2 x 89.5 MP); header only
    big = probe_image(png_header_only(20_000, 12_000), max_pixels=300_000_000)
    assert big.size == (20_000, 12_000)
    # a small explicit limit on a real image
    path = save_jpeg(tmp_path / "p.jpg", make_photo(50, 40, 15))
    assert reason_of(load, path, max_pixels=1999).reason == "decompression bomb"
    assert load(path, max_pixels=2000).shape == (40, 50, 3)
    assert 50_000_000 <= DEFAULT_MAX_PIXELS <= 200_000_000


def test_unsupported_formats(tmp_path):
    Image.fromarray(make_photo(8, 8, 16)).save(tmp_path / "x.ppm")
    err = reason_of(probe_image, read_image_bytes(tmp_path / "x.ppm"))
    assert err.reason == "unsupported format" and "PPM" in str(err)
    heic = struct.pack(">I", 24) + b"ftypheic" + b"\x00\x00\x00\x00mif1heic" + b"\x00" * 64
    try:
        import pillow_heif  # noqa: F401
    except ImportError:
        err = reason_of(probe_image, heic)
        assert err.reason == "unsupported format" and "mvkit[heic]" in str(err)


def test_header_mismatch_is_detected():
    buf = io.BytesIO()
    save_jpeg(buf, make_photo(40, 30, 17))
    wrong = ImageHeader(size=(41, 30), format="JPEG", mode="RGB", orientation=1)
    assert reason_of(decode_rgb, buf.getvalue(), wrong, (41, 30)).reason == "truncated image"


def test_image_error_contract():
    err = ImageError("truncated image", "x.jpg: cut")
    assert (err.reason, str(err)) == ("truncated image", "x.jpg: cut")
    back = pickle.loads(pickle.dumps(err))  # crosses worker processes intact
    assert (back.reason, str(back)) == (err.reason, str(err))
    with pytest.raises(ValueError):
        ImageError("bad", "x")
