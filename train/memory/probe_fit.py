"""A ``mvtrain probe`` fit as the planner's activation model, and the setup it holds for.

The probe measures the activation peak of forward + backward (above the weights, gradients
freed as they are produced) and fits ``bytes = a * padded_tokens + b * padded_patches + c``.
With a fit, that IS the activation peak of a micro-batch (:class:`ProbeFitModel`): nothing
of the config-derived model is added to it.

A fit holds only for the setup it was measured with, so the fit file records it
(:data:`SETUP_FIELDS`) and :func:`check_probe_setup` refuses a plan that asks for another
one, naming the fields and the ``mvtrain probe`` options that would measure the right one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mvtrain.memory.dims import text_dims, vision_dims

FIT_FORMAT = 2
"""Version of the fit file; files without ``setup`` (format 1) are refused."""
SETUP_FIELDS = (
    "dtype",
    "lora",
    "lora_rank",
    "freeze_vision",
    "grad_ckpt",
    "attention",
    "chunked_loss",
)
"""What a fit depends on besides the model (``config_hash``). A fit without
``chunked_loss`` was measured before the chunked loss existed: with the plain loss."""
PROBE_ATTENTION = "sdpa"
"""The LLM attention the probe measures: transformers' default, what ``mvtrain run`` uses."""


def config_hash(config: Any) -> str:
    """A short hash of the dimensions the memory model reads from a config (native or
    :class:`~mvtrain.memory.params.RemoteConfig`): equal for a loaded model and its
    config-only folder. The family enters by name, so the hash does not move when
    :class:`mvshards.families.Family` gains fields."""
    vision = vision_dims(config)
    dims = repr((text_dims(config), replace(vision, family=vision.family.name)))
    return hashlib.sha256(dims.encode()).hexdigest()[:16]


def probe_setup(
    config: Any,
    model: str,
    dtype: str,
    lora: bool,
    lora_rank: int,
    freeze_vision: bool,
    grad_ckpt: bool,
    attention: str = PROBE_ATTENTION,
    chunked_loss: bool = True,
) -> dict[str, Any]:
    """The setup record a fit file carries (and a plan request is compared with)."""
    return {
        "model": str(model),
        "config_hash": config_hash(config),
        "dtype": dtype,
        "lora": bool(lora),
        "lora_rank": int(lora_rank),
        "freeze_vision": bool(freeze_vision),
        "grad_ckpt": bool(grad_ckpt),
        "attention": attention,
        "chunked_loss": bool(chunked_loss),
    }


@dataclass(frozen=True)
class ProbeFitModel:
    """Activation peak ``a*T + b*P + c`` of a micro-batch of ``T`` padded tokens and ``P``
    padded patches, whatever its shape (the probe's points already contain the loss, mask and
    gradient transients the config model adds as separate terms)."""

    bytes_per_token: float
    bytes_per_patch: float
    const_bytes: float
    setup: dict[str, Any] = field(default_factory=dict)
    max_relative_error: float = 0.0
    path: str = ""

    def peak_bytes(
        self,
        padded_tokens: int,
        padded_patches: int,
        batch_size: int | None = None,
        max_len: int | None = None,
        padded: bool | None = None,
    ) -> int:
        """``a*T + b*P + c`` (the shape arguments are accepted and unused)."""
        total = (
            self.bytes_per_token * padded_tokens
            + self.bytes_per_patch * padded_patches
            + self.const_bytes
        )
        return int(round(max(total, 0.0)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "bytes_per_token": self.bytes_per_token,
            "bytes_per_patch": self.bytes_per_patch,
            "const_bytes": self.const_bytes,
            "max_relative_error": self.max_relative_error,
            "setup": dict(self.setup),
            "path": self.path,
        }


def load_probe_fit(path: Path | str) -> ProbeFitModel:
    """Read a fit saved by ``mvtrain probe``; a file without its setup record is refused."""
    fit = json.loads(Path(path).read_text())
    setup = fit.get("setup")
    if isinstance(setup, dict):
        setup.setdefault("chunked_loss", False)  # measured before the chunked loss existed
    if not isinstance(setup, dict) or any(k not in setup for k in (*SETUP_FIELDS, "config_hash")):
        raise ValueError(
            f"probe fit {path} does not record the setup it was measured with (dtype, LoRA, "
            "frozen vision, checkpointing, attention, model): it is from an older mvtrain; "
            "re-run `mvtrain probe` with the options you plan with"
        )
    return ProbeFitModel(
        bytes_per_token=float(fit["bytes_per_token"]),
        bytes_per_patch=float(fit["bytes_per_patch"]),
        const_bytes=float(fit["const_bytes"]),
        setup=setup,
        max_relative_error=float(fit.get("max_relative_error", 0.0)),
        path=str(path),
    )


def _mismatches(measured: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    fields = [f for f in SETUP_FIELDS if not (f == "lora_rank" and not wanted["lora"])]
    out = [f"{f} {measured[f]} (plan: {wanted[f]})" for f in fields if measured[f] != wanted[f]]
    if measured["config_hash"] != wanted["config_hash"]:
        out.append(
            f"model {measured.get('model', '?')} with config {measured['config_hash']} "
            f"(plan: {wanted.get('model', '?')} with config {wanted['config_hash']})"
        )
    return out


def _probe_options(wanted: dict[str, Any]) -> str:
    flags = [
        f"--shards {wanted.get('shards', 'SHARDS')}",
        f"--model {wanted.get('model', 'MODEL')}",
        f"--dtype {wanted['dtype']}",
    ]
    if wanted["lora"]:
        flags += ["--lora", f"--lora-rank {wanted['lora_rank']}"]
    for key, name in (("freeze_vision", "--freeze-vision"), ("grad_ckpt", "--grad-ckpt")):
        if wanted[key]:
            flags.append(name)
    if not wanted.get("chunked_loss", True):
        flags.append("--no-chunked-loss")
    return " ".join(flags)


def check_probe_setup(fit: ProbeFitModel, wanted: dict[str, Any]) -> None:
    """Refuse (ValueError, one line) a fit measured with another setup than ``wanted``."""
    mismatched = _mismatches(fit.setup, wanted)
    if not mismatched:
        return
    if wanted["attention"] != PROBE_ATTENTION:
        fix = f"the probe measures {PROBE_ATTENTION} attention only: plan without --probe"
    else:
        fix = f"re-run `mvtrain probe {_probe_options(wanted)}`, or plan without --probe"
    raise ValueError(
        f"probe fit {fit.path} was measured with another setup: {'; '.join(mismatched)}; {fix}"
    )
