"""Samples over a budget on their own are named, not just counted: the summary lists the
first few with their costs, counts them once per epoch and in total, and
``OUT/skipped.jsonl`` holds every one -- checked against what the batch log trained."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from run_helpers import MVTRAIN, _env

from mvshards.index import load_index

pytestmark = pytest.mark.slow
TOKENS = 4096


def test_skipped_samples_are_listed_once_per_epoch(shards: Path, tmp_path: Path) -> None:
    patches = int(load_index(shards).num_patches.max()) - 1  # the largest samples are over
    out = tmp_path / "run"
    cmd = [*MVTRAIN, "--shards", str(shards), "--model", "tiny", "--output", str(out)]
    cmd += ["--token-budget", str(TOKENS), "--patch-budget", str(patches), "--epochs", "2"]
    cmd += ["--dry-run", "--no-progress", "--batch-log", str(out / "batches.jsonl")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]

    rows = [json.loads(x) for x in (out / "skipped.jsonl").read_text().splitlines()]
    assert rows, "the budgets were chosen so that some samples are over them"
    assert all(r["padded_tokens"] > TOKENS or r["padded_patches"] > patches for r in rows)
    per_epoch = Counter(r["epoch"] for r in rows)
    assert per_epoch[0] == per_epoch[1] and set(per_epoch) == {0, 1}
    skipped = {r["key"] for r in rows}

    lines = [json.loads(x) for x in (out / "batches.jsonl").read_text().splitlines()]
    trained = Counter(k for line in lines if line["weight"] > 0 for k in line["keys"])
    assert not skipped & set(trained), "a skipped sample was trained"
    assert set(trained) | skipped == set(load_index(shards).keys)
    assert set(trained.values()) == {2}, "every other sample trains once per epoch"

    summary = next(x for x in proc.stdout.splitlines() if "over-budget samples skipped" in x)
    assert f"{per_epoch[0]} per epoch, {len(rows)} in total" in summary
    assert rows[0]["key"] in summary and str(out / "skipped.jsonl") in summary
