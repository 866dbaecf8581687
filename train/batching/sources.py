"""Several shard folders in one run (``--shards DIR[:WEIGHT]``, repeatable): the mix.

* **Sources.** Each folder is a source named by its basename (``data/a/shards`` ->
  ``shards``); equal basenames are told apart by their parent folders (``a/shards``,
  ``b/shards``). A folder may be an object-store URL (``s3://bucket/prefix``, see
  :mod:`mvshards.storage`): ``s3://bucket/x:2`` is ``s3://bucket/x`` with weight 2 (the
  colon after the scheme separates nothing), and it is named like a folder (``x``).
  Folders whose builds differ in anything the trainer's costs depend on
  (:data:`COST_FIELDS`: profile, slice count from ``--max-res``, image-id form) are refused
  (:class:`SourceMismatchError`, one line naming both folders and the field).
* **Identity.** Keys are unique only within a folder. A sample's id is its key when the run
  has one source (everything reads as before) and ``NAME/KEY`` with several; plans, the
  loader, the batch log, ``skipped.jsonl`` and OOM events all carry that id, and
  :class:`SampleLocator` maps it back to ``(shard file, key in the folder, source)``.
* **Weights.** Per epoch a source of ``n`` samples and weight ``w`` contributes
  ``round(w * n)`` samples (rounded half up): ``floor(w)`` full copies plus a subset of the
  remainder drawn by ``(seed, epoch, source)``. The epoch's samples form *virtual shards*
  (one per copy of each real shard, the drawn subset kept in its real shard's slot), which
  the usual planner (:mod:`mvtrain.batching.schedule`) shuffles, batches and deals to ranks. So an
  epoch is a pure function of (indexes, weights, seed, epoch, world size) and ``--resume``
  stays exact. One source of weight 1 plans exactly as a plain index does.
* **Loss groups.** Every sample carries one label (:func:`sample_group`): its channel
  (``mvprep build`` keeps a record's ``channel``/``source``/``dataset`` field, or
  ``--channel``, in the index) when it has one, else its source's name. So a channel spans
  every folder that has it, and each sample's loss counts in exactly one group. Channel
  labels are :class:`ChannelGroup` strings, so reports tell them from folder names
  (:func:`split_group_losses`: ``loss_by_channel`` and ``loss_by_source``); a channel
  spelled like a folder name shares that folder's group. The label set is fixed at setup
  (:attr:`SourceMix.groups`), so the per-group loss sums of a step ride in the step's one
  all-gather.

Pure Python + numpy; no torch.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mvshards.index import DatasetIndex, SampleRanges, load_index
from mvshards.storage import Location, ObjectPath, is_url, location
from mvtrain.batching.plan_index import PlanIndex

_MIX = 5
"""Purpose tag of the fraction draw's seed (the planner's own tags are 1-4)."""

COST_FIELDS = (
    ("profile", "--profile"),
    ("max_slice_nums", "--max-res"),
    ("image_id_form", "--image-id-form"),
)
"""Build parameters (manifest ``params``) every mixed folder must share: the model profile
(family, cost rule, tokens per image), the slice count ``--max-res`` gives (patches), and the
image-id form (tokens). The rest (input file, image format, quality, tokenizer, shard size,
filters) changes no cost the trainer reads: it recounts tokens with its own tokenizer."""


class SourceMismatchError(ValueError):
    """Two ``--shards`` folders were built with settings the trainer cannot mix."""


@dataclass(frozen=True)
class ShardSource:
    """One ``--shards DIR[:WEIGHT]`` (``DIR`` a local folder or an object-store URL)."""

    path: Location
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.path, Path | ObjectPath):
            object.__setattr__(self, "path", location(self.path))
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ValueError(f"--shards {self.path}: the weight must be > 0, got {self.weight}")

    @classmethod
    def parse(cls, text: str | Path) -> ShardSource:
        """``DIR`` or ``DIR:WEIGHT``; a local folder that exists under the whole text wins (a
        name with a colon); in a URL only a colon after the ``scheme://`` can separate."""
        text = str(text)
        folder, sep, weight = text.rpartition(":")
        if not sep or (not is_url(text) and Path(text).is_dir()):
            return cls(location(text))
        if is_url(text) and not is_url(folder):
            return cls(location(text))
        try:
            value = float(weight)
        except ValueError:
            return cls(location(text))
        return cls(location(folder), value)

    def __str__(self) -> str:
        return f"{self.path}" if self.weight == 1 else f"{self.path}:{self.weight:g}"


def parse_sources(value: Any) -> list[ShardSource]:
    """``RunConfig.shards`` as sources: a folder, ``DIR:WEIGHT`` text, a :class:`ShardSource`,
    or a sequence of those."""
    if isinstance(value, ShardSource):
        return [value]
    if isinstance(value, str | Path):
        return [ShardSource.parse(value)]
    sources = [s if isinstance(s, ShardSource) else ShardSource.parse(s) for s in value]
    if not sources:
        raise ValueError("--shards: give at least one shard folder")
    return sources


def load_sources(shards: Any) -> tuple[list[ShardSource], list[DatasetIndex]]:
    """The sources of ``shards`` (see :func:`parse_sources`) and their loaded indexes;
    :class:`SourceMismatchError` when they cannot be mixed."""
    sources = parse_sources(shards)
    indexes = [load_index(s.path) for s in sources]
    check_compatible([s.path for s in sources], [index.params for index in indexes])
    return sources, indexes


def _parts(path: Location | str) -> tuple[str, ...]:
    """A folder's path parts, the root first (a URL's: its ``scheme://``, bucket, prefixes)."""
    where = location(path)
    if isinstance(where, ObjectPath):
        return (f"{where.protocol}://", *where.path.split("/"))
    return where.resolve().parts


def source_names(paths: Sequence[Location]) -> list[str]:
    """Each folder's basename; folders with equal basenames get as many parent folders as
    tell them apart (``a/shards``), and a number when even the full paths are equal."""
    parts = [_parts(p) for p in paths]
    names = []
    for i, mine in enumerate(parts):
        depth = 1
        while depth < len(mine) and any(
            j != i and other[-depth:] == mine[-depth:] and other != mine
            for j, other in enumerate(parts)
        ):
            depth += 1
        names.append("/".join(mine[-depth:]))
    counts = Counter(names)
    seen: Counter[str] = Counter()
    for i, name in enumerate(names):
        if counts[name] > 1:
            seen[name] += 1
            names[i] = f"{name}#{seen[name]}"
    return names


def check_compatible(folders: Sequence[Location], params: Sequence[dict[str, Any]]) -> None:
    """Raise :class:`SourceMismatchError` (one line) when two folders' builds differ in a
    :data:`COST_FIELDS` parameter."""
    for folder, other in zip(folders[1:], params[1:], strict=True):
        for field, option in COST_FIELDS:
            first, here = params[0].get(field), other.get(field)
            if first == here:
                continue
            values = f"{first} vs {here}"
            if field == "max_slice_nums":
                values += f", from --max-res {params[0].get('max_res')} vs {other.get('max_res')}"
            raise SourceMismatchError(
                f"cannot mix --shards {folders[0]} and {folder}: they were built with "
                f"different {field} ({values}); rebuild one with the other's {option}"
            )


class ChannelGroup(str):
    """A loss-group label that is a channel (a plain ``str`` label is a source's name)."""

    __slots__ = ()


def sample_group(source: str, channel: str | None = None) -> str:
    """A sample's loss-group label: its channel (a :class:`ChannelGroup`) when it has one,
    else its source's name."""
    return ChannelGroup(channel) if channel else source


def split_group_losses(by_group: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """Per-group losses as ``metrics.jsonl`` keys them: ``loss_by_source`` for the groups that
    are folder names (samples without a channel), ``loss_by_channel`` for the channels; a key
    with no group is left out (a run without channels has ``loss_by_source`` alone)."""
    out: dict[str, dict[str, float]] = {}
    for group, loss in by_group.items():
        key = "loss_by_channel" if isinstance(group, ChannelGroup) else "loss_by_source"
        out.setdefault(key, {})[str(group)] = loss
    return out


def concat_indexes(parts: Sequence[PlanIndex], names: Sequence[str]) -> PlanIndex:
    """One plan index over several sources: ids ``NAME/KEY`` (the bare keys for one source),
    shard positions offset so every source's shards follow the previous ones'."""
    if len(parts) == 1:
        return parts[0]
    offsets = np.cumsum([0] + [p.num_shards for p in parts])
    return PlanIndex(
        keys=np.concatenate(
            [np.char.add(f"{n}/", p.keys.astype(str)) for p, n in zip(parts, names, strict=True)]
        ),
        shard_ids=np.concatenate([p.shard_ids + o for p, o in zip(parts, offsets, strict=False)]),
        num_shards=int(offsets[-1]),
        tokens=np.concatenate([p.tokens for p in parts]),
        patches=np.concatenate([p.patches for p in parts]),
        slices=np.concatenate([p.slices for p in parts]),
        max_patches_per_slice=np.concatenate([p.max_patches_per_slice for p in parts]),
    )


def epoch_share(n: int, weight: float) -> tuple[int, int]:
    """``(full copies, extra samples)`` a source of ``n`` samples gives one epoch:
    ``copies * n + extra == round(weight * n)`` (half up), ``0 <= extra < n``."""
    total = math.floor(weight * n + 0.5)
    copies = total // n if n else 0
    return copies, total - copies * n


@dataclass(frozen=True)
class SampleLocator:
    """Where a sample id lives: its shard file, its key in its folder, its source."""

    shard_paths: tuple[Location, ...]
    names: tuple[str, ...]
    rows: dict[str, int]
    shard_ids: np.ndarray
    keys: np.ndarray
    sources: np.ndarray
    channels: np.ndarray | None = None
    """Per row its channel (``""``: none); None when no sample has one."""
    shard_stamps: tuple[tuple[int, str], ...] = ()
    """Per shard (parallel to :attr:`shard_paths`) its ``(num_bytes, sha256)`` from the
    index: the key of its local copy (:mod:`mvtrain.data.shard_cache`); empty: unknown."""
    shard_ranges: tuple[SampleRanges | None, ...] = ()
    """Per shard its samples' byte ranges from the index (None, or empty: unknown, the
    loader walks the tar's headers); see :mod:`mvtrain.data.shard_access`."""

    @classmethod
    def of_index(cls, index: DatasetIndex, name: str = "") -> SampleLocator:
        """The locator of one folder (ids are its keys)."""
        keys = index.keys
        return cls(
            tuple(index.shard_paths()),
            (name or index.out.name,),
            {str(k): i for i, k in enumerate(keys.tolist())},
            np.asarray(index.shard_ids, dtype=np.int64),
            keys,
            np.zeros(len(keys), dtype=np.int64),
            index.channels,
            shard_stamps(index.shards),
            tuple(s.sample_ranges for s in index.shards),
        )

    def channel_of(self, uid: str) -> str | None:
        """The channel of sample id ``uid``, None when it has none."""
        if self.channels is None:
            return None
        row = self.rows.get(uid)
        if row is None:
            raise KeyError(f"sample {uid} is in no --shards folder of this run")
        return str(self.channels[row]) or None

    def group_of(self, uid: str) -> str:
        """The loss-group label of sample id ``uid`` (:func:`sample_group`)."""
        return sample_group(self.source_of(uid), self.channel_of(uid))

    def locate(self, uid: str) -> tuple[int, str, str]:
        """``(shard position, key in its folder, source name)`` of sample id ``uid``."""
        row = self.rows.get(uid)
        if row is None:
            raise KeyError(f"sample {uid} is in no --shards folder of this run")
        return int(self.shard_ids[row]), str(self.keys[row]), self.names[int(self.sources[row])]

    def source_of(self, uid: str) -> str:
        return self.locate(uid)[2]


@dataclass(frozen=True)
class SourceMix:
    """The run's sources, their weights and their combined plan index."""

    sources: tuple[ShardSource, ...]
    names: tuple[str, ...]
    index: PlanIndex
    """Every source's samples once, ids as in the module doc, shards numbered globally."""
    source_of: np.ndarray
    """Per row of :attr:`index`: the position of its source."""
    locator: SampleLocator

    @property
    def weights(self) -> tuple[float, ...]:
        return tuple(s.weight for s in self.sources)

    @property
    def groups(self) -> tuple[str, ...]:
        """The loss-group labels a sample of this run can carry: the name of every source
        with a sample without a channel (or with no sample), in source order, then every
        channel (:class:`ChannelGroup`), sorted; a channel spelled like a source's name is
        that source's group."""
        channels = self.locator.channels
        if channels is None:
            return self.names
        groups: list[str] = []
        for s, name in enumerate(self.names):
            mine = channels[self.source_of == s]
            if len(mine) == 0 or (mine == "").any():
                groups.append(name)
        for channel in sorted(str(c) for c in np.unique(channels) if c):
            if channel not in groups:
                groups.append(ChannelGroup(channel))
        return tuple(groups)

    @classmethod
    def build(
        cls,
        sources: Sequence[ShardSource],
        indexes: Sequence[DatasetIndex],
        plan_indexes: Sequence[PlanIndex],
    ) -> SourceMix:
        """The mix of ``sources``; ``plan_indexes[i]`` is ``indexes[i]`` with exact lengths.
        Refuses folders that cannot be mixed and weights that give a source no sample."""
        check_compatible([s.path for s in sources], [ix.params for ix in indexes])
        return cls.of_plan_indexes(
            sources,
            plan_indexes,
            [p for ix in indexes for p in ix.shard_paths()],
            [ix.channels for ix in indexes],
            shard_stamps([s for ix in indexes for s in ix.shards]),
            [s.sample_ranges for ix in indexes for s in ix.shards],
        )

    @classmethod
    def of_plan_indexes(
        cls,
        sources: Sequence[ShardSource],
        plan_indexes: Sequence[PlanIndex],
        shard_paths: Sequence[Location] = (),
        channels: Sequence[np.ndarray | None] = (),
        stamps: Sequence[tuple[int, str]] = (),
        ranges: Sequence[SampleRanges | None] = (),
    ) -> SourceMix:
        """The mix of ``sources`` planned from ``plan_indexes`` (keys: each folder's own);
        ``shard_paths``: every folder's shard files in turn (what the loader opens);
        ``channels``: each folder's per-sample channels (``DatasetIndex.channels``; none
        given: no channel); ``stamps``: each shard's ``(num_bytes, sha256)``, in the order
        of ``shard_paths`` (:attr:`SampleLocator.shard_stamps`); ``ranges``: each shard's
        sample byte ranges, likewise (:attr:`SampleLocator.shard_ranges`)."""
        names = source_names([s.path for s in sources])
        for source, part in zip(sources, plan_indexes, strict=True):
            if len(part) and sum(epoch_share(len(part), source.weight)) == 0:
                raise ValueError(
                    f"--shards {source}: weight {source.weight:g} of its {len(part)} samples "
                    "rounds to none per epoch: raise the weight"
                )
        index = concat_indexes(plan_indexes, names)
        source_of = np.concatenate(
            [np.full(len(p), i, dtype=np.int64) for i, p in enumerate(plan_indexes)]
        )
        locator = SampleLocator(
            tuple(shard_paths),
            tuple(names),
            {str(k): i for i, k in enumerate(index.keys.tolist())},
            index.shard_ids,
            np.concatenate([p.keys.astype(str) for p in plan_indexes]),
            source_of,
            _concat_channels(channels, [len(p) for p in plan_indexes]),
            tuple(stamps),
            tuple(ranges),
        )
        return cls(tuple(sources), tuple(names), index, source_of, locator)

    def epoch_rows(self, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """``(rows of index, copy number)`` of every sample ``epoch`` trains, source by
        source: the full copies, then the drawn extra samples (in dataset order)."""
        rows: list[np.ndarray] = []
        copies: list[np.ndarray] = []
        for s, source in enumerate(self.sources):
            mine = np.flatnonzero(self.source_of == s)
            full, extra = epoch_share(len(mine), source.weight)
            for c in range(full):
                rows.append(mine)
                copies.append(np.full(len(mine), c, dtype=np.int64))
            if extra:
                rng = np.random.default_rng(np.random.SeedSequence([seed, epoch, _MIX, s]))
                rows.append(mine[np.sort(rng.choice(len(mine), size=extra, replace=False))])
                copies.append(np.full(extra, full, dtype=np.int64))
        if not rows:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return np.concatenate(rows), np.concatenate(copies)

    def epoch_index(self, seed: int, epoch: int) -> PlanIndex:
        """The plan index of ``epoch``: :attr:`index` itself when every weight is 1, else its
        rows of :meth:`epoch_rows` in virtual shards (one per copy of a real shard)."""
        if all(w == 1 for w in self.weights):
            return self.index
        rows, copies = self.epoch_rows(seed, epoch)
        ix = self.index
        virtual = copies * max(ix.num_shards, 1) + ix.shard_ids[rows]
        order = np.lexsort((rows, virtual))  # virtual shard, then dataset order within it
        rows, virtual = rows[order], virtual[order]
        _, shard_ids = np.unique(virtual, return_inverse=True)
        return PlanIndex(
            keys=ix.keys[rows],
            shard_ids=shard_ids.astype(np.int64),
            num_shards=int(shard_ids.max()) + 1 if len(rows) else 0,
            tokens=ix.tokens[rows],
            patches=ix.patches[rows],
            slices=ix.slices[rows],
            max_patches_per_slice=ix.max_patches_per_slice[rows],
        )

    def plan_counts(self, plans: Sequence[Any]) -> dict[str, dict[str, int]]:
        """Per source: samples and real tokens the rank ``plans`` train, samples skipped."""
        out = {n: {"samples": 0, "tokens": 0, "skipped": 0} for n in self.names}
        for plan in plans:
            for batch in plan.batches:
                if batch.is_filler:
                    continue
                for cost in batch.samples:
                    counts = out[self.locator.source_of(cost.key)]
                    counts["samples"] += 1
                    counts["tokens"] += cost.tokens
            for o in plan.oversize:
                out[self.locator.source_of(o.sample.key)]["skipped"] += 1
        return out

    def describe(self) -> list[dict[str, Any]]:
        """What ``run.json`` records per source: name, folder, weight, samples in the folder
        and per epoch (``round(weight * samples)``), and the samples of each channel in the
        folder (``"channels"``, only when some sample has one)."""
        out = []
        for s, (name, source) in enumerate(zip(self.names, self.sources, strict=True)):
            n = int((self.source_of == s).sum())
            copies, extra = epoch_share(n, source.weight)
            record: dict[str, Any] = {
                "name": name,
                "path": str(source.path),
                "weight": source.weight,
                "samples": n,
                "samples_per_epoch": copies * n + extra,
            }
            if self.locator.channels is not None:
                counts = Counter(str(c) for c in self.locator.channels[self.source_of == s])
                named = {c: counts[c] for c in sorted(counts) if c}
                if named:
                    record["channels"] = named
            out.append(record)
        return out


def shard_stamps(shards: Sequence[Any]) -> tuple[tuple[int, str], ...]:
    """``(num_bytes, sha256)`` of each of the index's ``shards``
    (:class:`mvshards.index.ShardInfo`)."""
    return tuple((int(s.num_bytes), str(s.sha256)) for s in shards)


def _concat_channels(
    channels: Sequence[np.ndarray | None], sizes: Sequence[int]
) -> np.ndarray | None:
    """Every folder's per-sample channels in turn (``""``: none); None when none has one."""
    if not any(c is not None for c in channels):
        return None
    parts = [
        np.full(n, "", dtype=str) if c is None else np.asarray(c, dtype=str)
        for c, n in zip(list(channels) + [None] * (len(sizes) - len(channels)), sizes, strict=True)
    ]
    for part, n in zip(parts, sizes, strict=True):
        if len(part) != n:
            raise ValueError(f"{len(part)} channels for a folder of {n} samples")
    return np.concatenate(parts)
