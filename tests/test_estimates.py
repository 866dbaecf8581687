"""Estimated token counts are upper bounds, say so, and ``mvprep stats`` uses exact counts
whenever they exist (the tiny tokenizer gives the exact counts)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pipeline_data import make_pipeline_dataset

from mvprep.stats import ExactTokensError, dataset_stats, load_index_arrays, use_exact_tokens
from mvshards.index import load_index
from mvshards.tiny_tokenizer import build_tiny_tokenizer

ROOT = Path(__file__).resolve().parent.parent
MVPREP = [sys.executable, "-m", "mvprep.cli"]

pytestmark = pytest.mark.slow


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny"))


def test_estimate_bounds_the_demo_and_test_sets_for_every_profile(
    tiny_dir: Path, tmp_path: Path
) -> None:
    demo = _script("make_demo_data").make_demo_dataset(tmp_path / "demo", drawn_photos=True)
    pipeline = make_pipeline_dataset(tmp_path / "pipe", count=12)
    measure = _script("estimate_margin").measure
    for files in ([demo, demo.with_name("demo_llava.jsonl")], [pipeline]):
        result = measure(files, tiny_dir)
        for profile, m in result.items():
            assert m["records"] >= 10
            assert m["under"] == 0, (files, profile)  # never below the exact count
            assert m["text"]["min"] >= 1.0 and m["sample"]["min"] >= 1.0
            assert m["text"]["mean"] < 4.0  # an upper bound, not a useless one


@pytest.fixture(scope="module")
def exact_cache(
    shards: Path, tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, np.ndarray]:
    """What the trainer counts and caches for ``shards`` with the tiny tokenizer."""
    from transformers import AutoTokenizer

    from mvtrain.data.lengths import exact_lengths

    profile = json.loads((shards / "manifest.json").read_text())["params"]["profile"]
    run = tmp_path_factory.mktemp("run")
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_dir))
    lengths = exact_lengths(load_index(shards), tokenizer, profile, run / "cache")
    assert lengths.recounted and len(list((run / "cache").glob("lengths-*.json"))) == 1
    return run, lengths.tokens


def test_stats_budgets_come_from_exact_counts_when_there_are_any(
    shards: Path, tiny_dir: Path, exact_cache: tuple[Path, np.ndarray]
) -> None:
    run, trainer_tokens = exact_cache
    estimated = load_index_arrays(shards)
    assert not estimated.tokens_exact
    assert (estimated.tokens >= trainer_tokens).all()  # the build's estimate bounds them
    assert (estimated.tokens > trainer_tokens).any()

    for how in ({"lengths": run}, {"lengths": run / "cache"}, {"tokenizer": tiny_dir}):
        arrays = load_index_arrays(shards)
        use_exact_tokens(arrays, **how)  # type: ignore[arg-type]
        assert arrays.tokens.tolist() == trainer_tokens.tolist(), how  # prep counts = trainer's
        stats = dataset_stats(arrays)
        assert stats["token_counts_exact"] and stats["token_counts"].startswith("exact, ")
        assert stats["budgets"]["max"]["token_budget"] == int(trainer_tokens.max())

    other = run.parent / "other"
    (other / "cache").mkdir(parents=True)
    (other / "cache" / "lengths-0123456789abcdef-x-minicpmv-4.6.json").write_text("{}")
    with pytest.raises(ExactTokensError, match="no exact-length cache"):
        use_exact_tokens(load_index_arrays(shards), lengths=other)
    with pytest.raises(ExactTokensError, match="another build"):
        use_exact_tokens(
            load_index_arrays(shards),
            lengths=other / "cache" / "lengths-0123456789abcdef-x-minicpmv-4.6.json",
        )


def test_stats_cli_labels_estimates_and_uses_a_trainer_cache(
    shards: Path, exact_cache: tuple[Path, np.ndarray]
) -> None:
    run, trainer_tokens = exact_cache
    plain = subprocess.run(
        [*MVPREP, "stats", str(shards)], capture_output=True, text=True, timeout=60
    )
    assert plain.returncode == 0, plain.stderr
    assert "token counts estimated, upper bound" in plain.stdout.splitlines()[0]
    estimate_max = int(load_index_arrays(shards).tokens.max())
    assert f"--token-budget {estimate_max} (estimated, upper bound) --patch-budget" in plain.stdout
    exact = subprocess.run(
        [*MVPREP, "stats", str(shards), "--lengths", str(run / "cache"), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert exact.returncode == 0, exact.stderr
    stats = json.loads(exact.stdout)
    assert stats["token_counts"].startswith("exact, trainer cache ")
    assert stats["budgets"]["max"]["token_budget"] == int(trainer_tokens.max()) < estimate_max
