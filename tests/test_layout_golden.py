"""Every row of the golden slice layouts in ``<repo>/../shared/golden`` must match exactly.

The golden files hold, per ``(w, h, max_slice_nums)``, what the model families' own image
processors compute (see the folder's README). One test per file; all mismatching rows are
reported together in one assertion message.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from mvshards.families import REMOTE_26
from mvshards.layout import assign_image_ids, compute_layout, num_image_tokens
from mvshards.profiles import get_profile

GOLDEN_DIR = Path(__file__).resolve().parents[2] / "shared" / "golden"
"""``<repo>/../shared/golden``: the repository is cloned next to a copy of ``shared/``."""

GOLDEN_FILES = {
    "minicpmv-2.6": "minicpmv-2.6.public.jsonl",
    "minicpmv-4.6": "minicpmv-4.6.public.jsonl",
}
LAYOUT_FIELDS = ("source_size", "grid", "refine_size", "slice_sizes", "tgt_sizes", "num_patches")
MAX_REPORTED = 25


def _load_rows(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _computed_row(row: dict[str, Any], profile_name: str) -> dict[str, Any]:
    """Our answer for one golden row, with the same field names as the row."""
    profile = get_profile(profile_name)
    w, h, msn = row["w"], row["h"], row["max_slice_nums"]
    layout = compute_layout(w, h, profile, msn)
    got: dict[str, Any] = layout.to_dict()
    got["num_image_tokens"] = num_image_tokens(layout, profile, 0)
    if profile.family is REMOTE_26:
        got["num_image_tokens_no_image_id"] = num_image_tokens(layout, profile, None)
        (finetune_id,) = assign_image_ids([layout], "finetune")
        got["num_image_tokens_finetune_qwen"] = num_image_tokens(layout, profile, finetune_id)
    else:
        profile_4x = dataclasses.replace(profile, patch_tokens_divisor=4)
        got["num_image_tokens_4x"] = num_image_tokens(layout, profile_4x, 0)
    return got


def _expected_fields(profile_name: str) -> tuple[str, ...]:
    extra = (
        ("num_image_tokens_no_image_id", "num_image_tokens_finetune_qwen")
        if profile_name == "minicpmv-2.6"
        else ("num_image_tokens_4x",)
    )
    return (*LAYOUT_FIELDS, "num_image_tokens", *extra)


@pytest.mark.parametrize("profile_name", sorted(GOLDEN_FILES))
def test_golden_rows_match_exactly(profile_name: str) -> None:
    path = GOLDEN_DIR / GOLDEN_FILES[profile_name]
    if not GOLDEN_DIR.is_dir():
        pytest.skip(f"golden folder {GOLDEN_DIR} is absent (clone the repo next to shared/)")
    assert path.is_file(), f"golden folder exists but {path.name} is missing from {GOLDEN_DIR}"
    rows = _load_rows(path)
    assert len(rows) >= 100, f"{path.name}: only {len(rows)} rows, expected hundreds"

    fields = _expected_fields(profile_name)
    mismatches: list[str] = []
    for row in rows:
        missing = [f for f in fields if f not in row]
        assert not missing, f"{path.name}: row {row} lacks fields {missing}"
        got = _computed_row(row, profile_name)
        diffs = [f"{f}: expected {row[f]} got {got[f]}" for f in fields if got[f] != row[f]]
        if diffs:
            where = f"w={row['w']} h={row['h']} max_slice_nums={row['max_slice_nums']}"
            mismatches.append(f"{where}: " + "; ".join(diffs))

    shown = "\n".join(mismatches[:MAX_REPORTED])
    more = (
        f"\n... and {len(mismatches) - MAX_REPORTED} more" if len(mismatches) > MAX_REPORTED else ""
    )
    assert not mismatches, (
        f"{profile_name}: {len(mismatches)} of {len(rows)} golden rows differ\n{shown}{more}"
    )


def test_golden_files_cover_all_slice_caps() -> None:
    """The golden tables exercise every cap the CLI maps --max-res 1344/896/448 to."""
    if not GOLDEN_DIR.is_dir():
        pytest.skip(f"golden folder {GOLDEN_DIR} is absent (clone the repo next to shared/)")
    for name in GOLDEN_FILES.values():
        caps = {row["max_slice_nums"] for row in _load_rows(GOLDEN_DIR / name)}
        assert caps == {1, 4, 9}, f"{name}: slice caps {sorted(caps)}"
