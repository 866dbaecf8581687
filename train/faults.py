"""Fault injection for tests, read once from ``MVTRAIN_FAULT`` (never in the hot path).

* ``oom-forward:T`` / ``oom-backward:T`` -- a real ``torch.OutOfMemoryError`` in forward /
  inside backward of every weighted micro-batch whose padded token count exceeds ``T``;
  ``oom-forward-rank1:T`` / ``oom-backward-rank1:T`` on rank 1 only.
* ``kill-after-step:K`` -- every rank SIGKILLs itself right after optimizer step ``K``.
* ``slow-recount:S`` -- rank 0 sleeps ``S`` seconds after recounting its share of the
  lengths, before the all-gather of the counts the other ranks wait in.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

FAULT_ENV = "MVTRAIN_FAULT"


@dataclass(frozen=True)
class Faults:
    """The one fault ``MVTRAIN_FAULT`` asks for (none by default)."""

    oom_phase: str | None = None
    """``forward`` or ``backward``."""
    oom_threshold: int = 0
    oom_rank: int | None = None
    """Only this rank runs out of memory; None: every rank."""
    kill_after_step: int | None = None
    slow_recount_seconds: float = 0.0

    @classmethod
    def from_env(cls) -> Faults:
        action, _, value = os.environ.get(FAULT_ENV, "").partition(":")
        for phase in ("forward", "backward"):
            if action in (f"oom-{phase}", f"oom-{phase}-rank1"):
                rank = 1 if action.endswith("-rank1") else None
                return cls(oom_phase=phase, oom_threshold=int(value), oom_rank=rank)
        if action == "kill-after-step":
            return cls(kill_after_step=int(value))
        if action == "slow-recount":
            return cls(slow_recount_seconds=float(value))
        return cls()

    def oom_hits(self, phase: str, rank: int, weight: float, padded_tokens: int) -> bool:
        """Whether this micro-batch's ``phase`` runs out of memory on ``rank``."""
        if self.oom_phase != phase or (self.oom_rank is not None and rank != self.oom_rank):
            return False
        return weight > 0 and padded_tokens > self.oom_threshold

    def after_step(self, step: int) -> None:
        if self.kill_after_step == step:
            os.kill(os.getpid(), signal.SIGKILL)

    def after_recount(self) -> None:
        if self.slow_recount_seconds:
            time.sleep(self.slow_recount_seconds)
