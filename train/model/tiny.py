"""The ``tiny`` model: a small, randomly initialised MiniCPM-V 4.6 for tests and demos.

:func:`build_tiny_model` returns transformers' own ``MiniCPMV4_6ForConditionalGeneration``
(the native class, not a look-alike) with tiny sizes and the project's tokenizer
(:func:`mvshards.tiny_tokenizer.build_tiny_tokenizer`), so every code path of the real 4.6
model runs: the SigLIP-style NaViT vision tower, the window-attention merger inserted after
vision layer :data:`TINY_INSERT_LAYER_ID`, the 2x2 MLP merger, the Qwen3.5 text model and the
placeholder scatter of image features into the ``<unk>`` (image token) positions.

Choices:

* Text layers are all ``full_attention``: the Qwen3.5 default mixes in gated-delta-net
  ("linear attention") layers whose pure-torch fallback is very slow on CPU.
* Sizes: text hidden 64 (4 heads of 16, 2 KV heads), 2 layers; vision hidden 32, 2 layers,
  merger after layer 0. A 2-sample batch with one 448x448 image each runs forward and
  backward in well under a second on one CPU core.
* ``config.image_token_id`` is the tokenizer's image token (``<unk>`` for the tiny
  tokenizer), ``text_config.pad_token_id`` its pad token, ``eos_token_id`` its ``<|im_end|>``.
* Deterministic: the weights depend only on ``seed`` (initialised under a forked torch RNG,
  so the caller's global RNG state is left untouched).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

TINY_TEXT: dict[str, Any] = {
    "model_type": "qwen3_5_text",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "layer_types": ["full_attention", "full_attention"],
    "max_position_embeddings": 32768,
}
"""Text (Qwen3.5) sizes of the tiny model; vocab and special ids come from the tokenizer."""

TINY_VISION: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 224,
    "patch_size": 14,
}
"""Vision tower sizes. ``image_size / patch_size`` = 16 position embeddings per side; NaViT
images of any size map onto them by nearest position (as in the real model)."""

TINY_INSERT_LAYER_ID = 0
"""The window-attention merger runs after this vision layer (must be < vision layers)."""


_DEFAULT_TOKENIZER_DIR: Path | None = None
"""Where the tiny tokenizer is written when no folder is given (once per process)."""


def load_tiny_tokenizer(tokenizer_dir: Path | str | None = None) -> Any:
    """The project's tiny tokenizer, loaded with ``AutoTokenizer``.

    ``tokenizer_dir``: a folder that already holds it (loaded as is), or a folder to write it
    into (created); None writes it once per process into a temporary folder.
    """
    from transformers import AutoTokenizer

    from mvshards.tiny_tokenizer import build_tiny_tokenizer

    global _DEFAULT_TOKENIZER_DIR
    if tokenizer_dir is None:
        if _DEFAULT_TOKENIZER_DIR is None:
            _DEFAULT_TOKENIZER_DIR = Path(tempfile.mkdtemp(prefix="mvkit-tiny-tok-"))
        tokenizer_dir = _DEFAULT_TOKENIZER_DIR
    tokenizer_dir = Path(tokenizer_dir)
    if not (tokenizer_dir / "tokenizer.json").is_file():
        build_tiny_tokenizer(tokenizer_dir)
    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def tiny_model_config(tokenizer: Any | None = None) -> Any:
    """The ``MiniCPMV4_6Config`` of the tiny model for ``tokenizer`` (default: the tiny one).

    Pure configuration: build the model from it on the ``meta`` device to count parameters
    without allocating them.
    """
    from transformers import MiniCPMV4_6Config

    if tokenizer is None:
        tokenizer = load_tiny_tokenizer()
    image_token = getattr(tokenizer, "image_token", None) or tokenizer.unk_token
    image_token_id = tokenizer.convert_tokens_to_ids(image_token)
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    text = dict(TINY_TEXT)
    text.update(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos_id,
        bos_token_id=None,
    )
    return MiniCPMV4_6Config(
        text_config=text,
        vision_config=dict(TINY_VISION),
        insert_layer_id=TINY_INSERT_LAYER_ID,
        image_size=448,
        image_token_id=image_token_id,
        downsample_mode="16x",
    )


def build_tiny_model(seed: int = 0, tokenizer_dir: Path | str | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)``: a randomly initialised tiny MiniCPM-V 4.6 in float32, train mode.

    The same ``seed`` always gives the same weights. ``tokenizer_dir`` as in
    :func:`load_tiny_tokenizer`.
    """
    import torch
    from transformers import MiniCPMV4_6ForConditionalGeneration

    tokenizer = load_tiny_tokenizer(tokenizer_dir)
    config = tiny_model_config(tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MiniCPMV4_6ForConditionalGeneration(config)
    model.to(torch.float32)
    model.train()
    return model, tokenizer


def save_tiny(out_dir: Path | str, seed: int = 0) -> Path:
    """Write the tiny model and its tokenizer to ``out_dir`` as a local Hugging Face folder.

    ``mvtrain.model.loading.load_model(out_dir, ...)`` (or ``AutoModelForImageTextToText``)
    loads it.
    Returns ``out_dir``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mvkit-tiny-tok-") as tmp:
        model, tokenizer = build_tiny_model(seed=seed, tokenizer_dir=tmp)
        model.save_pretrained(str(out_dir))
        tokenizer.save_pretrained(str(out_dir))
    return out_dir
