"""Tiny, randomly initialised 2.6-family model folders built from the real upstream remote code.

``REFERENCE_26`` is ``<repo>/../shared/reference/minicpmv-2.6``: the unmodified
``trust_remote_code`` files of ``openbmb/MiniCPM-V-2_6`` (provenance in its README). Tests that
need it skip when it is absent, like the golden-layout tests. The files are copied into a
temporary *model folder* (as a user's downloaded checkpoint carries them), never into the
project.

:func:`build_remote_model` writes ``config.json`` (a tiny Qwen2 LLM, a 2-layer SigLIP, the
64-query resampler), the tiny tokenizer as a ``MiniCPMVTokenizerFast`` (with ``assistant`` one
token, as in the real Qwen2 vocabulary, so the official label code is comparable) and random
weights in ``model.safetensors``. The weights are made by the remote code itself, inside
:func:`mvtrain.model.remote_compat.remote_code_compat`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from mvshards.tiny_tokenizer import build_tiny_tokenizer

REFERENCE_ROOT = Path(__file__).resolve().parents[2] / "shared" / "reference"
"""``<repo>/../shared/reference``: the repository is cloned next to a copy of ``shared/``."""
REFERENCE_26 = REFERENCE_ROOT / "minicpmv-2.6"

MODEL_FILES_26 = (
    "configuration_minicpm.py",
    "modeling_minicpmv.py",
    "modeling_navit_siglip.py",
    "resampler.py",
    "tokenization_minicpmv_fast.py",
)

AUTO_MAP_26 = {
    "AutoConfig": "configuration_minicpm.MiniCPMVConfig",
    "AutoModel": "modeling_minicpmv.MiniCPMV",
    "AutoModelForCausalLM": "modeling_minicpmv.MiniCPMV",
}

QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""The chat template of ``openbmb/MiniCPM-V-2_6``'s ``tokenizer_config.json`` (Qwen2 ChatML
with the default system prompt)."""


EXTRA_MERGES = (("a", "ssistant"), ("Ċ", "Ċ"))
"""Merges the real Qwen2/Qwen3 vocabularies have and the tiny one lacks: ``assistant`` and
``"\n\n"`` are single tokens there, which the official label code's index arithmetic
(``assistant_idx + 2``, the 4-token empty think block) assumes."""


def require_reference(path: Path = REFERENCE_26) -> Path:
    if not path.is_dir():
        pytest.skip(f"reference folder {path} is absent (clone the repo next to shared/)")
    return path


def build_remote_tokenizer(out: Path, chat_template: str = QWEN2_CHAT_TEMPLATE) -> Path:
    """The tiny tokenizer in ``out`` as a remote-code ``MiniCPMVTokenizerFast``, with
    ``assistant`` and ``"\n\n"`` single tokens (:data:`EXTRA_MERGES`) and ``chat_template``."""
    build_tiny_tokenizer(out)
    tok_json = out / "tokenizer.json"
    data = json.loads(tok_json.read_text(encoding="utf-8"))
    model = data["model"]
    # The new entries go right after the base vocabulary and the added tokens move up by as
    # many: transformers 5 builds a Qwen2 tokenizer from vocab + merges and numbers the added
    # tokens from len(vocab) on, so entries placed after the added tokens would share their
    # ids ("assistant" decoding as "<image_id>").
    next_id = max(model["vocab"].values()) + 1
    for token in data["added_tokens"]:
        if token["id"] >= next_id:
            token["id"] += len(EXTRA_MERGES)
    for n, (a, b) in enumerate(EXTRA_MERGES):
        model["vocab"][a + b] = next_id + n
        model["merges"].append([a, b])
    tok_json.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    config = json.loads((out / "tokenizer_config.json").read_text(encoding="utf-8"))
    for key in [k for k in config if k.endswith("_token") and k.startswith(("image", "slice"))]:
        del config[key]
    config.pop("video_token", None)
    config.pop("im_start_token", None)
    config["tokenizer_class"] = "MiniCPMVTokenizerFast"
    config["auto_map"] = {
        "AutoTokenizer": [None, "tokenization_minicpmv_fast.MiniCPMVTokenizerFast"]
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (out / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    return out


def tiny_config_26(vocab_size: int, **overrides: Any) -> dict[str, Any]:
    """A tiny MiniCPM-V 2.6 ``config.json`` (resampler heads = hidden // 128 = 1)."""
    config: dict[str, Any] = {
        "architectures": ["MiniCPMV"],
        "auto_map": dict(AUTO_MAP_26),
        "model_type": "minicpmv",
        "version": 2.6,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 2,
        "vocab_size": vocab_size,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "use_cache": False,
        "query_num": 64,
        "image_size": 448,
        "patch_size": 14,
        "drop_vision_last_layer": False,
        "batch_vision_input": True,
        "use_image_id": True,
        "vision_batch_size": 16,
        "slice_config": {
            "max_slice_nums": 9,
            "patch_size": 14,
            "scale_resolution": 448,
            "model_type": "minicpmv",
        },
        "vision_config": {
            "hidden_size": 32,
            "image_size": 980,
            "intermediate_size": 64,
            "model_type": "siglip",
            "num_attention_heads": 2,
            "num_hidden_layers": 2,
            "patch_size": 14,
        },
        "bos_token_id": 471,
        "eos_token_id": 470,
        "pad_token_id": 471,
        "dtype": "float32",
    }
    config.update(overrides)
    return config


def build_remote_model(
    out: Path,
    code_dir: Path = REFERENCE_26,
    files: tuple[str, ...] = MODEL_FILES_26,
    config_overrides: dict[str, Any] | None = None,
    chat_template: str = QWEN2_CHAT_TEMPLATE,
    seed: int = 0,
) -> Path:
    """A tiny random model folder in ``out`` from the remote code in ``code_dir``."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer

    from mvtrain.model.remote_compat import remote_code_compat

    out.mkdir(parents=True, exist_ok=True)
    for name in files:
        shutil.copyfile(code_dir / name, out / name)
    build_remote_tokenizer(out, chat_template)
    tok = AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    config = tiny_config_26(len(tok), **(config_overrides or {}))
    config["eos_token_id"] = tok.convert_tokens_to_ids("<|im_end|>")
    config["bos_token_id"] = config["pad_token_id"] = tok.pad_token_id
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    with remote_code_compat(out) as compat:
        cls = compat.model_class(config["auto_map"]["AutoModel"])
        cfg = AutoConfig.from_pretrained(str(out), trust_remote_code=True)
        torch.manual_seed(seed)
        model = cls(cfg)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
