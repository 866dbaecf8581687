"""What each change would do: the remedies a plan evaluates besides the setup it was asked.

Each remedy is one change of the request -- the chunked loss (when the plan is for
``--no-chunked-loss``), LoRA, frozen vision, gradient checkpointing, two and four times the
GPUs, or shards built with a lower ``--max-res`` (about half the patches)
-- fitted like the request itself (:func:`~mvtrain.memory.setup_fit.fit_setup`): its static
memory per GPU, and its budgets or the bytes it would still need. A probe fit holds for its
own setup only, so the remedies that change the setup use the config-derived activation
model; more GPUs and fewer patches keep the probe fit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from mvtrain.memory.budgets import IndexStats
from mvtrain.memory.probe_fit import ProbeFitModel
from mvtrain.memory.setup_fit import PlanRequest, SetupFit, fit_setup

LOWER_MAX_RES = "mvprep build --max-res 896 (about half the patches)"
"""The change that rebuilds the shards with smaller images."""
CHUNKED_LOSS = "chunked loss (drop --no-chunked-loss)"
"""The change that computes the loss chunked from the hidden states."""


@dataclass(frozen=True)
class Remedy:
    """One change and its fit."""

    change: str
    """The option that makes it, e.g. ``--lora`` or ``--gpus 16``."""
    fit: SetupFit
    from_probe: bool
    """Whether its activations are the request's probe fit (else the model config's)."""

    def to_json(self) -> dict[str, Any]:
        """The ``advice`` row of ``mvtrain plan --json``."""
        budgets, shortfall = self.fit.budgets, self.fit.shortfall
        row: dict[str, Any] = {
            "change": self.change,
            "static_bytes_per_gpu": self.fit.static.total,
            "fits": budgets is not None,
            "activations": "probe fit" if self.from_probe else "model config",
        }
        if budgets is not None:
            row["token_budget"] = budgets.token_budget
            row["patch_budget"] = budgets.patch_budget
            row["predicted_peak_bytes"] = budgets.predicted_peak
        else:
            assert shortfall is not None
            row["needed_bytes"] = shortfall.needed
        return row


class _Change(NamedTuple):
    """A remedy before it is fitted."""

    change: str
    request: PlanRequest
    stats: IndexStats
    keeps_probe: bool
    """The setup is the request's: its probe fit still holds."""


def _changes(request: PlanRequest, stats: IndexStats) -> list[_Change]:
    """The remedies of ``request``, those already on left out."""
    changes: list[_Change] = []
    if not request.chunked_loss:
        changes.append(_Change(CHUNKED_LOSS, replace(request, chunked_loss=True), stats, False))
    if not request.lora:
        changes.append(_Change("--lora", replace(request, lora=True), stats, False))
    if not request.freeze_vision:
        changes.append(
            _Change("--freeze-vision", replace(request, freeze_vision=True), stats, False)
        )
    if not request.grad_ckpt:
        changes.append(_Change("--grad-ckpt", replace(request, grad_ckpt=True), stats, False))
    for gpus in (request.gpus * 2, request.gpus * 4):
        changes.append(_Change(f"--gpus {gpus}", replace(request, gpus=gpus), stats, True))
    lower = replace(
        stats,
        total_patches=stats.total_patches * 5 // 10,
        patches_p99=stats.patches_p99 * 5 // 10,
        patches_max=stats.patches_max * 5 // 10,
    )
    changes.append(_Change(LOWER_MAX_RES, request, lower, True))
    return changes


def remedies(
    request: PlanRequest, config: Any, stats: IndexStats, probe: ProbeFitModel | None
) -> list[Remedy]:
    """Each remedy of ``request`` (with the model ``config``, the index ``stats`` and the
    request's checked ``probe`` fit, if any), fitted."""
    out = []
    for change in _changes(request, stats):
        kept = probe if change.keeps_probe else None
        fit = fit_setup(change.request, config, change.stats, kept)
        out.append(Remedy(change.change, fit, from_probe=kept is not None))
    return out
