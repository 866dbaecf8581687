"""Preprocess a data set on a Ray cluster from Python (what ``mvprep build --runner ray`` does).

Set-up, once per cluster (every node: the same Python environment with ``pip install
'mvkit[ray,s3]'``; the data file, its images and the output in an object store, e.g.
``s3://bucket/...`` with the credentials in every node's environment, or at the same paths
on a shared file system)::

    ray start --head --port 6379                  # on the head node
    ray start --address HEAD_IP:6379               # on every other node

Then, on the head node (or any machine that can reach it and sees the same paths)::

    python scripts/ray_cluster_example.py s3://bkt/raw/train.jsonl s3://bkt/shards/train \
        --address auto --max-res 1344
    python scripts/ray_cluster_example.py /shared/train.json /shared/shards/train --address auto

Without ``--address`` a local Ray is started on this machine with ``--workers`` CPUs: the same
code path, handy to try it out. The shards are byte-identical to a local ``mvprep build``.
Each unit is one Ray task of one CPU that reads its own records and images and writes its
own shard; a dead worker is retried, a hung unit is cancelled after ``--unit-timeout``.
Re-running the same command after any interruption finishes the build (finished shards are
skipped).
"""

from __future__ import annotations

import argparse
import sys

from mvprep.build import build
from mvprep.options import BuildOptions
from mvprep.pool import RetryPolicy
from mvprep.summary import format_summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", help="data file: a path or a URL (s3://, gs://...)")
    parser.add_argument("out", help="output folder or URL")
    parser.add_argument("--address", default=None, help="Ray address, e.g. auto (default: local)")
    parser.add_argument("--workers", type=int, default=2, help="CPUs of a local Ray")
    parser.add_argument("--max-res", type=int, default=1344)
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--unit-timeout", type=float, default=None)
    args = parser.parse_args(argv)

    options = BuildOptions(
        data_path=args.data,
        out_dir=args.out,
        max_res=args.max_res,
        samples_per_shard=args.samples_per_shard,
    )
    result = build(
        options,
        workers=args.workers,
        runner="ray",
        ray_address=args.address,
        policy=RetryPolicy(unit_timeout=args.unit_timeout),
    )
    print(format_summary(result))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
