"""The trainer's model adapters on real built shards: the tiny model, forward/backward and
loss, dummy vision inputs, collate, adapters per family, and model loading (padded costs
against collate: test_cost)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import train_fixtures
from train_fixtures import Loaded, _text_only, _with_images

from mvshards.families import NATIVE_46, REMOTE_26
from mvshards.profiles import get_profile
from mvtrain.data.tokenize import IGNORE_INDEX
from mvtrain.model.adapters import (
    ADAPTERS,
    Native46Adapter,
    Remote26Adapter,
    adapter_for,
    token_loss_sum,
)
from mvtrain.model.loading import ModelLoadError, detect_family, load_model
from mvtrain.model.tiny import build_tiny_model, save_tiny, tiny_model_config

# The shared module-scoped fixtures (``loaded`` needs the other four), bound here so that
# this module gets its own instances.
_one_thread = train_fixtures._one_thread
tok_dir = train_fixtures.tok_dir
tiny = train_fixtures.tiny
dataset = train_fixtures.dataset
loaded = train_fixtures.loaded


# --- tiny model -------------------------------------------------------------------------


def test_tiny_model_is_deterministic_full_attention_and_leaves_rng_alone(tok_dir: Path) -> None:
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a, tok = build_tiny_model(seed=0, tokenizer_dir=tok_dir)
    assert torch.equal(torch.random.get_rng_state(), before)
    b, _ = build_tiny_model(seed=0, tokenizer_dir=tok_dir)
    c, _ = build_tiny_model(seed=1, tokenizer_dir=tok_dir)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    cfg = a.config
    assert type(a).__name__ == "MiniCPMV4_6ForConditionalGeneration"
    assert set(cfg.text_config.layer_types) == {"full_attention"}
    assert cfg.image_token_id == tok.convert_tokens_to_ids(tok.image_token) == tok.unk_token_id
    assert cfg.text_config.pad_token_id == tok.pad_token_id
    assert cfg.text_config.vocab_size == len(tok)
    assert cfg.vision_config.insert_layer_id < cfg.vision_config.num_hidden_layers
    # The planner counts parameters from the config alone, on the meta device.
    with torch.device("meta"):
        meta_model = type(a)(tiny_model_config(tok))
    assert sum(p.numel() for p in meta_model.parameters()) == sum(p.numel() for p in a.parameters())


@pytest.mark.slow
def test_forward_backward_on_a_real_batch_trains_vision_and_llm(
    tiny: tuple[Any, Any], loaded: dict[str, Loaded]
) -> None:
    model, tok = tiny
    adapter = adapter_for("minicpmv-4.6", tok)
    # Two samples with one unsliced 448x448 image each (the brief's speed case).
    pair = [s for s in _with_images(loaded["minicpmv-4.6"]) if s.tgt_sizes == [(32, 32)]][:2]
    assert len(pair) == 2
    batch = adapter.collate(pair)
    model.zero_grad(set_to_none=True)
    adapter.forward_loss(model, batch)[0].backward()  # warm-up
    model.zero_grad(set_to_none=True)
    start = time.process_time()  # CPU seconds (one thread): robust to a busy machine
    loss, count = adapter.forward_loss(model, batch)
    (loss / count).backward()
    elapsed = time.process_time() - start
    assert elapsed < 3.0, f"tiny fwd+bwd took {elapsed:.2f} CPU s"  # ~0.07 s here
    assert torch.isfinite(loss) and count == adapter.label_count(batch) > 0
    vision = model.model.vision_tower.embeddings.patch_embedding.weight.grad
    merger = model.model.merger.mlp[0].linear_2.weight.grad
    llm = model.model.language_model.layers[0].self_attn.q_proj.weight.grad
    for grad in (vision, merger, llm, model.lm_head.weight.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


@pytest.mark.slow
def test_loss_sum_matches_transformers_own_loss(
    tiny: tuple[Any, Any], loaded: dict[str, Loaded]
) -> None:
    model, tok = tiny
    adapter = adapter_for("4.6", tok)
    batch = adapter.collate([s for _, _, s in loaded["minicpmv-4.6"][:3]])
    with torch.no_grad():
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            target_sizes=batch["target_sizes"],
            labels=batch["labels"],
        )
        total, count = token_loss_sum(out.logits, batch["labels"])
        shifted = torch.cat(
            [batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], IGNORE_INDEX)], 1
        )
        total2, count2 = token_loss_sum(out.logits, shifted, pre_shifted=True)
    assert torch.allclose(total / count, out.loss, rtol=1e-5)
    assert torch.allclose(total, total2) and count == count2


@pytest.mark.slow
def test_merger_tokens_equal_image_spans(tiny: tuple[Any, Any], loaded: dict[str, Loaded]) -> None:
    model, tok = tiny
    for profile in ("minicpmv-4.6", "minicpmv-4.6-4x"):
        adapter = adapter_for(profile, tok)
        assert isinstance(adapter, Native46Adapter)
        for sample in _with_images(loaded[profile]):
            batch = adapter.collate([sample])
            with torch.no_grad():
                out = model.get_image_features(
                    batch["pixel_values"],
                    batch["target_sizes"],
                    downsample_mode=adapter.downsample_mode,
                )
            got = [f.shape[0] for f in out.pooler_output]
            assert got == [b - a for a, b in sample.tokenized.image_spans], sample.meta.key
            ids = torch.tensor(sample.tokenized.input_ids)
            assert int((ids == model.config.image_token_id).sum()) == sum(got)


@pytest.mark.slow
def test_dummy_vision_gives_zero_grads_and_keeps_the_loss(
    tiny: tuple[Any, Any], loaded: dict[str, Loaded]
) -> None:
    model, tok = tiny
    adapter = adapter_for("4.6", tok)
    text = _text_only(loaded["minicpmv-4.6"])
    assert text
    batch = adapter.collate(text)
    assert batch["pixel_values"] is None and batch["target_sizes"] is None
    model.zero_grad(set_to_none=True)
    loss, count = adapter.forward_loss(model, batch)
    loss.backward()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        plain, plain_count = token_loss_sum(out.logits, batch["labels"])
    # the chunked loss (default) sums in another order than the plain one: 1e-5 relative
    torch.testing.assert_close(loss.detach(), plain, rtol=1e-5, atol=0)
    assert count == plain_count
    vision = [p.grad for p in model.model.vision_tower.parameters()]
    vision += [p.grad for p in model.model.merger.parameters()]
    assert all(g is not None for g in vision), "every vision parameter must get a gradient"
    assert all(torch.count_nonzero(g) == 0 for g in vision)
    assert model.lm_head.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    features = adapter.vision_forward(model, *adapter.dummy_vision_inputs())
    assert features.shape == (1, model.config.text_config.hidden_size)


# --- adapters: costs and the 2.6 batch ---------------------------------------------------


@pytest.mark.slow
def test_remote26_collate_structure(loaded: dict[str, Loaded], tiny: tuple[Any, Any]) -> None:
    _, tok = tiny
    rows = loaded["minicpmv-2.6"]
    adapter = adapter_for("2.6", tok)
    assert isinstance(adapter, Remote26Adapter)
    samples = [s for _, _, s in rows[:6]]  # single, multi-image and text-only samples
    batch = adapter.collate(samples)
    b, length = batch["input_ids"].shape
    assert length == max(len(s.tokenized) for s in samples)
    assert batch["attention_mask"].dtype == torch.bool
    opens = {tok.convert_tokens_to_ids(t) for t in ("<image>", "<slice>")}
    closes = {tok.convert_tokens_to_ids(t) for t in ("</image>", "</slice>")}
    for i, s in enumerate(samples):
        n = len(s.tokenized)
        ids = batch["input_ids"][i]
        assert torch.equal(batch["position_ids"][i, :n], torch.arange(n))
        assert batch["attention_mask"][i].sum() == n and not batch["attention_mask"][i, n:].any()
        unshifted = torch.tensor(s.tokenized.labels)
        assert torch.equal(batch["labels"][i, : n - 1], unshifted[1:])
        assert (batch["labels"][i, n - 1 :] == IGNORE_INDEX).all()
        pixels, tgt, bound = (
            batch["pixel_values"][i],
            batch["tgt_sizes"][i],
            batch["image_bound"][i],
        )
        if not s.tgt_sizes:
            assert pixels == [] and tgt == [] and bound == []
            continue
        assert tgt.dtype == torch.int32 and tgt.shape == (len(pixels), 2)
        assert bound.shape == (len(pixels), 2)
        for p, (r, c), (start, end) in zip(pixels, tgt.tolist(), bound.tolist(), strict=True):
            assert p.shape == (3, 14, r * c * 14)
            assert end - start == 64 and (ids[start:end] == tok.unk_token_id).all()
            assert int(ids[start - 1]) in opens and int(ids[end]) in closes
    assert b == len(samples) and any(not s.tgt_sizes for s in samples)
    assert any(len(s.meta.images) > 1 for s in samples)


def test_adapter_for_a_family_a_profile_or_a_name() -> None:
    assert set(ADAPTERS) == {NATIVE_46, REMOTE_26}
    assert all(cls.family is family for family, cls in ADAPTERS.items())
    four_x = adapter_for(get_profile("minicpmv-4.6-4x"))
    assert isinstance(four_x, Native46Adapter) and four_x.downsample_mode == "4x"
    assert adapter_for("minicpmv-4.6-4x").downsample_mode == "4x"
    assert adapter_for(NATIVE_46).downsample_mode is None
    assert isinstance(adapter_for(REMOTE_26), Remote26Adapter)
    assert isinstance(adapter_for("minicpmv-2.6"), Remote26Adapter)
    with pytest.raises(ValueError, match="unknown model family or profile 'x'"):
        adapter_for("x")


# --- models -----------------------------------------------------------------------------


def _config(folder: Path, obj: dict[str, Any]) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(obj))
    return folder


def test_detect_family(tmp_path: Path) -> None:
    cases = {
        "v46": ({"model_type": "minicpmv4_6"}, NATIVE_46),
        "v47": ({"model_type": "minicpmv4_7"}, NATIVE_46),
        "v26": (
            {"model_type": "minicpmv", "auto_map": {"AutoModel": "modeling_minicpmv.MiniCPMV"}},
            REMOTE_26,
        ),
        "o26": ({"model_type": "minicpmo"}, REMOTE_26),
        "map": (
            {"model_type": "custom", "auto_map": {"AutoModel": "modeling_minicpmv.MiniCPMV"}},
            REMOTE_26,
        ),
    }
    for name, (obj, family) in cases.items():
        assert detect_family(_config(tmp_path / name, obj)) is family
    with pytest.raises(ModelLoadError, match="query_num 96"):
        detect_family(_config(tmp_path / "v25", {"model_type": "minicpmv", "query_num": 96}))
    with pytest.raises(ModelLoadError, match="llama"):
        detect_family(_config(tmp_path / "llama", {"model_type": "llama"}))
    with pytest.raises(ModelLoadError, match="no config.json"):
        detect_family(tmp_path / "absent")
    with pytest.raises(ModelLoadError, match="--trust-remote-code"):
        load_model(tmp_path / "v26", trust_remote_code=False)


def test_saved_tiny_model_loads_back(tmp_path: Path, tiny: tuple[Any, Any]) -> None:
    folder = save_tiny(tmp_path / "tiny", seed=0)
    model, tok, family = load_model(folder, trust_remote_code=False, dtype="bf16")
    assert family is NATIVE_46 and type(model).__name__ == "MiniCPMV4_6ForConditionalGeneration"
    assert model.dtype == torch.bfloat16 and model.training
    assert tok.image_token == "<unk>" and tok.chat_template
    reference = tiny[0].state_dict()
    assert all(
        torch.equal(v.float(), reference[k].bfloat16().float())
        for k, v in model.state_dict().items()
    )
