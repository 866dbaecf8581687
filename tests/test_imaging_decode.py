"""Tests for mvprep.imaging: every format decodes, reduced (JPEG scale) decode, and
process hygiene (light import, one OpenCV thread, seeded test images)."""

from __future__ import annotations

import io
import math
import subprocess
import sys

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from imagegen import make_photo, make_screenshot, save_image, save_jpeg
from imaging_fixtures import load, psnr
from PIL import Image

from mvprep.image_modes import stored_size
from mvprep.imaging import decode_rgb, encode_image, probe_image, read_image_bytes, resize_rgb

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


# ------------------------------------------------------------------------- process hygiene


@pytest.mark.slow
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
