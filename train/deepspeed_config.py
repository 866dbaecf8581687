"""The DeepSpeed config a run uses: generated from the options, the user's JSON deep-merged
over it (ZeRO stages 0-2 only, precision kept to ``--dtype``), written to the run folder."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def deepspeed_config(
    grad_accum: int,
    zero_stage: int = 2,
    dtype: str = "fp32",
    grad_clip: float = 1.0,
    user_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The generated DeepSpeed config; keys of ``user_config`` override it (deep merge).

    ``dtype`` (a resolved ``--dtype``) enables the ``bf16`` or ``fp16`` section (fp16 with
    dynamic loss scaling); ``user_config`` may not change either ``enabled`` flag.

    ``train_micro_batch_size_per_gpu`` is nominal: micro-batches vary in size under the
    token and patch budgets, and DeepSpeed only uses it for throughput logging. Gradient
    accumulation is unmanaged: ``step()`` is the boundary, so a window may hold more
    micro-batches than ``grad_accum`` when an OOM splits one (all ranks run the same count).
    """
    cuda = torch.cuda.is_available()
    generated: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": grad_accum,
        "managed_gradient_accumulation": False,
        "gradient_clipping": grad_clip,
        "zero_optimization": {
            "stage": zero_stage,
            "contiguous_gradients": True,
            # DeepSpeed allows overlap with an unmanaged accumulation boundary on ZeRO-2 only
            "overlap_comm": cuda and zero_stage == 2,
            "reduce_scatter": True,
            "reduce_bucket_size": 200_000_000,
            "allgather_bucket_size": 200_000_000,
        },
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {"enabled": dtype == "fp16", "loss_scale": 0},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1_000_000_000,
        "wall_clock_breakdown": False,
    }
    merged = _deep_merge(generated, user_config or {})
    _check_zero_stage(merged["zero_optimization"].get("stage"), zero_stage)
    for section in ("bf16", "fp16"):
        enabled = merged[section].get("enabled")
        if enabled != generated[section]["enabled"]:
            raise ValueError(
                f"--deepspeed-config sets {section}.enabled to {enabled!r} but --dtype is "
                f"{dtype}: choose the precision with --dtype"
            )
    return merged


def _check_zero_stage(stage: Any, zero_stage: int) -> None:
    """Refuse a merged ZeRO stage other than 0, 1 or 2 in the one line ``--zero`` gets (named
    after ``--deepspeed-config`` when the user's JSON chose it)."""
    if type(stage) is int and stage in (0, 1, 2):
        return
    source = "--zero" if stage == zero_stage else "--deepspeed-config zero_optimization.stage"
    raise ValueError(f"{source} must be 0, 1 or 2 (ZeRO-3 is not supported), got {stage!r}")


def write_deepspeed_config(path: Path, config: dict[str, Any]) -> None:
    """Write ``config`` (the effective DeepSpeed config) to ``path`` as indented JSON,
    atomically; the folder is made if missing."""
    from mvshards.tario import write_atomic

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())


def load_user_config(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"--deepspeed-config {path}: cannot read it as JSON ({exc})") from exc
