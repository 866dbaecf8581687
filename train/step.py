"""One optimizer step over a window of planned micro-batches, surviving out-of-memory errors.

Loss: every micro-batch contributes ``sum of token losses / L`` where ``L`` is the number of
label tokens in the whole window on all ranks, so the step's gradient is that of the global
per-token mean however the budgets cut the batches.

Out of memory (``torch.OutOfMemoryError``): after every forward and every backward all ranks
agree (an all-reduce of a flag) on whether any rank ran out of memory, so a rank that fails
alone never leaves the others waiting in a collective. Then every rank lowers its budgets to
the same values (the smallest proposal: ``factor`` x the cost of the micro-batch that failed),
the failed micro-batch is split into pieces that fit, and the window goes on. Ranks run the
same number of forward/backward rounds: a rank with nothing left runs a zero-weight copy of
a micro-batch. A forward OOM costs nothing already accumulated. A backward OOM leaves partial
gradients: the plain torch engine zeroes them and replays the window; under DeepSpeed ZeRO-2
gradients are reduced into partitions during backward, so the run stops with the budgets to
restart from (and, being agreed collectively, without hanging the other ranks).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from mvtrain.adapters import Adapter
from mvtrain.distributed import DistInfo, all_reduce_max, all_reduce_min, all_reduce_sum
from mvtrain.loader import MicroBatch, make_micro_batch, to_device
from mvtrain.metrics import BatchLog

log = logging.getLogger("mvtrain.step")

OOM_FAULT_ENV = "MVTRAIN_FAULT"
"""Test-only fault injection: ``oom-forward:T`` / ``oom-backward:T`` raise a real
``torch.OutOfMemoryError`` in forward / at the start of backward of any micro-batch whose
padded token count exceeds ``T``; ``oom-forward-rank1:T`` does it on rank 1 only."""


class BackwardOomError(RuntimeError):
    """An OOM in backward that the engine cannot undo (DeepSpeed ZeRO-2)."""


@dataclass
class LiveBudgets:
    """The budgets in force now: the planned ones until an OOM lowers them."""

    tokens: int
    patches: int

    def fits(self, batch: MicroBatch) -> bool:
        return batch.padded_tokens <= self.tokens and batch.padded_patches <= self.patches

    def as_dict(self) -> dict[str, int]:
        return {"tokens": self.tokens, "patches": self.patches}


@dataclass
class WindowResult:
    loss: float
    events: list[dict[str, Any]] = field(default_factory=list)


def _fault(batch: MicroBatch, phase: str, rank: int) -> bool:
    fault = os.environ.get(OOM_FAULT_ENV, "")
    if ":" not in fault:
        return False
    action, _, threshold = fault.partition(":")
    if action == f"oom-{phase}-rank1" and rank != 1:
        return False
    if action not in (f"oom-{phase}", f"oom-{phase}-rank1"):
        return False
    return batch.padded_tokens > int(threshold)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def split_to_fit(batch: MicroBatch, budgets: LiveBudgets, adapter: Adapter) -> list[MicroBatch]:
    """``batch`` as micro-batches within ``budgets`` (halving, order kept). A single sample
    that alone breaks a budget stays as it is: it is tried, and skipped if it fails."""
    if budgets.fits(batch) or len(batch.samples) == 1:
        return [batch]
    half = len(batch.samples) // 2
    pieces = []
    for part in (batch.samples[:half], batch.samples[half:]):
        piece = make_micro_batch(batch.position, part, batch.weight, adapter)
        pieces.extend(split_to_fit(piece, budgets, adapter))
    return pieces


@dataclass
class WindowRunner:
    """Runs windows for one rank: the engine, the adapter and where to report."""

    engine: Any
    adapter: Adapter
    info: DistInfo
    device: torch.device
    batch_log: BatchLog
    factor: float = 0.75
    on_event: Callable[[dict[str, Any]], None] = lambda event: None

    def run(self, window: list[MicroBatch], budgets: LiveBudgets, step: int) -> WindowResult:
        """Forward/backward every micro-batch of the window, then one optimizer step.

        ``budgets`` is updated in place when an OOM lowers them.
        """
        label_tokens = all_reduce_sum(sum(b.num_label_tokens for b in window), self.device)
        denominator = max(label_tokens, 1.0)
        events: list[dict[str, Any]] = []
        for _attempt in range(16):
            queue = [p for b in window for p in split_to_fit(b, budgets, self.adapter)]
            loss = self._run_queue(queue, budgets, step, denominator, events)
            if loss is not None:
                self.engine.step()
                total = all_reduce_sum(loss, self.device) / denominator
                return WindowResult(loss=total, events=events)
            self.engine.zero_grad()
        raise RuntimeError(f"step {step}: out of memory 16 times in a row; budgets now {budgets}")

    def _agree_on_oom(
        self, failed_here: bool, batch: MicroBatch, budgets: LiveBudgets
    ) -> dict[str, int] | None:
        """All ranks learn whether any of them ran out of memory; if so, every rank lowers
        ``budgets`` to the smallest proposal and gets the budgets before the change."""
        if not all_reduce_max(1 if failed_here else 0, self.device):
            return None
        _free_memory()
        old = budgets.as_dict()
        tokens, patches = budgets.tokens, budgets.patches
        if failed_here:
            tokens = int(min(tokens, batch.padded_tokens) * self.factor)
            if batch.padded_patches:
                patches = int(min(patches, batch.padded_patches) * self.factor)
        budgets.tokens = max(1, int(all_reduce_min(tokens, self.device)))
        budgets.patches = max(1, int(all_reduce_min(patches, self.device)))
        return old

    def _event(
        self,
        events: list,
        step: int,
        phase: str,
        action: str,
        batch: MicroBatch,
        old: dict[str, int],
        budgets: LiveBudgets,
    ) -> None:
        event = {
            "step": step,
            "rank": self.info.rank,
            "phase": phase,
            "action": action,
            "keys": batch.keys,
            "padded_tokens": batch.padded_tokens,
            "padded_patches": batch.padded_patches,
            "old_budgets": old,
            "budgets": budgets.as_dict(),
        }
        events.append(event)
        self.on_event(event)
        log.warning("out of memory: %s", event)

    def _run_queue(
        self,
        queue: list[MicroBatch],
        budgets: LiveBudgets,
        step: int,
        denominator: float,
        events: list,
    ) -> float | None:
        """Run the queue in rounds all ranks share; None when a backward OOM needs a replay."""
        rank, device = self.info.rank, self.device
        loss_total, i, micro = 0.0, 0, 0
        while all_reduce_max(1 if i < len(queue) else 0, device):
            active = i < len(queue)
            batch = queue[i] if active else dataclasses.replace(queue[-1], weight=0.0)
            loss_sum, count, oom = None, 0, False
            try:
                if _fault(batch, "forward", rank):
                    raise torch.OutOfMemoryError(f"injected OOM at {batch.padded_tokens} tokens")
                inputs = to_device(batch.inputs, device)
                loss_sum, count = self.adapter.forward_loss(self.engine, inputs)
            except torch.OutOfMemoryError:
                oom = True
            old = self._agree_on_oom(oom, batch, budgets)
            if old is not None:
                loss_sum = None
                if oom and active:
                    pieces = split_to_fit(batch, budgets, self.adapter)
                    skip = len(pieces) == 1  # one sample that does not fit even alone
                    queue[i : i + 1] = [] if skip else pieces
                    action = "skipped sample" if skip else "split and lowered budgets"
                    self._event(events, step, "forward", action, batch, old, budgets)
                continue
            assert loss_sum is not None
            if batch.weight == 0:
                loss_sum = loss_sum * 0.0
            boom = False
            try:
                if _fault(batch, "backward", rank):
                    loss_sum.register_hook(_raise_oom)
                self.engine.backward(loss_sum / denominator)
            except torch.OutOfMemoryError:
                boom = True
            old = self._agree_on_oom(boom, batch, budgets)
            if old is not None:
                if boom:
                    self._event(events, step, "backward", "replay window", batch, old, budgets)
                if getattr(self.engine, "name", "") == "deepspeed":
                    raise BackwardOomError(
                        f"out of memory in backward at step {step} under DeepSpeed ZeRO-2, "
                        "whose gradients are already reduced into partitions; restart with "
                        f"--resume --token-budget {budgets.tokens} --patch-budget {budgets.patches}"
                    )
                return None
            value = float(loss_sum.detach())
            if active:
                loss_total += value
                per_token = value / count if count and batch.weight else None
                self.batch_log.write(rank, step, micro, batch, per_token)
                i += 1
            micro += 1
        return loss_total


def _raise_oom(grad: torch.Tensor) -> torch.Tensor:
    raise torch.OutOfMemoryError("injected backward OOM")
