"""Options that several ``mvtrain`` commands share, defined once: the shard folders, the
training setup a run uses and a plan or probe is made for, the accumulation, the dtype."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import click

from mvtrain.run_config import DTYPES


class ShardsParam(click.ParamType):
    """``DIR`` or ``DIR:WEIGHT``: an existing shard folder (or an object-store URL, checked
    when the run reads its index) and its sampling weight (> 0)."""

    name = "DIR[:WEIGHT]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from mvtrain.batching.sources import ShardSource

        if isinstance(value, ShardSource):
            return value
        try:
            source = ShardSource.parse(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        if isinstance(source.path, Path) and not source.path.is_dir():
            self.fail(f"folder {str(source.path)!r} does not exist", param, ctx)
        return source


SHARDS = click.option(
    "--shards",
    type=ShardsParam(),
    multiple=True,
    required=True,
    help="A shard folder `mvprep build` wrote (with manifest.json), or its object-store URL "
    "(s3://BUCKET/PREFIX, gs://...), optionally with a sampling weight: DIR[:WEIGHT]. "
    "Repeat to mix folders (same --profile, --max-res and "
    "image-id form). Per epoch a folder of n samples gives round(WEIGHT*n): floor(WEIGHT) "
    "full copies plus a subset drawn by (--seed, epoch) for the fraction; default weight 1. "
    "With several folders samples are named NAME/KEY (NAME: the folder's basename) and "
    "the loss is reported per folder.",
)


def _storage_options(_ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    """``--storage-options``: parsed, and made this process's (and its ranks') defaults."""
    from mvshards.storage import parse_storage_options, use_storage_options

    try:
        use_storage_options(parse_storage_options(value))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


STORAGE_OPTIONS = click.option(
    "--storage-options",
    default=None,
    metavar="JSON",
    expose_value=False,
    is_eager=True,  # before --shards makes its URLs
    callback=_storage_options,
    help="fsspec options for s3://, gs://... --shards as a JSON object, e.g. "
    '\'{"endpoint_url": "http://minio:9000"}\' (merged over $MVKIT_STORAGE_OPTIONS, as for '
    "mvprep; credentials otherwise come from the standard places: AWS_* variables, ~/.aws, "
    "GOOGLE_APPLICATION_CREDENTIALS).",
)
"""``--storage-options`` of every command that takes ``--shards``."""


def _read_setting(ctx: click.Context, param: click.Parameter, value: Any) -> None:
    """``--cache-dir`` / ``--read-ahead``: made this process's (and its ranks' and loader
    workers') read settings (:func:`mvtrain.data.remote_reads.use_read_settings`)."""
    from dataclasses import replace

    from mvtrain.data.remote_reads import read_settings, use_read_settings

    try:
        use_read_settings(replace(read_settings(), **{str(param.name): value}))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


READS = (
    click.option(
        "--cache-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        expose_value=False,
        callback=_read_setting,
        help="For --shards in an object store: copy each shard whole into this local folder "
        "(keyed by its URL, size and sha256; verified against the index) and read it there, "
        "in this epoch and in later epochs and runs. Default: no copy; each sample is one "
        "ranged GET, and a shard a rank reads most of is copied to a temporary spool.",
    ),
    click.option(
        "--read-ahead",
        type=click.IntRange(min=0),
        default=8,
        show_default=True,
        expose_value=False,
        callback=_read_setting,
        help="For --shards in an object store: samples of the rank's schedule fetched "
        "concurrently ahead of the step that needs them (0: each when needed).",
    ),
)
"""Where a run reads stored shards from: ``run``'s options beside ``--storage-options``."""

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
