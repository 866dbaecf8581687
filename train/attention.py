"""Batched variable-length attention for the MiniCPM-V 4.6 vision tower without flash-attn.

The native vision attention handles packed sequences (one per slice, and one per 2x2 window
in the window-attention merger) with ``cu_seqlens``. Unless a flash-attention kernel is
configured, transformers runs one ``scaled_dot_product_attention`` call per sequence in a
Python loop: a 12-slice image means ~12k window calls of four tokens each, which dominates a
CPU step and costs real time on GPUs without flash-attn too.

:func:`varlen_sdpa` computes the same attention with one SDPA call per distinct sequence
length (windows all have length 4; slices of one image share a length), gathering the
sequences of a length into a batch. It is registered as an attention implementation whose
name contains "flash", which is how the vision code decides to pass ``cu_seqlens`` instead
of looping. Only the vision sub-config is switched; the language model is untouched.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IMPLEMENTATION = "mvkit_flash_varlen_sdpa"


def varlen_sdpa(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    is_causal: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention within each packed sequence. ``query``/``key``/``value``: ``[1, H, T, D]``;
    returns ``[1, T, H, D]`` like transformers' SDPA integration."""
    if cu_seq_lens_q is None:
        out = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attention_mask,
            dropout_p=dropout,
            scale=scaling,
            is_causal=is_causal,
        )
        return out.transpose(1, 2).contiguous(), None
    if query.shape[0] != 1:
        raise ValueError("packed varlen attention expects a batch of one packed sequence")
    cu = cu_seq_lens_q.to(device=query.device, dtype=torch.long)
    starts, lengths = cu[:-1], cu[1:] - cu[:-1]
    out = torch.empty_like(query)
    for length in torch.unique(lengths).tolist():
        if length == 0:
            continue
        chosen = starts[lengths == length]
        index = (chosen[:, None] + torch.arange(length, device=query.device)[None, :]).reshape(-1)

        def gather(
            t: torch.Tensor, idx: torch.Tensor = index, n: int = len(chosen)
        ) -> torch.Tensor:
            heads, dim = t.shape[1], t.shape[3]
            return t[0][:, idx].reshape(heads, n, -1, dim).transpose(0, 1)

        attended = F.scaled_dot_product_attention(
            gather(query),
            gather(key),
            gather(value),
            dropout_p=dropout,
            scale=scaling,
            is_causal=is_causal,
        )  # [n, H, L, D]
        heads, dim = query.shape[1], query.shape[3]
        out[0][:, index] = attended.transpose(0, 1).reshape(heads, -1, dim)
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(IMPLEMENTATION, varlen_sdpa)


def use_batched_varlen_attention(model: nn.Module) -> bool:
    """Switch the 4.6 vision tower to :func:`varlen_sdpa` unless it already uses a flash
    kernel; return whether it was switched."""
    register()
    switched = False
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is None or getattr(config, "model_type", "") != "minicpmv4_6_vision":
            continue
        current = getattr(config, "_attn_implementation", None) or "sdpa"
        if "flash" in current and current != IMPLEMENTATION:
            continue
        config._attn_implementation = IMPLEMENTATION
        switched = True
    return switched
