"""One optimizer step over a window of planned micro-batches, surviving out-of-memory errors.

Loss: every micro-batch contributes ``sum of token losses / L`` where ``L`` is the number of
label tokens in the whole window on all ranks (counted on the host, summed over ranks on the
device), so the step's gradient is that of the global per-token mean however the budgets cut
the batches.

One host sync per step: nothing in the forward/backward rounds reads a device value on the
host. At the end of the window one all-gather brings every rank's outcome (out of memory or
not, budget proposals, loss sum, label and token counts) to every rank, which is read once.

Out of memory (``torch.OutOfMemoryError``, raised on the host by the allocator):

* Forward: the rank notes the micro-batch and its budget proposal (``factor`` x its cost)
  and goes on. Under DeepSpeed with several ranks every backward holds gradient
  collectives, so ranks must run the same rounds with graphs of the same shape: the rank
  runs a tiny zero-weight filler micro-batch in place of the failed one. At the window's
  end all ranks lower their budgets to the smallest proposal, the failed micro-batches are
  split into pieces that fit and run in extra rounds (ranks with nothing left run fillers),
  then the window is agreed again. A forward OOM costs nothing already accumulated.
* Backward, plain torch engine: gradients stay local until ``step``, so the rank zeroes its
  partial gradients and replays its whole window with the lowered budgets.
* Backward, DeepSpeed ZeRO: gradients are already being reduced into partitions and the
  other ranks wait inside that reduce, so no agreement is possible. The rank writes the
  lowered budgets to ``restart_file`` and raises :class:`BackwardOomError` with the restart
  command; the CLI prints it and exits at once, and the launcher ends the other ranks.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from mvtrain.adapters import Adapter
from mvtrain.distributed import DistInfo
from mvtrain.loader import MicroBatch, make_micro_batch, to_device
from mvtrain.metrics import BatchLog
from mvtrain.tokenize import IGNORE_INDEX, TokenizedSample

log = logging.getLogger("mvtrain.step")

OOM_FAULT_ENV = "MVTRAIN_FAULT"
"""Test-only fault injection: ``oom-forward:T`` / ``oom-backward:T`` raise a real
``torch.OutOfMemoryError`` in forward / inside backward of any micro-batch whose padded
token count exceeds ``T``; ``oom-forward-rank1:T`` / ``oom-backward-rank1:T`` on rank 1 only."""

RESTART_FILE = "restart.json"
"""In the output folder: the budgets to restart with after a backward OOM under DeepSpeed."""

MAX_ATTEMPTS = 16
"""Agreements per window before the step gives up (budgets shrink by ``factor`` each time)."""


class BackwardOomError(RuntimeError):
    """An OOM in backward that the engine cannot undo (DeepSpeed ZeRO)."""


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
    """Sum of token losses over the window on all ranks / the global label count."""
    tokens: int = 0
    """Real tokens trained in the window on all ranks."""
    events: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class FaultPlan:
    """The parsed ``MVTRAIN_FAULT`` OOM injection (read once, not in the hot path)."""

    phase: str | None = None
    threshold: int = 0
    rank: int | None = None

    @classmethod
    def from_env(cls) -> FaultPlan:
        action, _, threshold = os.environ.get(OOM_FAULT_ENV, "").partition(":")
        for phase in ("forward", "backward"):
            if action in (f"oom-{phase}", f"oom-{phase}-rank1"):
                rank = 1 if action.endswith("-rank1") else None
                return cls(phase, int(threshold), rank)
        return cls()

    def hits(self, batch: MicroBatch, phase: str, rank: int) -> bool:
        if self.phase != phase or (self.rank is not None and rank != self.rank):
            return False
        return batch.weight > 0 and batch.padded_tokens > self.threshold


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
class _Pass:
    """What one rank did in the rounds of a window since its last agreement."""

    done: list[tuple[MicroBatch, torch.Tensor]] = field(default_factory=list)
    """Planned micro-batches (zero-weight ones too, not fillers) with their loss sums."""
    failed: list[MicroBatch] = field(default_factory=list)
    """Micro-batches whose forward ran out of memory."""
    backward_batch: MicroBatch | None = None
    """The micro-batch whose backward ran out of memory (plain torch engine: replay)."""
    proposal: tuple[int, int] | None = None

    def propose(self, batch: MicroBatch, budgets: LiveBudgets, factor: float) -> None:
        tokens = int(min(budgets.tokens, batch.padded_tokens) * factor)
        patches = budgets.patches
        if batch.padded_patches:
            patches = int(min(budgets.patches, batch.padded_patches) * factor)
        if self.proposal is not None:
            tokens, patches = min(tokens, self.proposal[0]), min(patches, self.proposal[1])
        self.proposal = (max(1, tokens), max(1, patches))


@dataclass
class _Outcome:
    """Every rank's outcome of the window so far, as read from the one all-gather."""

    any_oom: bool
    tokens: int
    """The smallest token budget any rank proposed (the current one when none did)."""
    patches: int
    loss_sum: float
    label_count: int
    real_tokens: int


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
    restart_file: Path | None = None
    """Where a backward OOM under DeepSpeed writes the budgets to restart with."""
    faults: FaultPlan = field(default_factory=FaultPlan.from_env)
    planned_budgets: LiveBudgets | None = None
    """The budgets the epoch was planned with: while the live ones are not lower, no
    micro-batch is split and ranks need not exchange queue lengths."""

    @property
    def lockstep(self) -> bool:
        """Whether every backward holds collectives (DeepSpeed ZeRO on several ranks), so
        all ranks must run the same rounds."""
        return self._deepspeed and self.info.world_size > 1

    def _within_plan(self, budgets: LiveBudgets) -> bool:
        """Whether ``budgets`` still hold every planned micro-batch, so no rank splits one
        and every rank's queue is its window."""
        planned = self.planned_budgets
        if planned is None:
            return False
        return budgets.tokens >= planned.tokens and budgets.patches >= planned.patches

    @property
    def _deepspeed(self) -> bool:
        return getattr(self.engine, "name", "") == "deepspeed"

    def run(self, window: list[MicroBatch], budgets: LiveBudgets, step: int) -> WindowResult:
        """Forward/backward every micro-batch of the window, then one optimizer step.

        ``budgets`` is updated in place when an OOM lowers them.
        """
        labels_here = sum(b.num_label_tokens for b in window)
        denominator = self._global_sum(labels_here)
        events: list[dict[str, Any]] = []
        queue = [p for b in window for p in split_to_fit(b, budgets, self.adapter)]
        state = _Pass()
        rounds = self._rounds(queue, agreed=self._within_plan(budgets))
        self._run_rounds(queue, rounds, window[0], budgets, denominator, state)
        for _attempt in range(MAX_ATTEMPTS):
            outcome = self._agree(state, budgets, labels_here, window)
            if not outcome.any_oom:
                self.engine.step()
                self._log_batches(step, state)
                loss = outcome.loss_sum / max(outcome.label_count, 1)
                return WindowResult(loss=loss, tokens=outcome.real_tokens, events=events)
            _free_memory()
            old = budgets.as_dict()
            budgets.tokens, budgets.patches = outcome.tokens, outcome.patches
            queue = self._pending(state, window, budgets, step, old, events)
            rounds = self._rounds(queue, agreed=not self.lockstep)
            self._run_rounds(queue, rounds, window[0], budgets, denominator, state)
        raise RuntimeError(
            f"step {step}: out of memory {MAX_ATTEMPTS} times in a row; budgets now {budgets}"
        )

    def _global_sum(self, value: int) -> torch.Tensor:
        """``value`` summed over ranks, left on the device (never read on the host here)."""
        total = torch.tensor(float(value), dtype=torch.float32, device=self.device)
        if self.info.world_size > 1:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total.clamp(min=1.0)

    def _rounds(self, queue: list[MicroBatch], agreed: bool) -> int:
        """Rounds this window runs: the queue's length, or (in lockstep, when ranks may
        differ) the longest queue of any rank -- an extra exchange, only after an OOM."""
        if agreed or not self.lockstep:
            return len(queue)
        return int(max(row[0] for row in _gather_rows([float(len(queue))], self.device)))

    def _run_rounds(
        self,
        queue: list[MicroBatch],
        rounds: int,
        like: MicroBatch,
        budgets: LiveBudgets,
        denominator: torch.Tensor,
        state: _Pass,
    ) -> None:
        for i in range(rounds):
            if state.backward_batch is not None:
                return  # the window is replayed after the agreement
            batch = queue[i] if i < len(queue) else None
            self._run_one(batch, like, budgets, denominator, state)

    def _run_one(
        self,
        batch: MicroBatch | None,
        like: MicroBatch,
        budgets: LiveBudgets,
        denominator: torch.Tensor,
        state: _Pass,
    ) -> None:
        """One round: forward and backward of ``batch`` (None: a filler when in lockstep)."""
        rank = self.info.rank
        loss_sum = None
        if batch is not None:
            try:
                if self.faults.hits(batch, "forward", rank):
                    raise torch.OutOfMemoryError(f"injected OOM at {batch.padded_tokens} tokens")
                loss_sum = self._forward(batch)
            except torch.OutOfMemoryError:
                loss_sum = None
                state.failed.append(batch)
                state.propose(batch, budgets, self.factor)
                _free_memory()
        filler = loss_sum is None
        if filler:
            if not self.lockstep:
                return
            batch = filler_batch(batch or like, self.adapter)
            try:
                loss_sum = self._forward(batch)
            except torch.OutOfMemoryError:
                self._stop_for_restart(batch, budgets, state, "forward of a filler")
        if batch.weight == 0:
            loss_sum = loss_sum * 0.0
        try:
            if self.faults.hits(batch, "backward", rank):
                loss_sum.register_hook(_raise_oom)
            self.engine.backward(loss_sum / denominator)
        except torch.OutOfMemoryError:
            self._backward_oom(batch, budgets, state)
            return
        if not filler:
            state.done.append((batch, loss_sum.detach()))

    def _forward(self, batch: MicroBatch) -> torch.Tensor:
        inputs = to_device(batch.inputs, self.device)
        loss_sum, _count = self.adapter.forward_loss(self.engine, inputs)
        return loss_sum

    def _backward_oom(self, batch: MicroBatch, budgets: LiveBudgets, state: _Pass) -> None:
        if not self._deepspeed:
            state.propose(batch, budgets, self.factor)
            state.backward_batch = batch
            _free_memory()
            return
        self._stop_for_restart(batch, budgets, state, "backward")

    def _stop_for_restart(
        self, batch: MicroBatch, budgets: LiveBudgets, state: _Pass, where: str
    ) -> NoReturn:
        """Write the lowered budgets to ``restart_file`` and raise :class:`BackwardOomError`:
        the other ranks are inside a collective this rank cannot join any more."""
        if batch.weight > 0:
            state.propose(batch, budgets, self.factor)
        tokens, patches = state.proposal or (budgets.tokens, budgets.patches)
        message = (
            f"rank {self.info.rank}: out of memory in {where} on a micro-batch of "
            f"{batch.padded_tokens} padded tokens / {batch.padded_patches} patches under "
            "DeepSpeed ZeRO, whose gradients are already being reduced across ranks; "
            f"restart with --resume --token-budget {tokens} --patch-budget {patches}"
        )
        if self.restart_file is not None:
            self.restart_file.parent.mkdir(parents=True, exist_ok=True)
            self.restart_file.write_text(
                json.dumps(
                    {
                        "reason": f"out of memory in {where}",
                        "rank": self.info.rank,
                        "keys": batch.keys,
                        "padded_tokens": batch.padded_tokens,
                        "padded_patches": batch.padded_patches,
                        "token_budget": tokens,
                        "patch_budget": patches,
                        "resume_options": f"--resume --token-budget {tokens} "
                        f"--patch-budget {patches}",
                    },
                    indent=1,
                )
                + "\n"
            )
        raise BackwardOomError(message)

    def _agree(
        self, state: _Pass, budgets: LiveBudgets, labels_here: int, window: list[MicroBatch]
    ) -> _Outcome:
        """The one host sync of the window: every rank's outcome, gathered and read."""
        oom = bool(state.failed) or state.backward_batch is not None
        tokens, patches = state.proposal or (budgets.tokens, budgets.patches)
        if state.done:
            loss = torch.stack([loss for _, loss in state.done]).sum().to(torch.float64)
        else:
            loss = torch.zeros((), dtype=torch.float64, device=self.device)
        real = sum(b.real_tokens for b in window if b.weight)
        host = [float(oom), float(tokens), float(patches), float(labels_here), float(real)]
        rows = _gather_rows([*host, loss], self.device)
        return _Outcome(
            any_oom=any(row[0] for row in rows),
            tokens=int(min(row[1] for row in rows)),
            patches=int(min(row[2] for row in rows)),
            label_count=int(sum(row[3] for row in rows)),
            real_tokens=int(sum(row[4] for row in rows)),
            loss_sum=float(sum(row[5] for row in rows)),
        )

    def _pending(
        self,
        state: _Pass,
        window: list[MicroBatch],
        budgets: LiveBudgets,
        step: int,
        old: dict[str, int],
        events: list[dict[str, Any]],
    ) -> list[MicroBatch]:
        """What this rank still has to run now that the budgets were lowered to ``budgets``."""
        pending: list[MicroBatch] = []
        if state.backward_batch is not None:  # plain torch engine: drop partial gradients
            self._event(
                events, step, "backward", "replay window", state.backward_batch, old, budgets
            )
            self.engine.zero_grad()
            state.done.clear()
            pending = [p for b in window for p in split_to_fit(b, budgets, self.adapter)]
        else:
            for batch in state.failed:
                pieces = split_to_fit(batch, budgets, self.adapter)
                skip = len(pieces) == 1  # one sample that does not fit even alone
                action = "skipped sample" if skip else "split and lowered budgets"
                self._event(events, step, "forward", action, batch, old, budgets)
                pending.extend([] if skip else pieces)
        state.failed, state.backward_batch, state.proposal = [], None, None
        return pending

    def _event(
        self,
        events: list[dict[str, Any]],
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

    def _log_batches(self, step: int, state: _Pass) -> None:
        if not self.batch_log.enabled or not state.done:
            return
        values = torch.stack([loss for _, loss in state.done]).tolist()
        for micro, ((batch, _), value) in enumerate(zip(state.done, values, strict=True)):
            count = batch.num_label_tokens
            self.batch_log.write(
                self.info.rank, step, micro, batch, value / count if count else None
            )


def _gather_rows(values: list[float | torch.Tensor], device: torch.device) -> list[list[float]]:
    """Every rank's ``values`` (numbers or 0-d tensors), read on the host once."""
    row = torch.stack(
        [
            v.detach().to(device=device, dtype=torch.float64)
            if isinstance(v, torch.Tensor)
            else torch.tensor(v, dtype=torch.float64, device=device)
            for v in values
        ]
    )
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [row.tolist()]
    rows = [torch.empty_like(row) for _ in range(dist.get_world_size())]
    dist.all_gather(rows, row)
    return torch.stack(rows).tolist()


def _raise_oom(grad: torch.Tensor) -> torch.Tensor:
    raise torch.OutOfMemoryError("injected backward OOM")
