"""Exact per-sample token lengths (and slice costs) for planning, without pixels.

The index holds exact token counts only when ``mvprep build`` ran with the same tokenizer
the trainer uses. Otherwise the trainer recounts once: it reads only the JSON member of
every sample (images are skipped by seeking past them), tokenizes the text exactly as the
training stream will, and caches the result in the run's output folder, keyed by the
shards' hashes and the tokenizer's fingerprint. A run over several ``--shards`` folders
counts (and caches) each folder on its own: rows and slice-table keys are that folder's.

The slice costs (what the 2.6 family's cost model reads) come from the index's per-image
table; an index built before the table existed has them recomputed from the same JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mvshards.cost import SampleCost
from mvshards.index import DatasetIndex
from mvshards.lengths_cache import (
    cache_path,
    dataset_hash,
    read_lengths_cache,
    write_lengths_cache,
)
from mvshards.profiles import get_profile
from mvshards.schema import SampleMeta
from mvtrain.data.tokenize import tokenize_sample

log = logging.getLogger("mvtrain")


@dataclass
class ExactLengths:
    """Per index row: exact token count, and the slice table (``key -> (slices,
    max_patches_per_slice)``, every sample) that a cost model padding (sub)images reads."""

    tokens: np.ndarray
    slices: dict[str, tuple[int, int]]
    recounted: bool
    mismatches: int
    """Samples whose exact count differs from the index's (only when the index was exact)."""


def tokenizer_fingerprint(tokenizer: Any) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    h.update(str(getattr(tokenizer, "chat_template", "")).encode())
    return h.hexdigest()[:16]


def iter_sample_json(shard: Path) -> Any:
    """Every sample's JSON in a shard, reading no image bytes."""
    with tarfile.open(shard) as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".json"):
                handle = tar.extractfile(member)
                assert handle is not None
                yield json.loads(handle.read())


def exact_lengths(
    index: DatasetIndex,
    tokenizer: Any,
    profile_name: str,
    cache_dir: Path | None,
    progress: bool = False,
) -> ExactLengths:
    """Exact lengths for every index row, from the cache, the index, or a recount."""
    fingerprint = tokenizer_fingerprint(tokenizer)
    shard_hash = dataset_hash(s.sha256 for s in index.shards)
    cache = None
    if cache_dir is not None:
        cache = cache_path(Path(cache_dir), shard_hash, fingerprint, profile_name)
        if cache.exists():
            saved = read_lengths_cache(cache)
            return ExactLengths(
                saved.tokens, saved.slices, recounted=False, mismatches=saved.mismatches
            )
    position = {key: i for i, key in enumerate(index.keys)}
    tokens = np.asarray(index.num_tokens, dtype=np.int64).copy()
    slices = _index_slices(index, profile_name)
    mismatches = 0
    desc = f"exact lengths {Path(index.out).name}"
    for shard in tqdm(index.shard_paths(), desc=desc, disable=not progress):
        for obj in iter_sample_json(shard):
            meta = SampleMeta.from_json(obj)
            exact = len(tokenize_sample(meta, tokenizer, profile_name).input_ids)
            i = position[meta.key]
            if meta.token_count_exact and exact != tokens[i]:
                mismatches += 1
            tokens[i] = exact
            if meta.key not in slices:
                cost = SampleCost.from_meta(meta)
                slices[meta.key] = (cost.slices, cost.max_patches_per_slice)
    result = ExactLengths(tokens, slices, recounted=True, mismatches=mismatches)
    if cache is not None:
        write_lengths_cache(cache, tokens, slices, mismatches)
    return result


def _index_slices(index: DatasetIndex, profile_name: str) -> dict[str, tuple[int, int]]:
    """The slice table from the index's per-image table; empty (the caller fills it from the
    samples' JSON) when the index has none, logged when the profile's cost reads it."""
    columns = index.slice_costs()
    if columns is None:
        cost = get_profile(profile_name).family.cost
        if cost.pads_subimages:
            log.info(
                "%s: the index has no per-image table (%d entries built by an older mvprep); "
                "the %s-family slice costs are read from the samples' JSON",
                index.out,
                len(index.missing_image_table),
                cost.name,
            )
        return {}
    return {str(k): (int(a), int(b)) for k, a, b in zip(index.keys.tolist(), *columns, strict=True)}
