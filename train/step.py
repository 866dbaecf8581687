"""One optimizer step over a window of planned micro-batches, surviving out-of-memory errors.

Loss: every micro-batch contributes ``sum of token losses / L`` where ``L`` is the number of
label tokens in the whole window on all ranks (counted on the host, summed over ranks on the
device), so the step's gradient is that of the global per-token mean however the budgets cut
the batches.

One host sync per step: nothing in the forward/backward rounds reads a device value on the
host. At the end of the window one all-gather brings every rank's outcome (out of memory or
not, budget proposals, loss sum, label and token counts, and per loss group -- the samples'
sources -- the loss sum and label count) to every rank, which is read once.

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

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from mvtrain.budgets import Budgets
from mvtrain.data.loader import MicroBatch
from mvtrain.distributed import DistInfo, all_gather_rows
from mvtrain.faults import Faults
from mvtrain.metrics import BatchLog
from mvtrain.model.adapters import Adapter, TokenLoss
from mvtrain.model.pixel_input import model_inputs
from mvtrain.oom import (
    BackwardOomError,
    WindowProgress,
    filler_batch,
    free_memory,
    raise_oom,
    split_to_fit,
    write_restart,
)

log = logging.getLogger("mvtrain.step")

MAX_ATTEMPTS = 16
"""Agreements per window before the step gives up (budgets shrink by ``factor`` each time)."""


@dataclass
class WindowResult:
    loss: float
    """Sum of token losses over the window on all ranks / the global label count."""
    budgets: Budgets
    """The budgets in force after the window (lowered by an out-of-memory error)."""
    tokens: int = 0
    """Real tokens trained in the window on all ranks."""
    events: list[dict[str, Any]] = field(default_factory=list)
    group_loss: dict[str, float] = field(default_factory=dict)
    """Per loss group with label tokens in the window (all ranks): its token losses summed."""
    group_labels: dict[str, int] = field(default_factory=dict)
    """Per loss group with label tokens in the window (all ranks): its label tokens."""

    @property
    def loss_by_group(self) -> dict[str, float]:
        """Each group's token-weighted mean loss over the window on all ranks."""
        return {g: self.group_loss[g] / n for g, n in self.group_labels.items() if n}


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
    group_loss: list[float] = field(default_factory=list)
    group_labels: list[float] = field(default_factory=list)


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
    faults: Faults = field(default_factory=Faults.from_env)
    planned_budgets: Budgets | None = None
    """The budgets the epoch was planned with: while the live ones are not lower, no
    micro-batch is split and ranks need not exchange queue lengths."""
    groups: tuple[str, ...] = ()
    """The loss groups (every rank's the same, in the same order) a sample's
    ``MicroBatch.sources`` label may name; empty: no per-group loss."""

    @property
    def lockstep(self) -> bool:
        """Whether every backward holds collectives (DeepSpeed ZeRO on several ranks), so
        all ranks must run the same rounds."""
        return self._deepspeed and self.info.world_size > 1

    def _within_plan(self, budgets: Budgets) -> bool:
        """Whether ``budgets`` still hold every planned micro-batch, so no rank splits one
        and every rank's queue is its window."""
        planned = self.planned_budgets
        if planned is None:
            return False
        return budgets.covers(planned)

    @property
    def _deepspeed(self) -> bool:
        return getattr(self.engine, "name", "") == "deepspeed"

    def run(self, window: list[MicroBatch], budgets: Budgets, step: int) -> WindowResult:
        """Forward/backward every micro-batch of the window, then one optimizer step.

        The result carries the budgets in force afterwards: ``budgets``, or the lower ones
        every rank agreed on after an out-of-memory error.
        """
        labels_here = sum(b.num_label_tokens for b in window)
        denominator = self._global_sum(labels_here)
        events: list[dict[str, Any]] = []
        queue = [p for b in window for p in split_to_fit(b, budgets, self.adapter)]
        state = WindowProgress()
        rounds = self._rounds(queue, agreed=self._within_plan(budgets))
        self._run_rounds(queue, rounds, window[0], budgets, denominator, state)
        for _attempt in range(MAX_ATTEMPTS):
            outcome = self._agree(state, budgets, labels_here, window)
            if not outcome.any_oom:
                self.engine.step()
                self._log_batches(step, state)
                loss = outcome.loss_sum / max(outcome.label_count, 1)
                return WindowResult(
                    loss,
                    budgets,
                    outcome.real_tokens,
                    events,
                    group_loss=dict(zip(self.groups, outcome.group_loss, strict=True)),
                    group_labels={
                        g: int(n) for g, n in zip(self.groups, outcome.group_labels, strict=True)
                    },
                )
            free_memory()
            old = budgets.as_dict()
            budgets = Budgets(outcome.tokens, outcome.patches)
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
        return int(max(row[0] for row in all_gather_rows([float(len(queue))], self.device)))

    def _run_rounds(
        self,
        queue: list[MicroBatch],
        rounds: int,
        like: MicroBatch,
        budgets: Budgets,
        denominator: torch.Tensor,
        state: WindowProgress,
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
        budgets: Budgets,
        denominator: torch.Tensor,
        state: WindowProgress,
    ) -> None:
        """One round: forward and backward of ``batch`` (None: a filler when in lockstep)."""
        rank = self.info.rank
        loss_sum = None
        rows: TokenLoss | None = None
        if batch is not None:
            try:
                if self.faults.oom_hits("forward", rank, batch.weight, batch.padded_tokens):
                    raise torch.OutOfMemoryError(f"injected OOM at {batch.padded_tokens} tokens")
                rows = self._forward(batch)
                loss_sum = rows.loss
            except torch.OutOfMemoryError:
                loss_sum = None
                state.failed.append(batch)
                state.propose(batch, budgets, self.factor)
                free_memory()
        filler = loss_sum is None
        if filler:
            if not self.lockstep:
                return
            batch = filler_batch(batch or like, self.adapter)
            try:
                loss_sum = self._forward(batch).loss
            except torch.OutOfMemoryError:
                self._stop_for_restart(batch, budgets, state, "forward of a filler")
        if batch.weight == 0:
            loss_sum = loss_sum * 0.0
        try:
            if self.faults.oom_hits("backward", rank, batch.weight, batch.padded_tokens):
                loss_sum.register_hook(raise_oom)
            self.engine.backward(loss_sum / denominator)
        except torch.OutOfMemoryError:
            self._backward_oom(batch, budgets, state)
            return
        if not filler:
            assert rows is not None
            state.done.append((batch, loss_sum.detach(), (rows.row_loss, rows.row_count)))

    def _forward(self, batch: MicroBatch) -> TokenLoss:
        """The batch's loss sum and label count, with its per-row sums (a weighted batch's
        label count, known on the host, spares the chunked loss a device sync). The pixels
        travel uint8 and become the model's float input on the device."""
        inputs = model_inputs(batch.host_inputs, self.device)
        count = batch.num_label_tokens if batch.weight else None
        return self.adapter.forward_loss(self.engine, inputs, count)

    def _group_sums(self, state: WindowProgress) -> tuple[torch.Tensor, torch.Tensor]:
        """Per loss group: the window's token losses summed and its label tokens, on the
        device (weighted micro-batches only; a zero-weight one counts for nothing)."""
        size = len(self.groups)
        loss = torch.zeros(size, dtype=torch.float64, device=self.device)
        labels = torch.zeros(size, dtype=torch.float64, device=self.device)
        if not size:
            return loss, labels
        position = {g: i for i, g in enumerate(self.groups)}
        for batch, _, rows in state.done:
            if batch.weight == 0:
                continue
            unknown = [g for g in batch.sources if g not in position]
            if unknown or len(batch.sources) != len(batch.keys):
                raise ValueError(
                    f"micro-batch {batch.position}: sample group {unknown[:1] or '(missing)'} "
                    f"is not one of this run's loss groups {list(self.groups)}"
                )
            index = torch.tensor([position[g] for g in batch.sources], device=self.device)
            row_loss, row_count = rows
            loss.index_add_(0, index, row_loss.to(self.device, torch.float64))
            labels.index_add_(0, index, row_count.to(self.device, torch.float64))
        return loss, labels

    def _backward_oom(self, batch: MicroBatch, budgets: Budgets, state: WindowProgress) -> None:
        if not self._deepspeed:
            state.propose(batch, budgets, self.factor)
            state.backward_batch = batch
            free_memory()
            return
        self._stop_for_restart(batch, budgets, state, "backward")

    def _stop_for_restart(
        self, batch: MicroBatch, budgets: Budgets, state: WindowProgress, where: str
    ) -> NoReturn:
        """Write the lowered budgets to ``restart_file`` and raise :class:`BackwardOomError`:
        the other ranks are inside a collective this rank cannot join any more."""
        if batch.weight > 0:
            state.propose(batch, budgets, self.factor)
        tokens, patches = state.proposal or (budgets.tokens, budgets.patches)
        message = write_restart(
            self.restart_file, self.info.rank, batch, Budgets(tokens, patches), where
        )
        raise BackwardOomError(message)

    def _agree(
        self, state: WindowProgress, budgets: Budgets, labels_here: int, window: list[MicroBatch]
    ) -> _Outcome:
        """The one host sync of the window: every rank's outcome, gathered and read."""
        oom = bool(state.failed) or state.backward_batch is not None
        tokens, patches = state.proposal or (budgets.tokens, budgets.patches)
        if state.done:
            loss = torch.stack([loss for _, loss, _ in state.done]).sum().to(torch.float64)
        else:
            loss = torch.zeros((), dtype=torch.float64, device=self.device)
        real = sum(b.real_tokens for b in window if b.weight)
        host = [float(oom), float(tokens), float(patches), float(labels_here), float(real)]
        group_loss, group_labels = self._group_sums(state)
        rows = all_gather_rows(
            [*host, loss, *group_loss.unbind(), *group_labels.unbind()], self.device
        )
        size = len(self.groups)
        return _Outcome(
            any_oom=any(row[0] for row in rows),
            tokens=int(min(row[1] for row in rows)),
            patches=int(min(row[2] for row in rows)),
            label_count=int(sum(row[3] for row in rows)),
            real_tokens=int(sum(row[4] for row in rows)),
            loss_sum=float(sum(row[5] for row in rows)),
            group_loss=[sum(row[6 + g] for row in rows) for g in range(size)],
            group_labels=[sum(row[6 + size + g] for row in rows) for g in range(size)],
        )

    def _pending(
        self,
        state: WindowProgress,
        window: list[MicroBatch],
        budgets: Budgets,
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
        budgets: Budgets,
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

    def _log_batches(self, step: int, state: WindowProgress) -> None:
        if not self.batch_log.enabled or not state.done:
            return
        values = torch.stack([loss for _, loss, _ in state.done]).tolist()
        for micro, ((batch, _, _), value) in enumerate(zip(state.done, values, strict=True)):
            count = batch.num_label_tokens
            self.batch_log.write(
                self.info.rank, step, micro, batch, value / count if count else None
            )
