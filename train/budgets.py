"""The per-micro-batch limits: one frozen value type for the planner, the step and checkpoints.

``tokens`` bounds the padded LLM tokens of a micro-batch (``batch size x longest sample``),
``patches`` its padded vision patches (the family's cost rule says how a batch pads). The
epoch is planned with the run's budgets; an out-of-memory error replaces them with lower
ones (never mutates them); a checkpoint stores the budgets in force as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Budgets:
    """Per-micro-batch limits on padded LLM tokens and padded vision patches."""

    tokens: int
    patches: int

    def __post_init__(self) -> None:
        if self.tokens < 1 or self.patches < 1:
            raise ValueError(
                f"budgets must be positive, got tokens={self.tokens} patches={self.patches}: "
                "pass --token-budget and --patch-budget >= 1"
            )

    def fits(self, padded_tokens: int, padded_patches: int) -> bool:
        """Whether a micro-batch of these padded costs is within both budgets."""
        return padded_tokens <= self.tokens and padded_patches <= self.patches

    def covers(self, other: Budgets) -> bool:
        """Whether everything within ``other`` is within these budgets too."""
        return self.tokens >= other.tokens and self.patches >= other.patches

    def as_dict(self) -> dict[str, int]:
        return {"tokens": self.tokens, "patches": self.patches}

    @classmethod
    def of(cls, value: Budgets | dict[str, Any]) -> Budgets:
        """``value`` itself, or the budgets of a ``{"tokens": T, "patches": P}`` dict."""
        if isinstance(value, Budgets):
            return value
        return cls(int(value["tokens"]), int(value["patches"]))
