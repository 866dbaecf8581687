"""Batching bench: our 2-D budget bucketer against the usual ways of batching.

Usage::

    python scripts/bench_batching.py [--samples 4000] [--seed 0] [--profile minicpmv-4.6]
                                     [--token-budget 16384] [--patch-budget 131072]
                                     [--world-size 1] [--grad-accum 1] [--shards DIR]

On a seeded synthetic index (default) or a built dataset folder (``--shards DIR``, read with
``mvshards.index.load_index``; under the 2.6 cost an index without the per-image table has
the sample JSON members read for the slice table), three batchings of the same samples are compared:

* ``ours``: :func:`mvtrain.batching.schedule.all_rank_plans` (shard shuffle, shuffle
  buffer, one streaming 2-D bucketer for the epoch, windowed batch shuffle, splits before
  fillers, dealt to (step, rank) slots balancing padded cost, costliest step first);
* ``fixed4``: batch size 4 in random order (the official fine-tuning scripts);
* ``grouped``: length-grouped batching (random mega-batches of 50 batches, sorted by tokens,
  chunked; HF ``group_by_length``) with our mean batch size.

Printed: token and patch efficiency (real / padded), budget utilisation (padded / budget),
max / std / p95-over-p50 of per-batch padded tokens and patches, and batches over budget,
with ratios of ours against each baseline; for ours also the fillers (count and fraction of
all micro-batches) and the per-step balance (the ranks' median over largest padded cost:
mean, p5 and min over the steps). The synthetic samples use the exact slice layout
(``mvshards.layout``) of random image sizes: a mixture of text-only, single-image (1-10
sub-images) and multi-image (2-4 images) conversations, 100-4000 tokens, 0-~30000 patches.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from mvshards.cost import CostModel, SampleCost
from mvshards.index import load_index
from mvshards.layout import assign_image_ids, compute_layout, num_image_tokens
from mvshards.profiles import get_profile
from mvshards.schema import SampleMeta
from mvshards.tario import iter_shard
from mvtrain.batching.bucketer import Batch, make_batch
from mvtrain.batching.plan_index import PlanIndex, SliceTable, slice_costs
from mvtrain.batching.schedule import (
    all_rank_plans,
    batch_stats,
    equal_step_plans,
    plan_report,
)
from mvtrain.budgets import Budgets


def synthetic_index(
    n: int, seed: int, profile_name: str, samples_per_shard: int = 100
) -> tuple[PlanIndex, dict[str, tuple[int, int]]]:
    """A seeded index of ``n`` realistic samples and its slice table."""
    rng = np.random.default_rng(seed)
    profile = get_profile(profile_name)
    keys, tokens, patches, table = [], [], [], {}
    for i in range(n):
        kind = rng.choice(3, p=[0.25, 0.55, 0.20])  # text-only, single image, multi-image
        num_images = 0 if kind == 0 else 1 if kind == 1 else int(rng.integers(2, 5))
        layouts = []
        for _ in range(num_images):
            # image area from 0.2x to ~10x the slice area, aspect 1:3..3:1 (1-10 sub-images)
            area = profile.scale_resolution**2 * float(np.exp(rng.uniform(np.log(0.2), np.log(10))))
            aspect = float(np.exp(rng.uniform(np.log(1 / 3), np.log(3))))
            w, h = max(16, int((area * aspect) ** 0.5)), max(16, int((area / aspect) ** 0.5))
            layouts.append(compute_layout(w, h, profile, 9))
        ids = assign_image_ids(layouts, profile.default_image_id_form)
        image_tokens = sum(
            num_image_tokens(lay, profile, k) for lay, k in zip(layouts, ids, strict=True)
        )
        text = int(np.clip(rng.lognormal(np.log(350), 0.9), 40, 3800))
        key = f"{i:09d}"
        keys.append(key)
        tokens.append(int(np.clip(text + image_tokens, 100, 4000)))
        patches.append(sum(lay.num_patches for lay in layouts))
        grids = [t for lay in layouts for t in lay.tgt_sizes]
        if grids:
            table[key] = (len(grids), max(r * c for r, c in grids))
    shard_ids = np.arange(n) // samples_per_shard
    index = PlanIndex.from_arrays(keys, shard_ids, tokens, patches, slice_table=table)
    return index, table


def shards_slice_table(index_dir: Path) -> SliceTable:
    """Slice table of a built dataset, from its JSON members (images are not decoded)."""
    table: dict[str, tuple[int, int]] = {}
    for shard in load_index(index_dir).shard_paths():
        for key, members in iter_shard(shard):
            meta = SampleMeta.from_json(json.loads(members["json"]))
            if meta.images:
                table[key] = slice_costs(meta)
    return table


def _samples(index: PlanIndex) -> list[SampleCost]:
    return [index.sample(i) for i in range(len(index))]


def fixed_batches(
    samples: list[SampleCost], size: int, seed: int, budgets: Budgets, model: CostModel
) -> list[Batch]:
    """Batch size ``size`` in random order (what the official scripts do)."""
    order = np.random.default_rng(seed).permutation(len(samples))
    chunks = [order[i : i + size] for i in range(0, len(order), size)]
    return [make_batch([samples[j] for j in c], budgets, model) for c in chunks]


def grouped_batches(
    samples: list[SampleCost], size: int, seed: int, budgets: Budgets, model: CostModel
) -> list[Batch]:
    """Length-grouped: random mega-batches of 50 batches, sorted by tokens, chunked."""
    order = np.random.default_rng(seed).permutation(len(samples))
    mega = 50 * size
    out: list[Batch] = []
    for start in range(0, len(order), mega):
        group = sorted(order[start : start + mega], key=lambda j: -samples[j].tokens)
        out.extend(
            make_batch([samples[j] for j in group[i : i + size]], budgets, model)
            for i in range(0, len(group), size)
        )
    return out


ROWS = [
    ("batches", lambda s: s["batches"], "{:.0f}"),
    ("mean batch size", lambda s: s["mean_batch_size"], "{:.2f}"),
    ("token efficiency", lambda s: s["token_efficiency"], "{:.3f}"),
    ("patch efficiency", lambda s: s["patch_efficiency"], "{:.3f}"),
    ("token utilisation", lambda s: s["token_utilisation"], "{:.3f}"),
    ("patch utilisation", lambda s: s["patch_utilisation"], "{:.3f}"),
    ("max padded tokens", lambda s: s["padded_tokens"]["max"], "{:.0f}"),
    ("max padded patches", lambda s: s["padded_patches"]["max"], "{:.0f}"),
    ("std padded tokens", lambda s: s["padded_tokens"]["std"], "{:.0f}"),
    ("p95/p50 padded tokens", lambda s: s["padded_tokens"]["p95_over_p50"], "{:.2f}"),
    ("p95/p50 padded patches", lambda s: s["padded_patches"]["p95_over_p50"], "{:.2f}"),
    ("p95/p50 cost", lambda s: s["cost"]["p95_over_p50"], "{:.2f}"),
    ("batches over budget", lambda s: s["over_budget"], "{:.0f}"),
]


def format_table(stats: dict[str, dict[str, Any]]) -> str:
    names = list(stats)
    head = f"{'metric':<24}" + "".join(f"{n:>10}" for n in names)
    head += "".join(f"{'ours/' + n:>14}" for n in names[1:])
    lines = [head, "-" * len(head)]
    for label, get, fmt in ROWS:
        vals = [float(get(stats[n])) for n in names]
        line = f"{label:<24}" + "".join(f"{fmt.format(v):>10}" for v in vals)
        for v in vals[1:]:
            line += f"{(vals[0] / v if v else float('nan')):>14.2f}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=Path, help="a built dataset folder (default: synthetic)")
    ap.add_argument("--samples", type=int, default=4000, help="synthetic index size")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", default="minicpmv-4.6", help="synthetic layout / cost family")
    ap.add_argument("--token-budget", type=int, default=16384)
    ap.add_argument("--patch-budget", type=int, default=131072)
    ap.add_argument("--world-size", type=int, default=1)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--shuffle-buffer", type=int, default=1000)
    ap.add_argument("--num-buckets", type=int, default=64)
    ap.add_argument("--max-buffered", type=int, default=2048)
    ap.add_argument("--patch-rows", type=int, default=0, help="0: 1-D buckets over tokens")
    args = ap.parse_args(argv)

    budgets = Budgets(args.token_budget, args.patch_budget)
    if args.shards:
        dataset = load_index(args.shards)
        profile = str(dataset.params.get("profile", args.profile))
        model = CostModel.for_profile(profile)
        old_index = model.pads_subimages and dataset.image_columns is None
        table = shards_slice_table(args.shards) if old_index else None
        index = PlanIndex.from_index(dataset, table)
        source = f"{args.shards} ({len(index)} samples, {index.num_shards} shards, {profile})"
    else:
        model = CostModel.for_profile(args.profile)
        index, _ = synthetic_index(args.samples, args.seed, args.profile)
        source = f"synthetic seed {args.seed} ({len(index)} samples, {args.profile})"

    t0 = time.perf_counter()
    plans = all_rank_plans(
        index, args.seed, 0, args.world_size, budgets, model, args.shuffle_buffer,
        args.num_buckets, max_buffered=args.max_buffered, patch_rows=args.patch_rows,
        grad_accum=args.grad_accum,
    )  # fmt: skip
    plan_s = time.perf_counter() - t0
    steps, padded = equal_step_plans(plans, args.grad_accum)
    ours = report = plan_report(padded)
    oversize = {o.sample.key for p in plans for o in p.oversize}
    samples = [s for s in _samples(index) if s.key not in oversize]
    size = max(1, round(ours["mean_batch_size"]))
    stats = {
        "ours": ours,
        "fixed4": batch_stats(fixed_batches(samples, 4, args.seed, budgets, model), budgets),
        "grouped": batch_stats(grouped_batches(samples, size, args.seed, budgets, model), budgets),
    }
    tok, pat = index.tokens, index.patches
    print(f"index: {source}; cost model {model.name}; budgets {budgets.tokens} tokens, "
          f"{budgets.patches} patches")  # fmt: skip
    print(f"tokens p5/p50/p95 {np.percentile(tok, [5, 50, 95]).round().tolist()}, patches "
          f"p50/p95/max {np.percentile(pat, [50, 95, 100]).round().tolist()}, "
          f"text-only {float((pat == 0).mean()):.0%}")  # fmt: skip
    print(f"plan: {plan_s:.2f} s for {args.world_size} rank(s); {steps} steps x "
          f"{args.grad_accum}; fillers {report['fillers']}; oversize {report['oversize']}; "
          f"closed by {report['closed_by']}; grouped uses batch size {size}")  # fmt: skip
    total = sum(report["micro_batches_per_rank"])
    balance = report["step_balance"]
    print(f"fillers {report['fillers']} of {total} micro-batches "
          f"({report['filler_fraction']:.1%}); per-step balance (p50/max padded cost over "
          f"ranks): mean {balance['mean']:.3f}, p5 {balance['p5']:.3f}, "
          f"min {balance['min']:.3f}")  # fmt: skip
    print(format_table(stats))
    ok = ours["token_efficiency"] >= 0.95 and ours["over_budget"] == 0
    print(f"target (token efficiency >= 0.95, no batch over budget): {'MET' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
