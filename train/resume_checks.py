"""What a ``--resume`` may change and what it may not.

The data position carries over to any world size, budgets and ``--grad-accum``
(:mod:`mvtrain.batching.position`), and so does the engine state of the torch engine (whole
on rank 0) and of DeepSpeed ZeRO-1/2 (re-partitioned, :mod:`mvtrain.zero_repartition`). The
optimizer state of another engine, ZeRO stage or precision, or of another set of trained
parameters (LoRA, a frozen vision tower), does not: such a resume is refused in one line
naming the options to resume with. A checkpoint records what its engine state belongs to
(:func:`setup_record`); one saved before that was recorded is not checked.
"""

from __future__ import annotations

from typing import Any

from mvtrain.run_config import RunConfig

_FIXED = ("engine", "zero_stage", "dtype", "lora", "lora_rank", "freeze_vision")
"""The fields of :func:`setup_record` the engine state belongs to."""


def setup_record(config: RunConfig, use_deepspeed: bool, dtype: str, world_size: int) -> dict:
    """What a checkpoint's engine state belongs to (and how long the run was asked to be,
    for the learning-rate schedule): saved with every checkpoint."""
    return {
        "engine": "deepspeed" if use_deepspeed else "torch",
        "zero_stage": config.zero_stage if use_deepspeed else None,
        "dtype": dtype,
        "lora": config.lora,
        "lora_rank": config.lora_rank if config.lora else None,
        "freeze_vision": config.freeze_vision,
        "world_size": world_size,
        "max_steps": config.max_steps,
        "epochs": config.epochs,
    }


def describe(record: dict[str, Any]) -> str:
    """``record``'s engine state in words, e.g. ``the deepspeed engine (ZeRO-2, fp32)``."""
    parts = [f"ZeRO-{record['zero_stage']}"] if record.get("zero_stage") is not None else []
    parts.append(str(record.get("dtype")))
    if record.get("lora"):
        parts.append(f"LoRA rank {record.get('lora_rank')}")
    if record.get("freeze_vision"):
        parts.append("frozen vision tower")
    return f"the {record.get('engine')} engine ({', '.join(parts)})"


def _option(name: str, record: dict[str, Any]) -> str:
    """The ``mvtrain run`` option that gives ``record``'s value of field ``name``."""
    value = record.get(name)
    if name == "engine":
        return f"--engine {value}"
    if name == "zero_stage":
        return f"--zero {value}" if value is not None else "--engine torch"
    if name == "dtype":
        return f"--dtype {value}"
    if name == "lora":
        return f"--lora --lora-rank {record.get('lora_rank')}" if value else "no --lora"
    if name == "lora_rank":
        return f"--lora-rank {value}" if value is not None else "no --lora"
    return "--freeze-vision" if value else "no --freeze-vision"


def check_same_engine(saved: dict[str, Any] | None, current: dict[str, Any], where: str) -> None:
    """Refuse (ValueError, one line) a resume whose engine state cannot carry over: another
    engine, ZeRO stage, precision or set of trained parameters than the checkpoint's
    ``saved`` record (None: an older checkpoint, not checked). ``where``: the checkpoint."""
    if saved is None:
        return
    differ = [n for n in _FIXED if n in saved and saved.get(n) != current.get(n)]
    if not differ:
        return
    if "lora" in differ:  # its option names the rank too
        differ = [n for n in differ if n != "lora_rank"]
    fix = " ".join(dict.fromkeys(_option(n, saved) for n in differ))
    raise ValueError(
        f"--resume: {where} holds the optimizer state of {describe(saved)}, which cannot "
        f"carry over to {describe(current)}: resume with {fix}, or start over with --overwrite"
    )


def length_unchanged(saved: dict[str, Any] | None, config: RunConfig) -> bool:
    """Whether ``--max-steps`` and ``--epochs`` are the checkpoint's run's (unknown for an
    older checkpoint: False)."""
    if saved is None or "max_steps" not in saved:
        return False
    return (saved["max_steps"], saved["epochs"]) == (config.max_steps, config.epochs)


def check_old_checkpoint(
    has_position: bool, saved_world_size: int, world_size: int, where: str
) -> None:
    """Refuse another world size for a checkpoint saved before checkpoints recorded the data
    position (its plan's settings are unknown, so the samples it trained are too)."""
    if has_position or saved_world_size == world_size:
        return
    raise ValueError(
        f"--resume: {where} predates checkpoints that record the trained samples, so it "
        f"resumes only with its own settings: run it on {saved_world_size} processes"
    )
