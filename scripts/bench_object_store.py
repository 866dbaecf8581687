"""Object-store bench: samples/s of the trainer's loader from local disk vs from an S3 bucket.

Usage::

    python scripts/bench_object_store.py [--records 48] [--samples-per-shard 8] [--reps 2]
                                         [--read-ahead 8] [--latency-ms 0] [--workdir DIR]

Generates ``--records`` one-image records (seeded 1.3-2.4 MP JPEG photos), builds shards with
``mvprep.build.build`` (``--max-res 1344``, ``--samples-per-shard``), starts moto's S3 server
in a subprocess on a free localhost port (the ``tests/s3_server.py`` server: the endpoint the
tests use, reached through fsspec/s3fs and the AWS environment exactly as a real bucket),
uploads the shards unchanged, plans one epoch for one rank with the trainer's planner, then
times the same micro-batches in the same order through
:class:`mvtrain.data.loader.PlannedBatches` (read, decode, tokenize, collate; no DataLoader
workers, as ``--loader-workers 0``):

* ``local disk``: the shard folder (the baseline of every ratio);
* ``bucket, no read-ahead``: one ranged GET per sample, each when the loader asks
  (``--read-ahead 0``; whole-shard copies off);
* ``bucket, ranged GETs``: the same GETs, ``--read-ahead`` of them in flight;
* ``bucket, default``: ``mvtrain run``'s defaults: shards the rank reads most of (with one rank:
  all) are copied whole to a temporary spool in large GETs, the rest ranged;
* ``bucket, --cache-dir 1st`` / ``2nd``: whole shards copied into a cache folder, then a
  second epoch reading only that folder.

Every bucket pass starts as a new process would (no member table kept), so its header walks
and copies are timed. The collated batches of every pass are checked equal (keys, tokens,
pixels) to the local ones. Wall time (network waits count), lowest of ``--reps`` passes after
a warm-up pass; GETs are counted by the server. The endpoint is on this machine: a GET costs
about a millisecond but the server's CPU, on the same cores as the loader; a remote store
adds tens of milliseconds per request, which ``--latency-ms`` adds (the server answers each
request that much later), and which read-ahead hides.

Runtime: about a minute on an idle 2-core machine; ``--workdir DIR`` keeps data and shards.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))
from imagegen import make_photo, save_jpeg  # noqa: E402

import mvtrain.data.shard_access as shard_access  # noqa: E402
from mvprep.build import build  # noqa: E402
from mvprep.options import BuildOptions  # noqa: E402
from mvshards import storage  # noqa: E402
from mvshards.cost import CostModel  # noqa: E402
from mvshards.index import DatasetIndex, load_index  # noqa: E402
from mvtrain.batching.plan_index import PlanIndex  # noqa: E402
from mvtrain.batching.schedule import RankPlan, epoch_plan  # noqa: E402
from mvtrain.batching.sources import SampleLocator  # noqa: E402
from mvtrain.budgets import Budgets  # noqa: E402
from mvtrain.data.lengths import exact_lengths  # noqa: E402
from mvtrain.data.loader import MicroBatch, PlannedBatches, batch_iterator  # noqa: E402
from mvtrain.data.remote_reads import ReadSettings, use_read_settings  # noqa: E402
from mvtrain.model.adapters import adapter_for  # noqa: E402
from mvtrain.model.tiny import load_tiny_tokenizer  # noqa: E402

MAX_RES = 1344
SIZES = [(1600, 1200), (1920, 1080), (1200, 1600), (1792, 1344), (1440, 1080)]
SERVER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from s3_server import S3Server, _create_bucket
server = S3Server()
_create_bucket(server)
latency, moto = float(sys.argv[2]) / 1000, server.layer.app
def slow(environ, start_response):
    time.sleep(latency)
    return moto(environ, start_response)
server.layer.app = slow
print(server.endpoint, flush=True)
for line in sys.stdin:
    print(sum(1 for method, _ in server.requests if method == "GET"), flush=True)
server.stop()
"""
"""The server process: answers each request ``argv[2]`` ms late, prints its endpoint, then its
GET count for every line it reads."""


def make_records(root: Path, count: int, seed: int) -> Path:
    """``count`` one-image records (JPEG photos of :data:`SIZES`), written once."""
    data = root / "records.json"
    if data.exists():
        return data
    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    records = []
    for i in range(count):
        w, h = SIZES[i % len(SIZES)]
        name = f"img/{i:03d}.jpg"
        with open(root / name, "wb") as handle:
            save_jpeg(handle, make_photo(w, h, seed=seed * 1000 + i), quality=90)
        words = " ".join(rng.choice(["a", "photo", "of", "the", "street", "tree"], 12))
        records.append(
            {
                "image": name,
                "conversations": [
                    {"role": "user", "content": f"<image>\nDescribe it: {words}"},
                    {"role": "assistant", "content": f"It shows {words}."},
                ],
            }
        )
    data.write_text(json.dumps(records))
    return data


class Server:
    """moto's S3 server in a subprocess (see :data:`SERVER`)."""

    def __init__(self, latency_ms: float) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(TESTS), str(latency_ms)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.endpoint = self.proc.stdout.readline().strip()
        if not self.endpoint:
            raise SystemExit("bench_object_store: the S3 server did not start (moto[server]?)")

    def gets(self) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("gets\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def plan_epoch(index: DatasetIndex, tokenizer: Any, budgets: Budgets) -> RankPlan:
    profile = str(index.params["profile"])
    lengths = exact_lengths(index, tokenizer, profile, None)
    pindex = PlanIndex.from_arrays(
        index.keys, index.shard_ids, lengths.tokens, index.num_patches, len(index.shards)
    )
    plan = epoch_plan(pindex, 0, 0, 0, 1, budgets, CostModel.for_profile(profile))
    if plan.oversize:
        raise SystemExit(f"bench_object_store: {len(plan.oversize)} samples over budget")
    return plan


def one_pass(dataset: PlannedBatches) -> tuple[float, list[MicroBatch]]:
    shard_access._STORED_TABLES.clear()  # as a new process: header walks are timed
    started = time.perf_counter()
    batches = list(batch_iterator(dataset, 0))
    return time.perf_counter() - started, batches


def same_batches(a: list[MicroBatch], b: list[MicroBatch]) -> bool:
    def tensors(batch: MicroBatch) -> list[torch.Tensor]:
        found: list[torch.Tensor] = []

        def walk(value: Any) -> None:
            if isinstance(value, torch.Tensor):
                found.append(value)
            elif isinstance(value, dict):
                for key in sorted(value):
                    walk(value[key])
            elif isinstance(value, list | tuple):
                for item in value:
                    walk(item)
            elif hasattr(value, "__dict__"):
                walk(vars(value))

        walk(batch.host_inputs)
        return found

    return len(a) == len(b) and all(
        x.keys == y.keys
        and len(tx := tensors(x)) == len(ty := tensors(y))
        and all(torch.equal(p, q) for p, q in zip(tx, ty, strict=True))
        for x, y in zip(a, b, strict=True)
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=48)
    parser.add_argument("--samples-per-shard", type=int, default=8)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--read-ahead", type=int, default=8)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench-object-store-") as tmp:
        root = args.workdir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        data = make_records(root / "data", args.records, args.seed)
        out = root / f"shards-{args.samples_per_shard}"
        if not (out / "manifest.json").exists():
            options = BuildOptions(
                data_path=data,
                out_dir=out,
                max_res=MAX_RES,
                samples_per_shard=args.samples_per_shard,
            )
            if not build(options, workers=1, progress=False).ok:
                raise SystemExit("bench_object_store: the build failed")
        t_data = time.perf_counter() - t0
        server = Server(args.latency_ms)
        try:
            return run(args, root, out, server, t_data)
        finally:
            server.stop()


def run(args: argparse.Namespace, root: Path, out: Path, server: Server, t_data: float) -> int:
    os.environ.update(
        AWS_ENDPOINT_URL=server.endpoint,
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
    )
    url = f"s3://mvkit-test/bench/{out.name}"
    for path in sorted(out.rglob("*")):
        if path.is_file():
            storage.write_whole(
                storage.location(url) / path.relative_to(out).as_posix(), path.read_bytes()
            )
    local, remote = load_index(out), load_index(url)
    tokenizer = load_tiny_tokenizer()
    profile = str(local.params["profile"])
    adapter = adapter_for(profile, tokenizer)
    plan = plan_epoch(local, tokenizer, Budgets(16384, 65536))

    def dataset(index: DatasetIndex) -> PlannedBatches:
        locator = SampleLocator.of_index(index)
        return PlannedBatches(plan, 0, len(plan), locator, tokenizer, profile, adapter)

    cache = root / "cache"
    ranged = ReadSettings(read_ahead=args.read_ahead, stream_fraction=2.0)
    passes: list[tuple[str, DatasetIndex, ReadSettings | None, bool]] = [
        ("local disk", local, None, True),
        ("bucket, no read-ahead", remote, ReadSettings(read_ahead=0, stream_fraction=2.0), True),
        (f"bucket, ranged GETs, read-ahead {args.read_ahead}", remote, ranged, True),
        ("bucket, default (spool)", remote, ReadSettings(read_ahead=args.read_ahead), True),
        ("bucket, --cache-dir 1st", remote, ReadSettings(cache, args.read_ahead), False),
        ("bucket, --cache-dir 2nd", remote, ReadSettings(cache, args.read_ahead), True),
    ]
    reference: list[MicroBatch] | None = None
    rows = []
    for name, index, settings, repeat in passes:
        if settings is not None:
            use_read_settings(settings)
        reps = args.reps if repeat else 1
        if repeat:
            one_pass(dataset(index))  # warm-up (and, for --cache-dir 2nd, the cache is full)
        elif cache.exists():
            for path in cache.iterdir():
                path.unlink()
        walls, gets = [], []
        for _ in range(reps):
            before = server.gets()
            wall, batches = one_pass(dataset(index))
            gets.append(server.gets() - before)
            walls.append(wall)
            if reference is None:
                reference = batches
            elif not same_batches(reference, batches):
                raise SystemExit(f"bench_object_store: {name} gave other batches than local disk")
        samples = sum(len(b.keys) for b in reference)
        rows.append((name, samples, min(walls), min(gets)))

    shards = len(local.shards)
    size = sum(s.num_bytes for s in local.shards) / 2**20
    print(
        f"set: {args.records} one-image records (1.3-2.4 MP JPEGs), {shards} shards of "
        f"{args.samples_per_shard} samples, {size:.1f} MiB, --max-res {MAX_RES}; made in "
        f"{t_data:.0f} s; plan: {len(plan)} micro-batches for one rank"
    )
    print(
        f"endpoint: moto S3 server on {server.endpoint} (another process, same cores), "
        f"{args.latency_ms:g} ms added per request; wall "
        f"time, lowest of {args.reps} passes after a warm-up; batches checked equal to local"
    )
    head = f"{'loader reads from':<36}{'samples':>8}{'wall s':>8}{'samples/s':>11}{'GETs':>6}"
    head += f"{'vs local':>10}"
    print(head)
    print("-" * len(head))
    base = rows[0][1] / rows[0][2]
    for name, samples, wall, gets in rows:
        rate = samples / wall
        print(f"{name:<36}{samples:>8}{wall:>8.2f}{rate:>11.1f}{gets:>6}{rate / base:>9.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
