"""How much larger mvprep's tokenizer-free token estimate is than the exact count.

Usage: ``python scripts/estimate_margin.py [DATA ...] [--tokenizer DIR] [--max-res 1344]``

Without DATA it generates the demo set (``scripts/make_demo_data.py --drawn-photos``) in a
temporary folder; without ``--tokenizer`` it builds the tiny test tokenizer
(``mvshards.tiny_tokenizer``). For every valid record and both profiles it prints the ratio
estimate / exact of the text tokens (``mvprep.tokens.EstimateTokenCounter`` against
``HFTokenCounter``) and of the whole sample (text + image tokens; the image tokens come from
the slice layout and are exact either way): mean, max and min, and whether the estimate was
ever below the exact count (it must not be: it is an upper bound).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from mvprep.imaging import probe_image, read_image_bytes
from mvprep.inputs import open_inputs
from mvprep.records import RecordError, normalize_record, resolve_image_path
from mvprep.tokens import EstimateTokenCounter, HFTokenCounter
from mvshards.layout import (
    assign_image_ids,
    compute_layout,
    max_slice_nums_for_res,
    num_image_tokens,
)
from mvshards.profiles import PROFILES, get_profile


def _demo_data(folder: Path) -> list[Path]:
    spec = importlib.util.spec_from_file_location(
        "make_demo_data", Path(__file__).with_name("make_demo_data.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    data = module.make_demo_dataset(folder, drawn_photos=True)
    return [data, data.with_name("demo_llava.jsonl")]


def measure(
    data_files: list[Path], tokenizer_dir: Path, max_res: int = 1344
) -> dict[str, dict[str, Any]]:
    """Per profile: ``{"records", "text": {...}, "sample": {...}}`` with the ratios' mean,
    max and min and the count of records where the estimate was below the exact count."""
    exact = HFTokenCounter(tokenizer_dir)
    inputs = open_inputs(data_files)
    records = []
    for index, raw, file in inputs.read_range(0, inputs.num_records):
        try:
            if isinstance(raw, RecordError):
                continue
            record = normalize_record(index, raw)
            sizes = []
            for _, path in record.images:
                data = read_image_bytes(resolve_image_path(file.root, path, False))
                sizes.append(probe_image(data, name=path).size)
        except Exception:  # noqa: BLE001 - bad records are the build's business, not ours
            continue
        records.append(
            (record, sizes, exact.count_text_tokens(record.conversations, record.image_names))
        )
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(PROFILES):
        profile = get_profile(name)
        estimate = EstimateTokenCounter(name)
        text_ratios, sample_ratios, under = [], [], 0
        for record, sizes, x in records:
            layouts = [
                compute_layout(w, h, profile, max_slice_nums_for_res(max_res)) for w, h in sizes
            ]
            ids = assign_image_ids(layouts, profile.default_image_id_form)
            image = sum(
                num_image_tokens(lay, profile, i) for lay, i in zip(layouts, ids, strict=True)
            )
            e = estimate.count_text_tokens(record.conversations, record.image_names)
            under += e < x
            text_ratios.append(e / x)
            sample_ratios.append((e + image) / (x + image))

        def summary(values: list[float]) -> dict[str, float]:
            return {
                "mean": round(statistics.mean(values), 2),
                "max": round(max(values), 2),
                "min": round(min(values), 2),
            }

        out[name] = {
            "records": len(records),
            "under": under,
            "text": summary(text_ratios),
            "sample": summary(sample_ratios),
        }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", nargs="*", type=Path, help="data files (default: the demo set)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="default: the tiny one")
    parser.add_argument("--max-res", type=int, default=1344, help="slice cap for image tokens")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data or _demo_data(Path(tmp) / "demo")
        tokenizer = args.tokenizer
        if tokenizer is None:
            from mvshards.tiny_tokenizer import build_tiny_tokenizer

            tokenizer = build_tiny_tokenizer(Path(tmp) / "tiny")
        result = measure(list(data), tokenizer, args.max_res)
    json.dump(result, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
