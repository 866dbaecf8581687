"""The model dimensions the activation model needs, read from a config (native or 2.6)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mvshards.families import NATIVE_46, REMOTE_26, Family
from mvtrain.memory.params import RemoteConfig, remote_llm_style


@dataclass(frozen=True)
class TextDims:
    """Language-model sizes."""

    hidden: int
    layer_types: tuple[str, ...]
    """``"full_attention"`` or ``"linear_attention"`` per layer."""
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    rotary_dim: int
    attn_output_gate: bool
    """Qwen3.5: ``q_proj`` also emits a sigmoid gate for the attention output."""
    qk_norm: bool
    norm_style: str
    """``"qwen35"`` (``x.float()`` normed, times ``1 + w``, in fp32) or ``"llama"``
    (normed cast back to the model dtype, times ``w``)."""
    lin_k_heads: int = 0
    lin_v_heads: int = 0
    lin_k_dim: int = 0
    lin_v_dim: int = 0

    @property
    def layers(self) -> int:
        return len(self.layer_types)

    @property
    def full_layers(self) -> int:
        return sum(t == "full_attention" for t in self.layer_types)

    @property
    def linear_layers(self) -> int:
        return sum(t == "linear_attention" for t in self.layer_types)


@dataclass(frozen=True)
class VisionDims:
    """Vision tower and merger/resampler sizes."""

    family: Family
    """4.6 family: NaViT SigLIP + window merger + MLP merger; 2.6 family: SigLIP + resampler."""
    hidden: int
    intermediate: int
    layers: int
    heads: int
    patch_size: int
    channels: int = 3
    insert_layer_id: int = -1
    """4.6: the window-attention merger runs after this layer (16x mode)."""
    downsample_mode: str = "16x"
    query_num: int = 64
    """2.6: resampler queries per (sub)image."""
    resampler_heads: int = 0
    llm_hidden: int = 0


def _get(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def text_dims(config: Any) -> TextDims:
    """Text sizes of a native config (its ``text_config``) or a :class:`RemoteConfig`."""
    if isinstance(config, RemoteConfig):
        raw = config.raw
        hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
        head_dim = int(raw.get("head_dim") or hidden // heads)
        style = remote_llm_style(raw)
        return TextDims(
            hidden=hidden,
            layer_types=("full_attention",) * int(raw["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=head_dim,
            intermediate=int(raw["intermediate_size"]),
            vocab=int(raw["vocab_size"]),
            rotary_dim=head_dim,
            attn_output_gate=False,
            qk_norm=style == "qwen3",
            norm_style="llama",
        )
    tc = _get(config, "text_config", config)
    hidden, heads = int(_get(tc, "hidden_size")), int(_get(tc, "num_attention_heads"))
    head_dim = int(_get(tc, "head_dim") or hidden // heads)
    layers = int(_get(tc, "num_hidden_layers"))
    layer_types = tuple(_get(tc, "layer_types") or ("full_attention",) * layers)[:layers]
    rope = _get(tc, "rope_parameters") or {}
    factor = float(rope.get("partial_rotary_factor", _get(tc, "partial_rotary_factor", 1.0)) or 1.0)
    return TextDims(
        hidden=hidden,
        layer_types=layer_types,
        heads=heads,
        kv_heads=int(_get(tc, "num_key_value_heads") or heads),
        head_dim=head_dim,
        intermediate=int(_get(tc, "intermediate_size")),
        vocab=int(_get(tc, "vocab_size")),
        rotary_dim=int(head_dim * factor),
        attn_output_gate=True,
        qk_norm=True,
        norm_style="qwen35",
        lin_k_heads=int(_get(tc, "linear_num_key_heads", 0) or 0),
        lin_v_heads=int(_get(tc, "linear_num_value_heads", 0) or 0),
        lin_k_dim=int(_get(tc, "linear_key_head_dim", 0) or 0),
        lin_v_dim=int(_get(tc, "linear_value_head_dim", 0) or 0),
    )


def vision_dims(config: Any, downsample_mode: str | None = None) -> VisionDims:
    """Vision sizes; ``downsample_mode`` ("16x"/"4x") overrides the config's (4.6 only)."""
    if isinstance(config, RemoteConfig):
        raw = config.raw
        v = raw.get("vision_config") or {}
        hidden_llm = int(raw["hidden_size"])
        layers = int(v.get("num_hidden_layers", 27)) - (
            1 if raw.get("drop_vision_last_layer") else 0
        )
        return VisionDims(
            family=REMOTE_26,
            hidden=int(v.get("hidden_size", 1152)),
            intermediate=int(v.get("intermediate_size", 4304)),
            layers=layers,
            heads=int(v.get("num_attention_heads", 16)),
            patch_size=int(v.get("patch_size", raw.get("patch_size", 14))),
            query_num=int(raw.get("query_num", 64)),
            resampler_heads=max(1, hidden_llm // 128),
            llm_hidden=hidden_llm,
        )
    vc = _get(config, "vision_config")
    return VisionDims(
        family=NATIVE_46,
        hidden=int(_get(vc, "hidden_size")),
        intermediate=int(_get(vc, "intermediate_size")),
        layers=int(_get(vc, "num_hidden_layers")),
        heads=int(_get(vc, "num_attention_heads")),
        patch_size=int(_get(vc, "patch_size")),
        channels=int(_get(vc, "num_channels", 3) or 3),
        insert_layer_id=int(_get(config, "insert_layer_id", _get(vc, "insert_layer_id", -1))),
        downsample_mode=downsample_mode or str(_get(config, "downsample_mode", "16x") or "16x"),
        llm_hidden=int(_get(_get(config, "text_config"), "hidden_size")),
    )
