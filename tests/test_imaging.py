"""Tests for mvprep.imaging: formats, modes, EXIF orientation, reduced decode, resize, encode,
and bad input (real corrupt files written to tmp_path)."""

from __future__ import annotations

import io
import math
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from imagegen import make_photo, make_screenshot, save_image, save_jpeg
from PIL import Image, ImageOps

from mvprep import imaging
from mvprep.image_modes import jpeg_is_complete, stored_size
from mvprep.imaging import (
    DEFAULT_MAX_PIXELS,
    ERROR_REASONS,
    JPEG_SUBSAMPLINGS,
    ImageError,
    ImageHeader,
    decode_rgb,
    decode_stored,
    encode_image,
    extension_for,
    output_subsampling,
    probe_image,
    read_image_bytes,
    resize_oriented,
    resize_rgb,
)


def load(path: Path, min_size: tuple[int, int] = (1 << 30, 1 << 30), **kw) -> np.ndarray:
    """read -> probe -> decode, full size unless min_size allows a reduced JPEG decode."""
    data = read_image_bytes(path)
    return decode_rgb(data, probe_image(data, **kw), min_size)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def pil_reference(path: Path) -> np.ndarray:
    """Full decode + exif_transpose + convert('RGB') with PIL (the naive path)."""
    with Image.open(path) as im:
        return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


# ------------------------------------------------------------------------- formats


@pytest.mark.parametrize(
    ("fmt", "ext", "min_psnr"),
    [
        ("JPEG", "jpg", 27.0),  # q95 4:2:0 of a noisy 83x57 image
        ("PNG", "png", math.inf),
        ("WEBP", "webp", math.inf),  # saved lossless below
        ("BMP", "bmp", math.inf),
        ("TIFF", "tif", math.inf),
        ("GIF", "gif", 18.0),  # 256-colour palette
    ],
)
def test_every_format_round_trips(tmp_path, fmt, ext, min_psnr):
    rgb = make_photo(83, 57, seed=1)
    kw = {"WEBP": {"lossless": True}, "JPEG": {"quality": 95}}.get(fmt, {})
    path = save_image(tmp_path / f"x.{ext}", rgb, fmt, **kw)
    header = probe_image(read_image_bytes(path))
    assert header.size == (83, 57) and header.orientation == 1 and header.format == fmt
    out = load(path)
    assert out.shape == (57, 83, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    assert psnr(out, rgb) >= min_psnr


def test_gif_first_frame(tmp_path):
    frames = [Image.new("RGB", (40, 30), c) for c in ((220, 20, 20), (20, 20, 220))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    out = load(path)
    assert out.shape == (30, 40, 3)
    assert np.abs(out.astype(int) - (220, 20, 20)).max() <= 4  # red, not blue


def test_mpo_uses_jpeg_paths(tmp_path):
    a, b = make_photo(64, 48, 1), make_photo(64, 48, 2)
    path = tmp_path / "x.mpo"
    Image.fromarray(a).save(path, "MPO", save_all=True, append_images=[Image.fromarray(b)])
    header = probe_image(read_image_bytes(path))
    assert header.format == "MPO"
    out = load(path)
    assert psnr(out, a) > psnr(out, b) + 6  # the first picture, not the second
    assert load(path, (32, 24)).shape == (24, 32, 3)  # reduced decode applies to MPO too


def test_progressive_and_grayscale_jpeg(tmp_path):
    rgb = make_photo(160, 96, 3)
    prog = save_jpeg(tmp_path / "p.jpg", rgb, quality=92, progressive=True)
    assert psnr(load(prog), rgb) > 27
    assert load(prog, (40, 24)).shape == (24, 40, 3)
    gray = save_image(tmp_path / "g.jpg", rgb, "JPEG", mode="L", quality=95)
    out = load(gray, (80, 48))
    assert out.shape == (48, 80, 3)
    assert (out[:, :, 0] == out[:, :, 1]).all() and (out[:, :, 1] == out[:, :, 2]).all()


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


# ------------------------------------------------------------------------- reduced decode


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    w=st.integers(1, 180),
    h=st.integers(1, 180),
    orientation=st.integers(1, 8),
    fx=st.floats(0.0, 1.2),
    fy=st.floats(0.0, 1.2),
    mode=st.sampled_from(["RGB", "L", "CMYK"]),
)
def test_reduced_decode_never_below_min_size(w, h, orientation, fx, fy, mode):
    buf = io.BytesIO()
    save_jpeg(
        buf, Image.fromarray(make_photo(w, h, w * h)).convert(mode), exif_orientation=orientation
    )
    data = buf.getvalue()
    header = probe_image(data)
    ow, oh = header.size
    assert (ow, oh) == stored_size((w, h), orientation)
    min_size = (int(ow * fx), int(oh * fy))
    out = decode_rgb(data, header, min_size)
    dh, dw = out.shape[:2]
    # the largest JPEG scale 1/k whose (ceil-rounded) output still covers min_size
    k = max(
        s
        for s in (1, 2, 4, 8)
        if s == 1
        or (s <= min(ow, oh) and -(-ow // s) >= min_size[0] and -(-oh // s) >= min_size[1])
    )
    assert (dw, dh) == (-(-ow // k), -(-oh // k))
    if min_size[0] <= ow and min_size[1] <= oh:
        assert dw >= min_size[0] and dh >= min_size[1]


def test_reduced_decode_quality_on_a_real_photo(tmp_path):
    """Reduced decode + resize_rgb stays close to full decode + PIL Lanczos (and not worse
    than the naive full decode + PIL bicubic by more than 1 dB, after the q95 encode)."""
    from imagegen import real_photo

    tiles = [real_photo(n)[:400, :512] for n in ("astronaut", "coffee", "rocket", "chelsea")]
    tiles[3] = cv2.resize(real_photo("chelsea"), (512, 400), interpolation=cv2.INTER_AREA)
    photo = np.vstack([np.hstack(tiles[:2]), np.hstack(tiles[2:])])  # 1024 x 800
    path = save_jpeg(tmp_path / "real.jpg", photo, quality=92)
    data = read_image_bytes(path)
    header = probe_image(data)
    with Image.open(path) as im:
        full = im.convert("RGB")
        full.load()
    for target in ((448, 350), (300, 234), (200, 156)):  # 1/2, 1/2 and 1/4 decodes
        ref = np.asarray(full.resize(target, Image.Resampling.LANCZOS))
        rgb = decode_rgb(data, header, target)
        assert rgb.shape[0] < 800  # really reduced
        ours = resize_rgb(rgb, target)
        assert psnr(ours, ref) > 30
        naive = np.asarray(full.resize(target, Image.Resampling.BICUBIC))
        ours_q = np.asarray(Image.open(io.BytesIO(encode_image(ours, "jpeg"))))
        buf = io.BytesIO()
        Image.fromarray(naive).save(buf, "JPEG", quality=95)
        naive_q = np.asarray(Image.open(buf))
        assert psnr(ours_q, ref) >= psnr(naive_q, ref) - 1.0


# ------------------------------------------------------------------------- resize


@settings(max_examples=60, deadline=None)
@given(iw=st.integers(1, 120), ih=st.integers(1, 120), w=st.integers(1, 200), h=st.integers(1, 200))
def test_resize_returns_exact_size(iw, ih, w, h):
    rgb = make_photo(iw, ih, 7)
    out = resize_rgb(rgb, (w, h))
    assert out.shape == (h, w, 3) and out.dtype == np.uint8


def grating(w: int, h: int, period: float) -> np.ndarray:
    """Vertical sine grating (text-like fine detail) as an HxWx3 uint8 image."""
    row = 127.5 + 127.5 * np.sin(2 * np.pi * np.arange(w) / period)
    return np.repeat(np.tile(row, (h, 1))[:, :, None], 3, axis=2).round().astype(np.uint8)


def test_resize_rule():
    rgb = make_photo(120, 90, 8)
    # up to 1.15x shrink and enlarging: plain bicubic
    for size in ((110, 83), (200, 150)):
        assert (resize_rgb(rgb, size) == cv2.resize(rgb, size, interpolation=cv2.INTER_CUBIC)).all()
    # more than 2x: pixel-area averaging
    assert (
        resize_rgb(rgb, (50, 40)) == cv2.resize(rgb, (50, 40), interpolation=cv2.INTER_AREA)
    ).all()
    # antialias=False is plain cubic up to 2x
    plain = cv2.resize(rgb, (70, 52), interpolation=cv2.INTER_CUBIC)
    assert (resize_rgb(rgb, (70, 52), antialias=False) == plain).all()
    assert resize_rgb(rgb, (120, 90)) is rgb


@pytest.mark.parametrize("shrink", [1.5, 1.9, 2.5, 3.0])
def test_resize_suppresses_aliasing(shrink):
    """A grating above the output's Nyquist frequency must be (mostly) removed, not folded
    into a strong false pattern -- as a plain 4-tap cubic does."""
    src = grating(600, 8, period=2.3)  # 0.43 cycles/px: beyond Nyquist after any >1.2x shrink
    size = (round(600 / shrink), 8)
    ours = resize_rgb(src, size)[:, 4:-4]
    plain = cv2.resize(src, size, interpolation=cv2.INTER_CUBIC)[:, 4:-4]
    pil = np.asarray(Image.fromarray(src).resize(size, Image.Resampling.BICUBIC))[:, 4:-4]
    assert plain.std() > 60  # the aliasing this rule exists for
    if shrink <= 2:  # antialiased bicubic: about as clean as PIL's
        assert ours.std() < max(12.0, 1.5 * pil.std())
    else:  # area averaging: far less aliasing than cubic (not as clean as PIL's)
        assert ours.std() < 0.4 * plain.std()


def test_resize_close_to_pil_bicubic_on_text():
    shot = make_screenshot(600, 400, 21)
    for size in ((400, 267), (330, 220)):  # 1.5x and 1.8x shrink
        pil = np.asarray(Image.fromarray(shot).resize(size, Image.Resampling.BICUBIC))
        plain = cv2.resize(shot, size, interpolation=cv2.INTER_CUBIC)
        ours = resize_rgb(shot, size)
        assert psnr(ours, pil) > 33 and psnr(ours, pil) > psnr(plain, pil) + 4


def test_resize_and_encode_reject_bad_arrays():
    with pytest.raises(ValueError):
        resize_rgb(np.zeros((4, 4), np.uint8), (2, 2))
    with pytest.raises(ValueError):
        resize_rgb(np.zeros((4, 4, 3), np.uint8), (0, 2))
    with pytest.raises(ValueError):
        encode_image(np.zeros((4, 4, 3), np.float32), "png")
    with pytest.raises(ValueError):
        encode_image(np.zeros((4, 4, 3), np.uint8), "gif")


# ------------------------------------------------------------------------- encode


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp"])
def test_encode_is_deterministic_and_decodes(fmt):
    rgb = make_screenshot(200, 120, 9)
    a = encode_image(rgb, fmt)
    assert a == encode_image(rgb.copy(), fmt)
    assert a != encode_image(make_screenshot(200, 120, 10), fmt)
    with Image.open(io.BytesIO(a)) as im:
        assert im.format == fmt.upper() and im.size == (200, 120) and im.mode == "RGB"
        assert "exif" not in im.info
        back = np.asarray(im)
    if fmt == "jpeg":
        assert psnr(back, rgb) > 30
    else:
        assert (back == rgb).all()  # lossless


def test_jpeg_is_444_and_honours_quality():
    rgb = make_photo(128, 96, 11)
    hi, lo = encode_image(rgb, "jpeg", 95), encode_image(rgb, "jpeg", 50)
    assert len(lo) < len(hi)
    with Image.open(io.BytesIO(hi)) as im:
        assert [layer[1:3] for layer in im.layer] == [(1, 1)] * 3  # no chroma subsampling
    with pytest.raises(ValueError):
        encode_image(rgb, "jpeg", 0)


def test_extension_for():
    assert [extension_for(f) for f in ("jpeg", "JPEG", "jpg", "png", "webp")] == [
        "jpg",
        "jpg",
        "jpg",
        "png",
        "webp",
    ]
    with pytest.raises(ValueError):
        extension_for("bmp")


# ------------------------------------------------------- stored orientation, BGR, subsampling


def sampling_of(jpeg: bytes) -> list[tuple[int, int]]:
    """Per-component (h, v) sampling factors of an encoded JPEG."""
    with Image.open(io.BytesIO(jpeg)) as im:
        return [layer[1:3] for layer in im.layer]


SAMPLING_FACTORS = {
    "4:4:4": [(1, 1)] * 3,
    "4:2:2": [(2, 1), (1, 1), (1, 1)],
    "4:2:0": [(2, 2), (1, 1), (1, 1)],
    "4:4:0": [(1, 2), (1, 1), (1, 1)],
    "4:1:1": [(4, 1), (1, 1), (1, 1)],
}


@pytest.mark.parametrize("subsampling", list(JPEG_SUBSAMPLINGS))
def test_jpeg_subsampling_round_trips_through_the_probe(subsampling):
    rgb = make_photo(96, 64, 30)
    out = encode_image(rgb, "jpeg", 95, subsampling)
    assert sampling_of(out) == SAMPLING_FACTORS[subsampling]
    header = probe_image(out)
    assert header.subsampling == subsampling
    assert output_subsampling(header) == subsampling
    # png and webp ignore it (lossless either way)
    assert encode_image(rgb, "png", 95, subsampling) == encode_image(rgb, "png")


def test_probe_subsampling_of_other_inputs(tmp_path):
    rgb = make_photo(64, 48, 31)
    cases = {
        "pil420.jpg": (lambda p: save_jpeg(p, rgb, subsampling=2), "4:2:0", "4:2:0"),
        "pil444.jpg": (lambda p: save_jpeg(p, rgb, subsampling=0), "4:4:4", "4:4:4"),
        "gray.jpg": (lambda p: save_image(p, rgb, "JPEG", mode="L"), None, "4:2:0"),
        "cmyk.jpg": (lambda p: save_image(p, rgb, "JPEG", mode="CMYK"), None, "4:4:4"),
        "rgb.png": (lambda p: save_image(p, rgb, "PNG"), None, "4:4:4"),
        "gray16.png": (lambda p: save_image(p, rgb, "PNG", mode="I;16"), None, "4:2:0"),
        "pal.gif": (lambda p: save_image(p, rgb, "GIF"), None, "4:4:4"),
    }
    for name, (write, stored, chosen) in cases.items():
        write(tmp_path / name)
        header = probe_image(read_image_bytes(tmp_path / name))
        assert (header.subsampling, output_subsampling(header)) == (stored, chosen), name


def test_encode_bgr_and_bad_subsampling():
    rgb = make_screenshot(120, 80, 32)
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    for fmt in ("jpeg", "png", "webp"):
        assert encode_image(bgr, fmt, 90, "4:2:0", bgr=True) == encode_image(rgb, fmt, 90, "4:2:0")
    with pytest.raises(ValueError, match="subsampling"):
        encode_image(rgb, "jpeg", 95, "4:2:1")


@pytest.mark.parametrize("orientation", range(1, 9))
def test_stored_decode_then_resize_oriented_matches_orient_first(tmp_path, orientation):
    """decode_stored + resize_oriented (rotate the small output) gives the image that
    decode_rgb + resize_rgb (rotate the big decode first) gives, up to rounding; BGR is the
    same pixels with the channels swapped."""
    w, h = 360, 240
    path = save_jpeg(tmp_path / "o.jpg", make_photo(w, h, 33), 92, exif_orientation=orientation)
    data = read_image_bytes(path)
    header = probe_image(data)
    ow, oh = header.size
    for size in ((ow * 3 // 8, oh * 3 // 8), (ow // 4 - 1, oh // 4 + 1), (ow // 2, oh // 2)):
        rgb = decode_rgb(data, header, size)
        pixels, still = decode_stored(data, header, size)
        assert still == orientation
        assert pixels.shape == (*stored_size(rgb.shape[:2], orientation), 3)
        bgr, _ = decode_stored(data, header, size, bgr=True)
        assert (bgr[:, :, ::-1] == pixels).all()
        expected = resize_rgb(rgb, size)
        ours = resize_oriented(pixels, size, still)
        assert ours.shape == expected.shape == (size[1], size[0], 3)
        assert ours.flags.c_contiguous
        assert np.abs(ours.astype(int) - expected).max() <= 2
        assert psnr(ours, expected) > 50


@settings(max_examples=40, deadline=None)
@given(
    iw=st.integers(2, 90),
    ih=st.integers(2, 90),
    w=st.integers(1, 120),
    h=st.integers(1, 120),
    orientation=st.integers(1, 8),
)
def test_resize_oriented_property(iw, ih, w, h, orientation):
    stored = make_photo(iw, ih, iw * ih)
    ours = resize_oriented(stored, (w, h), orientation)
    expected = resize_rgb(imaging.orient(stored, orientation), (w, h))
    assert ours.shape == expected.shape == (h, w, 3)
    assert np.abs(ours.astype(int) - expected).max() <= 2


def test_pil_decoded_orientation_is_not_applied_twice(tmp_path, monkeypatch):
    """PIL orients TIFFs itself (recent Pillow); decode_stored then reports orientation 1,
    on the PIL fallback path too, and BGR there is the same pixels swapped."""
    rgb = make_photo(30, 20, 34)
    path = save_image(tmp_path / "o.tiff", rgb, "TIFF", exif_orientation=6)
    data = read_image_bytes(path)
    header = probe_image(data)
    pixels, still = decode_stored(data, header, (1, 1))
    ours = resize_oriented(pixels, header.size, still)
    assert (ours == np.rot90(rgb, k=-1)).all()
    jpeg = save_jpeg(tmp_path / "o.jpg", rgb, 95, exif_orientation=6)
    jdata = read_image_bytes(jpeg)
    jheader = probe_image(jdata)
    fast = decode_stored(jdata, jheader, (1, 1), bgr=True)
    monkeypatch.setattr(imaging, "_cv2_decode", lambda data, k, bgr: None)
    slow = decode_stored(jdata, jheader, (1, 1), bgr=True)
    assert fast[1] == slow[1] == 6
    assert fast[0].shape == slow[0].shape and psnr(fast[0], slow[0]) > 40


def test_build_sample_stores_oriented_exact_sizes_and_input_subsampling(tmp_path):
    """The builder's stored images: exact layout sizes, EXIF applied, close to the naive
    path; a 4:2:0 photo stays 4:2:0, a PNG screenshot is stored 4:4:4."""
    from mvprep.options import BuildOptions
    from mvprep.records import normalize_record
    from mvprep.sample_builder import build_sample
    from mvprep.tokens import make_token_counter

    save_jpeg(tmp_path / "p.jpg", make_photo(1200, 900, 35), 92, exif_orientation=6)
    save_image(tmp_path / "s.png", make_screenshot(1000, 560, 36), "PNG")
    options = BuildOptions(data_path=tmp_path / "d.json", out_dir=tmp_path / "out", max_res=896)
    for i, (name, subsampling) in enumerate((("p.jpg", "4:2:0"), ("s.png", "4:4:4"))):
        raw = {"image": name, "conversations": [
            {"role": "user", "content": "<image>\nWhat is it?"},
            {"role": "assistant", "content": "A test."},
        ]}  # fmt: skip
        sample = build_sample(normalize_record(i, raw), tmp_path, options, make_token_counter(None))
        entry = sample.meta.images[0]
        layout = entry.layout
        assert layout.refine_size is not None and entry.refine_member is not None
        with Image.open(tmp_path / name) as im:
            full = ImageOps.exif_transpose(im).convert("RGB")
        for member, size in (
            (entry.source_member, layout.source_size),
            (entry.refine_member, layout.refine_size),
        ):
            blob = sample.members[member]
            assert sampling_of(blob) == SAMPLING_FACTORS[subsampling]
            stored = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
            assert (stored.shape[1], stored.shape[0]) == tuple(size)
            ref = np.asarray(full.resize(tuple(size), Image.Resampling.LANCZOS))
            assert psnr(stored, ref) > 30, (name, member)


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


# ------------------------------------------------------------------------- process hygiene


def test_light_import_and_single_cv2_thread():
    code = (
        "import sys, cv2, numpy as np; import mvprep.imaging as m; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy'; "
        "m.resize_rgb(np.zeros((8, 8, 3), np.uint8), (4, 4)); "
        "assert cv2.getNumThreads() == 1, cv2.getNumThreads()"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_imagegen_is_seeded():
    for gen in (make_photo, make_screenshot):
        a, b = gen(64, 40, 3), gen(64, 40, 3)
        assert a.shape == (40, 64, 3) and a.dtype == np.uint8 and (a == b).all()
        assert (a != gen(64, 40, 4)).any()
