"""The memory model against ground truth: parameters, static memory and budgets.

* Parameter counts: the meta-device count equals the real tiny model's; LoRA equals real
  ``peft``; the 2.6-family analytic count equals transformers' Qwen2/Qwen3/SigLIP modules.
* Static memory: within 5% of DeepSpeed's ``estimate_zero2_model_states_mem_needs`` for
  the tiny model and real-size MiniCPM-V 4.6 / 2.6 configs on 1, 4 and 8 GPUs.
* Budgets: the chosen budgets fit the card, keep the p99 sample, and say when nothing fits.
"""

from __future__ import annotations

import copy
import functools
import json

import memory_configs
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from memory_configs import REAL_26, real46_config

from mvshards.units import GiB
from mvtrain.memory import (
    BudgetError,
    IndexStats,
    RemoteConfig,
    StaticMemory,
    TrainingSetup,
    activation_model,
    count_parameters,
    load_config_only,
    plan_budgets,
    predicted_peak_bytes,
    static_memory,
)
from mvtrain.model.tiny import tiny_model_config

# The shared module-scoped fixtures, bound here: this module gets its own instances.
one_thread = memory_configs.one_thread
tiny = memory_configs.tiny


pytestmark = pytest.mark.xdist_group("memory_params")  # one worker: one tiny model build


# --- parameters -------------------------------------------------------------------------


def test_meta_count_equals_real_tiny_model(tiny):
    model, _ = tiny
    counts = count_parameters(model.config)
    real = sum(p.numel() for p in model.parameters())
    assert counts.total == real == counts.trainable
    assert counts.llm + counts.vision + counts.resampler == real and counts.other == 0
    vision = sum(p.numel() for p in model.model.vision_tower.parameters())
    merger = sum(p.numel() for p in model.model.merger.parameters())
    assert (counts.vision, counts.resampler) == (vision, merger)
    assert count_parameters(model) == counts  # the module itself counts the same
    assert not counts.estimate


@pytest.mark.parametrize("rank", [4, 16])
def test_lora_count_equals_peft(tiny, rank):
    from peft import LoraConfig, get_peft_model

    from mvtrain.model.lora import LORA_TARGETS

    model, _ = tiny
    counts = count_parameters(model.config, lora=True, lora_rank=rank)
    wrapped = get_peft_model(
        copy.deepcopy(model),
        LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS),
    )
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    assert counts.trainable == counts.lora == counts.trainable_llm == trainable
    assert counts.total == sum(p.numel() for p in wrapped.parameters())
    assert counts.lora_targets == 7 * 2


def test_freeze_vision_count_equals_model_setup(tiny):
    from mvtrain.model.setup import vision_modules

    model = copy.deepcopy(tiny[0])
    for module in vision_modules(model):
        for p in module.parameters():
            p.requires_grad_(False)
    counts = count_parameters(model.config, freeze_vision=True)
    assert counts.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert counts.trainable_vision == 0 and counts.trainable_resampler == counts.resampler


def test_config_only_folders(tmp_path, tiny):
    model, _ = tiny
    native = tmp_path / "native"
    model.config.save_pretrained(native)
    assert sorted(p.name for p in native.iterdir()) == ["config.json"]
    assert count_parameters(load_config_only(native)) == count_parameters(model.config)

    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "config.json").write_text(json.dumps(REAL_26))
    config = load_config_only(remote)
    assert isinstance(config, RemoteConfig)
    assert count_parameters(config).estimate

    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="not a MiniCPM-V model"):
        load_config_only(other)
    with pytest.raises(ValueError, match="no config.json"):
        load_config_only(tmp_path / "missing")


def test_real_46_counts():
    counts = count_parameters(real46_config())
    assert 1.25e9 < counts.total < 1.35e9  # "1.3B parameters"
    assert counts.llm == 752_161_600 and counts.vision == 522_299_312
    lora = count_parameters(real46_config(), lora=True, lora_rank=8)
    # 6 full-attention layers x 7 projections + 18 linear-attention layers x 3 MLP projections
    assert lora.lora_targets == 6 * 7 + 18 * 3
    assert lora.trainable == lora.lora < counts.total // 100


@pytest.mark.parametrize("version", [2.6, 4.5, 4.0])
def test_26_analytic_count_equals_transformers_modules(version):
    from torch import nn
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    raw = dict(REAL_26, version=version)
    if version != 2.6:  # smaller LLM for speed; still full-width attention shapes
        raw.update(num_hidden_layers=4, head_dim=128)
    llm_args = {
        k: raw[k]
        for k in (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "vocab_size",
            "tie_word_embeddings",
        )
    }
    if "head_dim" in raw:
        llm_args["head_dim"] = raw["head_dim"]
    llm_cls, cfg_cls = {
        2.6: (Qwen2ForCausalLM, Qwen2Config),
        4.5: (Qwen3ForCausalLM, Qwen3Config),
        4.0: (LlamaForCausalLM, LlamaConfig),
    }[version]
    vision_config = SiglipVisionConfig(**raw["vision_config"], vision_use_head=False)
    e, d = raw["hidden_size"], raw["vision_config"]["hidden_size"]
    with torch.device("meta"):
        llm = llm_cls(cfg_cls(**llm_args))
        vision = SiglipVisionModel(vision_config)
        resampler = nn.ModuleDict(
            {
                "kv_proj": nn.Linear(d, e, bias=False),
                "attn": nn.MultiheadAttention(e, e // 128),
                "ln_q": nn.LayerNorm(e),
                "ln_kv": nn.LayerNorm(e),
                "ln_post": nn.LayerNorm(e),
            }
        )
    counts = count_parameters(raw)
    assert counts.llm == sum(p.numel() for p in llm.parameters())
    assert counts.vision == sum(p.numel() for p in vision.parameters())
    queries_and_proj = raw["query_num"] * e + e * e
    assert counts.resampler == sum(p.numel() for p in resampler.parameters()) + queries_and_proj
    lora = count_parameters(raw, lora=True, lora_rank=8)
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    expected = sum(
        8 * (m.in_features + m.out_features)
        for n, m in llm.named_modules()
        if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in names
    )
    assert lora.lora == expected
    if version == 2.6:
        assert 8.0e9 < counts.total < 8.2e9  # "8B parameters"


# --- static memory ----------------------------------------------------------------------


def _static_cases():
    return {
        "tiny": lambda: count_parameters(tiny_model_config()),
        "minicpm-v-4.6": lambda: count_parameters(real46_config()),
        "minicpm-v-2.6": lambda: count_parameters(REAL_26),
    }


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(_static_cases()))
def test_static_agrees_with_deepspeed_estimator(name):
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    counts = _static_cases()[name]()
    for gpus in (1, 4, 8):
        ours = static_memory(counts.total, counts.trainable, num_gpus=gpus, zero_stage=2)
        _, theirs = estimate_zero2_model_states_mem_needs(
            counts.total, num_gpus_per_node=gpus, num_nodes=1, cpu_offload=False
        )
        print(
            f"\n{name:14s} P={counts.total:>13,} N={gpus}: ours {ours.model_states / GiB:8.3f}"
            f" GiB, DeepSpeed {theirs / GiB:8.3f} GiB"
        )
        assert abs(ours.model_states - theirs) <= 0.05 * theirs


def test_static_terms():
    p, pt = 1_000_000_000, 10_000_000
    full = [static_memory(p, p, 8, stage) for stage in (0, 1, 2)]
    assert full[0].model_states > full[1].model_states > full[2].model_states
    assert full[1].model_states == 4 * p + 16 * p // 8  # the "4P + 16P/N" form of ZeRO-1
    lora = static_memory(p, pt, 8, 2)
    assert lora.weights == 2 * p and lora.optimizer_states == 8 * pt // 8
    assert lora.model_states < full[2].model_states
    assert static_memory(p, p, 1, 2, dtype="fp32").weights == 4 * p
    # overlap_comm: 4.5 x (reduce + all-gather buckets of 2e8) x 2 bytes (bf16 gradients)
    assert static_memory(p, p, 1, 2).buffer_bytes == int(4.5 * (2e8 + 2e8) * 2)
    assert static_memory(p, p, 1, 2, overlap_comm=False).buffer_bytes == 200_000_000 * 2
    assert static_memory(p, p, 1, 2, reduce_bucket_size=None).buffer_bytes == 0
    with pytest.raises(ValueError, match="ZeRO-3"):
        static_memory(p, p, 1, 3)
    with pytest.raises(ValueError, match="within"):
        static_memory(p, p + 1, 1, 2)


# --- budgets ------------------------------------------------------------------------------

STATS = IndexStats(
    count=10_000,
    total_tokens=10_000 * 900,
    total_patches=10_000 * 3000,
    tokens_p99=2500,
    patches_p99=10_000,
    tokens_max=4000,
    patches_max=12_000,
)


def test_index_stats_from_rows():
    rows = [[f"{i:09d}", 100 + i, 10 * i, 1] for i in range(200)]
    stats = IndexStats.from_costs(rows)
    assert stats.count == 200 and stats.tokens_max == 299 and stats.patches_max == 1990
    assert stats.tokens_p99 in (297, 298) and stats.total_tokens == sum(100 + i for i in range(200))
    assert IndexStats.from_costs([(r[1], r[2]) for r in rows]) == stats
    with pytest.raises(ValueError, match="empty"):
        IndexStats.from_costs([])


@pytest.mark.parametrize(("gpus", "cards", "ckpt"), [(1, (80, 141), False), (8, (24, 80), True)])
def test_plan_budgets_real_46(gpus, cards, ckpt):
    config = real46_config()
    counts = count_parameters(config)
    static = static_memory(counts.total, counts.trainable, gpus)
    act = activation_model(config, TrainingSetup(grad_ckpt=ckpt))
    plans = []
    for card in cards:
        plan = plan_budgets(static, act, card * GiB, 0.9, STATS)
        assert plan.predicted_peak <= 0.9 * card * GiB
        assert plan.token_budget >= STATS.tokens_p99 and plan.patch_budget >= STATS.patches_p99
        # the budgets keep the index's patches-per-token mix (up to rounding)
        assert plan.patch_budget / plan.token_budget == pytest.approx(
            STATS.patch_token_ratio, rel=0.05
        )
        plans.append(plan)
    small, big = plans
    assert big.token_budget > small.token_budget
    peak = predicted_peak_bytes(static, act, big.token_budget, big.patch_budget, 1, 4000)
    assert static.total < peak <= big.predicted_peak


def test_plan_budgets_says_when_nothing_fits():
    counts = count_parameters(REAL_26)
    static = static_memory(counts.total, counts.trainable, 1)
    with pytest.raises(BudgetError) as info:
        plan_budgets(static, activation_model(RemoteConfig(REAL_26)), 24 * GiB, 0.9, STATS)
    assert info.value.needed > info.value.available
    lora = count_parameters(REAL_26, lora=True)
    static = static_memory(lora.total, lora.trainable, 8)
    act = activation_model(RemoteConfig(REAL_26), TrainingSetup(lora=True, grad_ckpt=True))
    assert plan_budgets(static, act, 80 * GiB, 0.9, STATS).token_budget >= STATS.tokens_p99


@functools.cache
def _real46_counts(lora: bool):
    config = real46_config()
    return config, count_parameters(config, lora=lora)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    card=st.sampled_from([16, 24, 40, 80, 141]),
    fraction=st.floats(0.5, 1.0),
    tokens_p99=st.integers(32, 8000),
    patches_p99=st.integers(0, 20000),
    ratio=st.floats(0.0, 10.0),
    mode=st.sampled_from(["full", "lora", "ckpt"]),
)
def test_plan_budgets_properties(card, fraction, tokens_p99, patches_p99, ratio, mode):
    config, counts = _real46_counts(mode == "lora")
    setup = TrainingSetup(lora=mode == "lora", grad_ckpt=mode == "ckpt")
    static: StaticMemory = static_memory(counts.total, counts.trainable, 8)
    stats = IndexStats(
        1000, 1000 * 500, int(1000 * 500 * ratio), tokens_p99, patches_p99, tokens_p99, patches_p99
    )
    act = activation_model(config, setup)
    try:
        plan = plan_budgets(static, act, card * GiB, fraction, stats)
    except BudgetError as err:
        assert err.needed > err.available
        return
    assert plan.predicted_peak <= fraction * card * GiB + 1
    assert plan.token_budget >= tokens_p99 and plan.patch_budget >= patches_p99
