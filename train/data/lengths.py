"""Exact per-sample token lengths (and slice costs) for planning, without pixels.

The index holds exact token counts only when ``mvprep build`` ran with the same tokenizer
the trainer uses (its manifest ``params`` then carry ``tokenizer_fingerprint``, equal to
:func:`tokenizer_fingerprint` of the trainer's tokenizer, and the index has its per-image
table): then nothing is recounted. Otherwise the trainer recounts once: it reads only the
JSON member of every sample (images are skipped by seeking past them), tokenizes the text
exactly as the training stream will, and caches the result in the run's output folder, keyed
by the shards' hashes and the tokenizer's fingerprint. A run over several ``--shards``
folders counts (and caches) each folder on its own: rows and slice-table keys are that
folder's.

On N ranks the recount is shared: rank ``r`` counts the index rows ``[r*n/N, (r+1)*n/N)``
(contiguous, so it reads about 1/N of the shards, front to back), the shares are
all-gathered (:func:`gather_counts`, under the process group's timeout) and rank 0 writes
the cache. Whether to count at all is agreed first (every rank finds the cache or an exact
index, or all count), so no rank waits in a collective the others skip.

The slice costs (what the 2.6 family's cost model reads) come from the index's per-image
table; an index built before the table existed has them recomputed from the same JSON.

Shards in an object store are recounted the same way: the JSON members are read while the tar
headers are walked in small ranged GETs (:func:`mvtrain.data.shard_access.open_shard`), the
image bytes between them skipped; with ``--cache-dir`` each shard is first copied whole into
that folder (:mod:`mvtrain.data.shard_cache`), where training then reads it too.
"""

from __future__ import annotations

import json
import logging
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mvshards.cost import SampleCost
from mvshards.index import DatasetIndex
from mvshards.lengths_cache import (
    FINGERPRINT_PARAM,
    cache_path,
    dataset_hash,
    read_lengths_cache,
    tokenizer_fingerprint,
    write_lengths_cache,
)
from mvshards.profiles import get_profile
from mvshards.schema import SampleMeta
from mvshards.storage import Location, ObjectPath, StorageError
from mvshards.tario import split_member_name
from mvtrain.data.remote_reads import shard_cache
from mvtrain.data.shard_access import (
    HEADER_BLOCK,
    ShardReadError,
    member_table,
    open_shard,
    remember_table,
    walk_block,
)
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


Gather = Callable[[Any], list[Any]]
"""An all-gather of one picklable object per rank: every rank's, in rank order."""


def gather_counts(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``torch.distributed.all_gather_object``; gloo
    or NCCL, under the process group's timeout); ``[obj]`` without a process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def iter_sample_json(
    shard: Location, wanted: Callable[[str], bool] | None = None, block: int = HEADER_BLOCK
) -> Iterator[Any]:
    """Every sample's JSON in a shard (a file or an object, walked in ranged GETs of
    ``block`` bytes, :func:`~mvtrain.data.shard_access.walk_block`; only the keys ``wanted``
    says yes to), skipping image bytes; a shard that cannot be read so raises
    :class:`ShardReadError` (run ``mvprep verify``), a store that refuses it
    :class:`~mvshards.storage.StorageError`."""
    key = "(the first)"
    try:
        with open_shard(shard, block) as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".json"):
                    parts = split_member_name(member.name)
                    key = parts[0] if parts is not None else member.name
                    if wanted is not None and (parts is None or not wanted(parts[0])):
                        continue
                    member_bytes = tar.extractfile(member)
                    assert member_bytes is not None
                    yield json.loads(member_bytes.read())
            remember_table(shard, member_table(tar))  # walked: the loader needs no walk
    except StorageError:
        raise
    except (tarfile.TarError, OSError, EOFError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardReadError(shard, key, f"cannot be read ({exc})") from exc


def readable_shard(shard: Location, stamp: tuple[int, str]) -> Location:
    """Where to read ``shard`` (``stamp``: its index size and sha256): its copy in the
    ``--cache-dir`` (made first) when it is stored and a cache is set, else itself."""
    cache = shard_cache()
    if cache is None or not isinstance(shard, ObjectPath):
        return shard
    return cache.fetch(shard, stamp)


def share_rows(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[lo, hi)``: the contiguous index rows rank ``rank`` of ``world_size`` recounts (the
    shares cover ``[0, n)`` once, sizes differ by at most one)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    return rank * n // world_size, (rank + 1) * n // world_size


def index_counts_exact(index: DatasetIndex, fingerprint: str) -> bool:
    """Whether ``index`` holds exact counts for the tokenizer of ``fingerprint`` and its slice
    costs (so nothing needs a recount)."""
    return index.params.get(FINGERPRINT_PARAM) == fingerprint and index.slice_costs() is not None


@dataclass
class _Share:
    """One rank's recount: tokens of rows ``[lo, hi)``, the slice costs the index lacked for
    them, and how many differed from an exact index count."""

    lo: int
    hi: int
    tokens: np.ndarray
    slices: dict[str, tuple[int, int]]
    mismatches: int


def count_share(
    index: DatasetIndex,
    tokenizer: Any,
    profile_name: str,
    rank: int = 0,
    world_size: int = 1,
    known_slices: dict[str, tuple[int, int]] | None = None,
    progress: bool = False,
) -> _Share:
    """Recount rank ``rank``'s rows (:func:`share_rows`): only the shards holding them are
    read, and only those samples' JSON members."""
    lo, hi = share_rows(len(index), rank, world_size)
    tokens = np.asarray(index.num_tokens[lo:hi], dtype=np.int64).copy()
    position = {str(index.keys[i]): i for i in range(lo, hi)}
    shard_ids = np.asarray(index.shard_ids[lo:hi], dtype=np.int64)
    shards = index.shards
    known = known_slices or {}
    slices: dict[str, tuple[int, int]] = {}
    mismatches = 0
    desc = f"exact lengths {index.out.name}"
    for shard in tqdm(sorted(set(shard_ids.tolist())), desc=desc, disable=not progress):
        info = shards[shard]
        where = readable_shard(info.path, (info.num_bytes, info.sha256))
        block = walk_block(info.num_bytes, info.num_samples)
        for obj in iter_sample_json(where, position.__contains__, block):
            meta = SampleMeta.from_json(obj)
            exact = len(tokenize_sample(meta, tokenizer, profile_name).input_ids)
            i = position[meta.key] - lo
            if meta.token_count_exact and exact != tokens[i]:
                mismatches += 1
            tokens[i] = exact
            if meta.key not in known:
                cost = SampleCost.from_meta(meta)
                slices[meta.key] = (cost.slices, cost.max_patches_per_slice)
    return _Share(lo, hi, tokens, slices, mismatches)


def exact_lengths(
    index: DatasetIndex,
    tokenizer: Any,
    profile_name: str,
    cache_dir: Path | None,
    progress: bool = False,
    *,
    rank: int = 0,
    world_size: int = 1,
    gather: Gather | None = None,
    after_count: Callable[[], None] | None = None,
) -> ExactLengths:
    """Exact lengths for every index row, from the cache, the exact index, or a recount
    shared by the ``world_size`` ranks (each calls this with its ``rank`` and the same
    ``gather``, e.g. :func:`gather_counts`); rank 0 writes the cache. ``after_count`` runs
    on this rank between its count and the gather (fault injection)."""
    if world_size > 1 and gather is None:
        raise ValueError("a recount shared by several ranks needs their gather")
    fingerprint = tokenizer_fingerprint(tokenizer)
    shard_hash = dataset_hash(s.sha256 for s in index.shards)
    cache = saved = None
    if cache_dir is not None:
        cache = cache_path(Path(cache_dir), shard_hash, fingerprint, profile_name)
        if cache.exists():
            saved = read_lengths_cache(cache)
    exact_index = index_counts_exact(index, fingerprint)
    have = saved is not None or exact_index
    if gather is not None and world_size > 1:
        have = all(gather(have))  # all ranks read, or all count: no one waits alone
    if have and saved is not None:
        return ExactLengths(
            saved.tokens, saved.slices, recounted=False, mismatches=saved.mismatches
        )
    if have:
        return ExactLengths(
            np.asarray(index.num_tokens, dtype=np.int64).copy(),
            _index_slices(index, profile_name),
            recounted=False,
            mismatches=0,
        )
    slices = _index_slices(index, profile_name)
    share = count_share(index, tokenizer, profile_name, rank, world_size, slices, progress)
    if after_count is not None:
        after_count()
    shares = gather(share) if gather is not None and world_size > 1 else [share]
    tokens = np.asarray(index.num_tokens, dtype=np.int64).copy()
    for part in shares:
        tokens[part.lo : part.hi] = part.tokens
        slices.update(part.slices)
    mismatches = sum(part.mismatches for part in shares)
    result = ExactLengths(tokens, slices, recounted=True, mismatches=mismatches)
    if cache is not None and rank == 0:
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
