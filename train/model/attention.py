"""Batched variable-length attention for the MiniCPM-V 4.6 vision tower without flash-attn.

The native vision attention handles packed sequences (one per slice, and one per 2x2 window
in the window-attention merger) with ``cu_seqlens``. Unless a flash-attention kernel is
configured, transformers runs one ``scaled_dot_product_attention`` call per sequence in a
Python loop: a 12-slice image means ~12k window calls of four tokens each, which dominates a
CPU step and costs real time on GPUs without flash-attn too.

:func:`varlen_sdpa` computes the same attention with one SDPA call per distinct sequence
length (windows all have length 4; slices of one image share a length), gathering the
sequences of a length into a batch of at most :data:`MAX_SDPA_BATCH` sequences. It is
registered as an attention implementation whose name contains "flash", which is how the
vision code decides to pass ``cu_seqlens`` instead of looping. Only the vision sub-config is
switched; the language model is untouched.

The grouping (a :class:`VarlenPlan`) needs the sequence lengths on the host, one
device-to-host sync. The vision tower passes the same ``cu_seqlens`` tensor object to every
layer that attends over the same sequences, so plans are cached per tensor object
(:func:`varlen_plan`): one sync per distinct ``cu_seqlens`` tensor in a forward (three for
the 4.6 tower: full-resolution layers, merger windows, downsampled layers), not one per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

IMPLEMENTATION = "mvkit_flash_varlen_sdpa"

MAX_SDPA_BATCH = 32768
"""Most sequences in one SDPA call of :func:`varlen_sdpa`: a cap on the batch dimension
alone, not on batch x heads.

CUDA's flash and memory-efficient SDPA kernels launch one grid axis per batch entry and
another per head, and those axes hold at most 65,535 blocks: a batch of 2**16 sequences fails
with "CUDA error: invalid configuration argument" while 2**16 - 1 works
(pytorch/pytorch#146704, "SDPA: EFFICIENT_ATTENTION / FLASH_ATTENTION backend, batch dim
limited to 2**16-1"). Heads sit on their own axis, so the limit does not shrink with more
heads. The 4-token windows of a large micro-batch reach that many sequences. Half the limit
leaves a margin; a chunk of 32,768 windows (x 16 heads in the 4.6 tower) still fills a GPU.
"""

_PLANS: WeakIdKeyDictionary = WeakIdKeyDictionary()
"""``cu_seqlens`` tensor object -> its :class:`VarlenPlan`. Weakly keyed by identity: an entry
dies with its tensor, so a later tensor that reuses the id never sees it."""


@dataclass(frozen=True)
class VarlenPlan:
    """How :func:`varlen_sdpa` batches the packed sequences of one ``cu_seqlens``.

    Tokens are taken in *plan order*: sequences sorted by length (ascending; equal lengths in
    packed order; empty sequences dropped), cut into ``calls``.
    """

    total: int
    """Packed tokens (``cu_seqlens[-1]``)."""
    calls: tuple[tuple[int, int], ...]
    """``(length, sequences)`` of each SDPA call, in plan order; ``sequences`` is at most
    ``max_batch``."""
    order: torch.Tensor
    """int64 ``[total]`` on ``device``: the packed position of each token in plan order."""
    device: torch.device
    """Device of ``order`` (the attention inputs' device)."""
    max_batch: int
    """The :data:`MAX_SDPA_BATCH` the calls were cut with."""
    version: int | None
    """``cu_seqlens._version`` when planned (an in-place edit of the tensor bumps it); None
    for an inference-mode tensor, which has no version counter."""


def _version(cu_seqlens: torch.Tensor) -> int | None:
    return None if cu_seqlens.is_inference() else cu_seqlens._version


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (CPU) on ``device``; to CUDA through pinned memory, which copies without a sync."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def plan_varlen(
    cu_seqlens: torch.Tensor, total: int, device: torch.device, max_batch: int
) -> VarlenPlan:
    """Group the sequences of ``cu_seqlens`` by length into SDPA calls of at most
    ``max_batch`` sequences.

    ``cu_seqlens``: 1-D cumulative boundaries ``[0, ..., total]``, any integer dtype and
    device; reading it is the one device-to-host sync. Raises ValueError unless it starts at
    0, never decreases and ends at ``total`` (the packed tokens of the attention inputs).
    """
    if cu_seqlens.ndim != 1 or cu_seqlens.numel() == 0:
        raise ValueError(f"cu_seqlens must be 1-D and non-empty, got {tuple(cu_seqlens.shape)}")
    if max_batch < 1:
        raise ValueError(f"max_batch must be at least 1, got {max_batch}")
    bounds = [int(b) for b in cu_seqlens.tolist()]
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:], strict=True)]
    if bounds[0] != 0 or bounds[-1] != total or any(length < 0 for length in lengths):
        raise ValueError(
            f"cu_seqlens must rise from 0 to the {total} packed tokens without decreasing, "
            f"got {bounds[0]} .. {bounds[-1]}"
        )
    starts_by_length: dict[int, list[int]] = {}
    for start, length in zip(bounds[:-1], lengths, strict=True):
        if length:
            starts_by_length.setdefault(length, []).append(start)
    calls: list[tuple[int, int]] = []
    for length in sorted(starts_by_length):
        count = len(starts_by_length[length])
        calls.extend((length, min(max_batch, count - i)) for i in range(0, count, max_batch))
    pieces = [
        (torch.tensor(starts)[:, None] + torch.arange(length)[None, :]).reshape(-1)
        for length, starts in sorted(starts_by_length.items())
    ]
    order = torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)
    return VarlenPlan(
        total=total,
        calls=tuple(calls),
        order=_to_device(order, device),
        device=device,
        max_batch=max_batch,
        version=_version(cu_seqlens),
    )


def varlen_plan(cu_seqlens: torch.Tensor, total: int, device: torch.device) -> VarlenPlan:
    """The cached :func:`plan_varlen` of ``cu_seqlens`` for :data:`MAX_SDPA_BATCH`.

    Reused while it is the same tensor object, unchanged in place (same ``_version``), with
    the same ``total``, ``device`` and :data:`MAX_SDPA_BATCH`; otherwise planned again. An
    in-place edit of an inference-mode tensor (no version counter) goes unnoticed.
    """
    device = torch.device(device)
    plan = _PLANS.get(cu_seqlens)
    if (
        plan is None
        or plan.version != _version(cu_seqlens)
        or plan.total != total
        or plan.device != device
        or plan.max_batch != MAX_SDPA_BATCH
    ):
        plan = plan_varlen(cu_seqlens, total, device, MAX_SDPA_BATCH)
        _PLANS[cu_seqlens] = plan
    return plan


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
    returns ``[1, T, H, D]`` like transformers' SDPA integration.

    ``cu_seq_lens_q`` (``[0, ..., T]``) delimits the sequences; keys use the same boundaries
    (``cu_seq_lens_k`` and ``max_length_*`` are ignored). Without it this is plain SDPA over
    the whole batch with ``attention_mask``.

    The tokens are gathered into plan order and scattered back with the plan's int64
    ``order`` (also when it is the packed order), which autograd saves: one index per
    ``cu_seqlens`` tensor, shared by the layers that attend with it.
    """
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
    heads, total = query.shape[1], query.shape[2]
    plan = varlen_plan(cu_seq_lens_q, total, query.device)

    def tokens(t: torch.Tensor) -> torch.Tensor:  # [T, H, D] in plan order
        return t[0].transpose(0, 1).index_select(0, plan.order)

    outs = _attend_in_calls(
        plan, tokens(query), tokens(key), tokens(value), dropout, scaling, is_causal
    )
    if not outs:
        return value.new_zeros((1, total, heads, value.shape[-1])), None
    ordered = outs[0] if len(outs) == 1 else torch.cat(outs)
    # index_put_ saves only the index for backward (index_copy_ would also keep the values).
    out = ordered.new_empty(ordered.shape).index_put_((plan.order,), ordered)
    return out.unsqueeze(0), None


def _attend_in_calls(
    plan: VarlenPlan,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout: float,
    scaling: float | None,
    is_causal: bool,
) -> list[torch.Tensor]:
    """One SDPA call per ``(length, count)`` of the plan over the tokens ``[T, H, D]`` in plan
    order; each output ``[length * count, H, Dv]``."""
    outs = []
    offset = 0
    for length, count in plan.calls:
        end = offset + length * count

        def batch(t: torch.Tensor, a: int = offset, b: int = end, n: int = count) -> torch.Tensor:
            return t[a:b].unflatten(0, (n, -1)).transpose(1, 2)  # [n, H, L, D]

        attended = F.scaled_dot_product_attention(
            batch(q), batch(k), batch(v), dropout_p=dropout, scale=scaling, is_causal=is_causal
        )  # [n, H, L, Dv]
        outs.append(attended.transpose(1, 2).reshape(end - offset, q.shape[1], -1))
        offset = end
    return outs


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
