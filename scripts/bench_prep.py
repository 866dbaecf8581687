"""Benchmark: mvprep's decode-once path against the naive per-image path, on one core.

Builds a set of 12-megapixel phone-style JPEGs (and a set of PNG screenshots), then times,
in one run:

(a) the naive path the official fine-tuning code takes per image: PIL open, EXIF transpose,
    convert to RGB, bicubic resize from the full decode to the source size and to the
    refine size, JPEG q95 encode of both;
(b) ``mvprep build --workers 1`` on the same images, as a subprocess. Its CPU time is the
    children's rusage. The fixed costs (interpreter, imports, pool, and the first image's
    one-off codec set-up) are measured with a build of the same records in which only the
    first record has its image (the others are text-only) and subtracted.

A second table takes the levers apart, in-process on the same JPEGs (and on a few 3 MP
JPEGs, which need a full-scale decode): the naive path against mvprep's per-image pipeline
(read, sha256, probe, decode, resize, encode; no tar) with each lever on or off -- the source
(overview) image resized from the refine image instead of from the decode, and the JPEG
decoder (``opencv`` or ``simplejpeg``, the imaging path recorded in ``build.json``). Ratios
are against the naive path timed in the same repetition; PSNR is given for both stored
images.

Both paths are timed on the same images: all but the first, which warms each path up
(plugin imports, first allocations) and is left out of both per-image figures. Both are CPU
seconds (``time.process_time`` / rusage user+sys), not wall time: this machine is shared and
noisy, so each measurement is repeated ``--reps`` times and the lowest taken, for both
paths alike. Prints images/s of both, the ratio, and the PSNR of each path's stored refine
images (all of them) against a full-decode Lanczos reference.

    python scripts/bench_prep.py [--jpegs 8] [--pngs 4] [--mid-jpegs 4] [--reps 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from imagegen import make_photo, make_screenshot, save_image, save_jpeg  # noqa: E402

from mvprep.imaging import (  # noqa: E402
    IMAGING_PATHS,
    check_imaging_path,
    decode_stored,
    default_imaging_path,
    encode_image,
    output_subsampling,
    probe_image,
    resize_outputs,
)
from mvshards.layout import compute_layout, max_slice_nums_for_res  # noqa: E402
from mvshards.profiles import get_profile  # noqa: E402
from mvshards.schema import SampleMeta  # noqa: E402
from mvshards.tario import iter_shard  # noqa: E402

PROFILE = get_profile("minicpmv-4.6")
MAX_SLICES = max_slice_nums_for_res(1344)


def make_sets(root: Path, jpegs: int, pngs: int) -> dict[str, list[str]]:
    """Write the image sets and one data file per set; return relative paths per set."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    sets: dict[str, list[str]] = {"jpeg": [], "png": []}
    for i in range(jpegs):
        name = f"img/phone_{i:02d}.jpg"
        w, h = (4032, 3024) if i % 2 == 0 else (3024, 4032)
        save_jpeg(
            root / name,
            make_photo(w, h, seed=i),
            quality=92,
            exif_orientation=6 if i % 3 == 0 else None,
        )
        sets["jpeg"].append(name)
    for i in range(pngs):
        name = f"img/screen_{i:02d}.png"
        save_image(root / name, make_screenshot(2560, 1440, seed=100 + i), "PNG")
        sets["png"].append(name)
    for set_name, paths in sets.items():
        records = [
            {
                "id": f"{set_name}-{i}",
                "image": path,
                "conversations": [
                    {"role": "user", "content": "<image>\nDescribe the picture."},
                    {"role": "assistant", "content": "A picture."},
                ],
            }
            for i, path in enumerate(paths)
        ]
        (root / f"{set_name}.json").write_text(json.dumps(records))
        # the baseline: record 0 keeps its image (warm-up), the others are text-only
        baseline = records[:1] + [{k: v for k, v in r.items() if k != "image"} for r in records[1:]]
        for r in baseline[1:]:
            r["conversations"] = [
                {"role": "user", "content": "Describe the picture."},
                {"role": "assistant", "content": "A picture."},
            ]
        (root / f"{set_name}_startup.json").write_text(json.dumps(baseline))
    return sets


def make_mid_jpegs(root: Path, count: int) -> list[Path]:
    """3 MP JPEGs: at --max-res 1344 their refine image needs more than half their size, so
    they decode at full scale (where the decoders differ in cost)."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        w, h = (2048, 1536) if i % 2 == 0 else (1536, 2048)
        path = root / f"img/mid_{i:02d}.jpg"
        save_jpeg(path, make_photo(w, h, seed=50 + i), quality=92)
        paths.append(path)
    return paths


def naive_path(path: Path) -> tuple[bytes | None, bytes]:
    """What the official fine-tuning code does per image, plus the encode a cache needs."""
    image = Image.open(path)
    image = ImageOps.exif_transpose(image).convert("RGB")
    layout = compute_layout(image.width, image.height, PROFILE, MAX_SLICES)
    source = image.resize(layout.source_size, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    source.save(out, "JPEG", quality=95)
    refine_bytes = None
    if layout.refine_size is not None:
        refine = image.resize(layout.refine_size, Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        refine.save(buf, "JPEG", quality=95)
        refine_bytes = buf.getvalue()
    return refine_bytes, out.getvalue()


def ours_pipeline(path: Path, imaging_path: str, from_refine: bool) -> tuple[bytes | None, bytes]:
    """mvprep's per-image work as ``build_sample`` does it (read, sha256, probe, layout,
    decode, resize, encode), without the tar: (refine bytes or None, source bytes)."""
    data = path.read_bytes()
    hashlib.sha256(data).hexdigest()
    header = probe_image(data)
    layout = compute_layout(header.size[0], header.size[1], PROFILE, MAX_SLICES)
    min_size = layout.source_size
    if layout.refine_size is not None:
        min_size = tuple(map(max, min_size, layout.refine_size))  # type: ignore[assignment]
    bgr = header.format in ("JPEG", "MPO")
    pixels, orientation = decode_stored(
        data, header, min_size, bgr=bgr, imaging_path=imaging_path
    )
    source, refine = resize_outputs(
        pixels, orientation, layout.source_size, layout.refine_size, from_refine=from_refine
    )
    sub = output_subsampling(header)
    source_bytes = encode_image(source, "jpeg", 95, sub, bgr=bgr)
    refine_bytes = None if refine is None else encode_image(refine, "jpeg", 95, sub, bgr=bgr)
    return refine_bytes, source_bytes


def references(path: Path) -> tuple[np.ndarray | None, np.ndarray]:
    """Full-decode Lanczos resizes of the original: (refine or None, source)."""
    image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    layout = compute_layout(image.width, image.height, PROFILE, MAX_SLICES)
    source = np.asarray(image.resize(layout.source_size, Image.Resampling.LANCZOS))
    if layout.refine_size is None:
        return None, source
    return np.asarray(image.resize(layout.refine_size, Image.Resampling.LANCZOS)), source


def _decoded(blob: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))


def lever_rows(files: list[Path], reps: int) -> list[dict[str, Any]]:
    """Per path: CPU ms per image (all but the warm-up image, lowest of ``reps``), ratio to
    the naive path timed in the same repetition, mean PSNR of refine and source images."""
    variants: list[tuple[str, Callable[[Path], tuple[bytes | None, bytes]]]] = [
        ("naive (PIL full decode)", naive_path)
    ]
    for path in IMAGING_PATHS:
        try:
            check_imaging_path(path)
        except ValueError:
            continue
        for from_refine in (False, True):
            name = f"{path}, source from {'refine' if from_refine else 'decode'}"
            variants.append(
                (name, lambda f, p=path, r=from_refine: ours_pipeline(f, p, r))
            )
    refs = [references(f) for f in files]
    outputs = {name: [fn(f) for f in files] for name, fn in variants}  # also the warm-up
    best = {name: float("inf") for name, _ in variants}
    for _ in range(reps):
        for name, fn in variants:
            start = time.process_time()
            for f in files[1:]:
                fn(f)
            best[name] = min(best[name], time.process_time() - start)
    rows = []
    for name, _ in variants:
        refine_psnr, source_psnr = [], []
        for (refine_bytes, source_bytes), (ref_refine, ref_source) in zip(
            outputs[name], refs, strict=True
        ):
            source_psnr.append(psnr(_decoded(source_bytes), ref_source))
            if ref_refine is not None and refine_bytes is not None:
                refine_psnr.append(psnr(_decoded(refine_bytes), ref_refine))
        rows.append(
            {
                "path": name,
                "ms": 1000 * best[name] / max(len(files) - 1, 1),
                "ratio": best[variants[0][0]] / best[name],
                "refine_psnr": float(np.mean(refine_psnr)) if refine_psnr else float("nan"),
                "source_psnr": float(np.mean(source_psnr)),
            }
        )
    return rows


def print_lever_table(title: str, rows: list[dict[str, Any]]) -> None:
    naive = rows[0]
    header = (
        f"{'path':<32}{'CPU ms/img':>11}{'ratio':>8}{'PSNR refine':>13}{'dPSNR':>7}"
        f"{'PSNR source':>13}{'dPSNR':>7}"
    )
    print(title)
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['path']:<32}{r['ms']:>11.1f}{r['ratio']:>7.2f}x"
            f"{r['refine_psnr']:>11.2f}dB{r['refine_psnr'] - naive['refine_psnr']:>+7.2f}"
            f"{r['source_psnr']:>11.2f}dB{r['source_psnr'] - naive['source_psnr']:>+7.2f}"
        )


def reference_refine(path: Path) -> np.ndarray | None:
    image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    layout = compute_layout(image.width, image.height, PROFILE, MAX_SLICES)
    if layout.refine_size is None:
        return None
    return np.asarray(image.resize(layout.refine_size, Image.Resampling.LANCZOS))


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_build(data: Path, out: Path) -> float:
    """CPU seconds of one fresh ``mvprep build --workers 1`` subprocess (and its worker)."""
    shutil.rmtree(out, ignore_errors=True)
    before = children_cpu()
    cmd = [sys.executable, "-m", "mvprep.cli", "build", str(data), "--out", str(out)]
    cmd += ["--workers", "1", "--no-progress", "--max-res", "1344"]
    subprocess.run(
        cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    return children_cpu() - before


def bench_set(root: Path, set_name: str, paths: list[str], reps: int) -> dict[str, float]:
    files = [root / p for p in paths]
    refs = [reference_refine(f) for f in files]
    timed = max(len(files) - 1, 1)  # images in the per-image figures (all but the warm-up)

    naive = [naive_path(f) for f in files]  # also the warm-up; its outputs give the PSNR
    naive_cpu = startup_cpu = build_cpu = float("inf")
    for _ in range(reps):
        start = time.process_time()
        for f in files[1:]:
            naive_path(f)
        naive_cpu = min(naive_cpu, time.process_time() - start)
        baseline = root / f"{set_name}_startup.json"
        startup_cpu = min(startup_cpu, run_build(baseline, root / f"out_{set_name}_startup"))
        build_cpu = min(build_cpu, run_build(root / f"{set_name}.json", root / f"out_{set_name}"))
    ours_cpu = max(build_cpu - startup_cpu, 1e-9)

    ours_refine: dict[int, np.ndarray] = {}
    for shard in sorted((root / f"out_{set_name}").glob("*.tar")):
        for _key, members in iter_shard(shard):
            meta = SampleMeta.from_json(json.loads(members["json"]))
            image = meta.images[0]
            if image.refine_member is not None:
                ext = image.refine_member.split(".", 1)[1]
                ours_refine[int(meta.key)] = np.asarray(
                    Image.open(io.BytesIO(members[ext])).convert("RGB")
                )

    naive_psnr, ours_psnr = [], []
    for i, ref in enumerate(refs):
        if ref is None:
            continue
        refine_bytes = naive[i][0]
        assert refine_bytes is not None
        naive_psnr.append(
            psnr(np.asarray(Image.open(io.BytesIO(refine_bytes)).convert("RGB")), ref)
        )
        ours_psnr.append(psnr(ours_refine[i], ref))
    return {
        "images": timed,
        "naive_ms": 1000 * naive_cpu / timed,
        "ours_ms": 1000 * ours_cpu / timed,
        "ours_ms_with_startup": 1000 * build_cpu / len(files),
        "startup_s": startup_cpu,
        "ratio": naive_cpu / ours_cpu,
        "naive_psnr": float(np.mean(naive_psnr)) if naive_psnr else float("nan"),
        "ours_psnr": float(np.mean(ours_psnr)) if ours_psnr else float("nan"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jpegs", type=int, default=8)
    parser.add_argument("--pngs", type=int, default=4)
    parser.add_argument("--mid-jpegs", type=int, default=4, help="3 MP JPEGs (levers table)")
    parser.add_argument("--reps", type=int, default=3, help="repeats; the lowest CPU counts")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.reps < 1 or args.jpegs == 1 or args.pngs == 1 or args.mid_jpegs == 1:
        parser.error("--reps must be >= 1, and a set needs 0 or >= 2 images (one warms up)")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        print(f"generating {args.jpegs} 12 MP JPEGs and {args.pngs} PNG screenshots in {root} ...")
        sets = make_sets(root, args.jpegs, args.pngs)
        rows = {
            name: bench_set(root, name, paths, args.reps) for name, paths in sets.items() if paths
        }
        levers = []
        if sets["jpeg"]:
            files = [root / p for p in sets["jpeg"]]
            levers.append(("12 MP JPEGs (the set above)", lever_rows(files, args.reps)))
        if args.mid_jpegs:
            files = make_mid_jpegs(root, args.mid_jpegs)
            levers.append(("3 MP JPEGs (full-scale decode)", lever_rows(files, args.reps)))
    header = (
        f"{'set':<6}{'images':>7}{'naive ms/img':>14}{'mvprep ms/img':>15}{'ratio':>7}"
        f"{'naive img/s':>12}{'mvprep img/s':>13}{'PSNR naive':>11}{'PSNR mvprep':>12}"
    )
    print(
        f"CPU time per image on one core, lowest of {args.reps} runs, first image (warm-up) "
        "and mvprep start-up excluded"
    )
    print(header)
    print("-" * len(header))
    for name, r in rows.items():
        print(
            f"{name:<6}{r['images']:>7}{r['naive_ms']:>14.1f}{r['ours_ms']:>15.1f}{r['ratio']:>6.2f}x"
            f"{1000 / r['naive_ms']:>12.2f}{1000 / r['ours_ms']:>13.2f}"
            f"{r['naive_psnr']:>10.2f}dB{r['ours_psnr']:>10.2f}dB"
        )
    for name, r in rows.items():
        print(
            f"{name}: mvprep start-up + warm-up image {r['startup_s']:.2f} CPU s per build; "
            f"whole build {r['ours_ms_with_startup']:.1f} ms/img"
        )
    print(f"mvprep build imaging path: {default_imaging_path()} (the default here)")
    print("PSNR: stored refine image vs full-decode Lanczos resize of the original")
    for title, lever in levers:
        print()
        print_lever_table(
            f"Levers, {title}: in-process CPU per image, lowest of {args.reps} runs; ratio vs "
            "the naive path in the same run; dPSNR vs naive",
            lever,
        )


if __name__ == "__main__":
    main()
