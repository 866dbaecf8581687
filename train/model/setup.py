"""Build the model to train: tiny or loaded, then LoRA / frozen vision / checkpointing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from mvshards.families import NATIVE_46, Family
from mvtrain.model.attention import use_batched_varlen_attention
from mvtrain.model.lora import LORA_TARGETS
from mvtrain.precision import cast_parameters, torch_dtype
from mvtrain.run_config import RunConfig


@dataclass
class ModelBundle:
    model: nn.Module
    tokenizer: Any
    family: Family


def load_tokenizer_only(config: RunConfig) -> Any:
    if config.model == "tiny":
        from mvtrain.model.tiny import load_tiny_tokenizer

        return load_tiny_tokenizer()
    from mvtrain.model.loading import load_tokenizer

    return load_tokenizer(config.model, trust_remote_code=config.trust_remote_code)


def vision_modules(model: nn.Module) -> list[nn.Module]:
    """The vision encoder (not the merger/resampler, which stays trainable as in the
    official fine-tuning code's ``tune_vision=False``)."""
    inner = getattr(model, "model", model)
    for name in ("vision_tower", "vpm"):
        module = getattr(inner, name, None) or getattr(model, name, None)
        if module is not None:
            return [module]
    raise ValueError("cannot find the vision tower (vision_tower / vpm) to freeze")


def build_model(config: RunConfig, weights: str | None = None) -> ModelBundle:
    """The model to train, in train mode, its floating-point parameters in ``weights``
    (``bf16``/``fp16``/``fp32``; None: the resolved ``config.dtype``).

    A loaded model is read from its folder in that dtype; the tiny one is built in float32 and
    cast. Only parameters are cast: buffers (RoPE ``inv_freq``...) keep the dtype they are
    built or loaded in.
    """
    dtype = torch_dtype(weights or config.dtype)
    if config.model == "tiny":
        from mvtrain.model.tiny import build_tiny_model

        model, tokenizer = build_tiny_model(seed=config.seed)
        family = NATIVE_46
    else:
        from mvtrain.model.loading import load_model

        model, tokenizer, family = load_model(
            config.model, trust_remote_code=config.trust_remote_code, dtype=dtype
        )
    if family.navit_packing:
        use_batched_varlen_attention(model)
    if config.freeze_vision:
        for module in vision_modules(model):
            for p in module.parameters():
                p.requires_grad_(False)
    if config.grad_ckpt:
        # non-reentrant checkpointing needs no enable_input_require_grads(), which would also
        # hook the (possibly frozen) vision input and keep its activations for backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=config.lora_rank,
            lora_alpha=2 * config.lora_rank,
            lora_dropout=0.0,
            target_modules=LORA_TARGETS,
        )
        model = get_peft_model(model, lora)
    cast_parameters(model, dtype)
    model.train()
    return ModelBundle(model=model, tokenizer=tokenizer, family=family)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": total, "trainable": trainable}
