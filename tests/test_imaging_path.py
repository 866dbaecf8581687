"""Imaging paths (opencv / simplejpeg), the source-from-refine resize and the process set-up
(kept heap): same pixels, PSNR within 1 dB of the naive path on real photos, deterministic
builds, and a resume or ``--part`` with another imaging path refused with one line."""

from __future__ import annotations

import ctypes
import io
import json
import platform
import resource

import numpy as np
import pytest
from imagegen import make_photo, real_photo, save_jpeg
from imaging_fixtures import psnr
from PIL import Image

from mvprep import image_modes, imaging
from mvprep.image_modes import orient, resize_oriented, resize_outputs
from mvprep.imaging import (
    ImageError,
    check_imaging_path,
    decode_stored,
    default_imaging_path,
    encode_image,
    probe_image,
)
from mvprep.options import BuildOptions
from mvshards.index import IndexMismatchError

HAS_SJ = imaging._simplejpeg() is not None
needs_sj = pytest.mark.skipif(not HAS_SJ, reason="simplejpeg (mvkit[fastjpeg]) not installed")


@needs_sj
@pytest.mark.parametrize("subsampling", [0, 1, 2])
def test_simplejpeg_decodes_the_same_pixels_at_every_scale(subsampling):
    buf = io.BytesIO()
    save_jpeg(buf, make_photo(333, 251, 3), 90, exif_orientation=6, subsampling=subsampling)
    data = buf.getvalue()
    header = probe_image(data)
    for min_size in ((251, 333), (120, 160), (60, 80), (30, 40)):  # scales 1, 1/2, 1/4, 1/8
        a, oa = decode_stored(data, header, min_size, bgr=True, imaging_path="opencv")
        b, ob = decode_stored(data, header, min_size, bgr=True, imaging_path="simplejpeg")
        assert oa == ob == 6 and a.shape == b.shape
        assert np.abs(a.astype(int) - b).max() <= 1


@needs_sj
def test_simplejpeg_path_rejects_a_cut_jpeg_like_the_opencv_path():
    buf = io.BytesIO()
    save_jpeg(buf, make_photo(200, 150, 4), 90)
    data = buf.getvalue()[:2000]
    header = probe_image(data)
    for path in ("opencv", "simplejpeg"):
        with pytest.raises(ImageError) as exc:
            decode_stored(data, header, (200, 150), imaging_path=path)
        assert exc.value.reason == "truncated image"


def test_missing_simplejpeg_falls_back_by_default_and_refuses_when_asked(monkeypatch, tmp_path):
    monkeypatch.setattr(imaging, "_simplejpeg", lambda: None)
    assert default_imaging_path() == "opencv"
    opts = BuildOptions(data_path=tmp_path / "d.json", out_dir=tmp_path / "o")
    assert opts.imaging_path == "opencv" and opts.params()["imaging_path"] == "opencv"
    with pytest.raises(ValueError) as exc:
        check_imaging_path("simplejpeg")
    assert str(exc.value) == (
        "imaging path simplejpeg needs the simplejpeg package, which is not installed here: "
        "pip install 'mvkit[fastjpeg]', or build into a new --out with --imaging-path opencv"
    )
    with pytest.raises(ValueError, match="--imaging-path must be one of opencv, simplejpeg"):
        BuildOptions(data_path=tmp_path / "d.json", out_dir=tmp_path / "o", imaging_path="x")


def _has_mallopt() -> bool:
    try:
        return platform.libc_ver()[0] == "glibc" and hasattr(ctypes.CDLL(None), "mallopt")
    except OSError:
        return False


@pytest.mark.skipif(not _has_mallopt(), reason="needs glibc's mallopt")
def test_process_set_up_keeps_freed_pixel_buffers_for_the_next_image():
    """After the set-up every pixel entry point runs, a round of multi-MB buffers freed and
    allocated again costs no page faults. Without it glibc mmaps each buffer, or trims the
    freed heap (above 64 MB at most), so the second round faults in all ~23000 pages."""
    image_modes.configure_process()

    def one_round() -> None:
        buffers = [bytearray(30 << 20) for _ in range(3)]  # written: every page touched
        del buffers

    one_round()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    one_round()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before < 2000


@pytest.mark.parametrize("orientation", range(1, 9))
def test_source_from_refine_matches_the_direct_resize(orientation):
    stored = make_photo(400, 300, orientation)
    source_size, refine_size = (98, 70), (280, 210)
    if orientation >= 5:
        source_size, refine_size = (70, 98), (210, 280)
    source, refine = resize_outputs(stored, orientation, source_size, refine_size)
    assert refine is not None
    assert (refine == resize_oriented(stored, refine_size, orientation)).all()  # unchanged
    direct = resize_oriented(stored, source_size, orientation)
    assert source.shape == direct.shape and psnr(source, direct) > 35
    old, _ = resize_outputs(stored, orientation, source_size, refine_size, from_refine=False)
    assert (old == direct).all()
    # a refine image larger than the pixels (an enlargement) is never the source's input
    small = make_photo(150, 120, 9)
    s2, _ = resize_outputs(small, 1, (60, 48), (200, 160))
    assert (s2 == resize_oriented(small, (60, 48), 1)).all()
    assert (orient(refine, 1) == refine).all()


def _real_mosaic() -> np.ndarray:
    """2016 x 1512 of scikit-image's photos at their own pixel scale (no resampling)."""
    names = ("astronaut", "coffee", "rocket", "chelsea")
    tiles = [real_photo(n) for n in names]
    rows = []
    for r in range(5):
        row = []
        for c in range(5):
            t = tiles[(r * 5 + c) % 4]
            y, x = (r * 37) % (t.shape[0] - 299), (c * 53) % (t.shape[1] - 402)
            row.append(t[y : y + 300, x : x + 403])
        rows.append(np.hstack(row))
    return np.pad(np.vstack(rows), ((0, 12), (0, 1), (0, 0)), "edge")  # 2016 x 1512


@pytest.mark.slow
def test_psnr_of_each_path_is_within_1db_of_the_naive_path_on_real_photos(tmp_path):
    """Both stored images, both imaging paths, against a full-decode Lanczos reference."""
    path = save_jpeg(tmp_path / "real.jpg", _real_mosaic(), quality=92)
    data = path.read_bytes()
    header = probe_image(data)
    full = Image.open(path).convert("RGB")
    refine_size, source_size = (672, 504), (448, 336)  # 1/2 decode, refine 1.5x, source 1.5x
    naive_psnr, refs = {}, {}
    for name, size in (("refine", refine_size), ("source", source_size)):
        refs[name] = np.asarray(full.resize(size, Image.Resampling.LANCZOS))
        buf = io.BytesIO()
        full.resize(size, Image.Resampling.BICUBIC).save(buf, "JPEG", quality=95)
        naive_psnr[name] = psnr(np.asarray(Image.open(buf)), refs[name])
    for imaging_path in ("opencv", "simplejpeg") if HAS_SJ else ("opencv",):
        pixels, orientation = decode_stored(data, header, refine_size, imaging_path=imaging_path)
        assert pixels.shape[:2] == (756, 1008)  # really reduced
        source, refine = resize_outputs(pixels, orientation, source_size, refine_size)
        for name, img in (("refine", refine), ("source", source)):
            assert img is not None
            ours = np.asarray(Image.open(io.BytesIO(encode_image(img, "jpeg", 95, "4:2:0"))))
            assert psnr(ours, refs[name]) >= naive_psnr[name] - 1.0, (imaging_path, name)


def _build(tmp_path, out_name: str, **kw) -> BuildOptions:
    from mvprep.build import build

    options = BuildOptions(
        data_path=tmp_path / "d.json", out_dir=tmp_path / out_name, max_res=896, **kw
    )
    build(options, workers=1, progress=False)
    return options


def _data(tmp_path) -> None:
    save_jpeg(tmp_path / "p.jpg", make_photo(1600, 1200, 7), 92, exif_orientation=6)
    save_jpeg(tmp_path / "q.jpg", make_photo(900, 1300, 8), 90)
    records = [
        {
            "image": name,
            "conversations": [
                {"role": "user", "content": "<image>\nWhat is it?"},
                {"role": "assistant", "content": "A test."},
            ],
        }
        for name in ("p.jpg", "q.jpg")
    ]
    (tmp_path / "d.json").write_text(json.dumps(records))


@pytest.mark.slow
def test_each_path_builds_deterministically_and_another_path_is_refused(tmp_path):
    _data(tmp_path)
    paths = ("opencv", "simplejpeg") if HAS_SJ else ("opencv",)
    for path in paths:
        a = _build(tmp_path, f"{path}_a", imaging_path=path)
        _build(tmp_path, f"{path}_b", imaging_path=path)
        assert (a.out_dir / "000000.tar").read_bytes() == (
            tmp_path / f"{path}_b" / "000000.tar"
        ).read_bytes()
        assert json.loads((a.out_dir / "build.json").read_text())["imaging_path"] == path
    other = "opencv" if HAS_SJ else "simplejpeg"
    first = paths[-1]
    if other == "simplejpeg":  # pretend it is installed: the refusal comes before any decode
        pytest.skip("needs simplejpeg to pick the other path")
    for part in (None, "1/2"):
        from mvprep.build import build
        from mvprep.partition import parse_part

        options = BuildOptions(
            data_path=tmp_path / "d.json",
            out_dir=tmp_path / f"{first}_a",
            max_res=896,
            imaging_path=other,
        )
        with pytest.raises(IndexMismatchError) as exc:
            build(options, workers=1, progress=False, part=parse_part(part) if part else None)
        assert str(exc.value) == (
            f'{tmp_path / f"{first}_a"} was built with --imaging-path "{first}", this run asks '
            f'for "{other}": use a new --out or the same options'
        )
