"""Evaluation during training (``--eval-shards``): the eval plan dealt over ranks, the options
refused in one line, the report's eval and per-group curves, and a 2-rank DeepSpeed run with
an eval set that does not divide over the ranks -- its eval losses (overall and per group)
against plain single-sample forwards of the model at step 0 and of the exported final model,
``--save-best`` keeping the best, and its training losses and weights bit for bit those of
the same run without eval (``two_rank_run``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from run_helpers import TWO_RANK_ARGS, _digests, _losses, _train
from train_fixtures import alone_loss

from mvshards.families import NATIVE_46
from mvshards.index import load_index
from mvshards.schema import SampleMeta
from mvtrain.batching.plan_index import PlanIndex
from mvtrain.batching.sources import SourceMismatchError
from mvtrain.budgets import Budgets
from mvtrain.evaluation import head, plan_eval
from mvtrain.run_config import RunConfig

BUDGETS = Budgets(1024, 4096)

# --- the plan ------------------------------------------------------------------------------


def _index(n: int, seed: int = 0) -> PlanIndex:
    rng = np.random.default_rng(seed)
    return PlanIndex.from_arrays(
        [f"{i:09d}" for i in range(n)],
        [i // 4 for i in range(n)],
        rng.integers(20, 500, n),
        np.zeros(n, dtype=np.int64),
    )


@pytest.mark.parametrize("n", [1, 2, 3, 7, 40])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_eval_plan_deals_the_first_samples_once_with_no_rank_idle(n: int, world: int) -> None:
    index = _index(n + 5)
    first = head(index, n)
    assert first.keys.tolist() == index.keys[:n].tolist() and len(head(index, None)) == n + 5
    plan = plan_eval(first, world, BUDGETS, NATIVE_46.cost)
    assert plan == plan_eval(first, world, BUDGETS, NATIVE_46.cost), "not deterministic"
    assert len(plan.per_rank) == world and plan.samples == n and plan.oversize == 0
    dealt = sorted(k for batches in plan.per_rank for b in batches for k in b.keys)
    assert dealt == sorted(index.keys[:n].tolist()), "every one of the first n, once"
    for batches in plan.per_rank:
        assert all(BUDGETS.fits(b.padded_tokens, b.padded_patches) for b in batches)
        assert all(b.weight == 1 for b in batches)
    if n >= world:
        assert all(plan.per_rank), "a rank got no eval micro-batch"
    loads = [sum(b.cost for b in batches) for batches in plan.per_rank]
    costliest = max(b.cost for batches in plan.per_rank for b in batches)
    assert max(loads) - min(loads) <= costliest + 1e-9, "the deal is not balanced"


# --- options refused in one line ---------------------------------------------------------


def _config(shards: Path, out: Path, **changes: Any) -> RunConfig:
    return RunConfig(shards=[shards], model="tiny", output=out, **changes)


def test_eval_options_are_checked_before_anything_runs(shards: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--save-best needs --eval-shards"):
        _config(shards, tmp_path, save_best=True).validate()
    with pytest.raises(ValueError, match="--eval-every must be >= 1"):
        _config(shards, tmp_path, eval_shards=[shards], eval_every=0).validate()
    with pytest.raises(ValueError, match="take no weight"):
        _config(shards, tmp_path, eval_shards=[f"{shards}:2"]).validate()
    with pytest.raises(ValueError, match="has no manifest.json"):
        _config(shards, tmp_path, eval_shards=[tmp_path]).validate()
    other = tmp_path / "other"
    shutil.copytree(shards, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["params"]["max_slice_nums"] = int(manifest["params"].get("max_slice_nums") or 1) + 3
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SourceMismatchError, match=r"^--eval-shards .*different max_slice_nums"):
        _config(shards, tmp_path, eval_shards=[other]).validate()
    _config(shards, tmp_path, eval_shards=[shards], save_best=True, eval_every=2).validate()


# --- the report ----------------------------------------------------------------------------


@pytest.mark.slow  # matplotlib
def test_report_draws_the_eval_curve_and_the_per_group_losses(tmp_path: Path) -> None:
    from mvtrain.report import format_report, write_report

    rows = [
        {"step": 0, "eval_loss": 6.0, "eval_loss_by_channel": {"ocr": 6.5, "val": 5.5}},
        {"step": 1, "epoch": 0, "tokens_per_s": 10.0, "loss": 5.9, "lr": 1e-3,
         "loss_by_source": {"a": 5.8}, "loss_by_channel": {"ocr": 6.1}},
        {"step": 2, "epoch": 0, "tokens_per_s": 11.0, "loss": 5.1, "lr": 1e-3,
         "loss_by_source": {"a": 5.0}, "eval_loss": 4.0,
         "eval_loss_by_channel": {"ocr": 4.5, "val": 3.5}},
    ]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = write_report(tmp_path)
    assert report.steps == [0, 1, 2]
    assert report.series["eval_loss"] == [6.0, None, 4.0]
    assert report.series["loss/a"] == [None, 5.8, 5.0]
    assert report.series["loss/ocr"] == [None, 6.1, None]
    assert report.series["eval_loss/ocr"] == [6.5, None, 4.5]
    assert report.series["eval_loss/val"] == [5.5, None, 3.5]
    assert "loss per group (eval dashed)" in report.panels and "loss" in report.panels
    text = format_report(report)
    assert "steps 2," in text and "eval loss 6.0000 -> 4.0000 (best 4.0000 at step 2)" in text
    assert report.png.stat().st_size > 0


# --- a 2-rank run with eval ---------------------------------------------------------------

EVAL_EVERY = 3


@pytest.fixture(scope="session")  # not module: tests of other modules may run in between
def held(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two eval folders (copies of the training shards): groups ``a/held`` and ``b/held``."""
    root = tmp_path_factory.mktemp("held")
    folders = [root / "a" / "held", root / "b" / "held"]
    for folder in folders:
        shutil.copytree(shards, folder)
    return folders


def _count(shards: Path) -> int:
    return len(load_index(shards).keys) + 3  # all of a/held, 3 of b/held


@pytest.fixture(scope="session")  # not module: tests of other modules may run in between
def eval_run(shards: Path, held: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``two_rank_run``'s run with an odd eval set (not even over 2 ranks) and --save-best."""
    out = tmp_path_factory.mktemp("eval") / "run"
    evals = [arg for folder in held for arg in ("--eval-shards", str(folder))]
    _train(
        shards,
        out,
        *TWO_RANK_ARGS,
        "--batch-log",
        str(out / "batches.jsonl"),
        *evals,
        "--eval-every",
        str(EVAL_EVERY),
        "--eval-max-samples",
        str(_count(shards)),
        "--save-best",
    )
    return out


def _eval_rows(out: Path) -> dict[int, dict[str, Any]]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "eval_loss" in r}


def _plain_eval(model: Any, tokenizer: Any, held: list[Path], count: int) -> dict[str, Any]:
    """The first ``count`` eval samples (folder by folder, dataset order), each forwarded
    alone with ``F.cross_entropy``: token-weighted mean loss overall and per group."""
    from mvtrain.data.sample import load_sample
    from mvtrain.data.shard_access import ShardAccess
    from mvtrain.model.adapters import adapter_for

    sums: dict[str, list[float]] = {}
    model.eval()
    for folder in held:
        index = load_index(folder)
        profile = index.params["profile"]
        adapter = adapter_for(profile, tokenizer)
        access = ShardAccess(index.shard_paths())
        name = f"{folder.parent.name}/{folder.name}"
        for key, shard in zip(index.keys.tolist(), index.shard_ids.tolist(), strict=True):
            if count == 0:
                break
            count -= 1
            members = access.members(int(shard), str(key))
            meta = SampleMeta.from_json(json.loads(members["json"]))
            sample = load_sample(meta, members, tokenizer, profile)
            total, labels = alone_loss(model, adapter, sample)
            group = getattr(meta, "channel", None) or name
            entry = sums.setdefault(group, [0.0, 0])
            entry[0] += total
            entry[1] += labels
    return {
        "loss": sum(t for t, _ in sums.values()) / sum(n for _, n in sums.values()),
        "by_group": {g: t / n for g, (t, n) in sums.items() if n},
        "tokens": sum(n for _, n in sums.values()),
    }


def _assert_matches(row: dict[str, Any], plain: dict[str, Any]) -> None:
    assert row["eval_tokens"] == plain["tokens"]
    assert row["eval_loss"] == pytest.approx(plain["loss"], rel=1e-4)
    assert set(row["eval_loss_by_channel"]) == set(plain["by_group"])
    for group, loss in plain["by_group"].items():
        assert row["eval_loss_by_channel"][group] == pytest.approx(loss, rel=1e-4), group


@pytest.mark.slow
@pytest.mark.xdist_group("two_rank_run")  # with test_train_run's: one build
def test_eval_leaves_training_bit_for_bit_as_without_it(eval_run: Path, two_rank_run: Path) -> None:
    assert _losses(eval_run) == _losses(two_rank_run)
    assert sorted(_losses(eval_run)) == [1, 2, 3, 4, 5, 6]
    assert _digests(eval_run) == _digests(two_rank_run) and len(_digests(eval_run)) == 1


@pytest.mark.slow
@pytest.mark.xdist_group("two_rank_run")  # with test_train_run's: one build
def test_eval_loss_is_the_token_weighted_loss_of_plain_forwards(
    eval_run: Path, held: list[Path], shards: Path
) -> None:
    from transformers import AutoModelForImageTextToText

    from mvtrain.model.tiny import build_tiny_model

    rows = _eval_rows(eval_run)
    assert sorted(rows) == [0, 3, 6], "at step 0, every --eval-every steps, at the end"
    count = _count(shards)
    assert {r["eval_samples"] for r in rows.values()} == {count}
    assert all(set(r["eval_loss_by_channel"]) == {"a/held", "b/held"} for r in rows.values())
    assert rows[6]["eval_loss"] < rows[0]["eval_loss"] and "loss" in rows[6]
    initial, tokenizer = build_tiny_model(seed=0)
    _assert_matches(rows[0], _plain_eval(initial, tokenizer, held, count))
    final = AutoModelForImageTextToText.from_pretrained(eval_run / "hf")
    _assert_matches(rows[6], _plain_eval(final, tokenizer, held, count))


@pytest.mark.slow
@pytest.mark.xdist_group("two_rank_run")  # with test_train_run's: one build
def test_save_best_keeps_the_checkpoint_and_export_of_the_lowest_eval_loss(
    eval_run: Path,
) -> None:
    from transformers import AutoModelForImageTextToText

    from mvtrain.loop import parameter_digest

    rows = _eval_rows(eval_run)
    step = min(rows, key=lambda s: rows[s]["eval_loss"])
    best = eval_run / "best"
    record = json.loads((best / "best.json").read_text())
    assert record["step"] == step and record["eval_loss"] == rows[step]["eval_loss"]
    assert record["eval_loss_by_channel"] == rows[step]["eval_loss_by_channel"]
    assert (best / record["checkpoint"] / "COMPLETE").exists()
    assert {p.name for p in (best / record["checkpoint"]).glob("rank-*.pt")} == {
        "rank-0.pt",
        "rank-1.pt",
    }
    assert not (eval_run / "best.new").exists()
    assert step == 6, "this run's eval loss falls at every eval"
    model = AutoModelForImageTextToText.from_pretrained(best / record["hf"])
    assert {parameter_digest(model)} == _digests(eval_run), "the best export is step 6's"
