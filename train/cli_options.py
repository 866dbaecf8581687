"""Options that several ``mvtrain`` commands share, defined once: the shard folders, the
training setup a run uses and a plan or probe is made for, the accumulation, the dtype."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from mvtrain.precision import DTYPES


class ShardsParam(click.ParamType):
    """``DIR`` or ``DIR:WEIGHT``: an existing shard folder and its sampling weight (> 0)."""

    name = "DIR[:WEIGHT]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from mvtrain.batching.sources import ShardSource

        if isinstance(value, ShardSource):
            return value
        try:
            source = ShardSource.parse(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        if not Path(source.path).is_dir():
            self.fail(f"folder {str(source.path)!r} does not exist", param, ctx)
        return source


SHARDS = click.option(
    "--shards",
    type=ShardsParam(),
    multiple=True,
    required=True,
    help="A shard folder `mvprep build` wrote (with manifest.json), optionally with a "
    "sampling weight: DIR[:WEIGHT]. Repeat to mix folders (same --profile, --max-res and "
    "image-id form). Per epoch a folder of n samples gives round(WEIGHT*n): floor(WEIGHT) "
    "full copies plus a subset drawn by (--seed, epoch) for the fraction; default weight 1. "
    "With several folders samples are named NAME/KEY (NAME: the folder's basename) and "
    "the loss is reported per folder.",
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
    click.option(
        "--chunked-loss/--no-chunked-loss",
        default=True,
        show_default=True,
        help="Compute the loss from the last hidden states in chunks of label tokens, never "
        "holding the fp32 [tokens, vocab] logits; --no-chunked-loss: the plain logits loss.",
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
