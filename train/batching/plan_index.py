"""The index a schedule is planned from: per sample its key, shard, exact tokens, patches and
(for a cost model that pads sub-images) slice costs, as numpy arrays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from mvshards.cost import CostModel, SampleCost
from mvshards.index import DatasetIndex
from mvshards.schema import SampleMeta

SliceTable = Mapping[str, tuple[int, int]]
"""``key -> (slices, max_patches_per_slice)``; needed for image samples under a cost model that
pads (sub)images (the 2.6 family's) when the index has no per-image table."""


def slice_costs(meta: SampleMeta) -> tuple[int, int]:
    """``(slices, max_patches_per_slice)`` of a sample (its :class:`SampleCost`): every source
    and slice of every image, and the largest one's patches."""
    cost = SampleCost.from_meta(meta)
    return cost.slices, cost.max_patches_per_slice


@dataclass(frozen=True)
class PlanIndex:
    """What planning reads: per-sample arrays in dataset order (index rows + slice table)."""

    keys: np.ndarray
    shard_ids: np.ndarray
    num_shards: int
    tokens: np.ndarray
    patches: np.ndarray
    slices: np.ndarray
    """Sources + slices per sample (0 when unknown or text-only)."""
    max_patches_per_slice: np.ndarray
    """Patches of each sample's largest (sub)image (0 when unknown or text-only)."""

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def from_arrays(
        cls,
        keys: Sequence[str] | np.ndarray,
        shard_ids: Sequence[int] | np.ndarray,
        tokens: Sequence[int] | np.ndarray,
        patches: Sequence[int] | np.ndarray,
        num_shards: int | None = None,
        slice_table: SliceTable | None = None,
        *,
        slice_arrays: tuple[np.ndarray, np.ndarray] | None = None,
    ) -> PlanIndex:
        """Build from parallel arrays; the slices come from ``slice_table`` (by key) or
        ``slice_arrays`` (``(slices, max_patches_per_slice)`` in row order), else are 0."""
        keys_arr = np.asarray(keys, dtype=str)
        ids = np.asarray(shard_ids, dtype=np.int64)
        n = len(keys_arr)
        if not (len(ids) == len(tokens) == len(patches) == n):
            raise ValueError("keys, shard_ids, tokens and patches must have the same length")
        if num_shards is None:
            num_shards = int(ids.max()) + 1 if n else 0
        if n and (ids.min() < 0 or ids.max() >= num_shards):
            raise ValueError(
                f"shard ids must lie in [0, {num_shards}), got {ids.min()}..{ids.max()}"
            )
        if slice_table is not None and slice_arrays is not None:
            raise ValueError("pass slice_table or slice_arrays, not both")
        slices = np.zeros(n, dtype=np.int64)
        mpps = np.zeros(n, dtype=np.int64)
        if slice_arrays is not None:
            slices[:], mpps[:] = slice_arrays
        elif slice_table is not None:
            for i, key in enumerate(keys_arr.tolist()):
                entry = slice_table.get(key)
                if entry is not None:
                    slices[i], mpps[i] = entry
        return cls(
            keys=keys_arr,
            shard_ids=ids,
            num_shards=num_shards,
            tokens=np.asarray(tokens, dtype=np.int64),
            patches=np.asarray(patches, dtype=np.int64),
            slices=slices,
            max_patches_per_slice=mpps,
        )

    @classmethod
    def from_index(
        cls,
        index: DatasetIndex,
        slice_table: SliceTable | None = None,
        *,
        tokens: np.ndarray | None = None,
    ) -> PlanIndex:
        """From a loaded dataset index (``mvshards.index.load_index``); ``tokens`` replaces
        its token counts (an exact recount). The slices come from ``slice_table`` when given,
        else from the index's per-image table (0 for an index without one)."""
        return cls.from_arrays(
            index.keys,
            index.shard_ids,
            index.num_tokens if tokens is None else tokens,
            index.num_patches,
            num_shards=len(index.shards),
            slice_table=slice_table,
            slice_arrays=index.slice_costs() if slice_table is None else None,
        )

    def check(self, cost_model: CostModel) -> None:
        """Raise ValueError when a cost model that pads (sub)images lacks (or contradicts) an
        image sample's slices."""
        if not cost_model.pads_subimages:
            return
        images = self.patches > 0
        missing = np.flatnonzero(images & (self.slices <= 0))
        if len(missing):
            raise ValueError(
                f"sample {self.keys[missing[0]]} (and {len(missing) - 1} more) has patches but no "
                f"slice entry: the {cost_model.name}-family cost model needs the index's "
                "per-image table (rebuild with this mvprep) or a slice table key -> (slices, "
                "max_patches_per_slice), built with "
                "mvtrain.batching.schedule.slice_costs(SampleMeta)"
            )
        bad = np.flatnonzero(self.slices * self.max_patches_per_slice < self.patches)
        if len(bad):
            raise ValueError(
                f"sample {self.keys[bad[0]]}: slices * max_patches_per_slice < its "
                f"{self.patches[bad[0]]} patches: the slice table does not belong to this index; "
                "rebuild it from the samples' JSON"
            )

    def sample(self, i: int) -> SampleCost:
        return SampleCost(
            str(self.keys[i]),
            int(self.tokens[i]),
            int(self.patches[i]),
            int(self.slices[i]),
            int(self.max_patches_per_slice[i]),
        )
