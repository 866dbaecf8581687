"""``mvprep stats``: what a built dataset holds, from its index alone (no tar is opened).

Sources, all written by ``mvprep build``:

* ``manifest.json``: build parameters, the shard list and totals (rejects by reason);
* ``index/NNNNNN.json``: per sample ``[key, num_tokens, num_patches, num_images]`` and the
  per-image table (:mod:`mvshards.image_table`), so that slices per image and original
  resolutions need no tar either. Indexes built before the image table existed still give
  every per-sample number; the per-image ones are then reported as missing. An entry's
  ``channels`` (one per sample, when any sample has a channel) gives the per-channel
  breakdown of samples, images, tokens and patches.

Percentiles use the nearest-rank definition (numpy ``method="inverted_cdf"``): ``pQ`` is the
smallest value that at least Q% of the items do not exceed, always a value that occurs, so
"the budget that holds p99" is exactly a budget that 99% of the samples fit in alone.

The loader parses each entry once with ``json`` and takes columns with ``zip`` rather than
building per-row Python objects: about 3 s for 1M samples on 2 cores, where
``mvshards.index.load_index`` (which also builds the key array) takes about 7 s. It performs
the same consistency checks as ``load_index`` (entry present, sha256 and sample count equal to
the manifest's) and raises the same errors.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mvprep.tokens import ESTIMATE_LABEL
from mvshards.cost import CostModel, CostTotals
from mvshards.image_table import (
    ImageColumns,
    concat_columns,
    read_image_table,
    sample_slice_costs,
)
from mvshards.index import IndexMissingError, entry_path, read_manifest
from mvshards.profiles import DEFAULT_PROFILE, get_profile
from mvshards.schema import SampleMeta
from mvshards.storage import Location, location, open_read
from mvshards.units import nearest_rank

PERCENTILES = (50, 90, 99)
_BUDGET_KEYS = ("token_budget", "patch_budget")


@dataclass
class IndexArrays:
    """A dataset's index as numpy arrays: per sample, and per image when the index has them."""

    out: Location
    manifest: dict[str, Any]
    tokens: np.ndarray
    patches: np.ndarray
    images: np.ndarray
    """Images per sample (int64, dataset order)."""
    image_columns: ImageColumns | None
    """The per-image table over all images; None when a shard lacks it."""
    missing_image_table: list[str] = field(default_factory=list)
    """Entry files without a usable image table (built by an older mvprep)."""
    token_source: str | None = None
    """Where ``tokens`` came from when not from the index: exact counts from a trainer's
    length cache or a tokenizer (:func:`use_exact_tokens`)."""
    channels: np.ndarray | None = None
    """Per sample its channel (``""``: none); None when no sample has one."""

    @property
    def params(self) -> dict[str, Any]:
        return self.manifest.get("params", {})

    @property
    def tokens_exact(self) -> bool:
        """True when ``tokens`` are exact counts (index built with --tokenizer, or replaced)."""
        return self.token_source is not None or self.params.get("tokenizer") is not None

    @property
    def token_label(self) -> str:
        """How token numbers are labelled: ``exact (...)`` or ``estimated, upper bound``."""
        if self.token_source is not None:
            return f"exact, {self.token_source}"
        if self.params.get("tokenizer") is not None:
            return "exact, index built with --tokenizer"
        return ESTIMATE_LABEL


def load_index_arrays(out: Location | str) -> IndexArrays:
    """Read ``manifest.json`` and every ``index/NNNNNN.json`` of a finished build (no tar);
    ``out`` may be an object-store URL."""
    out = location(out)
    manifest = read_manifest(out)
    sample_cols: list[np.ndarray] = []
    image_cols: list[ImageColumns] = []
    missing: list[str] = []
    channels: list[str] = []
    any_channel = False
    for item in manifest["shards"]:
        path = entry_path(out, int(item["unit"]))
        try:
            entry = json.loads(path.read_bytes())
            samples = entry["samples"]
        except (OSError, ValueError, KeyError) as exc:
            raise IndexMissingError(
                f"{path} is missing or unreadable ({type(exc).__name__}) but manifest.json "
                f"lists {item['shard']}: re-run mvprep build to complete it"
            ) from None
        if entry.get("sha256") != item["sha256"] or len(samples) != item["num_samples"]:
            raise IndexMissingError(
                f"{path} does not match manifest.json (sha256 or sample count differ): the "
                "folder was partly rebuilt; re-run mvprep build"
            )
        if samples:
            _, tokens, patches, images = zip(*samples, strict=True)
            sample_cols.append(np.array((tokens, patches, images), dtype=np.int64))
        named = entry.get("channels")
        if isinstance(named, list) and len(named) == len(samples):
            any_channel = any_channel or any(named)
            channels += [c if isinstance(c, str) else "" for c in named]
        else:
            channels += [""] * len(samples)
        num_images = int(sample_cols[-1][2].sum()) if samples else 0
        table = read_image_table(entry.get("stats"), num_images)
        if table is None:
            missing.append(str(path))
        else:
            image_cols.append(table)
    table_arr = np.concatenate(sample_cols, axis=1) if sample_cols else np.zeros((3, 0), np.int64)
    columns = None if missing else concat_columns(image_cols)
    return IndexArrays(
        out=out,
        manifest=manifest,
        tokens=table_arr[0].copy(),
        patches=table_arr[1].copy(),
        images=table_arr[2].copy(),
        image_columns=columns,
        missing_image_table=missing,
        channels=np.array(channels, dtype=str) if any_channel else None,
    )


class ExactTokensError(IndexMissingError):
    """Exact counts were asked for but cannot be had (one line, naming the file and the fix)."""


def use_exact_tokens(
    arrays: IndexArrays, lengths: Path | None = None, tokenizer: Path | None = None
) -> None:
    """Replace ``arrays.tokens`` with exact counts: from a trainer run's length cache
    (``lengths``: the cache file, the run's ``cache/`` folder or the run's output folder;
    :mod:`mvshards.lengths_cache`), else by tokenizing every sample's text with ``tokenizer``
    (the JSON members of the shards are read, no image), as ``mvprep build --tokenizer``
    would have counted."""
    from mvshards.index import load_index
    from mvshards.lengths_cache import (
        cache_dataset,
        dataset_hash,
        find_lengths_caches,
        read_lengths_cache,
    )

    index = load_index(arrays.out)
    if lengths is not None:
        mine = dataset_hash(s.sha256 for s in index.shards)
        found = find_lengths_caches(Path(lengths), mine)
        if not found:
            raise ExactTokensError(
                f"no exact-length cache of {arrays.out} in {lengths}: mvtrain writes one into "
                "OUT/cache/ when it trains on these shards; give that folder, or --tokenizer"
            )
        path = found[-1]
        if cache_dataset(path) not in (None, mine):
            raise ExactTokensError(
                f"{path} is the length cache of another build (its shards differ from "
                f"{arrays.out}'s); give the cache of a run on these shards, or --tokenizer"
            )
        try:
            cache = read_lengths_cache(path)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ExactTokensError(f"{path} is not a length cache ({exc})") from None
        if len(cache.tokens) != len(index):
            raise ExactTokensError(
                f"{path} holds {len(cache.tokens)} lengths but {arrays.out} has {len(index)} "
                "samples; give the cache of a run on these shards, or --tokenizer"
            )
        arrays.tokens = cache.tokens
        arrays.token_source = f"trainer cache {path}"
        return
    if tokenizer is None:
        return
    import tarfile

    from mvprep.tokens import HFTokenCounter

    counter = HFTokenCounter(tokenizer)
    position = {str(key): i for i, key in enumerate(index.keys.tolist())}
    tokens = np.asarray(index.num_tokens, dtype=np.int64).copy()
    for shard in index.shard_paths():
        with open_read(shard) as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
            for member in tar:
                if not (member.isfile() and member.name.endswith(".json")):
                    continue
                handle = tar.extractfile(member)
                assert handle is not None
                meta = SampleMeta.from_json(json.loads(handle.read()))
                text = counter.count_text_tokens(meta.conversations, meta.image_names)
                tokens[position[meta.key]] = text + meta.num_image_tokens
    arrays.tokens = tokens
    arrays.token_source = f"counted with the tokenizer {tokenizer}"


def percentiles(values: Sequence[float] | np.ndarray) -> dict[str, float | int | None]:
    """``{"p50", "p90", "p99", "max"}`` by nearest rank (None for no values); ints stay ints."""
    arr = np.asarray(values)
    if arr.size == 0:
        return {**{f"p{q}": None for q in PERCENTILES}, "max": None}
    found = nearest_rank(arr, [*PERCENTILES, 100])
    cast = int if np.issubdtype(arr.dtype, np.integer) else float
    return {
        **{f"p{q}": cast(v) for q, v in zip(PERCENTILES, found[:-1], strict=True)},
        "max": cast(found[-1]),
    }


def per_sample_patch_cost(arrays: IndexArrays, cost: CostModel) -> np.ndarray | None:
    """Padded patches of a micro-batch holding each sample alone, by ``cost`` (the family's
    rule, :meth:`~mvshards.cost.CostModel.alone` per sample). None when the rule pads
    (sub)images and the index has no per-image table to count them."""
    zeros = np.zeros_like(arrays.patches)
    if arrays.image_columns is not None:
        slices, largest = sample_slice_costs(arrays.images, arrays.image_columns)
    elif cost.pads_subimages:
        return None
    else:
        slices, largest = zeros, zeros
    totals = CostTotals(1, arrays.tokens, arrays.patches, slices, largest)
    return np.asarray(cost.padded_totals(totals)[1], dtype=np.int64)


def channel_stats(arrays: IndexArrays) -> list[dict[str, Any]]:
    """Per channel (sorted by name; samples without one last, as ``"channel": None``):
    samples, images, tokens and patches summed, and the token share. Empty when no sample
    has a channel."""
    if arrays.channels is None:
        return []
    total_tokens = max(int(arrays.tokens.sum()), 1)
    names = sorted(str(c) for c in np.unique(arrays.channels))
    rows = []
    for name in [*(n for n in names if n), *(n for n in names if not n)]:
        mine = arrays.channels == name
        tokens = int(arrays.tokens[mine].sum())
        rows.append(
            {
                "channel": name or None,
                "samples": int(mine.sum()),
                "images": int(arrays.images[mine].sum()),
                "tokens": tokens,
                "patches": int(arrays.patches[mine].sum()),
                "token_share": tokens / total_tokens,
            }
        )
    return rows


def dataset_stats(arrays: IndexArrays) -> dict[str, Any]:
    """Counts, rejects by reason, percentiles and the budgets that hold p99 and max samples,
    and (when samples carry channels) the counts per channel."""
    totals = arrays.manifest.get("totals", {})
    profile = arrays.params.get("profile")
    cost = get_profile(profile or DEFAULT_PROFILE).family.cost
    cols = arrays.image_columns
    counts = {
        "records": int(totals.get("records", 0)),
        "samples": len(arrays.tokens),
        "rejects": int(totals.get("rejects", 0)),
        "shards": len(arrays.manifest.get("shards", [])),
        "bytes": int(totals.get("bytes", 0)),
        "images": int(arrays.images.sum()),
        "text_only_samples": int((arrays.images == 0).sum()),
        "sliced_images": int((cols["slices"] > 0).sum()) if cols is not None else None,
    }
    dists: dict[str, Any] = {
        "tokens_per_sample": percentiles(arrays.tokens),
        "patches_per_sample": percentiles(arrays.patches),
        "images_per_sample": percentiles(arrays.images),
    }
    notes: list[str] = []
    if cols is not None:
        dists["slices_per_image"] = percentiles(cols["slices"])
        dists["patches_per_image"] = percentiles(cols["patches"])
        dists["original_width"] = percentiles(cols["width"])
        dists["original_height"] = percentiles(cols["height"])
        dists["original_megapixels"] = percentiles(cols["width"] * cols["height"] / 1e6)
    else:
        notes.append(
            f"{len(arrays.missing_image_table)} index entries have no per-image table (built "
            "by an older mvprep): slices and resolutions are missing; rebuild into a new --out"
        )
    patch_cost = per_sample_patch_cost(arrays, cost)
    budgets: dict[str, Any] = {"cost_model": cost.name}
    for name in ("p99", "max"):
        budgets[name] = {
            "token_budget": percentiles(arrays.tokens)[name],
            "patch_budget": percentiles(patch_cost)[name] if patch_cost is not None else None,
        }
    budgets["note"] = (
        "a micro-batch holding one sample alone; mvtrain skips samples over either budget"
    )
    if not arrays.tokens_exact:
        notes.append(
            "token counts are estimates, upper bounds of the exact ones (no --tokenizer at "
            "build time), so the token budgets are safe but larger than needed; exact: "
            "mvprep stats DIR --tokenizer PATH, or --lengths RUN_OUT/cache after a mvtrain run"
        )
    stats = {
        "dataset": str(arrays.out),
        "profile": profile,
        "params": {k: arrays.params.get(k) for k in ("max_res", "max_slice_nums", "tokenizer")},
        "token_counts_exact": arrays.tokens_exact,
        "token_counts": arrays.token_label,
        "counts": counts,
        "rejects_by_reason": dict(sorted(totals.get("rejects_by_reason", {}).items())),
        "percentiles": dists,
        "budgets": budgets,
        "notes": notes,
    }
    by_channel = channel_stats(arrays)
    if by_channel:
        stats["by_channel"] = by_channel
    return stats


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return f"{value:,}"


def _channel_table(rows: list[dict[str, Any]], exact: bool) -> list[str]:
    names = [r["channel"] if r["channel"] is not None else "(no channel)" for r in rows]
    width = max(len("channel"), *(len(n) for n in names))
    tokens = "tokens" if exact else "tokens*"
    lines = [
        "by channel:",
        f"  {'channel':{width}}  {'samples':>10} {'images':>10} {tokens:>14} {'share':>6} "
        f"{'patches':>14}",
    ]
    for name, r in zip(names, rows, strict=True):
        lines.append(
            f"  {name:{width}}  {_fmt(r['samples']):>10} {_fmt(r['images']):>10} "
            f"{_fmt(r['tokens']):>14} {r['token_share']:>6.1%} {_fmt(r['patches']):>14}"
        )
    if not exact:
        lines.append(f"  * {ESTIMATE_LABEL}")
    return lines


def format_stats(stats: dict[str, Any]) -> str:
    """The human-readable table ``mvprep stats`` prints."""
    c = stats["counts"]
    lines = [
        f"dataset {stats['dataset']}  (profile {stats['profile']}, "
        f"token counts {stats['token_counts']})",
        f"records {_fmt(c['records'])}  samples {_fmt(c['samples'])}  rejects "
        f"{_fmt(c['rejects'])}  shards {_fmt(c['shards'])}  {c['bytes'] / 1e9:.3f} GB",
        f"images {_fmt(c['images'])}  sliced {_fmt(c['sliced_images'])}  text-only samples "
        f"{_fmt(c['text_only_samples'])}",
    ]
    if stats["rejects_by_reason"]:
        lines.append("rejects by reason:")
        lines += [f"  {n:>8,}  {r}" for r, n in stats["rejects_by_reason"].items()]
    if stats.get("by_channel"):
        lines += _channel_table(stats["by_channel"], stats["token_counts_exact"])
    width = max(len(k) for k in stats["percentiles"])
    lines.append(f"{'':{width}}  {'p50':>10} {'p90':>10} {'p99':>10} {'max':>10}")
    estimated = "" if stats["token_counts_exact"] else f" ({ESTIMATE_LABEL})"
    for name, p in stats["percentiles"].items():
        cells = " ".join(f"{_fmt(p[k]):>10}" for k in ("p50", "p90", "p99", "max"))
        lines.append(f"{name:{width}}  {cells}" + (estimated if name.startswith("tokens") else ""))
    b = stats["budgets"]
    for name in ("p99", "max"):
        tokens, patches = (str(b[name][k]).replace("None", "-") for k in _BUDGET_KEYS)
        lines.append(
            f"budgets holding the {name} sample ({b['cost_model']} cost): "
            f"--token-budget {tokens}{estimated} --patch-budget {patches}"
        )
    lines += [f"note: {n}" for n in stats["notes"]]
    return "\n".join(lines)
