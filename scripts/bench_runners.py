"""Benchmark: 1 vs 2 workers, local processes and local Ray, on the same photos.

Writes ``--images`` phone-style JPEGs (``tests/imagegen.make_photo``, 3024x4032 by default)
and a JSON list with one record per image, then builds the set four times into fresh
folders: ``--runner local --workers 1|2`` and ``--runner ray`` on a local Ray of 1 or 2 CPUs.
Ray's start-up (~5-10 s) is left out: Ray is started before the clock starts and the build
reuses it. Prints wall seconds, images/s and the speed-up of 2 workers over 1, and checks that
all four builds wrote the same shard bytes.

    python scripts/bench_runners.py [--images 24] [--size 3024x4032] [--samples-per-shard 3]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from imagegen import make_photo, save_jpeg  # noqa: E402

from mvprep.build import build  # noqa: E402
from mvprep.options import BuildOptions  # noqa: E402


def make_set(root: Path, images: int, size: tuple[int, int]) -> Path:
    (root / "img").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(images):
        w, h = size if i % 2 == 0 else size[::-1]
        save_jpeg(root / f"img/{i:03d}.jpg", make_photo(w, h, seed=i), quality=90)
        records.append(
            {
                "id": f"p{i}",
                "image": f"img/{i:03d}.jpg",
                "conversations": [
                    {"role": "user", "content": "<image>\nDescribe the photo."},
                    {"role": "assistant", "content": f"Photo number {i}."},
                ],
            }
        )
    data = root / "data.json"
    data.write_text(json.dumps(records))
    return data


def run(data: Path, out: Path, runner: str, workers: int, sps: int) -> tuple[float, int, float]:
    """(wall seconds, images, worker CPU seconds) of one build; Ray is already running."""
    options = BuildOptions(data_path=data, out_dir=out, samples_per_shard=sps)
    started = time.perf_counter()
    result = build(options, workers=workers, progress=False, runner=runner)
    wall = time.perf_counter() - started
    assert result.ok, result.failed_units
    images = sum(e.stats.get("images", 0) for e in result.entries)
    return wall, images, sum(e.stats.get("cpu_seconds", 0.0) for e in result.entries)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--size", default="3024x4032", help="WxH of the photos")
    parser.add_argument("--samples-per-shard", type=int, default=3)
    parser.add_argument("--no-ray", action="store_true", help="local processes only")
    args = parser.parse_args(argv)
    size = tuple(int(v) for v in args.size.lower().split("x"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print(f"writing {args.images} {size[0]}x{size[1]} JPEGs ...", flush=True)
        # In a child process: a parent that has used OpenCV's thread pool (make_photo does)
        # must not fork the local pool's workers afterwards.
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
            data = ex.submit(make_set, root / "set", args.images, size).result()
        rows: list[tuple[str, int, float, int, float]] = []
        shards: dict[str, dict[str, bytes]] = {}
        configs = [("local", 1), ("local", 2)]
        if not args.no_ray:
            configs += [("ray", 1), ("ray", 2)]
        for runner, workers in configs:
            out = root / f"{runner}{workers}"
            if runner == "ray":
                from mvprep.runners.ray_runner import import_ray, start_ray

                start_ray(num_cpus=workers)
            try:
                wall, images, cpu = run(data, out, runner, workers, args.samples_per_shard)
            finally:
                if runner == "ray":
                    import_ray().shutdown()
            rows.append((runner, workers, wall, images, cpu))
            shards[f"{runner}{workers}"] = {p.name: p.read_bytes() for p in out.glob("*.tar")}
            print(f"{runner:>5} x{workers}: {wall:6.2f} s  {images / wall:6.2f} img/s", flush=True)
    print(f"\n{'runner':<8}{'workers':>8}{'wall s':>9}{'img/s':>8}{'speed-up':>10}{'cpu/wall':>10}")
    base = {runner: wall for runner, workers, wall, _, _ in rows if workers == 1}
    for runner, workers, wall, images, cpu in rows:
        print(
            f"{runner:<8}{workers:>8}{wall:>9.2f}{images / wall:>8.2f}"
            f"{base[runner] / wall:>9.2f}x{cpu / wall:>10.2f}"
        )
    print("(cpu/wall: worker CPU seconds per wall second, i.e. how many cores the build used)")
    same = all(s == shards["local1"] for s in shards.values())
    print(f"\nshards identical across runs: {same} (cpu count here: {os.cpu_count()})")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
