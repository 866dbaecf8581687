"""``mvtrain plan`` and ``mvtrain probe``: the memory planner's commands (registered on the
``mvtrain`` group by :mod:`mvtrain.cli`). Options are parsed here; the work is done by
:func:`mvtrain.memory.plan.make_plan` and :func:`mvtrain.memory.probe.run_probe`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from mvtrain.cli_options import (
    GRAD_ACCUM,
    SETUP,
    SHARDS,
    STORAGE_OPTIONS,
    dtype_choice,
    options,
)

PLAN_OPTIONS = [
    SHARDS,
    STORAGE_OPTIONS,
    click.option(
        "--model",
        required=True,
        help="'tiny', a model folder, or a folder with only config.json.",
    ),
    click.option(
        "--gpus",
        type=int,
        default=1,
        show_default=True,
        help="Data-parallel GPUs to plan for.",
    ),
    click.option(
        "--gpu-mem",
        default="80GiB",
        show_default=True,
        help="Memory of one card, with a unit: 80GiB, 24GB, 81920MiB.",
    ),
    click.option(
        "--zero",
        "zero_stage",
        type=int,
        default=2,
        show_default=True,
        help="DeepSpeed ZeRO stage: 0, 1 or 2 (ZeRO-3 is not supported).",
    ),
    *SETUP,
    dtype_choice("auto = bf16: a plan is for a GPU."),
    click.option(
        "--engine",
        type=click.Choice(["deepspeed", "torch"]),
        default="deepspeed",
        show_default=True,
        help="The engine `mvtrain run` will use (torch: no partitioning).",
    ),
    click.option(
        "--target",
        type=float,
        default=0.9,
        show_default=True,
        help="Fraction of the card the budgets may fill.",
    ),
    GRAD_ACCUM,
    click.option(
        "--attention",
        type=click.Choice(["sdpa", "flash", "eager"]),
        default="sdpa",
        show_default=True,
        help="The LLM attention kernel to plan for.",
    ),
]
"""The options ``plan`` shares with the setup it plans for."""


@click.command("plan")
@options(PLAN_OPTIONS)
@click.option(
    "--probe",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Use a fit saved by `mvtrain probe` instead of the config-derived coefficients.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def plan_command(gpu_mem: str, as_json: bool, **options: Any) -> None:
    """What fits: parameters, static memory, activations, budgets, and what to change."""
    import json as json_module

    from mvshards.units import parse_bytes
    from mvtrain.memory.plan import PlanRequest, make_plan
    from mvtrain.memory.plan_text import format_plan

    try:
        plan = make_plan(PlanRequest(gpu_mem=parse_bytes(gpu_mem), **options))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if as_json:
        click.echo(json_module.dumps(plan.to_json(), default=str))
    else:
        click.echo(format_plan(plan))
    sys.exit(0 if plan.fit.budgets is not None else 3)


@click.command("probe")
@SHARDS
@STORAGE_OPTIONS
@click.option(
    "--model", required=True, help="'tiny', a model folder, or a folder with only config.json."
)
@click.option(
    "--save",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("mvkit-probe.json"),
    show_default=True,
    help="Where to write the probe fit (JSON).",
)
@dtype_choice("auto = bf16 where the GPU supports it, else fp32.")
@options(SETUP)
@click.option(
    "--trust-remote-code", is_flag=True, help="Needed for the 2.6 family (remote-code checkpoints)."
)
def probe_command(shards: tuple[Any, ...], model: str, save: Path, **setup: Any) -> None:
    """On a GPU: measure fwd+bwd peaks on worst-case batches and fit the planner to them."""
    from mvshards.units import GiB
    from mvtrain.batching.sources import load_sources
    from mvtrain.memory.probe import require_cuda, run_probe
    from mvtrain.memory.probe_fit import probe_setup
    from mvtrain.model.adapters import adapter_for
    from mvtrain.model.setup import build_model
    from mvtrain.precision import resolve_dtype
    from mvtrain.run_config import RunConfig

    try:
        require_cuda()  # before the model is built
        _, indexes = load_sources(shards)
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    config = RunConfig(shards=shards, model=model, output=Path("."), **setup)
    bundle = build_model(config)
    if bundle.family.remote_code:
        raise click.UsageError(
            "probe drives the native 4.6 family; plan the 2.6 family from its config"
        )
    adapter = adapter_for(indexes[0].params["profile"], bundle.tokenizer, config.chunked_loss)
    record = probe_setup(
        bundle.model.config,
        model,
        resolve_dtype(config.dtype),
        config.lora,
        config.lora_rank,
        config.freeze_vision,
        config.grad_ckpt,
        chunked_loss=config.chunked_loss,
    )
    try:
        fit = run_probe(
            bundle.model,
            bundle.tokenizer.pad_token_id or 0,
            adapter,
            max(int(index.num_tokens.max(initial=0)) for index in indexes),
            max(int(index.num_patches.max(initial=0)) for index in indexes),
            save,
            record,
        )
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"probe fit ({record['dtype']}) saved to {save}: {fit['bytes_per_token']:,.0f} B/token, "
        f"{fit['bytes_per_patch']:,.0f} B/patch, const {fit['const_bytes'] / GiB:.2f} GiB, "
        f"max error {fit['max_relative_error']:.1%}"
    )
