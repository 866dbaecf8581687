"""Options that several ``mvtrain`` commands share, defined once: the shard folder, the
training setup a run uses and a plan or probe is made for, the accumulation, the dtype."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from mvtrain.precision import DTYPES

SHARDS = click.option(
    "--shards",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    required=True,
    help="The shard folder `mvprep build` wrote (with manifest.json).",
)
GRAD_ACCUM = click.option(
    "--grad-accum",
    type=int,
    default=1,
    show_default=True,
    help="Micro-batches per optimizer step (each within the budgets).",
)
SETUP = (
    click.option("--lora", is_flag=True, help="Train LoRA adapters on the LLM's projections only."),
    click.option(
        "--lora-rank", type=int, default=8, show_default=True, help="LoRA rank r (alpha = 2r)."
    ),
    click.option(
        "--freeze-vision",
        is_flag=True,
        help="Keep the vision encoder fixed (the merger/resampler still trains).",
    ),
    click.option(
        "--grad-ckpt",
        is_flag=True,
        help="Gradient checkpointing: recompute activations in backward to save memory.",
    ),
)
"""What is trained and how activations are kept: ``run``, ``plan`` and ``probe`` alike."""


def dtype_choice(auto: str) -> Any:
    """``--dtype`` of ``plan`` and ``probe``; ``auto`` explains what auto means there."""
    return click.option(
        "--dtype",
        type=click.Choice(list(DTYPES)),
        default="auto",
        show_default=True,
        help=f"Training precision; {auto}",
    )


def options(decorators: Sequence[Any]) -> Callable[[Any], Any]:
    """One decorator applying ``decorators`` so they list in ``--help`` in this order."""

    def apply(f: Any) -> Any:
        for option in reversed(decorators):
            f = option(f)
        return f

    return apply
