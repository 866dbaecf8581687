"""Tests for mvprep.imaging: resize, encode, stored-orientation decode, BGR and JPEG
chroma subsampling, and the images the sample builder stores."""

from __future__ import annotations

import io

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from imagegen import make_photo, make_screenshot, save_image, save_jpeg
from imaging_fixtures import psnr
from PIL import Image, ImageOps

from mvprep import imaging
from mvprep.image_modes import stored_size
from mvprep.imaging import (
    JPEG_SUBSAMPLINGS,
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
    if fmt == "png":
        assert (back == rgb).all()  # lossless
    else:
        assert psnr(back, rgb) > 30


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
    # png and webp ignore it
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
