"""The learning-rate schedule of a run, fixed at its first start.

The schedule is linear warm-up from ``peak_lr / warmup_steps`` to ``peak_lr`` over
``warmup_steps`` optimizer steps, then cosine decay from ``peak_lr`` to 10% of it at
``total_steps`` (:func:`mvtrain.engine.lr_lambda`). ``total_steps`` is the number of planned
optimizer steps (``--max-steps``, or the steps of ``--epochs`` epochs). It is saved in
``run.json`` and in every checkpoint; a resume that would change it is refused unless
``--schedule-change`` is given, and then the new schedule applies from the resumed step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

SHAPE = "linear warm-up to peak_lr, then cosine to 10% of peak_lr at total_steps"
CHANGE_EVENT = "lr_schedule_change"


@dataclass(frozen=True)
class LrSchedule:
    peak_lr: float
    warmup_steps: int
    total_steps: int
    shape: str = SHAPE

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of(cls, record: dict[str, Any]) -> LrSchedule:
        return cls(
            peak_lr=float(record["peak_lr"]),
            warmup_steps=int(record["warmup_steps"]),
            total_steps=int(record["total_steps"]),
            shape=str(record.get("shape", SHAPE)),
        )

    def describe(self) -> str:
        return (
            f"--lr {self.peak_lr:g}, --warmup-steps {self.warmup_steps}, "
            f"{self.total_steps} total steps"
        )


def schedule_change(
    saved: LrSchedule | None, new: LrSchedule, step: int, allowed: bool
) -> dict[str, Any] | None:
    """The event recording a change from ``saved`` (the checkpoint's schedule; None for a
    checkpoint that predates saving it) to ``new`` at ``step``, or None when nothing changes.
    Raises ValueError for a change that is not ``allowed``."""
    if saved is None or saved == new:
        return None
    if not allowed:
        raise ValueError(
            f"--resume: the learning-rate schedule was {saved.describe()} and would become "
            f"{new.describe()} (from --lr, --warmup-steps, --max-steps or --epochs): pass the "
            f"first run's values, or --schedule-change to use the new schedule from step {step}"
        )
    return {"event": CHANGE_EVENT, "step": step, "from": saved.as_dict(), "to": new.as_dict()}


def apply_schedule(scheduler: Any, schedule: LrSchedule) -> None:
    """Make a restored ``LambdaLR`` (built with ``schedule``'s factors, but holding the
    checkpoint's peak rate and current rates) follow ``schedule`` from its current step."""
    step = scheduler.last_epoch
    scheduler.base_lrs = [schedule.peak_lr for _ in scheduler.optimizer.param_groups]
    for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = schedule.peak_lr
        group["lr"] = schedule.peak_lr * factor(step)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
