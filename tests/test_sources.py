"""Several ``--shards`` folders in one run: weights per epoch (counted sample by sample over
several epochs), one source planning exactly as a bare index, sample ids across folders,
mismatched builds refused in one line, per-source loss against plain single-sample
forwards, and a two-source run stopped and resumed equal to an uninterrupted one."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import train_fixtures
from hypothesis import given, settings
from hypothesis import strategies as st
from run_helpers import _losses
from train_fixtures import Loaded, _text_only, _with_images, alone_loss

from mvshards.families import NATIVE_46
from mvtrain.batching.epochs import plan_epochs
from mvtrain.batching.plan_index import PlanIndex
from mvtrain.batching.sources import (
    ShardSource,
    SourceMismatchError,
    SourceMix,
    epoch_share,
    load_sources,
    source_names,
)
from mvtrain.budgets import Budgets
from mvtrain.data.loader import make_micro_batch
from mvtrain.data.tokenize import IGNORE_INDEX
from mvtrain.distributed import DistInfo
from mvtrain.engine import make_engine
from mvtrain.metrics import BatchLog
from mvtrain.model.adapters import adapter_for, token_loss_sum
from mvtrain.model.tiny import build_tiny_model
from mvtrain.run_config import RunConfig
from mvtrain.step import WindowRunner

_one_thread = train_fixtures._one_thread
tok_dir = train_fixtures.tok_dir
tiny = train_fixtures.tiny
dataset = train_fixtures.dataset
loaded = train_fixtures.loaded

WORLD = DistInfo(rank=0, world_size=1, local_rank=0, backend="gloo")


def _part(n: int, per_shard: int, seed: int) -> PlanIndex:
    """``n`` samples in shards of ``per_shard``, keys as a build writes them."""
    rng = np.random.default_rng(seed)
    return PlanIndex.from_arrays(
        [f"{i:09d}" for i in range(n)],
        [i // per_shard for i in range(n)],
        rng.integers(20, 400, n),
        rng.integers(0, 3000, n),
        num_shards=max(1, math.ceil(n / per_shard)),
    )


def _mix(sizes: list[int], weights: list[float], per_shard: int = 3) -> SourceMix:
    sources = [ShardSource(Path(f"data/s{i}/shards"), w) for i, w in enumerate(weights)]
    parts = [_part(n, per_shard, i) for i, n in enumerate(sizes)]
    return SourceMix.of_plan_indexes(sources, parts)


# --- weights ------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    weights=st.lists(st.floats(0.05, 3.5), min_size=3, max_size=3),
    seed=st.integers(0, 2**16),
    per_shard=st.integers(1, 7),
)
def test_each_epoch_draws_round_w_n_samples_per_source(
    sizes: list[int], weights: list[float], seed: int, per_shard: int
) -> None:
    weights = weights[: len(sizes)]
    if any(math.floor(w * n + 0.5) == 0 for w, n in zip(weights, sizes, strict=True)):
        with pytest.raises(ValueError, match="rounds to none per epoch"):
            _mix(sizes, weights, per_shard)
        return
    mix = _mix(sizes, weights, per_shard)
    for epoch in range(3):
        index = mix.epoch_index(seed, epoch)
        again = mix.epoch_index(seed, epoch)
        assert np.array_equal(index.keys, again.keys)  # a pure function of (seed, epoch)
        assert np.array_equal(index.shard_ids, again.shard_ids)
        counts = Counter(str(k) for k in index.keys)
        for s, (n, w) in enumerate(zip(sizes, weights, strict=True)):
            name = mix.names[s]
            prefix = f"{name}/" if len(sizes) > 1 else ""  # one source: ids are its keys
            mine = [counts[f"{prefix}{i:09d}"] for i in range(n)]
            assert sum(mine) == math.floor(w * n + 0.5)  # round(w * n), half up
            assert set(mine) <= {math.floor(w), math.floor(w) + 1}
        # every virtual shard holds samples of one real shard only
        real = mix.index.shard_ids[[mix.locator.rows[str(k)] for k in index.keys]]
        for v in range(index.num_shards):
            assert len(set(real[index.shard_ids == v].tolist())) == 1


def test_epoch_share_splits_copies_and_extra() -> None:
    assert epoch_share(10, 2.5) == (2, 5)
    assert epoch_share(10, 0.25) == (0, 3)  # 2.5 rounds half up
    assert epoch_share(7, 1.0) == (1, 0)
    assert epoch_share(0, 3.0) == (0, 0)


def test_planned_samples_per_source_per_epoch_follow_the_weights() -> None:
    mix = _mix([30, 20], [1.0, 0.35])
    config = RunConfig(
        shards=[],
        model="tiny",
        output=Path("unused"),
        epochs=4,
        token_budget=4096,
        patch_budget=1 << 20,
        shuffle_buffer=8,
    )
    plans = plan_epochs(config, mix, WORLD, NATIVE_46.cost)
    drawn = []
    for epoch in range(4):
        trained = Counter(
            mix.locator.source_of(k)
            for b in plans.plans[epoch].batches
            if not b.is_filler
            for k in b.keys
        )
        assert trained == {mix.names[0]: 30, mix.names[1]: 7}
        assert plans.report[epoch]["sources"][mix.names[1]]["samples"] == 7
        drawn.append(
            frozenset(
                k for b in plans.plans[epoch].batches for k in b.keys if k.startswith(mix.names[1])
            )
        )
    assert len(set(drawn)) > 1, "the fraction is drawn anew each epoch"


def test_one_source_of_weight_one_plans_exactly_as_the_bare_index() -> None:
    part = _part(40, 6, 0)
    mix = SourceMix.of_plan_indexes([ShardSource(Path("x/shards"))], [part])
    assert mix.names == ("shards",) and mix.locator.locate("000000007")[1:] == (
        "000000007",
        "shards",
    )
    world = DistInfo(rank=1, world_size=2, local_rank=1, backend="gloo")
    config = RunConfig(
        shards=[],
        model="tiny",
        output=Path("unused"),
        epochs=3,
        token_budget=1024,
        patch_budget=8192,
        grad_accum=2,
    )
    bare = plan_epochs(config, part, world, NATIVE_46.cost)
    mixed = plan_epochs(config, mix, world, NATIVE_46.cost)
    assert bare.steps == mixed.steps and bare.plans == mixed.plans


# --- identity and names -------------------------------------------------------------------


def test_names_are_basenames_told_apart_by_their_parents() -> None:
    assert source_names([Path("d/a"), Path("d/b")]) == ["a", "b"]
    assert source_names([Path("/x/a/shards"), Path("/x/b/shards")]) == ["a/shards", "b/shards"]
    assert source_names([Path("/x/a"), Path("/x/a")]) == ["a#1", "a#2"]


def test_equal_keys_in_two_folders_stay_two_samples() -> None:
    mix = _mix([5, 5], [1.0, 1.0])
    assert len(set(mix.index.keys.tolist())) == 10
    assert mix.names == ("s0/shards", "s1/shards")  # equal basenames: parents tell apart
    first = mix.locator.locate("s0/shards/000000002")
    second = mix.locator.locate("s1/shards/000000002")
    assert first[1] == second[1] == "000000002"
    assert (first[2], second[2]) == mix.names and first[0] != second[0]


def test_parse_dir_and_weight() -> None:
    assert ShardSource.parse("data/a:0.5") == ShardSource(Path("data/a"), 0.5)
    assert ShardSource.parse("data/a") == ShardSource(Path("data/a"), 1.0)
    with pytest.raises(ValueError, match="weight must be > 0"):
        ShardSource.parse("data/a:0")


# --- refusal ------------------------------------------------------------------------------


def _rebuilt_with(shards: Path, where: Path, **params: object) -> Path:
    """A copy of ``shards`` whose manifest says it was built with ``params``."""
    out = where / "shards"
    shutil.copytree(shards, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["params"].update(params)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        (
            {"max_res": 896, "max_slice_nums": 4},
            "different max_slice_nums (1 vs 4, from --max-res 448 vs 896); rebuild one with "
            "the other's --max-res",
        ),
        (
            {"profile": "minicpmv-2.6"},
            "different profile (minicpmv-4.6 vs minicpmv-2.6); rebuild one with the other's "
            "--profile",
        ),
        (
            {"image_id_form": "none"},
            "different image_id_form (inference vs none); rebuild one with the other's "
            "--image-id-form",
        ),
    ],
)
def test_mismatched_builds_are_refused_in_one_line(
    shards: Path, tmp_path: Path, params: dict[str, object], expected: str
) -> None:
    other = _rebuilt_with(shards, tmp_path, **params)
    with pytest.raises(SourceMismatchError) as caught:
        load_sources([shards, f"{other}:0.5"])
    assert (
        str(caught.value)
        == f"cannot mix --shards {shards} and {other}: they were built with {expected}"
    )
    assert "\n" not in str(caught.value)


def test_other_input_files_and_formats_mix(shards: Path, tmp_path: Path) -> None:
    other = _rebuilt_with(shards, tmp_path, data_path="/elsewhere/b.json", quality=80)
    sources, indexes = load_sources([shards, other])
    assert [s.path for s in sources] == [shards, other] and len(indexes) == 2


# --- per-source loss ----------------------------------------------------------------------


def test_token_loss_sum_rows_add_up_and_the_loss_is_cross_entropy_bit_for_bit() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 9, 50, requires_grad=True)
    labels = torch.randint(0, 50, (3, 9))
    labels[0, :4] = IGNORE_INDEX
    labels[2] = IGNORE_INDEX
    out = token_loss_sum(logits, labels)
    loss, count = out  # still unpacks to two
    plain = F.cross_entropy(
        logits[:, :-1].reshape(-1, 50),
        labels[:, 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    assert torch.equal(loss, plain)
    (grad,) = torch.autograd.grad(loss, logits)
    (plain_grad,) = torch.autograd.grad(plain, logits)
    assert torch.equal(grad, plain_grad)
    for row in range(3):
        one = F.cross_entropy(
            logits[row, :-1], labels[row, 1:], ignore_index=IGNORE_INDEX, reduction="sum"
        )
        assert abs(float(out.row_loss[row]) - float(one.detach())) < 1e-4
        assert int(out.row_count[row]) == int((labels[row, 1:] != IGNORE_INDEX).sum())
    assert int(count) == int(out.row_count.sum()) and not out.row_loss.requires_grad


@pytest.mark.slow
def test_per_source_loss_equals_plain_single_sample_forwards(
    loaded: dict[str, Loaded], tok_dir: Path
) -> None:
    model, tok = build_tiny_model(seed=0, tokenizer_dir=tok_dir)
    reference, _ = build_tiny_model(seed=0, tokenizer_dir=tok_dir)
    adapter = adapter_for("minicpmv-4.6", tok)
    rows = loaded["minicpmv-4.6"]
    text, images = _text_only(rows), _with_images(rows)

    def tag(sample: object, source: str) -> object:
        return dataclasses.replace(sample, source=source)  # type: ignore[type-var]

    groups = [
        [tag(text[0], "a"), tag(images[0], "b")],
        [tag(images[1], "a")],
        [tag(images[2], "b"), tag(images[3], "b"), tag(images[4], "a")],
    ]
    window = [make_micro_batch(i, g, 1.0, adapter) for i, g in enumerate(groups)]  # type: ignore[arg-type]
    filler = make_micro_batch(3, [tag(images[5], "a")], 0.0, adapter)  # type: ignore[arg-type]
    engine = make_engine(
        model,
        WORLD,
        use_deepspeed=False,
        lr=1e-3,
        weight_decay=0.0,
        warmup_steps=0,
        total_steps=10,
        grad_accum=4,
    )
    runner = WindowRunner(
        engine, adapter, WORLD, torch.device("cpu"), BatchLog(None), groups=("a", "b", "c")
    )
    result = runner.run([*window, filler], Budgets(1 << 30, 1 << 30), step=0)

    expected: dict[str, list[float]] = {"a": [0.0, 0], "b": [0.0, 0]}
    for group in groups:
        for sample in group:
            total, count = alone_loss(reference, adapter, sample)
            expected[sample.source][0] += total  # type: ignore[attr-defined]
            expected[sample.source][1] += count  # type: ignore[attr-defined]
    assert set(result.loss_by_group) == {"a", "b"}  # "c" had no tokens; the filler counts nothing
    for name, (total, count) in expected.items():
        assert result.group_labels[name] == count
        assert result.loss_by_group[name] == pytest.approx(total / count, rel=2e-5)
    all_loss = sum(t for t, _ in expected.values()) / sum(c for _, c in expected.values())
    assert result.loss == pytest.approx(all_loss, rel=2e-5)


# --- a two-source run, stopped and resumed ------------------------------------------------


def _run_config(shards: list[object], out: Path, **changes: object) -> RunConfig:
    options: dict[str, object] = {
        "shards": shards,
        "model": "tiny",
        "output": out,
        "token_budget": 1024,
        "patch_budget": 4096,
        "lr": 3e-3,
        "max_steps": 7,
        "save_every": 3,
        "use_deepspeed": False,
        "export": False,
        "progress": False,
        "tensorboard": False,
        "batch_log": out / "batches.jsonl",
    }
    return RunConfig(**{**options, **changes})  # type: ignore[arg-type]


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.slow
def test_a_two_source_run_stopped_and_resumed_equals_the_uninterrupted_one(
    shards: Path, tmp_path: Path
) -> None:
    from mvtrain.loop import run

    other = tmp_path / "b" / "shards"
    shutil.copytree(shards, other)  # the same keys in a second folder: two samples each
    mix = [shards, f"{other}:0.5"]
    whole = tmp_path / "whole"
    result = run(_run_config(mix, whole))
    record = json.loads((whole / "run.json").read_text())
    names = [s["name"] for s in record["sources"]]
    assert len(record["steps_per_epoch"]) >= 2, "the run crosses an epoch (a new draw)"
    a, b = record["sources"]
    assert (a["weight"], b["weight"]) == (1.0, 0.5)
    assert a["samples_per_epoch"] == a["samples"]
    assert b["samples_per_epoch"] == math.floor(0.5 * b["samples"] + 0.5)
    assert b["planned_samples_per_epoch"][0] == b["samples_per_epoch"]
    batches = _lines(whole / "batches.jsonl")
    trained = {str(k) for b in batches for k in b["keys"]}  # type: ignore[attr-defined]
    assert {k.rsplit("/", 1)[0] for k in trained} == set(names)
    for b in batches:
        assert b["sources"] == [str(k).rsplit("/", 1)[0] for k in b["keys"]]  # type: ignore[attr-defined]
    metrics = _lines(whole / "metrics.jsonl")
    assert all(set(m["loss_by_source"]) <= set(names) for m in metrics)  # type: ignore[arg-type]
    assert set(result.loss_by_source) == set(names)

    # Stopped after step 4: its checkpoint at step 3 is the newest, its logs end at step 4.
    part = tmp_path / "part"
    shutil.copytree(whole, part)
    for child in (part / "checkpoints").iterdir():
        if child.name != "step-000003":
            shutil.rmtree(child)
    for name in ("params-rank0.sha256",):
        (part / name).unlink()
    (part / "metrics.jsonl").write_text(
        "".join(json.dumps(m) + "\n" for m in metrics if int(m["step"]) <= 4)  # type: ignore[call-overload]
    )
    (part / "batches.jsonl").write_text("")
    run(_run_config(mix, part, resume=True))
    assert _losses(part) == _losses(whole)
    resumed = _lines(part / "batches.jsonl")
    assert [(b["step"], b["keys"], b["sources"]) for b in resumed] == [
        (b["step"], b["keys"], b["sources"])
        for b in batches
        if int(b["step"]) >= 3  # type: ignore[call-overload]
    ]
    assert (part / "params-rank0.sha256").read_text() == (whole / "params-rank0.sha256").read_text()
