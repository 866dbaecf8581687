"""Fetch planned micro-batches from the shards: read by key, decode, tokenize, collate.

The schedule (``mvtrain.batching.schedule``) says which samples form each micro-batch, in
order, by their ids in the run (``NAME/KEY`` with several ``--shards``); a
:class:`~mvtrain.batching.sources.SampleLocator` maps each id to its shard file, its key
there and its source. The loader reads each sample's members straight from its tar (member
offsets come from one header scan per shard, cached), collates them with the family's adapter
-- tokens padded, pixels uint8 (:mod:`mvtrain.model.pixel_input`: the training device
normalises and patchifies them) -- and yields micro-batches in schedule order. With
DataLoader workers, worker ``w`` builds micro-batches ``i`` with ``i % num_workers == w``,
which the DataLoader interleaves back into order.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mvshards import processes
from mvshards.schema import SampleMeta
from mvtrain.batching.schedule import RankPlan
from mvtrain.batching.sources import SampleLocator, sample_group
from mvtrain.data.remote_reads import open_reads
from mvtrain.data.sample import LoadedSample, load_sample
from mvtrain.data.shard_access import ShardAccess
from mvtrain.model.adapters import Adapter
from mvtrain.model.pixel_input import map_tensors, model_inputs

log = logging.getLogger("mvtrain.data.loader")

AUTO_WORKERS = 4
"""Most DataLoader workers per rank that ``--loader-workers auto`` starts on CUDA."""


@dataclass
class MicroBatch:
    """One planned micro-batch, collated, with what the batch log reports."""

    position: int
    keys: list[str]
    """The samples' ids in the run (their keys with one source, ``NAME/KEY`` with several)."""
    weight: float
    host_inputs: dict[str, Any]
    """The collated batch as the loader hands it (:meth:`Adapter.host_batch`): the pixels
    uint8 in a :class:`~mvtrain.model.pixel_input.PixelPack`; the step makes the model's
    inputs of it on its device (:func:`~mvtrain.model.pixel_input.model_inputs`)."""
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

    @property
    def inputs(self) -> dict[str, Any]:
        """The model's inputs on the CPU (float pixels), made from :attr:`host_inputs` on each
        call by :func:`~mvtrain.model.pixel_input.model_inputs`: for checks and tools; the
        step makes them on its device."""
        return model_inputs(self.host_inputs, "cpu")

    def pin_memory(self) -> MicroBatch:
        """The host inputs in page-locked memory, so ``non_blocking`` copies to the GPU
        really overlap (the DataLoader's pin thread calls this)."""
        self.host_inputs = map_tensors(self.host_inputs, lambda t: t.pin_memory())
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
        positions = [p for p in range(self.start, self.stop) if p % workers == worker]
        with open_reads(self.plan, positions, self.locator) as access:  # read-ahead from a store
            for position in positions:
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
    inputs = adapter.host_batch(samples)
    lengths = [len(s.tokenized) for s in samples]
    patches = [sum(r * c for r, c in s.tgt_sizes) for s in samples]
    padded_tokens, padded_patches = adapter.padded_cost(samples)
    return MicroBatch(
        position=position,
        keys=[s.id for s in samples],
        weight=weight,
        host_inputs=inputs,
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


KEEP_FREED_BYTES = 64 << 20
"""Loader workers keep freed blocks up to this size for reuse (:func:`keep_freed_memory`)."""


def keep_freed_memory(size: int = KEEP_FREED_BYTES) -> bool:
    """Loader processes reuse freed blocks of up to ``size`` bytes (and keep twice that of
    freed heap) instead of returning them to the OS: the decoded images and pixel packs of
    every micro-batch (:func:`mvshards.processes.keep_freed_memory`). A loader worker calls
    this on start (it only loads); the training process does not."""
    return processes.keep_freed_memory(size, 2 * size)


def _worker_init(worker_id: int) -> None:
    keep_freed_memory()


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
        worker_init_fn=_worker_init,
    )
    yield from loader
