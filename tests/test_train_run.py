"""The trainer for real: subprocesses, 2 ranks of DeepSpeed ZeRO-2 on CPU (gloo), kills."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from run_helpers import PATCHES, TOKENS, _digests, _env, _losses, _train

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow  # subprocess runs, 2 ranks of DeepSpeed
TWO_RANK_RUN = pytest.mark.xdist_group("two_rank_run")  # one worker builds the run (conftest)


@TWO_RANK_RUN
def test_two_ranks_zero2_loss_falls_and_weights_agree(two_rank_run: Path) -> None:
    losses = _losses(two_rank_run)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert losses[6] < losses[1] - 0.5, losses
    assert len(_digests(two_rank_run)) == 1, "ranks ended with different weights"
    run = json.loads((two_rank_run / "run.json").read_text())
    assert run["engine"] == "deepspeed" and run["world_size"] == 2


@TWO_RANK_RUN
def test_batch_log_respects_the_budgets_on_every_rank(two_rank_run: Path) -> None:
    lines = [json.loads(x) for x in (two_rank_run / "batches.jsonl").read_text().splitlines()]
    assert {line["rank"] for line in lines} == {0, 1}
    for line in lines:
        assert line["padded_tokens"] <= TOKENS and line["padded_patches"] <= PATCHES
        assert line["padded_tokens"] == line["num_samples"] * line["max_len"]
        assert line["real_tokens"] <= line["padded_tokens"]
        assert line["loss"] is None or line["loss"] > 0
    per_rank = {r: sum(1 for x in lines if x["rank"] == r) for r in (0, 1)}
    assert per_rank[0] == per_rank[1] == 6, "every rank runs the same number of micro-batches"


@TWO_RANK_RUN
def test_kill_then_resume_matches_the_uninterrupted_run_bitwise(
    shards: Path, two_rank_run: Path, tmp_path: Path
) -> None:
    out = tmp_path / "b"
    args = ["--nproc-per-node", "2", "--max-steps", "6", "--epochs", "4", "--save-every", "2"]
    killed = _train(shards, out, *args, env=_env(MVTRAIN_FAULT="kill-after-step:3"), check=False)
    assert killed.returncode != 0
    assert not (out / "params-rank0.sha256").exists()
    _train(shards, out, *args, "--resume")
    assert _losses(out) == _losses(two_rank_run)
    assert _digests(out) == _digests(two_rank_run)


@TWO_RANK_RUN
def test_the_export_loads_back_in_transformers(two_rank_run: Path) -> None:
    from transformers import AutoModelForImageTextToText

    from mvtrain.loop import parameter_digest

    model = AutoModelForImageTextToText.from_pretrained(two_rank_run / "hf")
    assert {parameter_digest(model)} == _digests(two_rank_run)


def _initial_weights() -> dict[str, torch.Tensor]:
    from mvtrain.model.tiny import build_tiny_model

    model, _ = build_tiny_model(seed=0)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_lora_trains_only_the_adapters(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "lora"
    _train(shards, out, "--lora", "--max-steps", "2", "--no-export")
    states = torch.load(
        out / "checkpoints" / "step-000002" / "mp_rank_00_model_states.pt",
        map_location="cpu",
        weights_only=False,
    )["module"]
    initial = _initial_weights()
    lora_b = [k for k in states if "lora_B" in k]
    assert lora_b and any(states[k].abs().sum() > 0 for k in lora_b), "LoRA B stayed zero"
    base = {k: v for k, v in states.items() if "lora_" not in k}
    for name, value in base.items():
        plain = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(value, initial[plain]), f"{plain} changed under LoRA"


def test_frozen_vision_keeps_the_vision_tower(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "frozen"
    _train(shards, out, "--freeze-vision", "--engine", "torch", "--max-steps", "2", "--no-export")
    states = torch.load(
        out / "checkpoints" / "step-000002" / "engine.pt", map_location="cpu", weights_only=False
    )["model"]
    initial = _initial_weights()
    vision = [k for k in states if ".vision_tower." in k]
    others = [k for k in states if ".vision_tower." not in k]
    assert vision and all(torch.equal(states[k], initial[k]) for k in vision)
    assert any(not torch.equal(states[k], initial[k]) for k in others)


def test_dry_run_streams_every_sample_once(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "dry"
    log = out / "batches.jsonl"
    proc = _train(shards, out, "--dry-run", "--batch-log", str(log))
    assert "dry run" in proc.stdout
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert all(line["loss"] is None for line in lines)
    keys = [k for line in lines if line["weight"] > 0 for k in line["keys"]]
    from mvshards.index import load_index

    assert sorted(keys) == sorted(load_index(shards).keys)
