"""Tests for mvprep.imaging: pixel modes to RGB (16/32-bit, bilevel, alpha, palettes,
CMYK) and EXIF orientation, on real files written to tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from imagegen import make_photo, save_image, save_jpeg
from imaging_fixtures import load
from PIL import Image, ImageOps

from mvprep.image_modes import stored_size
from mvprep.imaging import probe_image, read_image_bytes


def pil_reference(path: Path) -> np.ndarray:
    """Full decode + exif_transpose + convert('RGB') with PIL (the naive path)."""
    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


# ------------------------------------------------------------------------- modes


def test_16bit_gradient_keeps_its_gradient(tmp_path):
    ramp = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (8, 1))
    for fmt, ext in (("PNG", "png"), ("TIFF", "tif")):
        path = tmp_path / f"g16.{ext}"
        Image.fromarray(ramp).save(path, fmt)
        assert probe_image(read_image_bytes(path)).mode.startswith("I;16")
        out = load(path)
        row = out[0, :, 0].astype(int)
        expected = np.round(ramp[0].astype(np.float64) * 255 / 65535).astype(int)
        assert (row == expected).all()  # full-range rescale, not PIL's near-white clip
        assert row[0] == 0 and row[-1] == 255 and (np.diff(row) >= 0).all()
        assert len(np.unique(row)) > 200


def test_32bit_int_and_float_modes(tmp_path):
    gray = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (5, 1))
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    for mode in ("I", "F"):
        path = save_image(tmp_path / f"{mode}.tif", rgb, "TIFF", mode=mode)
        assert probe_image(read_image_bytes(path)).mode == mode
        out = load(path)
        assert (out[:, :, 0] == gray).all() and (out[:, :, 2] == gray).all()
    # out-of-range values clip instead of wrapping
    Image.fromarray(np.array([[-5, 70000]], np.int32)).save(tmp_path / "c.tif")
    assert load(tmp_path / "c.tif")[0, :, 0].tolist() == [0, 255]
    Image.fromarray(np.array([[-1.0, 2.0, np.nan]], np.float32)).save(tmp_path / "f.tif")
    assert load(tmp_path / "f.tif")[0, :, 0].tolist() == [0, 255, 0]


def test_bilevel_and_gray(tmp_path):
    pix = np.zeros((8, 16), np.uint8)
    pix[:, 8:] = 255
    for fmt, ext in (("PNG", "png"), ("TIFF", "tif"), ("BMP", "bmp")):
        Image.fromarray(pix).convert("1").save(tmp_path / f"b.{ext}", fmt)
        out = load(tmp_path / f"b.{ext}")
        assert (out[:, :8] == 0).all() and (out[:, 8:] == 255).all()
        Image.fromarray(pix // 2).save(tmp_path / f"l.{ext}", fmt)
        assert (load(tmp_path / f"l.{ext}") == (pix // 2)[:, :, None]).all()


def expected_over_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    a = alpha.astype(np.float64)[:, :, None] / 255.0
    return np.floor(rgb * a + 255.0 * (1 - a) + 0.5).astype(np.uint8)


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("RGBA", "PNG"), ("RGBA", "WEBP"), ("RGBA", "TIFF"), ("LA", "PNG"), ("LA", "TIFF")],
)
def test_alpha_composites_over_white(tmp_path, mode, fmt):
    rgb = make_photo(64, 20, 4)
    alpha = np.tile(np.linspace(0, 255, 64).round().astype(np.uint8), (20, 1))
    kw = {"lossless": True, "exact": True} if fmt == "WEBP" else {}
    path = save_image(tmp_path / f"a.{fmt.lower()}", np.dstack([rgb, alpha]), fmt, mode, **kw)
    assert probe_image(read_image_bytes(path)).mode == mode
    out = load(path)
    base = rgb if mode == "RGBA" else np.asarray(Image.fromarray(rgb).convert("L"))[:, :, None]
    expected = expected_over_white(np.broadcast_to(base, rgb.shape), alpha)
    assert np.abs(out.astype(int) - expected).max() <= 1
    assert (out[:, 0] == 255).all()  # fully transparent column is white


@pytest.mark.parametrize(("fmt", "ext"), [("PNG", "png"), ("GIF", "gif"), ("TIFF", "tif")])
def test_palette_with_transparent_index(tmp_path, fmt, ext):
    idx = np.zeros((10, 12), np.uint8)
    idx[:, 6:] = 1
    idx[0, 0] = 2
    im = Image.fromarray(idx, "P")
    im.putpalette([0, 0, 0, 200, 30, 40, 10, 200, 90] + [0] * (253 * 3))
    im.info["transparency"] = 0
    path = tmp_path / f"p.{ext}"
    im.save(path, fmt, transparency=0) if fmt != "TIFF" else im.convert("PA").save(path)
    out = load(path)
    assert (out[1:, :6] == 255).all()  # transparent index -> white
    assert (out[:, 6:] == (200, 30, 40)).all()
    assert out[0, 0].tolist() == [10, 200, 90]


def test_palette_alpha_png_and_pa(tmp_path):
    idx = np.array([[0, 1, 2, 3]], np.uint8)
    im = Image.fromarray(idx, "P")
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9] + [0] * 252 * 3)
    alphas = bytes([0, 128, 255, 64])
    im.save(tmp_path / "pa.png", transparency=alphas)  # tRNS with per-entry alpha
    out = load(tmp_path / "pa.png")
    expected = expected_over_white(
        np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [9, 9, 9]]], np.float64),
        np.array([list(alphas)], np.uint8),
    )
    assert np.abs(out.astype(int) - expected).max() <= 1


def test_rgb_png_with_colour_key(tmp_path):
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[:2] = (10, 20, 30)
    rgb[2:] = (90, 80, 70)
    Image.fromarray(rgb).save(tmp_path / "k.png", transparency=(10, 20, 30))
    out = load(tmp_path / "k.png")
    assert (out[:2] == 255).all() and (out[2:] == (90, 80, 70)).all()


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk(tmp_path, fmt):
    colours = [(220, 30, 30), (30, 200, 40), (20, 40, 210), (240, 240, 240)]
    rgb = np.zeros((64, 64, 3), np.uint8)
    for i, c in enumerate(colours):
        rgb[(i // 2) * 32 : (i // 2 + 1) * 32, (i % 2) * 32 : (i % 2 + 1) * 32] = c
    path = tmp_path / f"c.{fmt.lower()}"
    Image.fromarray(rgb).convert("CMYK").save(
        path, fmt, **({"quality": 95} if fmt == "JPEG" else {})
    )
    assert probe_image(read_image_bytes(path)).mode == "CMYK"
    for min_size in ((64, 64), (16, 16)):
        out = load(path, min_size)
        k = 64 // out.shape[0]
        assert out.shape == (64 // k, 64 // k, 3) and k == (
            4 if min_size[0] == 16 and fmt == "JPEG" else 1
        )
        for i, c in enumerate(colours):
            y, x = ((i // 2) * 32 + 16) // k, ((i % 2) * 32 + 16) // k
            assert np.abs(out[y, x].astype(int) - c).max() <= 12


# ------------------------------------------------------------------------- EXIF orientation


def displayed(x: int, y: int, w: int, h: int, orientation: int) -> tuple[int, int]:
    """Where stored pixel (x, y) of a w x h image shows, per the EXIF specification."""
    return {
        1: (x, y), 2: (w - 1 - x, y), 3: (w - 1 - x, h - 1 - y), 4: (x, h - 1 - y),
        5: (y, x), 6: (h - 1 - y, x), 7: (h - 1 - y, w - 1 - x), 8: (y, w - 1 - x),
    }[orientation]  # fmt: skip


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_png_marker_pixel(tmp_path, orientation):
    w, h = 7, 4
    rgb = np.full((h, w, 3), 128, np.uint8)
    rgb[0, 0] = (255, 0, 0)
    rgb[1, 5] = (0, 0, 255)
    path = save_image(tmp_path / "o.png", rgb, "PNG", exif_orientation=orientation)
    header = probe_image(read_image_bytes(path))
    assert header.orientation == orientation
    assert header.size == stored_size((w, h), orientation)
    out = load(path)
    assert out.shape == (header.size[1], header.size[0], 3)
    for (sx, sy), colour in (((0, 0), (255, 0, 0)), ((5, 1), (0, 0, 255))):
        dx, dy = displayed(sx, sy, w, h, orientation)
        assert out[dy, dx].tolist() == list(colour)
    assert (out == pil_reference(path)).all()


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_jpeg_full_and_reduced(tmp_path, orientation):
    w, h = 96, 64
    rgb = np.full((h, w, 3), 128, np.uint8)
    rgb[:16, :16] = (255, 0, 0)  # stored top-left block
    rgb[:16, -16:] = (0, 0, 255)  # stored top-right block
    path = save_jpeg(tmp_path / "o.jpg", rgb, quality=95, exif_orientation=orientation)
    header = probe_image(read_image_bytes(path))
    ow, oh = stored_size((w, h), orientation)
    assert (header.orientation, header.size) == (orientation, (ow, oh))
    full = load(path)
    assert full.shape == (oh, ow, 3)
    assert np.abs(full.astype(int) - pil_reference(path)).max() <= 2
    half = load(path, (ow // 2, oh // 2))  # decoded at 1/2, oriented the same way
    assert half.shape == (oh // 2, ow // 2, 3)
    for img, k in ((full, 1), (half, 2)):
        for (sx, sy), colour in (((8, 8), (255, 0, 0)), ((w - 8, 8), (0, 0, 255))):
            dx, dy = displayed(sx, sy, w, h, orientation)
            assert np.abs(img[dy // k, dx // k].astype(int) - colour).max() <= 40


@pytest.mark.parametrize(("fmt", "kw"), [("WEBP", {"lossless": True}), ("TIFF", {})])
def test_exif_orientation_other_containers(tmp_path, fmt, kw):
    rgb = make_photo(30, 20, 5)
    path = save_image(tmp_path / f"o.{fmt.lower()}", rgb, fmt, exif_orientation=6, **kw)
    header = probe_image(read_image_bytes(path))
    assert (header.orientation, header.size) == (6, (20, 30))
    assert (load(path) == np.rot90(rgb, k=-1)).all()


def test_bad_orientation_value_is_ignored(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 42
    rgb = make_photo(30, 20, 6)
    Image.fromarray(rgb).save(tmp_path / "b.png", exif=exif.tobytes())
    header = probe_image(read_image_bytes(tmp_path / "b.png"))
    assert (header.orientation, header.size) == (1, (30, 20))
