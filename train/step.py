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


def _lowered(
    budgets: LiveBudgets, failed: MicroBatch | None, factor: float, device: torch.device
) -> LiveBudgets:
    """The budgets every rank agrees on after an OOM: the smallest proposal of any rank."""
    tokens, patches = budgets.tokens, budgets.patches
    if failed is not None:
        tokens = int(min(tokens, failed.padded_tokens) * factor)
        if failed.padded_patches:
            patches = int(min(patches, failed.padded_patches) * factor)
    return LiveBudgets(
        tokens=max(1, int(all_reduce_min(tokens, device))),
        patches=max(1, int(all_reduce_min(patches, device))),
    )


def run_window(
    window: list[MicroBatch],
    engine: Any,
    adapter: Adapter,
    info: DistInfo,
    device: torch.device,
    budgets: LiveBudgets,
    step: int,
    batch_log: BatchLog,
    factor: float = 0.75,
    on_event: Callable[[dict[str, Any]], None] = lambda event: None,
) -> WindowResult:
    """Forward/backward every micro-batch of the window, then one optimizer step.

    ``budgets`` is updated in place when an OOM lowers them.
    """
    label_tokens = all_reduce_sum(sum(b.num_label_tokens for b in window), device)
    denominator = max(label_tokens, 1.0)
    events: list[dict[str, Any]] = []
    for _attempt in range(16):
        queue = [piece for batch in window for piece in split_to_fit(batch, budgets, adapter)]
        loss = _run_queue(
            queue,
            engine,
            adapter,
            info,
            device,
            budgets,
            step,
            batch_log,
            denominator,
            factor,
            events,
            on_event,
        )
        if loss is not None:
            engine.step()
            return WindowResult(loss=all_reduce_sum(loss, device) / denominator, events=events)
        engine.zero_grad()
    raise RuntimeError(f"step {step}: out of memory 16 times in a row; budgets now {budgets}")


def _event(events: list, on_event: Callable, **fields: Any) -> None:
    events.append(fields)
    on_event(fields)
    log.warning("out of memory: %s", fields)


def _run_queue(
    queue: list[MicroBatch],
    engine: Any,
    adapter: Adapter,
    info: DistInfo,
    device: torch.device,
    budgets: LiveBudgets,
    step: int,
    batch_log: BatchLog,
    denominator: float,
    factor: float,
    events: list,
    on_event: Callable,
) -> float | None:
    """Run the queue in rounds all ranks share; None when a backward OOM needs a replay."""
    loss_total = 0.0
    i = 0
    micro = 0
    while all_reduce_max(1 if i < len(queue) else 0, device):
        active = i < len(queue)
        batch = queue[i] if active else dataclasses.replace(queue[-1], weight=0.0)
        loss_sum = None
        try:
            if _fault(batch, "forward", info.rank):
                raise torch.OutOfMemoryError(
                    f"injected forward OOM at {batch.padded_tokens} tokens"
                )
            loss_sum, count = adapter.forward_loss(engine, to_device(batch.inputs, device))
            oom = False
        except torch.OutOfMemoryError:
            oom, loss_sum = True, None
            _free_memory()
        if all_reduce_max(1 if oom else 0, device):
            loss_sum = None
            _free_memory()
            old = budgets.as_dict()
            new = _lowered(budgets, batch if oom else None, factor, device)
            budgets.tokens, budgets.patches = new.tokens, new.patches
            if oom and active:
                pieces = split_to_fit(batch, budgets, adapter)
                if len(pieces) == 1:  # one sample that does not fit even alone: skip it
                    _event(
                        events,
                        on_event,
                        step=step,
                        rank=info.rank,
                        phase="forward",
                        action="skipped sample",
                        keys=batch.keys,
                        budgets=budgets.as_dict(),
                    )
                    queue[i : i + 1] = []
                    continue
                queue[i : i + 1] = pieces
            if oom:
                _event(
                    events,
                    on_event,
                    step=step,
                    rank=info.rank,
                    phase="forward",
                    action="split and lowered budgets",
                    keys=batch.keys,
                    padded_tokens=batch.padded_tokens,
                    padded_patches=batch.padded_patches,
                    old_budgets=old,
                    budgets=budgets.as_dict(),
                )
            continue
        assert loss_sum is not None
        if batch.weight == 0:
            loss_sum = loss_sum * 0.0
        try:
            if _fault(batch, "backward", info.rank):
                loss_sum.register_hook(_raise_oom)
            engine.backward(loss_sum / denominator)
            boom = False
        except torch.OutOfMemoryError:
            boom = True
            _free_memory()
        if all_reduce_max(1 if boom else 0, device):
            old = budgets.as_dict()
            new = _lowered(budgets, batch if boom else None, factor, device)
            budgets.tokens, budgets.patches = new.tokens, new.patches
            if boom:
                _event(
                    events,
                    on_event,
                    step=step,
                    rank=info.rank,
                    phase="backward",
                    action="replay window",
                    keys=batch.keys,
                    old_budgets=old,
                    budgets=budgets.as_dict(),
                )
            if getattr(engine, "name", "") == "deepspeed":
                raise BackwardOomError(
                    f"out of memory in backward at step {step} under DeepSpeed ZeRO-2, whose "
                    "gradients are already reduced into partitions; restart with --resume "
                    f"--token-budget {budgets.tokens} --patch-budget {budgets.patches}"
                )
            return None
        value = float(loss_sum.detach())
        if active:
            loss_total += value
            batch_log.write(
                info.rank, step, micro, batch, value / count if count and batch.weight else None
            )
            i += 1
        micro += 1
    return loss_total


def _raise_oom(grad: torch.Tensor) -> torch.Tensor:
    raise torch.OutOfMemoryError("injected backward OOM")
