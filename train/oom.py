"""What an out-of-memory error changes in a window: budget proposals, split micro-batches,
fillers that keep ranks in step, and the restart file when nothing can be undone.

The policy (which error is recovered how) is in :mod:`mvtrain.step`; these are its parts.
"""

from __future__ import annotations

import dataclasses
import gc
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mvtrain.budgets import Budgets
from mvtrain.data.loader import MicroBatch, make_micro_batch
from mvtrain.data.tokenize import IGNORE_INDEX, TokenizedSample
from mvtrain.model.adapters import Adapter

RESTART_FILE = "restart.json"
"""In the output folder: the budgets to restart with after a backward OOM under DeepSpeed."""


class BackwardOomError(RuntimeError):
    """An OOM in backward that the engine cannot undo (DeepSpeed ZeRO)."""


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def split_to_fit(batch: MicroBatch, budgets: Budgets, adapter: Adapter) -> list[MicroBatch]:
    """``batch`` as micro-batches within ``budgets`` (halving, order kept). A single sample
    that alone breaks a budget stays as it is: it is tried, and skipped if it fails."""
    if budgets.fits(batch.padded_tokens, batch.padded_patches) or len(batch.samples) == 1:
        return [batch]
    half = len(batch.samples) // 2
    pieces = []
    for part in (batch.samples[:half], batch.samples[half:]):
        piece = make_micro_batch(batch.position, part, batch.weight, adapter)
        pieces.extend(split_to_fit(piece, budgets, adapter))
    return pieces


def filler_batch(like: MicroBatch, adapter: Adapter) -> MicroBatch:
    """A two-token, text-only, zero-weight micro-batch: the cheapest round that still runs
    the same graph (the adapter's dummy image included) and so the same collectives."""
    pad = adapter.pad_token_id
    sample = like.samples[0]
    tiny = dataclasses.replace(
        sample,
        tokenized=TokenizedSample(sample.meta.key, [pad, pad], [IGNORE_INDEX] * 2, []),
        pixel_values=[],
        tgt_sizes=[],
    )
    return make_micro_batch(like.position, [tiny], 0.0, adapter)


@dataclass
class WindowProgress:
    """What one rank did in the rounds of a window since its last agreement."""

    done: list[tuple[MicroBatch, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]] = field(
        default_factory=list
    )
    """Planned micro-batches (zero-weight ones too, not fillers) with their loss sums and
    per-row loss sums and label counts (all detached,
    :class:`~mvtrain.model.adapters.TokenLoss`)."""
    failed: list[MicroBatch] = field(default_factory=list)
    """Micro-batches whose forward ran out of memory."""
    backward_batch: MicroBatch | None = None
    """The micro-batch whose backward ran out of memory (plain torch engine: replay)."""
    proposal: tuple[int, int] | None = None

    def propose(self, batch: MicroBatch, budgets: Budgets, factor: float) -> None:
        tokens = int(min(budgets.tokens, batch.padded_tokens) * factor)
        patches = budgets.patches
        if batch.padded_patches:
            patches = int(min(budgets.patches, batch.padded_patches) * factor)
        if self.proposal is not None:
            tokens, patches = min(tokens, self.proposal[0]), min(patches, self.proposal[1])
        self.proposal = (max(1, tokens), max(1, patches))


def write_restart(
    path: Path | None, rank: int, batch: MicroBatch, budgets: Budgets, where: str
) -> str:
    """Write the budgets to restart with to ``path`` (unless None); the one-line message."""
    options = f"--resume --token-budget {budgets.tokens} --patch-budget {budgets.patches}"
    if path is not None:
        record = {
            "reason": f"out of memory in {where}",
            "rank": rank,
            "keys": batch.keys,
            "padded_tokens": batch.padded_tokens,
            "padded_patches": batch.padded_patches,
            "token_budget": budgets.tokens,
            "patch_budget": budgets.patches,
            "resume_options": options,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1) + "\n")
    return (
        f"rank {rank}: out of memory in {where} on a micro-batch of {batch.padded_tokens} "
        f"padded tokens / {batch.padded_patches} patches under DeepSpeed ZeRO, whose gradients "
        f"are already being reduced across ranks; restart with {options}"
    )


def raise_oom(grad: torch.Tensor) -> torch.Tensor:
    """A tensor hook raising a real ``torch.OutOfMemoryError`` inside backward (faults)."""
    raise torch.OutOfMemoryError("injected backward OOM")
