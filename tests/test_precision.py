"""Training precision (``--dtype``): buffers are never cast, the torch engine keeps fp32 master
weights under bf16 autocast, a model folder loads in the dtype asked for, fp16 without loss
scaling is refused, and ``auto`` is what ``run.json`` says it resolved to."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from train_fixtures import _one_thread  # noqa: F401  (autouse: one intra-op thread)

from mvtrain.deepspeed_config import deepspeed_config
from mvtrain.distributed import DistInfo, free_port
from mvtrain.engine import init_process_group, make_engine
from mvtrain.model.adapters import adapter_for, token_loss_sum
from mvtrain.model.loading import load_model
from mvtrain.model.setup import build_model
from mvtrain.model.tiny import build_tiny_model
from mvtrain.precision import (
    TORCH_ENGINE_FP16,
    Precision,
    engine_precision,
    resolve_dtype,
)
from mvtrain.run_config import RunConfig

LR = 1e-5
WORLD1 = DistInfo(rank=0, world_size=1, local_rank=0, backend="gloo")
RUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
ALLOC_ENV = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


def _cli_run(shards: Path, out: Path, *args: str) -> dict[int, float]:
    """``mvtrain run`` on the tiny model in a fresh process without the allocator variables;
    the losses by step."""
    env = {k: v for k, v in os.environ.items() if k not in RUN_ENV + ALLOC_ENV}
    cmd = [sys.executable, "-m", "mvtrain.cli", "run", "--shards", str(shards)]
    cmd += ["--model", "tiny", "--output", str(out), "--token-budget", "1024"]
    cmd += ["--patch-budget", "4096", "--lr", "3e-3", "--no-progress", "--no-export", *args]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=600, env={**env, "OMP_NUM_THREADS": "1"}
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records}


def _config(model: str = "tiny", **options: Any) -> RunConfig:
    return RunConfig(shards=Path("unused"), model=model, output=Path("unused"), **options)


def _fp32_buffers() -> dict[str, torch.Tensor]:
    """The tiny model's buffers as built in float32, independently of build_model."""
    model, _ = build_tiny_model(seed=0)
    buffers = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    assert any(b.is_floating_point() for b in buffers.values())
    rounded = [not torch.equal(b.bfloat16().float(), b) for b in buffers.values()]
    assert any(rounded), "bf16 would not change these buffers: the test could not fail"
    return buffers


def _assert_buffers(model: torch.nn.Module, reference: dict[str, torch.Tensor]) -> None:
    found = {name: buf.detach() for name, buf in model.named_buffers()}
    assert found.keys() == reference.keys()
    for name, value in reference.items():
        assert found[name].dtype == value.dtype, f"{name} is {found[name].dtype}"
        assert torch.equal(found[name].cpu(), value), f"{name} changed value"


def _text_inputs(tokenizer: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    ids = torch.tensor([tokenizer("The quick brown fox jumps over the lazy dog. " * 4).input_ids])
    return ids, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}


def _engine(model: torch.nn.Module, use_deepspeed: bool, dtype: str, info: DistInfo = WORLD1):
    return make_engine(
        model,
        info,
        use_deepspeed=use_deepspeed,
        lr=LR,
        weight_decay=0.0,
        warmup_steps=0,
        total_steps=1,
        grad_accum=1,
        grad_clip=0.0,
        dtype=dtype,
    )


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever run() or the process group puts in os.environ is removed afterwards."""
    for name in RUN_ENV + ALLOC_ENV:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def world_of_one() -> Iterator[DistInfo]:
    """DeepSpeed's process group on gloo for this process alone, as run() starts it; one per
    module (DeepSpeed caches its groups, so a second group in the same process fails)."""
    pytest.importorskip("deepspeed")
    import torch.distributed as dist

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RANK", "0")
        patch.setenv("LOCAL_RANK", "0")
        patch.setenv("WORLD_SIZE", "1")
        patch.setenv("MASTER_ADDR", "127.0.0.1")
        patch.setenv("MASTER_PORT", str(free_port()))
        init_process_group(WORLD1, use_deepspeed=True, timeout_minutes=1.0)
        yield WORLD1
        dist.destroy_process_group()


def test_engine_precision_per_engine_and_dtype() -> None:
    assert engine_precision("bf16", deepspeed=True) == Precision("bf16", "bf16", None)
    assert engine_precision("fp16", deepspeed=True) == Precision("fp16", "fp16", None)
    assert engine_precision("bf16", deepspeed=False) == Precision("bf16", "fp32", "bf16")
    assert engine_precision("fp32", deepspeed=False) == Precision("fp32", "fp32", None)
    assert engine_precision("auto", True, cuda_bf16=True) == Precision("bf16", "bf16", None)
    assert engine_precision("auto", False, cuda_bf16=False) == Precision("fp32", "fp32", None)
    generated = deepspeed_config(1, dtype="fp16")
    assert generated["fp16"] == {"enabled": True, "loss_scale": 0}  # dynamic loss scaling
    assert generated["bf16"] == {"enabled": False}
    assert deepspeed_config(1, dtype="bf16")["bf16"] == {"enabled": True}
    with pytest.raises(ValueError, match="choose the precision with --dtype"):
        deepspeed_config(1, dtype="fp32", user_config={"bf16": {"enabled": True}})


def test_bf16_build_casts_parameters_only() -> None:
    reference = _fp32_buffers()
    bundle = build_model(_config(dtype="bf16"), "bf16")
    assert {p.dtype for p in bundle.model.parameters()} == {torch.bfloat16}
    _assert_buffers(bundle.model, reference)


@pytest.mark.slow
def test_deepspeed_bf16_engine_keeps_buffers_and_trains(world_of_one: DistInfo) -> None:
    reference = _fp32_buffers()
    bundle = build_model(_config(dtype="bf16"), engine_precision("bf16", True).weights)
    engine = _engine(bundle.model, use_deepspeed=True, dtype="bf16", info=world_of_one)
    assert engine.config["bf16"]["enabled"] and engine.precision == Precision("bf16", "bf16", None)
    assert {p.dtype for p in engine.module.parameters()} == {torch.bfloat16}
    _assert_buffers(engine.module, reference)
    ids, _ = _text_inputs(bundle.tokenizer)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    loss, count = adapter_for("4.6", bundle.tokenizer).forward_loss(engine, batch)
    assert torch.isfinite(loss) and count > 0
    engine.backward(loss / count)
    engine.step()
    _assert_buffers(engine.module, reference)


@pytest.mark.slow
def test_deepspeed_engine_undoes_a_buffer_cast_in_initialize(
    world_of_one: DistInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DeepSpeed before 0.19 calls ``module.bfloat16()`` in ``initialize``."""
    import deepspeed

    initialize = deepspeed.initialize

    def casting_initialize(*args: Any, model: torch.nn.Module, **kwargs: Any) -> Any:
        model.bfloat16()
        return initialize(*args, model=model, **kwargs)

    monkeypatch.setattr(deepspeed, "initialize", casting_initialize)
    reference = _fp32_buffers()
    bundle = build_model(_config(dtype="bf16"), "bf16")
    engine = _engine(bundle.model, use_deepspeed=True, dtype="bf16", info=world_of_one)
    _assert_buffers(engine.module, reference)


def test_torch_engine_bf16_updates_fp32_master_weights() -> None:
    precision = engine_precision("bf16", deepspeed=False)
    bundle = build_model(_config(dtype="bf16"), precision.weights)
    model = bundle.model
    initial = copy.deepcopy(model)
    start = {name: p.detach().clone() for name, p in model.named_parameters()}
    ids, inputs = _text_inputs(bundle.tokenizer)

    engine = _engine(model, use_deepspeed=False, dtype="bf16")
    out = engine(**inputs)
    assert out.logits.dtype == torch.bfloat16, "the forward did not run under autocast"
    engine.backward(token_loss_sum(out.logits, ids)[0])
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    engine.step()
    assert {p.dtype for p in model.parameters()} == {torch.float32}

    def adamw_step(reference: torch.nn.Module) -> dict[str, torch.Tensor]:
        """One plain AdamW step on ``reference`` without autocast; its gradients."""
        optimizer = torch.optim.AdamW(reference.parameters(), lr=LR, weight_decay=0.0)
        token_loss_sum(reference(**inputs).logits, ids)[0].backward()
        found = {n: p.grad.clone() for n, p in reference.named_parameters() if p.grad is not None}
        optimizer.step()
        return found

    fp32 = copy.deepcopy(initial)
    fp32_grads = adamw_step(fp32)
    bf16 = copy.deepcopy(initial).to(torch.bfloat16)
    adamw_step(bf16)
    assert grads.keys() == fp32_grads.keys()
    error = torch.cat([(grads[n] - fp32_grads[n]).flatten() for n in grads]).norm()
    assert error <= 0.02 * torch.cat([g.flatten() for g in fp32_grads.values()]).norm()

    ours, fp32_params, bf16_params = (dict(m.named_parameters()) for m in (model, fp32, bf16))
    close = moved = lost_in_bf16 = total = 0
    for name, grad in fp32_grads.items():
        mask = grad != 0
        step = (ours[name].detach() - start[name])[mask]
        expected = (fp32_params[name].detach() - start[name])[mask]
        bf16_step = (bf16_params[name].detach().float() - start[name].bfloat16().float())[mask]
        close += int(((step - expected).abs() <= 0.01 * LR).sum())
        moved += int((step != 0).sum())
        lost_in_bf16 += int((bf16_step == 0).sum())
        total += int(mask.sum())
    assert lost_in_bf16 > 0.5 * total, "bf16 weights keep this update: the test could not fail"
    assert moved == total, "some fp32 weights did not move"
    assert close >= 0.98 * total, f"{close}/{total} updates match the fp32 AdamW step"


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model saved in bf16 (config.json says bfloat16)."""
    folder = tmp_path_factory.mktemp("tiny-bf16")
    model, tokenizer = build_tiny_model(seed=0)
    model.to(torch.bfloat16).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    return folder


def test_a_bf16_checkpoint_loads_in_the_dtype_asked_for(bf16_folder: Path) -> None:
    from transformers import AutoModelForImageTextToText

    default = AutoModelForImageTextToText.from_pretrained(str(bf16_folder))
    assert default.dtype == torch.bfloat16, "transformers' default follows the checkpoint"
    reference = _fp32_buffers()
    model, _, _ = load_model(bf16_folder)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    for options, weights, dtype in (
        ({"dtype": "fp32"}, None, torch.float32),
        ({"dtype": "bf16"}, engine_precision("bf16", False).weights, torch.float32),
        ({"dtype": "bf16"}, engine_precision("bf16", True).weights, torch.bfloat16),
    ):
        bundle = build_model(_config(str(bf16_folder), **options), weights)
        assert {p.dtype for p in bundle.model.parameters()} == {dtype}, (options, weights)
        _assert_buffers(bundle.model, reference)


@pytest.mark.slow
def test_fp16_on_the_torch_engine_is_refused_in_one_line(
    shards: Path, tmp_path: Path, clean_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert "\n" not in TORCH_ENGINE_FP16
    with pytest.raises(ValueError) as refused:
        engine_precision("fp16", deepspeed=False)
    assert str(refused.value) == TORCH_ENGINE_FP16
    model, _ = build_tiny_model(seed=0)
    with pytest.raises(ValueError, match="^the torch engine has no loss scaling"):
        _engine(model, use_deepspeed=False, dtype="fp16")

    from mvshards.command_line import run_cli
    from mvtrain.cli import IS_EXPECTED, main

    out = tmp_path / "out"
    args = ["run", "--shards", str(shards), "--model", "tiny", "--output", str(out)]
    with pytest.raises(SystemExit) as ended:
        run_cli(main, "mvtrain", IS_EXPECTED, argv=[*args, "--engine", "torch", "--dtype", "fp16"])
    assert ended.value.code == 1
    assert capsys.readouterr().err == f"mvtrain: error: {TORCH_ENGINE_FP16}\n"
    assert not out.exists(), "the run started before refusing"


@pytest.mark.slow
def test_auto_dtype_resolves_and_run_json_records_it(shards: Path, tmp_path: Path) -> None:
    cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert resolve_dtype("auto") == ("bf16" if cuda_bf16 else "fp32")
    out = tmp_path / "auto"
    _cli_run(shards, out, "--engine", "torch", "--max-steps", "1")
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["dtype"] == "auto"
    fp32 = {"dtype": "fp32", "weights": "fp32", "autocast": None}
    bf16 = {"dtype": "bf16", "weights": "fp32", "autocast": "bf16"}
    assert run["precision"] == (bf16 if cuda_bf16 else fp32)
    assert run["cuda_alloc_conf"] == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("engine", "precision"),
    [
        ("deepspeed", {"dtype": "bf16", "weights": "bf16", "autocast": None}),
        ("torch", {"dtype": "bf16", "weights": "fp32", "autocast": "bf16"}),
    ],
)
def test_bf16_runs_train_and_record_it(
    shards: Path, tmp_path: Path, engine: str, precision: dict[str, Any]
) -> None:
    if engine == "deepspeed":
        pytest.importorskip("deepspeed")
    out = tmp_path / engine
    losses = _cli_run(shards, out, "--engine", engine, "--dtype", "bf16", "--max-steps", "2")
    run = json.loads((out / "run.json").read_text())
    assert run["engine"] == engine and run["precision"] == precision
    assert sorted(losses) == [1, 2] and all(0 < v < 100 for v in losses.values())


@pytest.mark.slow
def test_dtype_options_reach_the_config(
    shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mvtrain.cli import main
    from mvtrain.loop import RunResult

    seen: list[RunConfig] = []
    monkeypatch.setattr(
        "mvtrain.loop.run", lambda config: seen.append(config) or RunResult(steps_done=0)
    )
    base = ["run", "--shards", str(shards), "--model", "tiny", "--output", str(tmp_path)]
    for extra, dtype in (([], "auto"), (["--dtype", "fp16"], "fp16"), (["--bf16"], "bf16")):
        result = CliRunner().invoke(main, base + extra)
        assert result.exit_code == 0, result.output
        assert seen[-1].dtype == dtype
    result = CliRunner().invoke(main, [*base, "--bf16", "--dtype", "fp32"])
    assert result.exit_code == 2 and "--bf16 contradicts --dtype fp32" in result.output
    result = CliRunner().invoke(main, [*base, "--dtype", "float8"])
    assert result.exit_code == 2
    assert "--dtype must be one of auto, bf16, fp16, fp32, got 'float8'" in result.output
