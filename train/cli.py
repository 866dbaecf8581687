"""``mvtrain``: the training stage's command line. Options are parsed here; the work is done
by :func:`mvtrain.loop.run` (a notebook can call it with a :class:`RunConfig`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from mvshards.command_line import expected_classes, png_callback, run_cli
from mvtrain.cli_options import GRAD_ACCUM, READS, SETUP, SHARDS, STORAGE_OPTIONS, options
from mvtrain.cli_plan import plan_command, probe_command
from mvtrain.launch import exit_now, launch, report_failure, strip_nproc, watch_parent
from mvtrain.run_config import DEFAULT_PATCH_BUDGET, DEFAULT_TOKEN_BUDGET


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Train MiniCPM-V on mvkit shards under token and patch budgets.

    A failure you can act on is one line on stderr (once, however many ranks); add --debug
    anywhere on the command line (or set MVKIT_DEBUG=1) for its traceback."""


IS_EXPECTED = expected_classes(
    "builtins:ValueError",
    "builtins:FileNotFoundError",
    "mvshards.index:DatasetIndexError",
    "mvshards.storage:StorageError",
    "mvtrain.data.shard_access:ShardReadError",
    "mvtrain.model.loading:ModelLoadError",
    "mvtrain.report:ReportError",
    "mvtrain.oom:BackwardOomError",
)
"""The failures a user can act on: one line, no traceback."""


def entry() -> None:
    """The ``mvtrain`` console command: :data:`main` with one-line failures."""
    run_cli(main, "mvtrain", IS_EXPECTED, report_failure)


def _int_or_auto(text: object, flag: str, kind: str = "a positive integer") -> int | None:
    """An integer, or None for 'auto'; ``kind`` names the integers ``flag`` takes."""
    if str(text).lower() == "auto":
        return None
    try:
        return int(str(text))
    except ValueError:
        raise ValueError(f"{flag} takes {kind} or 'auto', got {text!r}") from None


def _dtype_option(dtype: str, bf16_alias: bool) -> str:
    """``--dtype``, with the old ``--bf16`` flag read as ``--dtype bf16``."""
    from mvtrain.run_config import check_dtype

    if not bf16_alias:
        return check_dtype(dtype)
    if dtype not in ("auto", "bf16"):
        raise ValueError(f"--bf16 contradicts --dtype {dtype}: use --dtype alone")
    return "bf16"


@main.command("run")
@SHARDS
@STORAGE_OPTIONS
@options(READS)
@click.option("--model", required=True, help="'tiny' or a local model folder.")
@click.option(
    "--output",
    type=click.Path(path_type=Path),
    required=True,
    help="The run folder: checkpoints, metrics.jsonl, run.json, the HF export. One run per "
    "folder: one that holds a run needs --resume or --overwrite.",
)
@click.option(
    "--token-budget",
    default=str(DEFAULT_TOKEN_BUDGET),
    show_default=True,
    help="Max padded tokens (batch_size x max_len) per micro-batch, or 'auto' (from the plan).",
)
@click.option(
    "--patch-budget",
    default=str(DEFAULT_PATCH_BUDGET),
    show_default=True,
    help="Max padded vision patches per micro-batch, or 'auto' (from the plan).",
)
@click.option("--gpu-mem", default=None, help="Card size for 'auto' budgets (default: the GPU's).")
@click.option(
    "--target", type=float, default=0.9, show_default=True, help="Card fraction for 'auto'."
)
@click.option(
    "--probe",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="A fit saved by `mvtrain probe` for 'auto' budgets.",
)
@GRAD_ACCUM
@click.option(
    "--max-steps",
    type=int,
    default=None,
    help="Stop after this many optimizer steps: a cap on --epochs when both are given; "
    "alone, it trains this many steps over as many epochs as that takes.",
)
@click.option(
    "--epochs",
    type=int,
    default=None,
    help="Passes over the data [default: 1, or as many as --max-steps takes]; with "
    "--max-steps the run stops at whichever comes first.",
)
@click.option(
    "--zero",
    "zero_stage",
    type=int,
    default=2,
    show_default=True,
    help="DeepSpeed ZeRO stage: 0, 1 or 2 (ZeRO-3 is not supported).",
)
@click.option(
    "--deepspeed-config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="JSON whose keys override the generated DeepSpeed config.",
)
@click.option(
    "--engine",
    type=click.Choice(["auto", "deepspeed", "torch"]),
    default="auto",
    show_default=True,
    help="deepspeed (ZeRO), torch (plain, fp32 master weights), or auto: DeepSpeed when installed.",
)
@options(SETUP)
@click.option(
    "--dtype",
    default="auto",
    show_default=True,
    metavar="auto|bf16|fp16|fp32",
    help="Training precision. auto: bf16 where CUDA supports it, else fp32. DeepSpeed keeps "
    "bf16/fp16 weights and its own fp32 master copy (fp16 with dynamic loss scaling); the "
    "torch engine keeps fp32 weights, runs the forward under bf16 autocast and refuses fp16.",
)
@click.option("--bf16", "bf16_alias", is_flag=True, hidden=True, help="Same as --dtype bf16.")
@click.option(
    "--lr",
    type=float,
    default=1e-5,
    show_default=True,
    help="Peak learning rate. Schedule: linear warm-up over --warmup-steps (step k uses "
    "k/W of the peak), then cosine decay from the peak towards 10% of it at the last planned "
    "step (the steps of --epochs, capped by --max-steps). Fixed at the first start: --resume keeps "
    "it and refuses another --lr/--warmup-steps/step count unless --schedule-change.",
)
@click.option(
    "--warmup-steps",
    type=int,
    default=0,
    show_default=True,
    help="Optimizer steps of linear learning-rate warm-up (to the --lr peak, then cosine to "
    "10% of it); kept on --resume like --lr.",
)
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Seed of the epoch plans and the model initialisation.",
)
@click.option(
    "--batch-log",
    type=click.Path(path_type=Path),
    default=None,
    help="Write one JSON line per micro-batch (keys, padded costs, loss) to this file.",
)
@click.option(
    "--save-every",
    type=int,
    default=None,
    help="Save a checkpoint every N optimizer steps (and always at the end).",
)
@click.option(
    "--eval-shards",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    multiple=True,
    help="Held-out shard folder (`mvprep build`, same --profile and --max-res as --shards) to "
    "evaluate on: without gradients, under the same budgets, split over the ranks; logs "
    "eval_loss and eval_loss_by_channel (per loss group) at step 0, every --eval-every steps "
    "and at the end. Repeatable.",
)
@click.option(
    "--eval-every",
    type=int,
    default=None,
    help="Evaluate every N optimizer steps too [default: only at step 0 and at the end].",
)
@click.option(
    "--eval-max-samples",
    type=int,
    default=None,
    help="Evaluate the first M eval samples only (dataset order, the same every time).",
)
@click.option(
    "--save-best",
    is_flag=True,
    help="Keep the checkpoint and HF export of the lowest eval loss in OUT/best/ "
    "(best.json names its step and loss).",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue from the newest checkpoint in --output, on any number of processes and "
    "with any budgets or --grad-accum: the epoch's samples not yet trained are planned anew "
    "when those differ.",
)
@click.option(
    "--overwrite",
    is_flag=True,
    help="Start a new run in an --output folder that holds one: first delete its run files "
    "(metrics.jsonl, run.json, events.jsonl, skipped.jsonl, restart.json, report.png, "
    "deepspeed_config.json, params-rank*.sha256, checkpoints/, hf/, tensorboard/, best/); cache/ "
    "and other files stay.",
)
@click.option(
    "--schedule-change",
    is_flag=True,
    help="With --resume: accept a learning-rate schedule (--lr, --warmup-steps, total steps) "
    "other than the checkpoint's; it applies from the resumed step and run.json records it.",
)
@click.option("--dry-run", is_flag=True, help="The data path only: stream, tokenize, bucket, log.")
@click.option("--trust-remote-code", is_flag=True, help="Needed for the 2.6 family.")
@click.option(
    "--loader-workers",
    default="auto",
    show_default=True,
    help="DataLoader workers per rank; auto: 4 with pinned memory on CUDA, 0 on CPU",
)
@click.option(
    "--dist-timeout",
    "dist_timeout_minutes",
    type=float,
    default=60.0,
    show_default=True,
    metavar="MINUTES",
    help="How long a collective waits for the other ranks before the run fails with a "
    "timeout error (torch's defaults: 10 min under NCCL, 30 under gloo). The ranks wait "
    "for each other while they recount token lengths (unless mvprep counted them with the "
    "same tokenizer) and while rank 0 writes the export: raise it for very large data sets "
    "or models.",
)
@click.option("--nproc-per-node", type=int, default=None, help="Launch this many processes here.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--no-export", is_flag=True, help="Skip the Hugging Face export at the end.")
def run_command(
    nproc_per_node: int | None,
    engine: str,
    no_progress: bool,
    no_export: bool,
    bf16_alias: bool,
    **options: object,
) -> None:
    """Train (or --dry-run the data path) on SHARDS.

    The loss is also reported per loss group: a sample's channel when it has one (the
    record's channel/source/dataset field, or mvprep build --channel), else its --shards
    folder; metrics.jsonl keys them loss_by_channel and loss_by_source."""
    if nproc_per_node and "RANK" not in os.environ:
        sys.exit(launch(nproc_per_node, strip_nproc(sys.argv[1:])))
    if "RANK" in os.environ:  # a rank of this launcher or of torchrun
        watch_parent()
    from mvshards.units import parse_bytes
    from mvtrain.distributed import name_cpu_accelerator
    from mvtrain.loop import run
    from mvtrain.run_config import RunConfig

    name_cpu_accelerator()

    try:
        options["token_budget"] = _int_or_auto(options["token_budget"], "--token-budget")
        options["patch_budget"] = _int_or_auto(options["patch_budget"], "--patch-budget")
        options["loader_workers"] = _int_or_auto(
            options["loader_workers"], "--loader-workers", "a count of workers (0: none)"
        )
        options["dtype"] = _dtype_option(str(options["dtype"]), bf16_alias)
        if options["gpu_mem"] is not None:
            options["gpu_mem"] = parse_bytes(str(options["gpu_mem"]))
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    config = RunConfig(
        use_deepspeed=None if engine == "auto" else engine == "deepspeed",
        progress=not no_progress,
        export=not no_export,
        **options,  # type: ignore[arg-type]
    )
    from mvtrain.oom import BackwardOomError

    try:
        result = run(config)
    except BackwardOomError as exc:
        exit_now(f"{exc} (saved in {Path(config.output) / 'restart.json'})", 3)
    if os.environ.get("RANK", "0") == "0":
        _print_summary(result)


@main.command("report")
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--png",
    callback=png_callback,
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to draw it (default: OUT/report.png).",
)
@click.option(
    "--memory-budget",
    default=None,
    help="Planned peak GPU memory per GPU for the memory panel's line, e.g. 80GiB "
    "(default: the planned peak the run recorded in run.json, if any).",
)
def report_command(out: Path, png: Path | None, memory_budget: str | None) -> None:
    """One PNG of run OUT: loss, lr, tokens/s, efficiency, budget use, GPU memory."""
    from mvshards.units import parse_bytes
    from mvtrain.report import ReportError, format_report, write_report

    try:
        budget = parse_bytes(memory_budget) if memory_budget is not None else None
        report = write_report(out, png, memory_budget=budget)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    except ReportError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(format_report(report))


def _skipped_text(result: Any) -> str:
    """``N per epoch, T in total: key (costs), ...; all in OUT/skipped.jsonl``, or ``0``."""
    if not result.oversize:
        return "0"
    per_epoch = sorted(set(result.skipped_per_epoch))
    counts = (
        f"{per_epoch[0]} per epoch"
        if len(per_epoch) == 1
        else "per epoch " + "/".join(str(n) for n in result.skipped_per_epoch)
    )
    where = Path(result.output) / "skipped.jsonl"
    examples = ", ".join(result.skipped_examples)
    return f"{counts}, {result.oversize} in total: {examples}; all in {where}"


def _source_rows(result: Any) -> list[tuple[str, str]]:
    """One summary row per ``--shards`` folder: weight, samples per epoch, mean loss."""
    losses = result.loss_by_source
    rows = []
    for source in result.sources:
        loss = losses.get(source["name"])
        rows.append(
            (
                f"source {source['name']}",
                f"weight {source['weight']:g}, {source['samples_per_epoch']} of "
                f"{source['samples']} samples per epoch"
                + (f", loss {loss:.4f}" if loss is not None else ""),
            )
        )
    return rows


def _channel_rows(result: Any) -> list[tuple[str, str]]:
    """One summary row per channel (samples that carry one): its mean loss over the run."""
    from mvtrain.batching.sources import split_group_losses

    channels = split_group_losses(result.loss_by_source).get("loss_by_channel", {})
    return [(f"channel {name}", f"loss {loss:.4f}") for name, loss in sorted(channels.items())]


def _eval_rows(result: Any) -> list[tuple[str, str]]:
    """``--eval-shards``: the first and last eval loss, and the best kept (``--save-best``)."""
    evals = getattr(result, "evals", [])
    if not evals:
        return []
    rows = [("eval loss first / last", f"{evals[0].loss:.4f} / {evals[-1].loss:.4f}")]
    if result.best is not None:
        where = Path(result.output) / "best"
        rows.append(("best eval", f"{result.best['eval_loss']:.4f} at step {result.best['step']}"))
        rows.append(("best saved in", str(where)))
    return rows


def _print_summary(result: Any) -> None:
    """The short table that ends a run (rank 0)."""
    eff = result.efficiency
    last = result.losses[max(result.losses)] if result.losses else None
    first = result.losses[min(result.losses)] if result.losses else None
    rows = [
        ("steps", f"{result.steps_done}"),
        (
            "loss first / last",
            f"{first:.4f} / {last:.4f}" if last is not None else "- (dry run)",
        ),
        ("token efficiency", f"{eff.get('token_efficiency', 0):.3f}"),
        ("patch efficiency", f"{eff.get('patch_efficiency', 0):.3f}"),
        ("token budget use", f"{eff.get('token_budget_utilisation', 0):.3f}"),
        ("patch budget use", f"{eff.get('patch_budget_utilisation', 0):.3f}"),
        ("over-budget samples skipped", _skipped_text(result)),
        ("length mismatches vs index", f"{result.length_mismatches}"),
        *_source_rows(result),
        *_channel_rows(result),
        *_eval_rows(result),
        ("output", str(result.output)),
    ]
    width = max(len(k) for k, _ in rows)
    click.echo("-" * (width + 30))
    for k, v in rows:
        click.echo(f"{k.ljust(width)}  {v}")
    click.echo("-" * (width + 30))


main.add_command(plan_command)
main.add_command(probe_command)

if __name__ == "__main__":
    entry()
