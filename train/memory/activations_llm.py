"""The language model's part of the activation model: what its layers, final norm and loss
save for backward, in the notation and op rules of :mod:`mvtrain.memory.activations_ops`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mvtrain.memory.activations_ops import INDEX, F, Ledger
from mvtrain.memory.dims import TextDims

if TYPE_CHECKING:
    from mvtrain.memory.activations import TrainingSetup


def rmsnorm_saved(
    width: int,
    rows: int,
    x_grad: bool,
    w_train: bool,
    a: int,
    style: str,
    upcast_storage: int | None = None,
) -> tuple[float, float]:
    """(bytes per token, constant bytes) an RMSNorm saves; ``rows`` norms per token (heads);
    ``upcast_storage``: per-token bytes of the parent storage when ``x.float()`` is a view.

    Qwen3.5 (``x.float()``, ``pow``, ``rsqrt``, ``*``, ``* (1 + w)``): ``F*W`` upcast input +
    ``F`` per row rstd when the input needs a grad, ``F*W`` normed when ``w`` trains, ``F*W``
    constant for ``1 + w``. In fp32 ``x.float()`` is a view, so the saved storage is the
    parent (the whole ``q_proj`` output for ``q_norm``, gate included). Llama/Qwen2 style
    saves ``a*W`` (the cast normed) instead of ``F*W`` for the weight."""
    upcast = upcast_storage if (a == F and upcast_storage) else F * width
    per_token = (upcast + F * rows) if x_grad else 0
    if w_train:
        per_token += F * width if style == "qwen35" else a * width
    const = F * (width // rows) if (x_grad and style == "qwen35") else 0
    return per_token, const


def _full_layer(td: TextDims, st: TrainingSetup, x_grad: bool) -> tuple[float, float, float]:
    """(bytes per token, constant bytes, bytes per padded token) of a full-attention decoder
    layer. All trainable (Qwen3.5): input RMSNorm ``2F*H + F``; q/k/v input ``a*H``; q_norm
    (``F*2*nh*d`` in fp32 / ``F*nh*d`` in bf16) ``+ F*nh + F*nh*d``; k_norm
    ``2F*nkv*d + F*nkv``; RoPE'd q, k + v + out ``a*(2nh + 2nkv)*d``, lse ``F*nh``; gate
    sigmoid, contiguous output, gated product ``3a*nh*d``; post RMSNorm ``2F*H + F``; MLP
    input ``a*H``, SiLU input, SiLU output, up output, down input ``4a*I``. Padded: the k/v
    repeated to all heads, ``2a*(nh - nkv)*d``."""
    a, r = st.act_bytes, st.lora_rank
    train, lora = not st.lora, st.lora
    h, nh, nkv, d, i = td.hidden, td.heads, td.kv_heads, td.head_dim, td.intermediate
    lin = train or lora
    tok = const = 0.0
    t, c = rmsnorm_saved(h, 1, x_grad, train, a, td.norm_style)
    tok, const = tok + t, const + c
    tok += a * h if lin else 0
    q_out = nh * d * (2 if td.attn_output_gate else 1)
    if td.qk_norm:
        t, c = rmsnorm_saved(nh * d, nh, True, train, a, td.norm_style, upcast_storage=F * q_out)
        tok, const = tok + t, const + c
        t, c = rmsnorm_saved(nkv * d, nkv, True, train, a, td.norm_style)
        tok, const = tok + t, const + c
    tok += a * (nh * d + 2 * nkv * d) + a * nh * d + F * nh  # q, k, v, out, lse
    tok += 2 * a * nh * d if td.attn_output_gate else 0  # sigmoid(gate), output copy
    tok += a * nh * d if lin else 0  # o_proj input
    t, c = rmsnorm_saved(h, 1, True, train, a, td.norm_style)
    tok, const = tok + t, const + c
    tok += (a * h if lin else 0) + 3 * a * i + (a * i if lin else 0)
    tok += 7 * a * r if lora else 0
    return tok, const, 2 * a * (nh - nkv) * d


def _linear_layer(td: TextDims, st: TrainingSetup, x_grad: bool) -> tuple[float, float]:
    """(bytes per token, constant bytes) of a linear-attention (gated delta net) layer: an
    ESTIMATE (flash-linear-attention kernels, not measurable on CPU): conv input/output
    ``2a*C`` (``C = 2*nk*dk + nv*dv``), gate terms ``3F*nv + a*nv``, chunk matrices
    ``a*64*nv``, gated RMSNorm ``(3F + 2a)*nv*dv``, projections' inputs ``a*(H + nv*dv)``."""
    a, r = st.act_bytes, st.lora_rank
    train, lora = not st.lora, st.lora
    h, i = td.hidden, td.intermediate
    lin = train or lora
    nk, nv, dk, dv = td.lin_k_heads, td.lin_v_heads, td.lin_k_dim, td.lin_v_dim
    conv = 2 * nk * dk + nv * dv
    tok = const = 0.0
    t, c = rmsnorm_saved(h, 1, x_grad, train, a, td.norm_style)
    tok, const = tok + t, const + c
    tok += (a * h + a * nv * dv) if train else 0  # in_proj_* and out_proj inputs
    tok += 2 * a * conv + 3 * F * nv + a * nv + a * 64 * nv + a  # conv, gates, chunks, mask
    tok += (3 * F + 2 * a) * nv * dv + F * nv  # gated RMSNorm
    t, c = rmsnorm_saved(h, 1, True, train, a, td.norm_style)
    tok, const = tok + t, const + c
    tok += (a * h if lin else 0) + 3 * a * i + (a * i if lin else 0)
    tok += 3 * a * r if lora else 0
    return tok, const


def _layers(led: Ledger, td: TextDims, st: TrainingSetup, x0_grad: bool) -> tuple[float, float]:
    """Add the decoder layers' terms (checkpointed: each layer's input ``a*H`` only); return
    the recompute transient (bytes per token, quadratic bytes per ``L^2``) of the costliest
    layer, before checkpointing decides whether it applies."""
    a, h, nh = st.act_bytes, td.hidden, td.heads
    recompute = recompute_quad = 0.0
    for index, kind in enumerate(td.layer_types):
        x_grad = x0_grad if index == 0 else True
        if kind == "linear_attention":
            tok, const = _linear_layer(td, st, x_grad)
            pad = 0.0
        else:
            tok, const, pad = _full_layer(td, st, x_grad)
        recompute = max(recompute, tok)
        name = f"llm.{kind}"
        if st.grad_ckpt:
            led.add(f"{name} (checkpointed input)", "token", a * h)
        else:
            led.add(name, "token", tok)
            led.add(f"{name} norms", "const", const)
        if kind == "full_attention" and st.attention != "flash":
            quad = a if st.attention == "sdpa" else nh * (F + a) + a
            if st.grad_ckpt:  # inside the checkpointed layer: recomputed, one layer at a time
                recompute_quad = max(recompute_quad, quad)
            else:
                led.add(f"{name} k/v repeated for the mask", "padded_token", pad)
                led.add(f"{name} attention mask/probs", "quad", quad)
    return recompute, recompute_quad


def text_terms(led: Ledger, td: TextDims, st: TrainingSetup, x0_grad: bool) -> tuple[float, float]:
    """Add the language model's terms (``x0_grad``: whether the first layer's input needs a
    gradient); return the checkpointing recompute transient (bytes per token, quadratic bytes
    per ``L^2``) of the costliest layer, zeros without checkpointing. RoPE ``cos``/``sin``
    (``2a*rot``) are shared by all layers."""
    a, h = st.act_bytes, td.hidden
    train = not st.lora
    recompute, recompute_quad = _layers(led, td, st, x0_grad)
    if td.full_layers:
        led.add("llm.rope cos/sin", "token", 2 * a * td.rotary_dim)
    t, c = rmsnorm_saved(h, 1, True, train, a, td.norm_style)
    led.add("llm.final_norm", "token", t)
    led.add("llm.final_norm", "const", c)
    if train:
        led.add("llm.embed_tokens ids", "token", INDEX)
    loss_terms(led, td, st)
    return (recompute, recompute_quad) if st.grad_ckpt else (0.0, 0.0)


def loss_terms(led: Ledger, td: TextDims, st: TrainingSetup) -> None:
    """Add what the loss saves. Plain: ``lm_head`` keeps its input ``a*H`` per token when its
    weight trains; ``log_softmax`` keeps fp32 log-probs and ``nll_loss`` the int64 targets,
    ``F*vocab + 8`` per label row, and its ``total_weight``. Chunked: per label row the
    selected hidden state ``a*H`` (a copy: ``index_select``), its int64 index and target
    (``2*8``); nothing per token (the head is passed through)."""
    a, h = st.act_bytes, td.hidden
    if st.chunked_loss:
        led.add("chunked loss hidden rows + index + targets", "loss_row", a * h + 2 * INDEX)
        return
    if not st.lora:
        led.add("lm_head input", "token", a * h)
    led.add("loss log_softmax + targets", "loss_row", F * td.vocab + INDEX)
    led.add("loss total_weight", "const", F)


def loss_transients(
    td: TextDims, st: TrainingSetup
) -> tuple[float, float, float, int, float, int]:
    """(bytes per padded token, head-gradient bytes, bytes per chunk row, rows per chunk,
    head-gradient bytes of a single chunk, most rows taken as a single chunk) held for a moment
    at the loss's backward.

    Plain: the fp32 gradient of the log-probs and of the logits, ``2F*vocab`` per token, and
    the head (embedding) weight's gradient ``a*vocab*H`` when it trains. Chunked: the hidden
    states' gradient (``index_select``'s full ``a*H`` per token and the rows' ``a*H``); the
    head weight's fp32 accumulator plus, below fp32, one chunk's product and the cast result
    ``a*vocab*H``, when it trains; one chunk of up to ``c`` rows
    (:func:`mvtrain.model.chunked_loss.chunk_rows_for`): its fp32 logits, turned in place
    into their gradient, and below fp32 the logits or their gradient in ``a``:
    ``(F + a)*vocab`` per row (``F*vocab`` in fp32). Up to
    :func:`~mvtrain.model.chunked_loss.one_chunk_rows` label rows the loss is one chunk, whose
    head gradient is one matmul in ``a``: ``a*vocab*H``, no fp32 accumulator."""
    from mvtrain.model.chunked_loss import chunk_rows_for, one_chunk_rows

    a, h, vocab = st.act_bytes, td.hidden, td.vocab
    if not st.chunked_loss:
        return 2 * F * vocab, (0.0 if st.lora else a * vocab * h), 0.0, 0, 0.0, 0
    low = a < F
    head_grad = 0.0 if st.lora else (F + (a if low else 0)) * vocab * h
    per_row = (F + (a if low else 0)) * vocab
    single = one_chunk_rows(vocab, h, int(a), head_trains=not st.lora)
    single_head_grad = 0.0 if st.lora else a * vocab * h
    return 2 * a * h, head_grad, per_row, chunk_rows_for(vocab), single_head_grad, single
