"""``mvprep``: the offline stage's command line. Options are parsed here; the work is done
by library functions (``mvprep.build.build``, ``mvprep.layout_rows``, ``mvshards.verify``)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from mvshards.command_line import expected_classes, png_callback, run_cli
from mvshards.profiles import DEFAULT_PROFILE, PROFILES
from mvshards.think_block import DEFAULT_THINK_BLOCK, THINK_BLOCK_MODES

PROFILE_CHOICE = click.Choice(sorted(PROFILES))


class PathOrUrl(click.ParamType):
    """A local path (checked like ``click.Path``) or an object-store URL (``s3://...``,
    ``gs://...``, any fsspec URL: passed on as text, checked when opened)."""

    name = "path_or_url"

    def __init__(self, exists: bool = False, file_okay: bool = True) -> None:
        self.local = click.Path(exists=exists, file_okay=file_okay, path_type=Path)

    def convert(self, value, param, ctx):  # type: ignore[no-untyped-def]
        from mvshards.storage import is_url

        if isinstance(value, str) and is_url(value):
            return value
        return self.local.convert(value, param, ctx)


def storage_options_callback(_ctx: click.Context, _param: click.Parameter, value: str | None):
    """``--storage-options``: parsed, and made this process's (and its workers') defaults."""
    from mvshards.storage import parse_storage_options, use_storage_options

    try:
        options = parse_storage_options(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    use_storage_options(options)
    return options


STORAGE_OPTIONS = click.option(
    "--storage-options",
    default=None,
    metavar="JSON",
    expose_value=False,
    is_eager=True,
    callback=storage_options_callback,
    help="fsspec options for s3://, gs://... URLs as a JSON object, e.g. "
    '\'{"endpoint_url": "http://minio:9000"}\' (merged over $MVKIT_STORAGE_OPTIONS; '
    "credentials otherwise come from the standard places: AWS_* variables, ~/.aws, "
    "GOOGLE_APPLICATION_CREDENTIALS).",
)
"""``--storage-options`` of every command that takes a URL."""


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one, else all)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Preprocess MiniCPM-V fine-tuning data into annotated WebDataset shards.

    A failure you can act on is one line on stderr; add --debug anywhere on the command line
    (or set MVKIT_DEBUG=1) for its traceback."""


PROFILE = click.option(
    "--profile",
    default=DEFAULT_PROFILE,
    type=PROFILE_CHOICE,
    show_default=True,
    help="The model family's image arithmetic the shards are built for.",
)
"""``--profile`` of ``build`` and ``layout``."""


@main.command("build")
@click.argument("data", nargs=-1, required=True, type=PathOrUrl(exists=True))
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=PathOrUrl(),
    help="Output folder, or an object-store URL (s3://bucket/prefix, gs://..., any fsspec URL).",
)
@STORAGE_OPTIONS
@PROFILE
@click.option(
    "--max-res",
    type=int,
    default=None,
    help="Slice cap as a resolution: max_slice_nums = floor((R/448)^2). Default 1344 (9 slices).",
)
@click.option(
    "--max-slice-nums",
    type=int,
    default=None,
    help="Slice cap given directly (instead of --max-res).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=available_cpus,
    show_default=f"the CPUs this process may use: {available_cpus()} here",
    help="Worker processes.",
)
@click.option(
    "--samples-per-shard", type=int, default=1000, show_default=True, help="Samples per tar shard."
)
@click.option(
    "--format",
    "image_format",
    type=click.Choice(["jpeg", "png", "webp"]),
    default="jpeg",
    show_default=True,
    help="Encoding of the stored images.",
)
@click.option(
    "--quality",
    type=click.IntRange(1, 100),
    default=95,
    show_default=True,
    help="JPEG and WebP quality (both lossy; PNG is lossless and ignores it).",
)
@click.option(
    "--tokenizer",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Local HF tokenizer folder: exact token counts.",
)
@click.option(
    "--max-tokens",
    type=int,
    default=None,
    help="Reject samples longer than this. Without --tokenizer it applies to the estimate, an "
    "upper bound: a sample may be rejected that is in fact short enough.",
)
@click.option(
    "--max-pixels",
    type=int,
    default=None,
    help="Decompression-bomb limit in pixels (default: mvprep.imaging.DEFAULT_MAX_PIXELS).",
)
@click.option(
    "--allow-outside-root", is_flag=True, help="Allow image paths outside the data file's folder."
)
@click.option(
    "--image-id-form",
    type=click.Choice(["finetune", "inference", "none"]),
    default=None,
    help="Where <image_id> tags go (default: the profile's).",
)
@click.option(
    "--unit-timeout",
    type=float,
    default=None,
    help="Kill a unit's worker after this many seconds (counted as a worker death).",
)
@click.option(
    "--runner",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: --workers processes here; ray: Ray tasks (pip install 'mvkit[ray]').",
)
@click.option(
    "--ray-address",
    default=None,
    help="Ray cluster to use with --runner ray (e.g. auto, ray://head:10001); "
    "default: start a local Ray with --workers CPUs.",
)
@click.option(
    "--part",
    "part_text",
    default=None,
    metavar="I/N",
    help="Build only part I of N (1-based; units u with u % N == I-1), e.g. one Slurm array "
    "task: --part $SLURM_ARRAY_TASK_ID/N. Then run mvprep merge OUT.",
)
@click.option(
    "--max-reject-rate",
    type=click.FloatRange(0.0, 1.0),
    default=None,
    metavar="R",
    help="Fail (exit 1) when more than this fraction of the records is rejected, e.g. 0.05 "
    "(default: off; a build that rejects every record always fails).",
)
@click.option(
    "--input-format",
    type=click.Choice(["auto", "minicpmv", "llava", "messages", "sharegpt", "parquet", "hf-disk"]),
    default="auto",
    show_default=True,
    help="auto: file type and record shape detected (shape per record); a shape (minicpmv, "
    "llava, messages, sharegpt) is required of every record; parquet/hf-disk (a "
    "datasets.save_to_disk folder) require that file type (pip install 'mvkit[parquet]').",
)
@click.option(
    "--channel",
    default=None,
    metavar="NAME",
    help="The channel of every record that names none (a record's own channel, source or "
    "dataset string field wins). Kept in each sample's JSON and the index; mvprep stats "
    "counts per channel and mvtrain reports the loss per channel.",
)
@click.option(
    "--think-block",
    type=click.Choice(THINK_BLOCK_MODES),
    default=DEFAULT_THINK_BLOCK,
    show_default=True,
    help="4.6 family: auto writes <think>\\n\\n</think>\\n\\n before every answer that "
    "does not start with <think>, as the Cookbook's ms-swift/LLaMA-Factory recipes train it "
    "(answers with their own <think>...</think> keep it; the empty block is not trained); "
    "never adds nothing. Stored in the shards, so mvtrain follows it. No effect on 2.6.",
)
@click.option(
    "--imaging-path",
    type=click.Choice(["opencv", "simplejpeg"]),
    default=None,
    help="JPEG decoder: simplejpeg (pip install 'mvkit[fastjpeg]'; the default when "
    "installed) or opencv. Recorded in build.json: a resume or --part with another path is "
    "refused.",
)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def build_command(
    data: tuple[Path | str, ...],
    out_dir: Path | str,
    profile: str,
    max_res: int | None,
    max_slice_nums: int | None,
    workers: int,
    samples_per_shard: int,
    image_format: str,
    quality: int,
    tokenizer: str | None,
    max_tokens: int | None,
    max_pixels: int | None,
    allow_outside_root: bool,
    image_id_form: str | None,
    unit_timeout: float | None,
    runner: str,
    ray_address: str | None,
    part_text: str | None,
    max_reject_rate: float | None,
    input_format: str,
    channel: str | None,
    think_block: str,
    imaging_path: str | None,
    no_progress: bool,
) -> None:
    """Build shards from DATA files (JSON/JSONL in the MiniCPM-V, LLaVA, messages+images or
    ShareGPT+images shape, Parquet files, datasets.save_to_disk folders; several files, in
    any mix of formats, are read as one sequence of records in the order given). DATA and
    --out may be object-store URLs (s3://, gs://; pip install 'mvkit[s3]' / 'mvkit[gcs]').

    Keys are the record's position in that sequence (000000042), so a file's keys depend only
    on the files before it; with several files each sample's JSON and each reject also say
    where the record came from ("source": {"file": "b.jsonl", "index": 12}). Image paths are
    relative to each record's own data file's folder.

    Without --tokenizer token counts are an estimate that is an upper bound for the profile's
    tokenizer family, and everything computed from them says "estimated, upper bound"."""
    from mvprep.build import build
    from mvprep.options import BuildOptions
    from mvprep.partition import parse_part
    from mvprep.pool import RetryPolicy
    from mvprep.readers import DatasetError, check_input_format
    from mvprep.runners.ray_runner import RayUnavailableError  # does not import ray
    from mvprep.summary import format_summary, reject_failure
    from mvshards.index import DatasetIndexError
    from mvshards.storage import StorageError

    if max_res is None and max_slice_nums is None:
        max_res = 1344
    try:
        options = BuildOptions(
            data_path=tuple(data),
            out_dir=out_dir,
            profile=profile,
            max_res=max_res,
            max_slice_nums=max_slice_nums,
            image_format=image_format,
            quality=quality,
            tokenizer=tokenizer,
            max_tokens=max_tokens,
            max_pixels=max_pixels,
            samples_per_shard=samples_per_shard,
            allow_outside_root=allow_outside_root,
            image_id_form=image_id_form,  # type: ignore[arg-type]
            input_format=input_format,
            channel=channel,
            think_block=think_block,
            imaging_path=imaging_path,
        )
        part = parse_part(part_text) if part_text is not None else None
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if ray_address is not None and runner != "ray":
        raise click.UsageError("--ray-address needs --runner ray")
    try:
        for path in data:
            check_input_format(path, input_format)
        result = build(
            options,
            workers=workers,
            progress=not no_progress,
            policy=RetryPolicy(unit_timeout=unit_timeout),
            runner=runner,
            ray_address=ray_address,
            part=part,
        )
    except (DatasetError, DatasetIndexError, RayUnavailableError, StorageError) as exc:
        raise click.ClickException(str(exc)) from None
    except ConnectionError as exc:  # Ray could not reach --ray-address
        raise click.ClickException(f"--ray-address {ray_address}: {exc}") from None
    click.echo(format_summary(result))
    if not result.ok:
        click.echo(
            "some units failed; fix the cause above and re-run the same command to finish", err=True
        )
        sys.exit(1)
    problem = reject_failure(result, max_reject_rate)
    if problem is not None:
        raise click.ClickException(problem)
    if part is not None:
        click.echo(f"part {part} done; when every part is done: mvprep merge {out_dir}")


@main.command("merge")
@click.argument("out_dir", type=PathOrUrl(exists=True, file_okay=False))
@click.option("--verify", "verify_hashes", is_flag=True, help="Also re-hash every shard.")
@STORAGE_OPTIONS
def merge_command(out_dir: Path | str, verify_hashes: bool) -> None:
    """After every --part build into OUT_DIR: check all shards, write manifest and rejects."""
    from mvprep.merge import merge
    from mvshards.index import DatasetIndexError

    try:
        result = merge(out_dir, verify_hashes=verify_hashes)
    except DatasetIndexError as exc:
        raise click.ClickException(str(exc)) from None
    totals = result.manifest["totals"]
    click.echo(
        f"merged {totals['shards']} shards of {out_dir}: {totals['samples']} samples, "
        f"{totals['rejects']} rejects, {totals['bytes'] / 1e9:.3f} GB; wrote manifest.json, "
        "rejects.jsonl, README.md"
    )


@main.command("layout")
@click.argument("width", type=str)
@click.argument("height", type=int, required=False)
@PROFILE
@click.option("--max-res", type=int, default=None, help="Default 1344 (9 slices).")
@click.option(
    "--max-slice-nums",
    type=int,
    default=None,
    help="Most slices per image (default: the profile's for --max-res).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per size.")
def layout_command(
    width: str,
    height: int | None,
    profile: str,
    max_res: int | None,
    max_slice_nums: int | None,
    as_json: bool,
) -> None:
    """Slice layout of a WIDTH HEIGHT image, or of every 'W H' line on stdin with '-'."""
    from mvprep.layout_rows import layout_row, parse_size_lines
    from mvshards.layout import max_slice_nums_for_res

    if max_res is not None and max_slice_nums is not None:
        raise click.UsageError("give --max-res or --max-slice-nums, not both")
    try:
        cap = (
            max_slice_nums
            if max_slice_nums is not None
            else max_slice_nums_for_res(max_res or 1344)
        )
        if width == "-":
            if height is not None:
                raise click.UsageError("with '-' the sizes come from stdin; drop HEIGHT")
            sizes = list(parse_size_lines(sys.stdin))
        else:
            if height is None or not width.isdigit():
                raise click.UsageError("give WIDTH HEIGHT as two integers, or '-' to read stdin")
            sizes = [(int(width), height)]
        rows = [layout_row(w, h, profile, cap) for w, h in sizes]
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    for row in rows:
        if as_json:
            click.echo(json.dumps(row, separators=(", ", ": ")))
        else:
            grid = "x".join(map(str, row["grid"])) if row["grid"] else "none"
            refine = "x".join(map(str, row["refine_size"])) if row["refine_size"] else "-"
            click.echo(
                f"{row['w']}x{row['h']} [{row['profile']}, "
                f"max_slice_nums={row['max_slice_nums']}]: "
                f"source {row['source_size'][0]}x{row['source_size'][1]}, grid {grid}, "
                f"refine {refine}, slices {len(row['slice_sizes'])}, "
                f"patches {row['num_patches']}, image tokens {row['num_image_tokens']}"
            )


@main.command("verify")
@click.argument("out_dir", type=PathOrUrl(exists=True, file_okay=False))
@STORAGE_OPTIONS
def verify_command(out_dir: Path | str) -> None:
    """Re-hash and re-count every shard in OUT_DIR against its index."""
    from mvshards.verify import verify_dataset

    report = verify_dataset(out_dir)
    click.echo(report.format_report())
    sys.exit(0 if report.ok else 1)


@main.command("stats")
@click.argument("out_dir", type=PathOrUrl(exists=True, file_okay=False))
@STORAGE_OPTIONS
@click.option(
    "--png",
    callback=png_callback,
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also draw token/patch histograms and their 2-D histogram to this PNG.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object, not the table.")
@click.option(
    "--lengths",
    type=click.Path(exists=True, path_type=Path),
    default=None,
    metavar="RUN_OUT/cache",
    help="Exact token counts from a mvtrain run's length cache (the run's output folder, its "
    "cache/ folder or the cache file) for these shards.",
)
@click.option(
    "--tokenizer",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Exact token counts by tokenizing every sample's text with this local HF tokenizer "
    "folder (reads the shards' JSON, no image; what build --tokenizer would have counted).",
)
def stats_command(
    out_dir: Path | str,
    png: Path | None,
    as_json: bool,
    lengths: Path | None,
    tokenizer: Path | None,
) -> None:
    """Counts, rejects and percentiles of a built dataset, from its index alone.

    Token numbers and the --token-budget suggestions are exact when the build ran with
    --tokenizer, or with --lengths / --tokenizer here; otherwise they come from the build's
    estimate, an upper bound of the exact counts, and are labelled "estimated, upper bound"
    (budgets that hold every sample, but larger than needed)."""
    from mvprep.stats import dataset_stats, format_stats, load_index_arrays, use_exact_tokens
    from mvprep.tokens import TokenizerError
    from mvshards.index import DatasetIndexError

    if lengths is not None and tokenizer is not None:
        raise click.UsageError("give --lengths or --tokenizer, not both")
    try:
        arrays = load_index_arrays(out_dir)
        if lengths is not None or tokenizer is not None:
            use_exact_tokens(arrays, lengths=lengths, tokenizer=tokenizer)
    except (DatasetIndexError, TokenizerError) as exc:
        raise click.ClickException(str(exc)) from None
    stats = dataset_stats(arrays)
    if png is not None:
        from mvprep.stats_plot import plot_stats

        plot_stats(arrays, stats, png)
    if as_json:
        click.echo(json.dumps(stats, indent=1))
    else:
        click.echo(format_stats(stats))
    if png is not None:
        click.echo(f"wrote {png}", err=as_json)


@main.command("inspect")
@click.argument("out_dir", type=PathOrUrl(exists=True, file_okay=False))
@STORAGE_OPTIONS
@click.argument("key", required=False)
@click.option("--id", "record_id", default=None, help="Find the sample by its record id.")
@click.option(
    "--png",
    callback=png_callback,
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to draw it (default: inspect-KEY.png in the current folder).",
)
@click.option(
    "--tokenizer",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Local HF tokenizer folder: its image/slice token strings (default <unk> etc.).",
)
@click.option("--full", is_flag=True, help="Print every image token, not [<unk> x N].")
def inspect_command(
    out_dir: Path | str,
    key: str | None,
    record_id: str | None,
    png: Path | None,
    tokenizer: str | None,
    full: bool,
) -> None:
    """Draw sample KEY (or --id ID) with its slice grid; print the text the model sees.

    Exits 1 when the stored layout has a problem (also drawn in red on the PNG)."""
    from mvprep.inspect_sample import InspectError, compact_text, inspect_sample
    from mvshards.index import DatasetIndexError

    tokens = None
    if tokenizer is not None:
        from transformers import AutoTokenizer

        from mvshards.image_spans import span_tokens
        from mvshards.index import read_manifest
        from mvshards.profiles import get_profile

        family = get_profile(read_manifest(out_dir)["params"]["profile"]).family
        tokens = span_tokens(AutoTokenizer.from_pretrained(tokenizer), family)
    try:
        found = inspect_sample(out_dir, key=key, record_id=record_id, tokens=tokens)
    except (InspectError, DatasetIndexError) as exc:
        raise click.ClickException(str(exc)) from None
    png = png if png is not None else Path(f"inspect-{found.meta.key}.png")
    png.parent.mkdir(parents=True, exist_ok=True)
    found.image.save(png)
    meta = found.meta
    counted = "exact" if meta.token_count_exact else "estimated, upper bound"
    origin = ""
    if meta.source is not None:
        origin = f" from {meta.source.get('file')} record {meta.source.get('index')}"
    click.echo(
        f"sample {meta.key} (id {meta.id!r}{origin}) in {found.shard.name}: images "
        f"{len(meta.images)}, {meta.num_tokens} tokens ({counted}), {meta.num_patches} patches"
    )
    for problem in found.problems:
        click.echo(f"LAYOUT PROBLEM: {problem}", err=True)
    click.echo("--- the conversation as the model sees it (before the chat template) ---")
    for turn in found.turns:
        text = turn["content"] if full else compact_text(turn["content"], found.query_token)
        click.echo(f"[{turn['role']}]\n{text}")
    click.echo(f"--- wrote {png}")
    if found.problems:
        sys.exit(1)


IS_EXPECTED = expected_classes(
    "builtins:ValueError",
    "builtins:FileNotFoundError",
    "mvshards.index:DatasetIndexError",
    "mvprep.readers:DatasetError",
    "mvprep.tokens:TokenizerError",
    "mvprep.inspect_sample:InspectError",
    "mvprep.runners.ray_runner:RayUnavailableError",
    "mvshards.storage:StorageError",
)
"""The failures a user can act on: one line, no traceback."""


def entry() -> None:
    """The ``mvprep`` console command: :data:`main` with one-line failures."""
    run_cli(main, "mvprep", IS_EXPECTED)


if __name__ == "__main__":
    entry()
