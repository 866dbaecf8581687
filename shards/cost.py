"""What a micro-batch costs padded: the one rule the planner, the stats and the collators use.

A sample costs LLM tokens and vision patches. A micro-batch costs what the model's batch
really holds once padded:

* tokens, every family: ``batch size x longest sample`` (text is right-padded to the longest);
* patches, packed (4.6 family, NaViT packing): the sum of every sample's patches, no padding;
* patches, padded (sub)images (2.6 family: the model pads every (sub)image of the batch to
  the longest): ``(sub)images of the batch x patches of the largest one``.

:class:`SampleCost` is what one sample brings (from its JSON, from an index row plus the
index's per-image table, or from the patch grids of a loaded sample); :class:`CostModel` is a
family's rule, each family (:mod:`mvshards.families`) names its own. :meth:`CostModel.padded`
and :meth:`CostModel.alone` cost a batch and a lone sample, both through
:meth:`CostModel.padded_totals`, which reads only running sums and maxima
(:class:`CostTotals`): the bucketer's O(1) budget check, and, fed numpy arrays, the
per-sample costs of a whole index at once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from mvshards.schema import SampleMeta


@dataclass(frozen=True)
class SampleCost:
    """What one sample contributes to a micro-batch.

    ``slices`` counts every (sub)image the vision tower sees (each image's source plus its
    slices) and ``max_patches_per_slice`` is the largest ``rows * cols`` among them; both are
    0 for a text-only sample, and only a rule that pads (sub)images reads them.
    """

    key: str
    tokens: int
    patches: int
    slices: int = 0
    max_patches_per_slice: int = 0

    @classmethod
    def from_grids(
        cls, key: str, tokens: int, grids: Iterable[tuple[int, int] | list[int]]
    ) -> SampleCost:
        """From the patch grids ``(rows, cols)`` of every (sub)image, in any order."""
        sizes = [int(r) * int(c) for r, c in grids]
        return cls(key, int(tokens), sum(sizes), len(sizes), max(sizes, default=0))

    @classmethod
    def from_meta(cls, meta: SampleMeta, tokens: int | None = None) -> SampleCost:
        """From a sample's JSON member (``SampleMeta.from_json``); ``tokens`` replaces its
        stored count (an exact recount)."""
        grids = [t for image in meta.images for t in image.layout.tgt_sizes]
        return cls.from_grids(meta.key, meta.num_tokens if tokens is None else tokens, grids)

    @classmethod
    def from_index_row(
        cls, row: Sequence[Any], slices: int = 0, max_patches_per_slice: int = 0
    ) -> SampleCost:
        """From an index row ``[key, num_tokens, num_patches, num_images]``; the row has no
        per-(sub)image sizes, so ``slices`` and ``max_patches_per_slice`` come from the
        index's per-image table (:meth:`mvshards.index.DatasetIndex.slice_costs`)."""
        return cls(str(row[0]), int(row[1]), int(row[2]), int(slices), int(max_patches_per_slice))


_new_tuple = tuple.__new__


class CostTotals(NamedTuple):
    """Running sums and maxima of a batch: everything a cost rule reads.

    Fields may also be numpy arrays (one batch per element) with the same arithmetic.
    """

    samples: Any = 0
    max_tokens: Any = 0
    patches: Any = 0
    slices: Any = 0
    max_patches_per_slice: Any = 0

    def plus(self, s: SampleCost) -> CostTotals:
        """These totals with ``s`` added to the batch (the bucketer's inner loop: written
        for speed, ``tuple.__new__`` and conditional maxima)."""
        n, max_tokens, patches, slices, max_pps = self
        tokens, pps = s.tokens, s.max_patches_per_slice
        return _new_tuple(
            CostTotals,
            (
                n + 1,
                max_tokens if max_tokens >= tokens else tokens,
                patches + s.patches,
                slices + s.slices,
                max_pps if max_pps >= pps else pps,
            ),
        )

    @classmethod
    def of(cls, batch: Iterable[SampleCost]) -> CostTotals:
        totals = cls()
        for s in batch:
            totals = totals.plus(s)
        return totals


@dataclass(frozen=True)
class CostModel:
    """How one model family pads a micro-batch (see the module doc)."""

    name: str
    """The family's name, as plans and stats print it (``mvshards.families``)."""
    pads_subimages: bool
    """True: every (sub)image is padded to the batch's largest, so the rule reads
    ``slices`` and ``max_patches_per_slice``; False: patches are packed without padding."""

    @classmethod
    def of(cls, value: CostModel | str) -> CostModel:
        """``value`` itself, or the cost model of the family named ``value``."""
        if isinstance(value, CostModel):
            return value
        from mvshards.families import get_family

        return get_family(value).cost

    @classmethod
    def for_profile(cls, profile_name: str) -> CostModel:
        """The cost model of a ``mvshards.profiles`` profile name (``minicpmv-2.6`` -> 2.6)."""
        from mvshards.profiles import get_profile

        return get_profile(profile_name).family.cost

    def padded_totals(self, totals: CostTotals) -> tuple[Any, Any]:
        """``(padded_tokens, padded_patches)`` of the batch these totals describe."""
        tokens = totals.samples * totals.max_tokens
        if self.pads_subimages:
            return tokens, totals.slices * totals.max_patches_per_slice
        return tokens, totals.patches

    def padded(self, batch: Iterable[SampleCost]) -> tuple[int, int]:
        """``(padded_tokens, padded_patches)`` of ``batch`` as the model pads it."""
        return self.padded_totals(CostTotals.of(batch))

    def alone(self, sample: SampleCost) -> tuple[int, int]:
        """``(padded_tokens, padded_patches)`` of a batch holding only ``sample``."""
        return self.padded_totals(CostTotals().plus(sample))

    @staticmethod
    def real(batch: Sequence[SampleCost]) -> tuple[int, int]:
        """``(real_tokens, real_patches)``: what ``batch`` holds without padding."""
        return sum(s.tokens for s in batch), sum(s.patches for s in batch)

    def check(self, sample: SampleCost) -> None:
        """Raise ValueError when ``sample`` lacks the per-(sub)image sizes this rule reads."""
        if self.pads_subimages and sample.slices * sample.max_patches_per_slice < sample.patches:
            raise ValueError(
                f"sample {sample.key}: {sample.patches} patches but {sample.slices} (sub)images "
                f"of at most {sample.max_patches_per_slice} patches: the {self.name}-family "
                "cost needs per-(sub)image sizes (a sample's JSON, a loaded sample, or an index "
                "row with the index's per-image table); an index row alone has none"
            )
