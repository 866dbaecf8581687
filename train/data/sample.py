"""One sample ready to collate: its metadata, its tokens and labels, its uint8 pixels."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from mvshards.schema import SampleMeta
from mvtrain.data.pixels import sample_pixels
from mvtrain.data.tokenize import TokenizedSample, tokenize_sample


@dataclass
class LoadedSample:
    """One sample ready to collate: its metadata, tokens and pixels."""

    meta: SampleMeta
    tokenized: TokenizedSample
    pixel_values: list[torch.Tensor]
    """Per (sub)image, in vision order: uint8 ``[H, W, 3]`` as decoded (a slice is a view of
    its refine image); the device normalises and patchifies them
    (:mod:`mvtrain.model.pixel_input`)."""
    tgt_sizes: list[tuple[int, int]]
    """Per (sub)image: patch grid ``(H/14, W/14)``."""
    uid: str = ""
    """The sample's id in the run (``NAME/KEY`` with several sources); empty: its key."""
    source: str = ""
    """Its loss-group label (:func:`mvtrain.batching.sources.sample_group`): its channel
    when it has one, else its source's name."""

    @property
    def id(self) -> str:
        """The sample's id in the run: :attr:`uid`, else its key."""
        return self.uid or self.meta.key


def load_sample(
    meta: SampleMeta,
    members: Mapping[str, bytes],
    tokenizer: Any,
    profile_name: str,
    *,
    uid: str = "",
    source: str = "",
) -> LoadedSample:
    """Tokenize ``meta`` and decode its images from ``members`` (``{ext: bytes}``); ``uid``
    and ``source`` are its id in the run and its loss group."""
    tokenized = tokenize_sample(meta, tokenizer, profile_name)
    pixel_values, tgt_sizes = sample_pixels(meta, members)
    return LoadedSample(meta, tokenized, pixel_values, tgt_sizes, uid=uid, source=source)
