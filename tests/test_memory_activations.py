"""The memory model against ground truth: activations.

The config-derived prediction against the bytes autograd really saves
(``saved_tensors_hooks``) over a sweep of batch shapes, real shards included, for full
fine-tuning (fp32, bf16), LoRA, frozen vision, gradient checkpointing, the 4x profile and a
second set of dims. Target of issue 4: within 15% everywhere.
"""

from __future__ import annotations

import copy
import json
import statistics
from pathlib import Path

import memory_configs
import pytest
import torch
from memory_configs import REAL_26, real46_config
from pipeline_data import make_pipeline_dataset

from mvprep.build import build
from mvprep.options import BuildOptions
from mvshards.schema import SampleMeta
from mvshards.tario import iter_shard
from mvtrain.data.sample import load_sample
from mvtrain.memory import RemoteConfig, TrainingSetup, activation_model
from mvtrain.memory.saved_tensors import (
    format_sweep,
    measure_saved_tensors,
    prediction_sweep,
    synthetic_native_batch,
)
from mvtrain.model.adapters import Native46Adapter
from mvtrain.model.attention import use_batched_varlen_attention
from mvtrain.model.tiny import load_tiny_tokenizer

# The shared module-scoped fixtures, bound here: this module gets its own instances.
one_thread = memory_configs.one_thread
tiny = memory_configs.tiny


pytestmark = pytest.mark.xdist_group("memory_activations")  # one worker: one tiny model build


# --- activations vs saved tensors ---------------------------------------------------------

SYNTHETIC = [
    ("text 1x64", [64], [[]]),
    ("text 3x(30,50,20)", [30, 50, 20], [[], [], []]),
    ("text 4x96 equal", [96] * 4, [[]] * 4),
    ("1 img 16x16", [80], [[(16, 16)]]),
    ("3 img 1 sample", [120], [[(16, 16), (8, 12), (12, 8)]]),
    ("2 img + text, padded", [40, 24], [[(8, 12), (8, 8)], []]),
    ("mix 2x, 3 img", [90, 60], [[(8, 8), (8, 12)], [(12, 12)]]),
    ("big slices 2x", [300, 200], [[(32, 24)], [(16, 16)]]),
]


def _variant(model, mode):
    """The tiny model set up the way ``model_setup.build_model`` does for ``mode``."""
    from peft import LoraConfig, get_peft_model

    from mvtrain.model.lora import LORA_TARGETS
    from mvtrain.model.setup import vision_modules

    model = copy.deepcopy(model)
    if "freeze" in mode:
        for module in vision_modules(model):
            for p in module.parameters():
                p.requires_grad_(False)
    if "ckpt" in mode:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if "lora" in mode:
        lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS)
        model = get_peft_model(model, lora)
    if "bf16" in mode:
        model = model.to(torch.bfloat16)
    model.train()
    return model


def _setup(mode: str, **kwargs) -> TrainingSetup:
    return TrainingSetup(
        bf16="bf16" in mode,
        lora="lora" in mode,
        freeze_vision="freeze" in mode,
        grad_ckpt="ckpt" in mode,
        device_type="cpu",
        **kwargs,
    )


def _synthetic_batches(config, tokenizer, downsample_mode="16x", cases=SYNTHETIC):
    return [
        (
            label,
            synthetic_native_batch(
                lengths,
                grids,
                config.image_token_id,
                tokenizer.pad_token_id,
                config.text_config.vocab_size,
                downsample_mode=downsample_mode,
                seed=i,
            ),
        )
        for i, (label, lengths, grids) in enumerate(cases)
    ]


def _check(rows, name):
    print(f"\n[{name}]\n{format_sweep(rows)}")
    errors = [abs(r.error) for r in rows]
    assert max(errors) <= 0.15, f"{name}: prediction off by more than 15%"
    assert statistics.median(errors) <= 0.02, f"{name}: median error above 2%"


@pytest.fixture(scope="module")
def real_batches(tmp_path_factory):
    """Micro-batches collated by the real adapter from shards built by mvprep (max-res 896)."""
    root = tmp_path_factory.mktemp("memshards")
    tok_dir = root / "tok"
    tokenizer = load_tiny_tokenizer(tok_dir)
    data = make_pipeline_dataset(root / "ds", count=8)
    options = BuildOptions(
        data_path=data,
        out_dir=root / "out",
        profile="minicpmv-4.6",
        tokenizer=str(tok_dir),
        max_res=896,
        samples_per_shard=8,
    )
    assert build(options, workers=1, progress=False).ok
    samples = []
    for shard in sorted(Path(root / "out").glob("*.tar")):
        for _, members in iter_shard(shard):
            meta = SampleMeta.from_json(json.loads(members["json"]))
            samples.append(load_sample(meta, members, tokenizer, "minicpmv-4.6"))
    adapter = Native46Adapter(tokenizer.pad_token_id)
    text = [s for s in samples if not s.tgt_sizes]
    images = sorted((s for s in samples if s.tgt_sizes), key=lambda s: len(s.tokenized))
    picks = {
        "shards: 1 image sample": [images[0]],
        "shards: 2 samples padded": [images[0], images[1]],
        "shards: image + text": [images[1], text[0]],
        "shards: text only": text[:1],
    }
    return [(label, adapter.collate(group)) for label, group in picks.items()]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fp32", "bf16"])
def test_saved_tensors_full_finetune(tiny, real_batches, mode):
    model, tokenizer = tiny
    variant = _variant(model, mode)
    act = activation_model(model.config, _setup(mode))
    batches = _synthetic_batches(model.config, tokenizer) + real_batches
    _check(prediction_sweep(variant, act, batches), f"full fine-tune {mode}")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora-bf16", "freeze", "ckpt", "ckpt-lora-bf16", "ckpt-freeze"])
def test_saved_tensors_modes(tiny, mode):
    model, tokenizer = tiny
    variant = _variant(model, mode)
    act = activation_model(model.config, _setup(mode))
    _check(prediction_sweep(variant, act, _synthetic_batches(model.config, tokenizer)), mode)


@pytest.mark.slow
def test_saved_tensors_4x_profile(tiny):
    model, tokenizer = tiny
    act = activation_model(model.config, _setup("fp32", downsample_mode="4x"))
    adapter = Native46Adapter(tokenizer.pad_token_id, downsample_mode="4x")
    cases = [
        ("4x: 1 img", [80], [[(8, 12)]]),
        ("4x: 2 samples, 3 img", [120, 60], [[(12, 12), (4, 8)], [(8, 8)]]),
        ("4x: text", [50, 30], [[], []]),
    ]
    batches = _synthetic_batches(model.config, tokenizer, "4x", cases)
    _check(prediction_sweep(model, act, batches, adapter), "4x profile")


@pytest.mark.slow
def test_saved_tensors_other_dims(tiny):
    """Different widths, head counts (no GQA), rotary fraction, depth and merger position:
    the formula is symbolic in the dims, not fitted to the tiny model."""
    from transformers import MiniCPMV4_6Config, MiniCPMV4_6ForConditionalGeneration

    _, tokenizer = tiny
    base = tiny[0].config
    text = base.text_config.to_dict()
    text.update(
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=6,
        head_dim=16,
        layer_types=["full_attention"] * 3,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.5,
        },
    )
    vision = base.vision_config.to_dict()
    vision.update(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=3)
    config = MiniCPMV4_6Config(
        text_config=text,
        vision_config=vision,
        insert_layer_id=1,
        image_size=448,
        image_token_id=base.image_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = MiniCPMV4_6ForConditionalGeneration(config).train()
    use_batched_varlen_attention(model)
    act = activation_model(config, _setup("fp32"))
    batches = _synthetic_batches(config, tokenizer, cases=SYNTHETIC[:6])
    _check(prediction_sweep(model, act, batches), "other dims")


@pytest.mark.slow
def test_frozen_vision_keeps_no_activations(tiny):
    """Frozen tower, input without grad: autograd saves nothing in it. Under gradient
    checkpointing ``enable_input_require_grads`` also hooks the vision patch embedding, so
    the frozen tower's un-checkpointed window merger does keep activations (and the model
    knows it)."""
    model, tokenizer = tiny
    (_, batch), *_ = _synthetic_batches(model.config, tokenizer, cases=SYNTHETIC[4:5])

    def vision_bytes(mode):
        report = measure_saved_tensors(_variant(model, mode), batch)
        return sum(v for k, v in report.by_module.items() if "vision_tower" in k)

    assert vision_bytes("freeze") == 0
    assert vision_bytes("lora") == 0
    assert vision_bytes("fp32") > 0
    assert vision_bytes("ckpt-freeze") > 0
    assert activation_model(model.config, _setup("freeze")).bytes_per_patch > 0  # merger only
    frozen = activation_model(model.config, _setup("freeze", vision_input_requires_grad=False))
    assert frozen.bytes_per_patch < activation_model(model.config, _setup("fp32")).bytes_per_patch


def test_real_size_activation_terms():
    config = real46_config()
    full = activation_model(config, TrainingSetup(bf16=True))
    assert full.logits_bytes_per_token == 2 * 1024 + 16  # bf16 hidden row + index + target
    plain = activation_model(config, TrainingSetup(bf16=True, chunked_loss=False))
    assert plain.logits_bytes_per_token == 4 * 248094 + 8  # fp32 log-probs + int64 target
    assert plain.bytes_per_token == full.bytes_per_token + 2 * 1024  # lm_head input
    assert full.peak_bytes(8192, 20000) < plain.peak_bytes(8192, 20000) - 16 * 2**30
    assert full.estimate  # linear-attention layers are estimated
    assert full.quadratic_bytes_per_token_sq == 2 * 6  # mask copy in 6 full-attention layers
    flash = activation_model(config, TrainingSetup(attention="flash"))
    assert flash.quadratic_bytes_per_token_sq == 0 and flash.padded_bytes_per_token == 0
    ckpt = activation_model(config, TrainingSetup(grad_ckpt=True))
    assert ckpt.bytes_per_token < full.bytes_per_token / 10
    assert ckpt.recompute_bytes_per_token > 0
    lora = activation_model(config, TrainingSetup(lora=True))
    assert lora.bytes_per_patch == 0 and lora.bytes_per_token < full.bytes_per_token
    four = activation_model(config, TrainingSetup(downsample_mode="4x"))
    assert four.bytes_per_patch > full.bytes_per_patch
    remote = activation_model(RemoteConfig(REAL_26), TrainingSetup())
    assert remote.estimate and remote.bytes_per_patch > 0 and remote.dummy_patches == 0
    tokens, patches = 8192, 20000
    assert full.peak_bytes(tokens, patches, 2, 4096) > full.saved_bytes(tokens, patches, 2, 4096)
