"""Fetch planned micro-batches from the shards: read by key, decode, tokenize, collate.

The schedule (``mvtrain.batching.schedule``) says which samples form each micro-batch, in
order, by their ids in the run (``NAME/KEY`` with several ``--shards``); a
:class:`~mvtrain.batching.sources.SampleLocator` maps each id to its shard file, its key
there and its source. The loader reads each sample's members straight from its tar (member
offsets come from one header scan per shard, cached), turns them into model inputs with the
family's adapter, and yields micro-batches in schedule order. With DataLoader workers,
worker ``w`` builds micro-batches ``i`` with ``i % num_workers == w``, which the DataLoader
interleaves back into order.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mvshards.schema import SampleMeta
from mvshards.tario import split_member_name
from mvtrain.batching.schedule import RankPlan
from mvtrain.batching.sources import SampleLocator, sample_group
from mvtrain.data.sample import LoadedSample, load_sample
from mvtrain.model.adapters import Adapter

log = logging.getLogger("mvtrain.data.loader")

AUTO_WORKERS = 4
"""Most DataLoader workers per rank that ``--loader-workers auto`` starts on CUDA."""


class ShardReadError(Exception):
    """A shard does not hold what its index says (one line, naming the shard, the sample and
    the fix: ``mvprep verify``)."""

    def __init__(self, shard: Path, key: str, problem: str) -> None:
        super().__init__(
            f"{shard}: sample {key} {problem}; the shard is damaged or changed since the index "
            f"was written: run `mvprep verify {shard.parent}` and rebuild the shards it names"
        )


class ShardAccess:
    """Random access to a sample's members by key; one header scan per shard. A shard that
    cannot be read as its index says raises :class:`ShardReadError`."""

    def __init__(self, shard_paths: list[Path]) -> None:
        self.shard_paths = shard_paths
        self._offsets: dict[int, dict[str, list[tuple[str, int, int]]]] = {}

    def _scan(self, shard_id: int) -> dict[str, list[tuple[str, int, int]]]:
        found: dict[str, list[tuple[str, int, int]]] = {}
        with tarfile.open(self.shard_paths[shard_id]) as tar:
            for member in tar:
                parts = split_member_name(member.name) if member.isfile() else None
                if parts is None:
                    continue
                key, ext = parts
                found.setdefault(key, []).append((ext, member.offset_data, member.size))
        return found

    def members(self, shard_id: int, key: str) -> dict[str, bytes]:
        path = self.shard_paths[shard_id]
        table = self._offsets.get(shard_id)
        if table is None:
            try:
                table = self._offsets[shard_id] = self._scan(shard_id)
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise ShardReadError(path, key, f"cannot be read ({exc})") from exc
        if key not in table:
            raise ShardReadError(path, key, "is not in it")
        out: dict[str, bytes] = {}
        with open(path, "rb") as handle:
            for ext, offset, size in table[key]:
                handle.seek(offset)
                out[ext] = handle.read(size)
                if len(out[ext]) != size:
                    raise ShardReadError(path, key, f"is cut short (member .{ext})")
        if "json" not in out:
            raise ShardReadError(path, key, "has no .json member")
        return out


@dataclass
class MicroBatch:
    """One planned micro-batch, collated, with what the batch log reports."""

    position: int
    keys: list[str]
    """The samples' ids in the run (their keys with one source, ``NAME/KEY`` with several)."""
    weight: float
    inputs: dict[str, Any]
    max_len: int
    real_tokens: int
    padded_tokens: int
    real_patches: int
    padded_patches: int
    num_label_tokens: int
    has_images: bool
    length_mismatches: list[str]
    samples: list[LoadedSample]
    """The loaded samples, kept so an OOM can split the micro-batch and re-collate."""
    sources: list[str] = field(default_factory=list)
    """Per sample (row), its loss-group label: its channel when it has one, else its
    source's name (:func:`mvtrain.batching.sources.sample_group`)."""

    def pin_memory(self) -> MicroBatch:
        """The model inputs in page-locked memory, so ``non_blocking`` copies to the GPU
        really overlap (the DataLoader's pin thread calls this)."""
        self.inputs = _map_tensors(self.inputs, lambda t: t.pin_memory())
        return self


class PlannedBatches(IterableDataset):
    """The micro-batches ``plan.batches[start:stop]`` of one rank, built in order."""

    def __init__(
        self,
        plan: RankPlan,
        start: int,
        stop: int,
        locator: SampleLocator,
        tokenizer: Any,
        profile_name: str,
        adapter: Adapter,
    ) -> None:
        super().__init__()
        self.plan, self.start, self.stop = plan, start, stop
        self.locator = locator
        self.shard_paths = list(locator.shard_paths)
        self.tokenizer, self.profile_name, self.adapter = tokenizer, profile_name, adapter

    def __iter__(self) -> Iterator[MicroBatch]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        access = ShardAccess(self.shard_paths)
        for position in range(self.start, self.stop):
            if position % workers != worker:
                continue
            yield self.build(position, access)

    def build(self, position: int, access: ShardAccess) -> MicroBatch:
        planned = self.plan.batches[position]
        samples = []
        mismatches = []
        for cost in planned.samples:
            shard, key, source = self.locator.locate(cost.key)
            members = access.members(shard, key)
            meta = SampleMeta.from_json(json.loads(members["json"]))
            loaded = load_sample(
                meta,
                members,
                self.tokenizer,
                self.profile_name,
                uid=cost.key,
                source=sample_group(source, self.locator.channel_of(cost.key)),
            )
            if len(loaded.tokenized) != cost.tokens:
                mismatches.append(
                    f"{cost.key}: planned {cost.tokens} tokens, tokenized {len(loaded.tokenized)}"
                )
            samples.append(loaded)
        return make_micro_batch(position, samples, float(planned.weight), self.adapter, mismatches)


def make_micro_batch(
    position: int,
    samples: list[LoadedSample],
    weight: float,
    adapter: Adapter,
    length_mismatches: list[str] | None = None,
) -> MicroBatch:
    """Collate loaded samples into a :class:`MicroBatch` with its real and padded costs."""
    inputs = adapter.collate(samples)
    lengths = [len(s.tokenized) for s in samples]
    patches = [sum(r * c for r, c in s.tgt_sizes) for s in samples]
    padded_tokens, padded_patches = adapter.padded_cost(samples)
    return MicroBatch(
        position=position,
        keys=[s.id for s in samples],
        weight=weight,
        inputs=inputs,
        max_len=max(lengths),
        real_tokens=sum(lengths),
        padded_tokens=padded_tokens,
        real_patches=sum(patches),
        padded_patches=padded_patches,
        num_label_tokens=adapter.label_count(inputs) if weight else 0,
        has_images=any(patches),
        length_mismatches=length_mismatches or [],
        samples=samples,
        sources=[s.source for s in samples],
    )


def default_loader_workers(cuda: bool) -> int:
    """``--loader-workers auto``: none on CPU (the training thread has the cores), else up to
    :data:`AUTO_WORKERS` per rank within this rank's share of the CPUs, one left for the
    training thread."""
    if not cuda:
        return 0
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    share = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2) // local_ranks
    return max(1, min(AUTO_WORKERS, share - 1))


def batch_iterator(
    dataset: PlannedBatches, num_workers: int, pin_memory: bool = False
) -> Iterator[MicroBatch]:
    """The dataset's micro-batches in order, built by ``num_workers`` DataLoader workers (0:
    on this thread); with ``pin_memory`` their inputs come in page-locked memory."""
    if num_workers <= 0:
        for batch in dataset:
            yield batch.pin_memory() if pin_memory else batch
        return
    loader = DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        persistent_workers=False,
        prefetch_factor=2,
        collate_fn=lambda x: x,
        pin_memory=pin_memory,
    )
    yield from loader


def _map_tensors(value: Any, fn: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, list):
        return [_map_tensors(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def to_device(inputs: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """``inputs`` on ``device``; copies from pinned memory do not block the host."""
    return _map_tensors(inputs, lambda t: t.to(device, non_blocking=True))
