"""Parameter counts (total / trainable, per part) from a model or from ``config.json`` alone.

* Native MiniCPM-V 4.6 / 4.7 (transformers classes): the model is built on the ``meta``
  device (``with torch.device("meta"): MiniCPMV4_6ForConditionalGeneration(config)``), so a
  folder holding only ``config.json`` is enough and no memory is allocated. The counts are
  exact.
* The 2.6 family (MiniCPM-V 2.6, MiniCPM-o 2.6, 4.0, 4.5; ``model_type`` ``minicpmv``/
  ``minicpmo``): its modelling code ships with the checkpoint and is not here, so the count
  is an analytic ESTIMATE from the config fields (``ParamCounts.estimate`` is True; the
  formulas are in :func:`_remote_counts`).

Parts: ``llm`` is the language model INCLUDING its token embeddings and ``lm_head`` (a tied
``lm_head`` is counted once); ``vision`` is the vision tower (for 4.6 including its
window-attention ``vit_merger``); ``resampler`` is the 4.6 ``merger`` MLP or the 2.6
resampler; ``other`` is anything else (0 for the known families).

LoRA: ``r*(in+out)`` trainable parameters per ``nn.Linear`` whose module name fully matches
:data:`mvtrain.model.lora.LORA_TARGETS` (q/k/v/o/gate/up/down projections of the language
model), exactly what ``peft`` adds with ``bias="none"``; everything else is frozen.
``freeze_vision`` freezes the vision tower only (the merger/resampler stays trainable).
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mvshards.families import NATIVE_46, REMOTE_26
from mvtrain.model.lora import LORA_TARGETS

NATIVE_MODEL_TYPES = ("minicpmv4_6", "minicpmv4_7")
REMOTE_MODEL_TYPES = ("minicpmv", "minicpmo")


@dataclass(frozen=True)
class RemoteConfig:
    """The parsed ``config.json`` of a 2.6-family model (no modelling code here)."""

    raw: dict[str, Any]
    path: str = ""


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of one model under one fine-tuning setup."""

    total: int
    trainable: int
    llm: int
    """Language model incl. token embeddings and lm_head (tied: counted once)."""
    vision: int
    """Vision tower (4.6: incl. the window-attention vit_merger)."""
    resampler: int
    """4.6 merger MLP / 2.6 resampler."""
    other: int
    trainable_llm: int
    trainable_vision: int
    trainable_resampler: int
    lora: int
    """LoRA parameters (0 without LoRA); included in ``trainable`` and ``trainable_llm``."""
    lora_targets: int
    """Linear modules LoRA wraps."""
    family: str
    """The model family's name (:attr:`mvshards.families.Family.name`)."""
    estimate: bool
    """True when counted analytically from config fields (2.6 family)."""
    buffer_bytes: int = 0
    """Bytes of the model's buffers (every rank holds them whole, in the dtype the code builds
    them in: float32 for the 2.6 resampler's position tables, 70 x 70 x hidden, and the 4.5
    resampler's ``temporal_pos_embed``, 72,000 x hidden -- about 1.2 GB at the 8B size)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_config_only(path: Path | str) -> Any:
    """The configuration in ``path/config.json``, without weights or remote code.

    Native 4.6/4.7: a transformers config (``AutoConfig``); 2.6 family: a
    :class:`RemoteConfig` wrapping the JSON. Raises ``ValueError`` naming the folder otherwise.
    """
    folder = Path(path)
    file = folder / "config.json"
    if not file.is_file():
        raise ValueError(f"{folder}: no config.json; pass a model folder (weights not needed)")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file}: not valid JSON ({exc})") from exc
    model_type = str(raw.get("model_type", ""))
    if model_type in NATIVE_MODEL_TYPES:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(folder))
    auto_map = raw.get("auto_map") or {}
    if model_type in REMOTE_MODEL_TYPES or any(
        "minicpm" in str(v).lower() for v in auto_map.values()
    ):
        return RemoteConfig(raw=raw, path=str(folder))
    raise ValueError(
        f"{file}: model_type {model_type!r} is not a MiniCPM-V model (native: "
        f"{', '.join(NATIVE_MODEL_TYPES)}; remote code: {', '.join(REMOTE_MODEL_TYPES)})"
    )


def meta_model(config: Any) -> Any:
    """The native model of ``config`` built on the meta device (no memory, no init cost).

    Built once per configuration (``mvtrain plan`` counts the same model for every remedy it
    tries): a meta model holds no memory, and nothing here changes it.
    """
    return _meta_model_of(type(config), json.dumps(config.to_dict(), sort_keys=True, default=str))


@functools.lru_cache(maxsize=4)
def _meta_model_of(config_class: type, config_json: str) -> Any:
    import torch

    config = config_class.from_dict(json.loads(config_json))
    model_type = getattr(config, "model_type", "")
    if model_type == "minicpmv4_7":
        from transformers import MiniCPMV4_7ForConditionalGeneration as cls
    elif model_type == "minicpmv4_6":
        from transformers import MiniCPMV4_6ForConditionalGeneration as cls
    else:
        raise ValueError(f"no native class for model_type {model_type!r}")
    # Built from a fresh copy: the run may have switched the live config's attention
    # implementation (mvtrain.model.attention), which a new model would try to load as a kernel.
    with torch.device("meta"):
        return cls(config)


def _part(name: str) -> str:
    if ".vision_tower." in f".{name}" or name.startswith("vpm.") or ".vpm." in name:
        return "vision"
    if name.startswith(("model.merger.", "merger.", "resampler.")) or ".resampler." in name:
        return "resampler"
    if "language_model" in name or name.startswith(("lm_head", "llm.")):
        return "llm"
    return "other"


def _module_buffer_bytes(model: Any) -> int:
    return sum(b.numel() * b.element_size() for _, b in model.named_buffers())


TEMPORAL_POSITIONS = 72_000
"""Rows of the MiniCPM-V 4.5 resampler's ``temporal_pos_embed`` (one per video timestamp)."""
RESAMPLER_POS_SIDE = 70
"""The 2.6-family resampler's 2D position table is ``70 x 70 x hidden`` (``max_size``)."""


def _remote_buffer_bytes(raw: dict[str, Any]) -> int:
    """Float32 buffers of a 2.6-family model (ESTIMATE from the config): the resampler's 2D
    sin-cos table ``70*70*hidden``, for 4.5 (``version`` >= 4.5) its ``temporal_pos_embed``
    ``72000*hidden``, and the LLM's RoPE ``inv_freq`` (and ``original_inv_freq``),
    ``head_dim/2`` each."""
    d = _llm_dims(raw)
    floats = RESAMPLER_POS_SIDE * RESAMPLER_POS_SIDE * d["hidden"] + d["head_dim"]
    if float(raw.get("version") or 2.6) >= 4.5:
        floats += TEMPORAL_POSITIONS * d["hidden"]
    return 4 * floats


def _module_counts(model: Any, lora: bool, lora_rank: int) -> tuple[dict[str, int], int, int]:
    from torch import nn

    parts = {"llm": 0, "vision": 0, "resampler": 0, "other": 0}
    for name, p in model.named_parameters():  # shared (tied) parameters are listed once
        parts[_part(name)] += p.numel()
    lora_params = targets = 0
    if lora:
        pattern = re.compile(LORA_TARGETS)
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and pattern.fullmatch(name):
                lora_params += lora_rank * (module.in_features + module.out_features)
                targets += 1
    return parts, lora_params, targets


def _llm_dims(raw: dict[str, Any]) -> dict[str, Any]:
    hidden = int(raw["hidden_size"])
    heads = int(raw["num_attention_heads"])
    head_dim = int(raw.get("head_dim") or hidden // heads)
    return {
        "hidden": hidden,
        "layers": int(raw["num_hidden_layers"]),
        "heads": heads,
        "kv_heads": int(raw.get("num_key_value_heads") or heads),
        "head_dim": head_dim,
        "intermediate": int(raw["intermediate_size"]),
        "vocab": int(raw["vocab_size"]),
        "tied": bool(raw.get("tie_word_embeddings", False)),
    }


def remote_llm_style(raw: dict[str, Any]) -> str:
    """``"qwen2"`` (q/k/v bias), ``"qwen3"`` (q/k RMSNorm) or ``"llama"`` for a 2.6-family
    config: explicit ``attention_bias`` wins; else MiniCPM-V ``version`` < 4 is Qwen2 (2.6,
    o-2.6), >= 4.5 is Qwen3 (4.5), 4.0 is MiniCPM4 (Llama style)."""
    version = float(raw.get("version") or 2.6)
    if raw.get("attention_bias") is True:
        return "qwen2"
    if version < 4:
        return "qwen2"
    return "qwen3" if version >= 4.5 else "llama"


def _remote_counts(
    raw: dict[str, Any], lora: bool, lora_rank: int
) -> tuple[dict[str, int], int, int]:
    """Parts, LoRA parameters and LoRA targets of a 2.6-family ``config.json`` (ESTIMATE):

    * LLM (Qwen2 / Qwen3 / Llama style): embeddings ``vocab*hidden``; per layer attention
      ``hidden*(heads*head_dim) + 2*hidden*(kv_heads*head_dim) + (heads*head_dim)*hidden``
      (+ q/k/v biases for Qwen2, version < 4; + q/k RMSNorm weights for Qwen3, version
      >= 4.5), SwiGLU MLP ``3*hidden*intermediate``, two RMSNorms ``2*hidden``; final norm
      ``hidden``; ``lm_head`` ``vocab*hidden`` unless ``tie_word_embeddings``.
    * Vision (SigLIP-400M style NaViT ``vpm``): patch conv ``3*p*p*d + d``, position
      embedding ``(image_size/p)^2 * d``; per layer ``4*(d*d + d)`` attention,
      ``2*d*i + i + d`` MLP, ``4*d`` for two LayerNorms; post LayerNorm ``2*d`` (the last
      layer is dropped when ``drop_vision_last_layer``).
    * Resampler (``query_num`` learned queries, one cross-attention into the LLM width
      ``E = hidden``): queries ``query_num*E``, ``kv_proj`` ``d*E`` (when ``d != E``), an
      ``nn.MultiheadAttention`` ``4*E*E + 4*E``, three LayerNorms ``6*E``, output projection
      ``E*E``.
    """
    d = _llm_dims(raw)
    h, kv, q = d["hidden"], d["kv_heads"] * d["head_dim"], d["heads"] * d["head_dim"]
    style = remote_llm_style(raw)
    attn = h * q + 2 * h * kv + q * h
    if style == "qwen2":
        attn += q + 2 * kv
    elif style == "qwen3":
        attn += 2 * d["head_dim"]
    mlp = 3 * h * d["intermediate"]
    layer = attn + mlp + 2 * h
    llm = d["vocab"] * h + d["layers"] * layer + h + (0 if d["tied"] else d["vocab"] * h)

    v = raw.get("vision_config") or {}
    vd = int(v.get("hidden_size", 1152))
    vi = int(v.get("intermediate_size", 4304))
    vl = int(v.get("num_hidden_layers", 27)) - (1 if raw.get("drop_vision_last_layer") else 0)
    ps = int(v.get("patch_size", raw.get("patch_size", 14)))
    side = int(v.get("image_size", 980)) // ps
    vision = 3 * ps * ps * vd + vd + side * side * vd
    vision += vl * (4 * (vd * vd + vd) + 2 * vd * vi + vi + vd + 4 * vd) + 2 * vd

    e, queries = h, int(raw.get("query_num", 64))
    resampler = queries * e + (vd * e if vd != e else 0) + 4 * e * e + 4 * e + 6 * e + e * e

    lora_params = targets = 0
    if lora:
        per_layer = (h + q) + 2 * (h + kv) + (q + h) + 2 * (h + d["intermediate"])
        per_layer += d["intermediate"] + h
        lora_params = lora_rank * per_layer * d["layers"]
        targets = 7 * d["layers"]
    return {"llm": llm, "vision": vision, "resampler": resampler, "other": 0}, lora_params, targets


def count_parameters(
    model_or_config: Any, lora: bool = False, lora_rank: int = 8, freeze_vision: bool = False
) -> ParamCounts:
    """Counts for a model (``nn.Module``, any device incl. meta), a native config, a
    :class:`RemoteConfig`, or a raw 2.6-family ``config.json`` dict.

    ``lora``: only LoRA adapters train (``lora_rank`` r); ``freeze_vision``: the vision tower
    is frozen (ignored under LoRA, where it is frozen anyway).
    """
    from torch import nn

    estimate = False
    if isinstance(model_or_config, dict):
        model_or_config = RemoteConfig(raw=model_or_config)
    if isinstance(model_or_config, RemoteConfig):
        parts, lora_params, targets = _remote_counts(model_or_config.raw, lora, lora_rank)
        family, estimate = REMOTE_26.name, True
        buffers = _remote_buffer_bytes(model_or_config.raw)
    elif isinstance(model_or_config, nn.Module):
        base = getattr(model_or_config, "base_model", None)
        if base is not None and hasattr(base, "model") and hasattr(model_or_config, "peft_config"):
            raise ValueError("count_parameters takes the base model, not a PEFT-wrapped one")
        parts, lora_params, targets = _module_counts(model_or_config, lora, lora_rank)
        native = any(
            p.startswith("model.vision_tower") for p, _ in model_or_config.named_parameters()
        )
        family = (NATIVE_46 if native else REMOTE_26).name
        buffers = _module_buffer_bytes(model_or_config)
    else:
        model = meta_model(model_or_config)
        parts, lora_params, targets = _module_counts(model, lora, lora_rank)
        family = NATIVE_46.name
        buffers = _module_buffer_bytes(model)
    total = sum(parts.values())
    if lora:
        t_llm, t_vision, t_res = lora_params, 0, 0
    else:
        t_llm, t_res = parts["llm"], parts["resampler"]
        t_vision = 0 if freeze_vision else parts["vision"]
    trainable = t_llm + t_vision + t_res + (0 if lora else parts["other"])
    return ParamCounts(
        total=total + lora_params,
        trainable=trainable,
        llm=parts["llm"],
        vision=parts["vision"],
        resampler=parts["resampler"],
        other=parts["other"],
        trainable_llm=t_llm,
        trainable_vision=t_vision,
        trainable_resampler=t_res,
        lora=lora_params,
        lora_targets=targets,
        family=family,
        estimate=estimate,
        buffer_bytes=buffers,
    )
