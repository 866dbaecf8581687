"""Reference model configs of the memory-model tests, and the fixtures their modules share.

The real-size configs are read from ``scripts/configs/`` (the folders ``mvtrain plan --model``
takes), the one copy of them:

* ``minicpmv-4.6/config.json``: MiniCPM-V 4.6 at full size, the config.json of
  openbmb/MiniCPM-V-4.6 (Qwen3.5-0.8B text, SigLIP2-400M vision; values as published in its
  text_config / vision_config), as ``MiniCPMV4_6Config.save_pretrained`` writes it.
* ``minicpmv-2.6/config.json``: MiniCPM-V 2.6, Qwen2-7B + SigLIP-400M + 64-query resampler
  (remote code: counted analytically).

The fixtures are module-scoped: a test module binds them by name (``tiny =
memory_configs.tiny``) and gets its own instances.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from mvtrain.model.attention import use_batched_varlen_attention
from mvtrain.model.tiny import build_tiny_model

CONFIGS = Path(__file__).resolve().parents[1] / "scripts" / "configs"
"""Config-only model folders, one per reference model."""

REAL_26: dict[str, Any] = json.loads(
    (CONFIGS / "minicpmv-2.6" / "config.json").read_text(encoding="utf-8")
)
"""MiniCPM-V 2.6's config fields (a plain dict, as the remote-code config.json holds them)."""


def real46_config():
    """MiniCPM-V 4.6 at full size, a fresh ``MiniCPMV4_6Config`` on every call."""
    from transformers import MiniCPMV4_6Config

    return MiniCPMV4_6Config.from_pretrained(str(CONFIGS / "minicpmv-4.6"))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and busy-waiting OpenMP threads on a
    loaded 2-core machine make each op many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = build_tiny_model()
    use_batched_varlen_attention(model)
    return model, tokenizer
