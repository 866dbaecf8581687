"""``mvprep``: the offline stage's command line. Options are parsed here; the work is done
by library functions (``mvprep.build.build``, ``mvprep.layout_rows``, ``mvshards.verify``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from mvshards.profiles import DEFAULT_PROFILE, PROFILES

PROFILE_CHOICE = click.Choice(sorted(PROFILES))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Preprocess MiniCPM-V fine-tuning data into annotated WebDataset shards."""


@main.command("build")
@click.argument("data", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output folder."
)
@click.option("--profile", default=DEFAULT_PROFILE, type=PROFILE_CHOICE, show_default=True)
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
@click.option("--workers", type=int, default=1, show_default=True, help="Worker processes.")
@click.option("--samples-per-shard", type=int, default=1000, show_default=True)
@click.option(
    "--format",
    "image_format",
    type=click.Choice(["jpeg", "png", "webp"]),
    default="jpeg",
    show_default=True,
)
@click.option("--quality", type=int, default=95, show_default=True, help="JPEG quality.")
@click.option(
    "--tokenizer",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Local HF tokenizer folder: exact token counts.",
)
@click.option("--max-tokens", type=int, default=None, help="Reject samples longer than this.")
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
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def build_command(
    data: Path,
    out_dir: Path,
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
    no_progress: bool,
) -> None:
    """Build shards from DATA (MiniCPM-V JSON/JSONL or LLaVA-style)."""
    from mvprep.build import build
    from mvprep.options import BuildOptions
    from mvprep.pool import RetryPolicy
    from mvprep.summary import format_summary

    if max_res is None and max_slice_nums is None:
        max_res = 1344
    try:
        options = BuildOptions(
            data_path=data,
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
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    result = build(
        options,
        workers=workers,
        progress=not no_progress,
        policy=RetryPolicy(unit_timeout=unit_timeout),
    )
    click.echo(format_summary(result))
    if not result.ok:
        click.echo(
            "some units failed; fix the cause above and re-run the same command to finish", err=True
        )
        sys.exit(1)


@main.command("layout")
@click.argument("width", type=str)
@click.argument("height", type=int, required=False)
@click.option("--profile", default=DEFAULT_PROFILE, type=PROFILE_CHOICE, show_default=True)
@click.option("--max-res", type=int, default=None, help="Default 1344 (9 slices).")
@click.option("--max-slice-nums", type=int, default=None)
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
@click.argument("out_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def verify_command(out_dir: Path) -> None:
    """Re-hash and re-count every shard in OUT_DIR against its index."""
    from mvshards.verify import verify_dataset

    report = verify_dataset(out_dir)
    click.echo(report.format_report())
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
