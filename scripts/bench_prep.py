"""Benchmark: mvprep's per-image prep path against the naive per-image path, CPU time, one core.

Generates 12-megapixel phone-style JPEGs (a third with EXIF orientation 6), 2560x1440 PNG
screenshots and 3 MP JPEGs, then repeats ``--reps`` times, interleaved (the order of the
measurements rotates from one repetition to the next, so a burst of load on this shared machine
hits each of them in turn):

(a) the naive path (:func:`naive_path`), the honest baseline -- what the official fine-tuning
    code does per image: PIL open and full decode, EXIF transpose, convert to RGB, bicubic
    resize from the full decode to the source and to the refine size, JPEG q95 encode of both.
    Timed in this script's own process, which never runs mvprep's pixel code (that tunes its
    process on first use: one OpenCV thread, malloc keeping freed buffers);
(b) ``mvprep build --workers 1`` as a subprocess, on a data file that names each timed image
    ``--repeat`` times. Two figures: the worker's own CPU time for its unit (``cpu_seconds`` in
    the index entry, ``process_time``) and the whole build's (children's rusage: interpreter,
    imports, parent process), each less the same figure of a build of the same records in
    which only the first record has its image (start-up, token counter, the first image's
    codec set-up);
(c) mvprep's per-image work in-process (:func:`ours_pipeline`: read, sha256, probe, decode,
    resize, encode; no tar) with its levers switched on one at a time, each variant in a
    helper process of its own (as one build worker would run it).

(a) and (c) are interleaved image by image (each image goes through every path before the
next one). All figures are CPU seconds (``process_time``, rusage user+sys), never wall time,
over the timed images: all but the first of a set, which warms each path up and is left out
of every figure. Per repetition each path's total gives a per-image figure and a ratio to the
naive path of the same repetition; printed are the median per-image figure, the ratio of the
medians and the range of the per-repetition ratios (the noise). PSNR: each path's stored
images against a full-decode Lanczos resize of the original. Last, a per-stage profile of
both paths on the 12 MP JPEGs (the decoders side by side).

    python scripts/bench_prep.py [--jpegs 8] [--pngs 4] [--mid-jpegs 4] [--reps 5]
                                 [--repeat 3] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing as mp
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from imagegen import make_photo, make_screenshot, save_image, save_jpeg  # noqa: E402

from mvprep import image_modes  # noqa: E402
from mvprep.imaging import (  # noqa: E402
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
MAX_RES = 1344
MAX_SLICES = max_slice_nums_for_res(MAX_RES)
Outputs = tuple[bytes | None, bytes]  # (refine image or None, source image), encoded


# ---------------------------------------------------------------------------- data


def _conversation(with_image: bool) -> list[dict[str, str]]:
    prompt = "<image>\nDescribe the picture." if with_image else "Describe the picture."
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": "A picture."}]


def write_build_data(root: Path, name: str, paths: list[str], repeat: int) -> list[int]:
    """``NAME.json``: the first image once (warm-up), then the others ``repeat`` times;
    ``NAME_startup.json``: the same records with only the first one's image. Returns, per
    record, the index of its image in ``paths``."""
    which = [0] + [i for _ in range(repeat) for i in range(1, len(paths))]
    records = [
        {"id": f"{name}-{n}", "image": paths[i], "conversations": _conversation(True)}
        for n, i in enumerate(which)
    ]
    startup = records[:1] + [
        {"id": r["id"], "conversations": _conversation(False)} for r in records[1:]
    ]
    (root / f"{name}.json").write_text(json.dumps(records))
    (root / f"{name}_startup.json").write_text(json.dumps(startup))
    return which


def make_images(root: Path, jpegs: int, pngs: int, mids: int) -> dict[str, list[str]]:
    """Write the image sets under ``root/img``; return their relative paths per set."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    sets: dict[str, list[str]] = {"jpeg": [], "png": [], "mid": []}
    for i in range(jpegs):
        name = f"img/phone_{i:02d}.jpg"
        w, h = (4032, 3024) if i % 2 == 0 else (3024, 4032)
        orientation = 6 if i % 3 == 0 else None
        save_jpeg(root / name, make_photo(w, h, seed=i), quality=92, exif_orientation=orientation)
        sets["jpeg"].append(name)
    for i in range(pngs):
        name = f"img/screen_{i:02d}.png"
        save_image(root / name, make_screenshot(2560, 1440, seed=100 + i), "PNG")
        sets["png"].append(name)
    # 3 MP: at --max-res 1344 their refine image needs more than half their size, so they
    # decode at full scale (where the decoders differ most in cost)
    for i in range(mids):
        name = f"img/mid_{i:02d}.jpg"
        w, h = (2048, 1536) if i % 2 == 0 else (1536, 2048)
        save_jpeg(root / name, make_photo(w, h, seed=50 + i), quality=92)
        sets["mid"].append(name)
    return sets


# ---------------------------------------------------------------------------- the two paths


def naive_path(path: Path) -> Outputs:
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


@dataclass(frozen=True)
class Variant:
    """mvprep's per-image pipeline with some levers off (the build runs all of them on)."""

    name: str
    imaging_path: str = "simplejpeg"  # the JPEG decoder
    reduced: bool = True  # decode JPEGs at 1/2, 1/4 or 1/8 scale in the DCT domain
    from_refine: bool = True  # the source image resized from the refine image
    keep_heap: bool = True  # malloc keeps freed pixel buffers (which helper process runs it)


def _min_size(layout: Any) -> tuple[int, int]:
    if layout.refine_size is None:
        return layout.source_size
    return (
        max(layout.source_size[0], layout.refine_size[0]),
        max(layout.source_size[1], layout.refine_size[1]),
    )


def ours_pipeline(path: Path, variant: Variant) -> Outputs:
    """mvprep's per-image work as ``build_sample`` does it (read, sha256, probe, layout,
    decode, resize, encode), without the tar."""
    data = path.read_bytes()
    hashlib.sha256(data).hexdigest()
    header = probe_image(data)
    layout = compute_layout(header.size[0], header.size[1], PROFILE, MAX_SLICES)
    min_size = _min_size(layout) if variant.reduced else header.size  # full size: no 1/k
    bgr = header.format in ("JPEG", "MPO")
    pixels, orientation = decode_stored(
        data, header, min_size, bgr=bgr, imaging_path=variant.imaging_path
    )
    source, refine = resize_outputs(
        pixels,
        orientation,
        layout.source_size,
        layout.refine_size,
        from_refine=variant.from_refine,
    )
    sub = output_subsampling(header)
    source_bytes = encode_image(source, "jpeg", 95, sub, bgr=bgr)
    refine_bytes = None if refine is None else encode_image(refine, "jpeg", 95, sub, bgr=bgr)
    return refine_bytes, source_bytes


def lever_variants() -> list[Variant]:
    """The levers switched on one at a time, in the order the table lists them."""
    steps = [
        Variant("OpenCV full decode + resize, source from decode", "opencv", False, False, False),
        Variant("+ DCT-domain decode at 1/k", "opencv", True, False, False),
        Variant("+ source resized from refine", "opencv", True, True, False),
        Variant("+ malloc keeps freed buffers", "opencv", True, True, True),
        Variant("+ simplejpeg decoder (= build default)", "simplejpeg", True, True, True),
    ]
    try:
        check_imaging_path("simplejpeg")
    except ValueError:
        return steps[:-1]
    return steps


# ---------------------------------------------------------------------------- timing


def rotated(items: list[Any], shift: int) -> list[Any]:
    shift %= max(len(items), 1)
    return items[shift:] + items[:shift]


def cpu_and_faults(fn: Callable[[], Any]) -> tuple[float, int]:
    """CPU seconds (``process_time``) and minor page faults of one call."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start = time.process_time()
    fn()
    seconds = time.process_time() - start
    return seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults


class Helper:
    """A spawned process that runs one variant of mvprep's in-process pipeline on request,
    as one build worker would run it: mvprep sets up the process it runs in (one OpenCV
    thread, malloc keeping freed buffers or not), and malloc's behaviour depends on what the
    process did before, so each variant gets a process of its own and none of it happens in
    the process that times the naive path."""

    def __init__(self, variant: Variant):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_helper_main, args=(child, variant), daemon=True)
        self.process.start()

    def call(self, name: str, *args: Any) -> Any:
        self.conn.send((name, args))
        result = self.conn.recv()
        if isinstance(result, BaseException):
            raise result
        return result

    def close(self) -> None:
        self.conn.send(None)
        self.process.join()


def _helper_main(conn: Any, variant: Variant) -> None:
    image_modes.configure_process(keep_heap=variant.keep_heap)
    calls: dict[str, Callable[..., Any]] = {
        "outputs": lambda files: [ours_pipeline(f, variant) for f in files],
        "time": lambda f: cpu_and_faults(lambda: ours_pipeline(f, variant)),
        "stages": ours_stages,
    }
    while (message := conn.recv()) is not None:
        name, args = message
        try:
            conn.send(calls[name](*args))
        except Exception as exc:  # report it in the parent
            conn.send(exc)


# ---------------------------------------------------------------------------- per stage


def _decoders(data: bytes, k: int, size: tuple[int, int]) -> dict[str, Callable[[], Any]]:
    """Decode ``data`` (stored size ``size``) at 1/k, B-G-R, by each available decoder."""
    flags = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4}
    flags[8] = cv2.IMREAD_REDUCED_COLOR_8
    buf = np.frombuffer(data, np.uint8)

    def pil() -> Any:
        im = Image.open(io.BytesIO(data))
        if k > 1:
            im.draft("RGB", (size[0] // k, size[1] // k))
        im.load()
        return im

    out: dict[str, Callable[[], Any]] = {
        "OpenCV IMREAD_REDUCED": lambda: cv2.imdecode(
            buf, flags[k] | cv2.IMREAD_IGNORE_ORIENTATION
        ),
        "PIL draft": pil,
    }
    try:
        import simplejpeg  # optional extra
    except ImportError:
        return out
    w, h = -(-size[0] // k), -(-size[1] // k)
    out["simplejpeg min_width/height"] = lambda: simplejpeg.decode_jpeg(
        data, "BGR", min_width=w, min_height=h
    )
    return out


def _ours_stage_fns(f: Path) -> dict[str, Callable[[], Any]]:
    """Each stage of :func:`ours_pipeline` for one image, as a call on inputs made here."""
    from mvprep.image_modes import orient, resize_rgb, stored_size

    data = f.read_bytes()
    header = probe_image(data)
    layout = compute_layout(header.size[0], header.size[1], PROFILE, MAX_SLICES)
    pixels, o = decode_stored(data, header, _min_size(layout), bgr=True)
    stored = stored_size(header.size, header.orientation)
    k = round(stored[0] / pixels.shape[1])
    ref_size = stored_size(layout.refine_size, o)
    src_size = stored_size(layout.source_size, o)
    refine = resize_rgb(pixels, ref_size)
    source = resize_rgb(refine, src_size)
    sub = output_subsampling(header)
    stages: dict[str, Callable[[], Any]] = {
        "read file": f.read_bytes,
        "sha256": lambda: hashlib.sha256(data).hexdigest(),
        "probe header": lambda: probe_image(data),
    }
    for name, fn in _decoders(data, k, stored).items():
        stages[f"decode 1/{k}: {name}"] = fn
    for name, fn in _decoders(data, 1, stored).items():
        stages[f"  (full scale: {name})"] = fn
    floor = _decoders(data, 8, stored)["OpenCV IMREAD_REDUCED"]
    stages["  (1/8, OpenCV: entropy-decoding floor)"] = floor
    stages["  (RGB<->BGR swap that bgr=True skips)"] = lambda: cv2.cvtColor(
        pixels, cv2.COLOR_BGR2RGB
    )
    stages["resize refine (prefilter + cubic)"] = lambda: resize_rgb(pixels, ref_size)
    stages["resize source from refine"] = lambda: resize_rgb(refine, src_size)
    stages["  (source from the decode instead)"] = lambda: resize_rgb(pixels, src_size)
    stages["EXIF orientation of both"] = lambda: (orient(refine, o), orient(source, o))
    stages["encode refine (JPEG q95)"] = lambda: encode_image(refine, "jpeg", 95, sub, bgr=True)
    stages["encode source (JPEG q95)"] = lambda: encode_image(source, "jpeg", 95, sub, bgr=True)
    return stages


def ours_stages(files: list[Path], reps: int) -> dict[str, list[float]]:
    """CPU ms per image of each stage of :func:`ours_pipeline` on its own, per repetition;
    decode rows for each decoder at the build's scale, at full scale and at 1/8 (where
    entropy decoding is nearly all that is left)."""
    per_rep: dict[str, list[float]] = {}
    for rep in range(reps):
        total: dict[str, float] = {}
        for j, f in enumerate(files):
            stages = _ours_stage_fns(f)
            for name in rotated(list(stages), rep + j):
                start = time.process_time()
                stages[name]()
                total[name] = total.get(name, 0.0) + time.process_time() - start
        for name, seconds in total.items():
            per_rep.setdefault(name, []).append(1000 * seconds / len(files))
    return per_rep


def naive_stages(files: list[Path], reps: int) -> dict[str, list[float]]:
    """CPU ms per image of each stage of :func:`naive_path`, per repetition."""
    per_rep: dict[str, list[float]] = {}
    for _ in range(reps):
        total: dict[str, float] = {}
        for f in files:
            times: dict[str, float] = {}
            start = time.process_time()
            image = Image.open(f)
            image.load()
            times["open + full decode (PIL)"] = time.process_time() - start
            start = time.process_time()
            image = ImageOps.exif_transpose(image).convert("RGB")
            times["EXIF transpose + convert RGB"] = time.process_time() - start
            layout = compute_layout(image.width, image.height, PROFILE, MAX_SLICES)
            start = time.process_time()
            source = image.resize(layout.source_size, Image.Resampling.BICUBIC)
            times["resize source (bicubic, full decode)"] = time.process_time() - start
            start = time.process_time()
            refine = image.resize(layout.refine_size, Image.Resampling.BICUBIC)
            times["resize refine (bicubic, full decode)"] = time.process_time() - start
            start = time.process_time()
            for im in (source, refine):
                im.save(io.BytesIO(), "JPEG", quality=95)
            times["encode both (JPEG q95)"] = time.process_time() - start
            for name, seconds in times.items():
                total[name] = total.get(name, 0.0) + seconds
        for name, seconds in total.items():
            per_rep.setdefault(name, []).append(1000 * seconds / len(files))
    return per_rep


# ---------------------------------------------------------------------------- builds


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_build(data: Path, out: Path) -> tuple[float, float]:
    """One fresh ``mvprep build --workers 1`` subprocess: (whole-process CPU seconds, the
    worker's CPU seconds for its units, from the index entries)."""
    shutil.rmtree(out, ignore_errors=True)
    before = children_cpu()
    cmd = [sys.executable, "-m", "mvprep.cli", "build", str(data), "--out", str(out)]
    cmd += ["--workers", "1", "--no-progress", "--max-res", str(MAX_RES)]
    cmd += ["--samples-per-shard", "100000"]  # one unit: its fixed costs once
    subprocess.run(
        cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    whole = children_cpu() - before
    entries = [json.loads(p.read_text()) for p in sorted((out / "index").glob("*.json"))]
    worker = sum(e.get("stats", {}).get("cpu_seconds", float("nan")) for e in entries)
    return whole, worker


def build_refines(out: Path) -> dict[int, np.ndarray]:
    """Sample key (record index) -> its stored refine image, RGB."""
    refines: dict[int, np.ndarray] = {}
    for shard in sorted(out.glob("*.tar")):
        for _key, members in iter_shard(shard):
            meta = SampleMeta.from_json(json.loads(members["json"]))
            image = meta.images[0]
            if image.refine_member is not None:
                ext = image.refine_member.split(".", 1)[1]
                refines[int(meta.key)] = _decoded(members[ext])
    return refines


# ---------------------------------------------------------------------------- quality


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


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def mean_psnr(outputs: list[Outputs], refs: list[tuple[np.ndarray | None, np.ndarray]]):
    """(mean refine PSNR, mean source PSNR) of encoded outputs against their references."""
    refine, source = [], []
    for (refine_bytes, source_bytes), (ref_refine, ref_source) in zip(outputs, refs, strict=True):
        source.append(psnr(_decoded(source_bytes), ref_source))
        if ref_refine is not None and refine_bytes is not None:
            refine.append(psnr(_decoded(refine_bytes), ref_refine))
    nan = float("nan")
    return (float(np.mean(refine)) if refine else nan, float(np.mean(source)) if source else nan)


# ---------------------------------------------------------------------------- the run


@dataclass
class Series:
    """One path's per-image CPU ms in each repetition, and the naive path's alongside."""

    ms: list[float]
    naive_ms: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.ms)

    @property
    def ratio(self) -> float:
        """Ratio of the medians (naive / this)."""
        return statistics.median(self.naive_ms) / self.median

    @property
    def ratios(self) -> list[float]:
        return [n / m for n, m in zip(self.naive_ms, self.ms, strict=True)]

    @property
    def min_ratio(self) -> float:
        """Ratio of the minima."""
        return min(self.naive_ms) / min(self.ms)


@dataclass
class SetRun:
    files: list[Path]
    variants: list[Variant]
    build_data: Path | None = None
    which: list[int] | None = None  # per build record: its image's index in ``files``

    def __post_init__(self) -> None:
        names = ["naive"] + [v.name for v in self.variants]
        self.ms: dict[str, list[float]] = {name: [] for name in names}  # per repetition
        self.faults: dict[str, list[float]] = {name: [] for name in names}
        self.whole: list[float] = []
        self.worker: list[float] = []

    @property
    def timed(self) -> list[Path]:
        return self.files[1:]

    @property
    def build_images(self) -> int:
        return len(self.which) - 1 if self.which else 0

    def series(self, name: str) -> Series:
        return Series(self.ms[name], self.ms["naive"])


def run_rep(run: SetRun, rep: int, helpers: dict[str, Helper], root: Path, name: str) -> None:
    """One repetition of every measurement of a set: image by image, the naive path and each
    variant (in an order that rotates per image and per repetition), then the two builds."""
    seconds = dict.fromkeys(run.ms, 0.0)
    faults = dict.fromkeys(run.ms, 0)
    paths: dict[str, Callable[[Path], tuple[float, int]]] = {
        "naive": lambda f: cpu_and_faults(lambda: naive_path(f))
    }
    for v in run.variants:
        paths[v.name] = lambda f, h=helpers[v.name]: h.call("time", f)
    for j, f in enumerate(run.timed):
        for path in rotated(list(paths), rep + j):
            cpu, flt = paths[path](f)
            seconds[path] += cpu
            faults[path] += flt
    for path in paths:
        run.ms[path].append(1000 * seconds[path] / len(run.timed))
        run.faults[path].append(faults[path] / len(run.timed))
    if run.build_data is None:
        return
    startup = root / f"{name}_startup.json"
    pair = [(startup, root / f"out_{name}_startup"), (run.build_data, root / f"out_{name}")]
    if rep % 2:
        pair.reverse()
    got = {data: run_build(data, out) for data, out in pair}
    (w0, u0), (w1, u1) = got[startup], got[run.build_data]
    run.whole.append(1000 * (w1 - w0) / run.build_images)
    run.worker.append(1000 * (u1 - u0) / run.build_images)


def _fmt_ratio(s: Series) -> str:
    lo, hi = min(s.ratios), max(s.ratios)
    return f"{s.ratio:>6.2f}x{s.min_ratio:>7.2f}x   {lo:.2f}-{hi:.2f}x"


RATIO_HEADER = f"{'ratio':>7}{'of min':>8}   {'per rep':<11}"


def print_build_table(runs: dict[str, SetRun], psnrs: dict[str, tuple[float, float]], reps: int):
    print(
        f"CPU ms per image on one core: median of {reps} interleaved repetitions (first image "
        "= warm-up and mvprep's start-up excluded); ratio = naive / mvprep: of the medians, of "
        "the minima, and the range over the repetitions"
    )
    header = f"{'set':<6}{'path':<34}{'ms/img':>8}{RATIO_HEADER}{'PSNR refine':>13}"
    print(header)
    print("-" * len(header))
    for name, run in runs.items():
        if run.build_data is None:
            continue
        naive = run.ms["naive"]
        rows = [
            ("naive (PIL full decode, bicubic)", run.series("naive"), psnrs[name][0]),
            ("mvprep build: worker CPU", Series(run.worker, naive), psnrs[name][1]),
            ("mvprep build: whole process", Series(run.whole, naive), psnrs[name][1]),
        ]
        for label, series, value in rows:
            print(f"{name:<6}{label:<34}{series.median:>8.1f}{_fmt_ratio(series)}{value:>11.2f}dB")
        print(f"{'':6}({run.build_images} images per build: {len(run.timed)} x --repeat)")


def print_lever_table(title: str, run: SetRun, psnrs: dict[str, tuple[float, float]]) -> None:
    print(title)
    header = (
        f"{'path':<48}{'ms/img':>8}{'saves':>7}{RATIO_HEADER}{'faults':>8}"
        f"{'PSNR refine':>13}{'dPSNR':>7}{'PSNR source':>13}{'dPSNR':>7}"
    )
    print(header)
    print("-" * len(header))
    naive_refine, naive_source = psnrs["naive"]
    previous = None
    for name in run.ms:
        s = run.series(name)
        refine, source = psnrs[name]
        saves = "" if previous is None else f"{previous - s.median:.1f}"
        label = "naive (PIL full decode, bicubic)" if name == "naive" else name
        print(
            f"{label:<48}{s.median:>8.1f}{saves:>7}{_fmt_ratio(s)}"
            f"{statistics.median(run.faults[name]):>8.0f}"
            f"{refine:>11.2f}dB{refine - naive_refine:>+7.2f}"
            f"{source:>11.2f}dB{source - naive_source:>+7.2f}"
        )
        previous = s.median
    print(
        "(a lever that does not apply to a set -- 3 MP photos decode at full scale -- shows the "
        "noise; without the kept heap the faults, and their CPU, depend on what the process did "
        "before)"
    )


def print_stage_table(title: str, stages: dict[str, list[float]]) -> None:
    print(title)
    for name, values in stages.items():
        print(f"  {name:<46}{statistics.median(values):>8.1f} ms")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jpegs", type=int, default=8, help="12 MP JPEGs")
    parser.add_argument("--pngs", type=int, default=4, help="2560x1440 PNG screenshots")
    parser.add_argument("--mid-jpegs", type=int, default=4, help="3 MP JPEGs (levers only)")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions")
    parser.add_argument("--repeat", type=int, default=3, help="times a build reads each image")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.reps < 1 or args.repeat < 1 or 1 in (args.jpegs, args.pngs, args.mid_jpegs):
        parser.error("--reps and --repeat must be >= 1; a set needs 0 or >= 2 images")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    cv2.setNumThreads(1)  # the naive path never calls OpenCV; image generation does
    with tempfile.TemporaryDirectory() as tmp:
        root = args.workdir or Path(tmp)
        print(
            f"generating {args.jpegs} 12 MP JPEGs, {args.pngs} PNG screenshots and "
            f"{args.mid_jpegs} 3 MP JPEGs in {root} ..."
        )
        sets = make_images(root, args.jpegs, args.pngs, args.mid_jpegs)
        levers = lever_variants()
        runs: dict[str, SetRun] = {}
        for name, paths in sets.items():
            if not paths:
                continue
            run = SetRun([root / p for p in paths], levers if name != "png" else [])
            if name != "mid":
                run.build_data = root / f"{name}.json"
                run.which = write_build_data(root, name, paths, args.repeat)
            runs[name] = run
        helpers = {v.name: Helper(v) for v in levers}
        try:
            refs = {name: [references(f) for f in run.files] for name, run in runs.items()}
            naive_out = {name: [naive_path(f) for f in run.files] for name, run in runs.items()}
            psnrs: dict[str, dict[str, tuple[float, float]]] = {}
            for name, run in runs.items():  # also the warm-up of each path
                psnrs[name] = {"naive": mean_psnr(naive_out[name], refs[name])}
                for v in run.variants:
                    got = helpers[v.name].call("outputs", run.files)
                    psnrs[name][v.name] = mean_psnr(got, refs[name])
            for rep in range(args.reps):
                print(f"repetition {rep + 1}/{args.reps} ...", flush=True)
                for name, run in runs.items():
                    run_rep(run, rep, helpers, root, name)
            stage_files = runs["jpeg"].timed if "jpeg" in runs else []
            ours_stage: dict[str, list[float]] = {}
            if stage_files:  # in the process of the build's own variant (the last lever)
                ours_stage = helpers[levers[-1].name].call("stages", stage_files, args.reps)
            naive_stage = naive_stages(stage_files, args.reps) if stage_files else {}
        finally:
            for helper in helpers.values():
                helper.close()
        # fairness: the naive path was timed in a process that mvprep never set up
        assert not image_modes._PROCESS_CONFIGURED, "mvprep pixel code ran in the naive process"
        build_psnr: dict[str, tuple[float, float]] = {}
        for name, run in runs.items():
            if run.build_data is None or run.which is None:
                continue
            refines = build_refines(root / f"out_{name}")
            naive_values, ours_values = [], []
            for i, (ref, _source) in enumerate(refs[name]):
                refine_bytes = naive_out[name][i][0]
                if ref is None or refine_bytes is None:
                    continue
                naive_values.append(psnr(_decoded(refine_bytes), ref))
                ours_values.append(psnr(refines[run.which.index(i)], ref))
            nan = float("nan")
            build_psnr[name] = (
                float(np.mean(naive_values)) if naive_values else nan,
                float(np.mean(ours_values)) if ours_values else nan,
            )

    print()
    print_build_table(runs, build_psnr, args.reps)
    print(f"mvprep build imaging path: {default_imaging_path()} (the default here)")
    print("PSNR: stored refine image vs full-decode Lanczos resize of the original")
    titles = {"jpeg": "12 MP JPEGs", "mid": "3 MP JPEGs (full-scale decode)"}
    for name, title in titles.items():
        if name not in runs:
            continue
        print()
        print_lever_table(
            f"Levers, {title}, in-process (no tar), switched on one at a time, each in a "
            "process of its own: CPU ms per image (median), what each saves, ratio vs the naive "
            "path in the same repetitions, minor page faults per image",
            runs[name],
            psnrs[name],
        )
    if ours_stage:
        print()
        print_stage_table(
            "Stages of the naive path, 12 MP JPEGs: CPU ms per image (median)", naive_stage
        )
        print()
        print_stage_table(
            "Stages of mvprep's path, 12 MP JPEGs, each alone (helper process set up as a build "
            "worker): CPU ms per image (median); indented rows are alternatives, not run",
            ours_stage,
        )


if __name__ == "__main__":
    main()
