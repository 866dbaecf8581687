"""The loader bench's baseline: the per-step work of the official MiniCPM-V fine-tuning
dataset class (``finetune/dataset.py`` ``SupervisedDataset.__getitem__`` + ``slice_image``),
timed stage by stage. See ``bench_loader.py`` for what it is compared with and how.

Per sample, on every step: PIL open and decode the original (optionally
``ImageOps.exif_transpose``), convert to RGB, compute the slice layout (``mvshards.layout``,
equal to the official ``slice_image`` arithmetic), bicubic resize to the source and refine
sizes, PIL crop of the slices, ``ToTensor`` + ``Normalize(0.5, 0.5)``, ``reshape_by_patch``;
tokenization and collation are the trainer's own (equal work on both paths).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from mvshards.layout import compute_layout
from mvshards.profiles import get_profile
from mvshards.schema import SampleMeta
from mvtrain.batching.schedule import RankPlan
from mvtrain.data.sample import LoadedSample
from mvtrain.data.tokenize import tokenize_sample

PROFILE_NAME = "minicpmv-4.6"
PATCH = 14


# ----------------------------------------------------------------------------- timing


class StageTimer:
    """CPU seconds per named stage (``time.process_time``)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.process_time()
        try:
            yield
        finally:
            self.seconds[stage] += time.process_time() - start


# ----------------------------------------------------------------------------- baseline


def _to_tensor_normalised(image: Image.Image) -> torch.Tensor:
    """torchvision ``ToTensor()`` then ``Normalize((0.5,) * 3, (0.5,) * 3)``, as the
    official fine-tuning transform (torchvision itself is not a project dependency)."""
    arr = torch.from_numpy(np.array(image, copy=True))
    chw = arr.view(image.height, image.width, 3).permute(2, 0, 1).contiguous()
    x = chw.to(torch.float32).div(255)
    half = torch.tensor([0.5, 0.5, 0.5]).view(3, 1, 1)
    return x.sub_(half).div_(half)


def _reshape_by_patch(chw: torch.Tensor, patch: int = PATCH) -> torch.Tensor:
    """``[3, H, W]`` -> ``[3, patch, H*W/patch]`` with ``unfold``, as the official code."""
    cols = F.unfold(chw, (patch, patch), stride=(patch, patch))
    cols = cols.reshape(chw.size(0), patch, patch, -1)
    return cols.permute(0, 1, 3, 2).reshape(chw.size(0), patch, -1)


@dataclass
class OfficialPath:
    """The official dataset class's per-step work over the planned micro-batches."""

    plan: RankPlan
    metas: dict[str, SampleMeta]
    """Each sample's record (conversation, image paths), as the official class holds the
    raw JSON in memory; the stored layouts are not used."""
    root: Path
    tokenizer: Any
    adapter: Any
    max_slice_nums: int

    def sample(self, meta: SampleMeta, exif: bool, timer: StageTimer) -> LoadedSample:
        """One sample the way the official dataset class builds it on every step."""
        profile = get_profile(PROFILE_NAME)
        patches: list[torch.Tensor] = []
        grids: list[tuple[int, int]] = []
        entries = []
        for entry in meta.images:
            with timer("open+decode"):
                image = Image.open(self.root / entry.path)
                image.load()
            if exif:
                with timer("exif transpose"):
                    image = ImageOps.exif_transpose(image)
            with timer("open+decode"):
                image = image.convert("RGB")
            with timer("layout"):
                layout = compute_layout(image.width, image.height, profile, self.max_slice_nums)
            with timer("resize"):
                views = [image.resize(layout.source_size, Image.Resampling.BICUBIC)]
                refine = None
                if layout.refine_size is not None:
                    refine = image.resize(layout.refine_size, Image.Resampling.BICUBIC)
            with timer("slice"):
                if refine is not None:
                    views += [refine.crop(box) for box in layout.slice_boxes()]
            with timer("normalise+patchify"):
                for view in views:
                    patches.append(_reshape_by_patch(_to_tensor_normalised(view)))
                    grids.append((view.height // PATCH, view.width // PATCH))
            entries.append(replace(entry, layout=layout))
        with timer("tokenize"):
            own = replace(meta, images=entries)
            tokenized = tokenize_sample(own, self.tokenizer, PROFILE_NAME)
        return LoadedSample(own, tokenized, patches, grids)

    def batches(
        self, exif: bool, timer: StageTimer, keep: bool = False
    ) -> tuple[int, list[tuple[list[LoadedSample], dict[str, Any]]]]:
        """Every micro-batch; ``(samples, [(samples, collated inputs)] when keep)``."""
        count, kept = 0, []
        for planned in self.plan.batches:
            samples = [self.sample(self.metas[c.key], exif, timer) for c in planned.samples]
            with timer("collate"):
                inputs = self.adapter.collate(samples)
            count += len(samples)
            if keep:
                kept.append((samples, inputs))
        return count, kept
