"""Activation memory from the model config: bytes autograd saves per padded token and patch.

The model is an op-by-op count of the tensors each autograd node SAVES for its backward (the
memory held between forward and backward), symbolic in the config dims, checked against
:func:`mvtrain.memory.saved_tensors.measure_saved_bytes` on the tiny model. Notation:
``a`` bytes of the activation dtype (2 bf16, 4 fp32), ``F = 4`` (fp32), ``s`` bytes of a
LayerNorm statistic (fp32 on CUDA; the CPU kernel keeps them in ``a``).

What an op saves (PyTorch autograd formulas):

* ``linear`` saves its input iff its weight trains (the grad of the input needs only the
  weight, a parameter); LoRA's ``lora_A`` saves the same input (de-duplicated) and
  ``lora_B`` saves the rank-``r`` output of ``lora_A``: ``a*r`` per adapted linear.
* ``mul`` saves each operand iff the *other* one needs a gradient; ``silu``/``gelu`` save
  their input; ``sigmoid``/``rsqrt``/``log_softmax`` their output; ``pow`` its input;
  ``mean``/``add``/views/casts save nothing; advanced indexing saves the int64 index.
* RMSNorm (Qwen3.5: ``x.float()``, ``pow``, ``rsqrt``, ``*``, ``* (1 + w)``): ``F*W`` upcast
  input + ``F`` per row rstd when the input needs a grad, ``F*W`` normed when ``w`` trains,
  ``F*W`` constant for ``1 + w``. In fp32 ``x.float()`` is a view, so the saved storage is
  the parent (the whole ``q_proj`` output for ``q_norm``, gate included). Llama/Qwen2
  style saves ``a*W`` (the cast normed) instead of ``F*W`` for the weight.
* LayerNorm saves input + mean + rstd (``a*W + 2s`` per row) when anything needs a grad.
* Attention with SDPA / flash / memory-efficient kernels saves ``q, k, v, out`` and the fp32
  ``logsumexp`` (``F`` per head per token): nothing quadratic. With a padding mask,
  transformers repeats k/v to all heads (GQA off) and SDPA saves its own float copy of the
  ``[B, 1, L, L]`` mask per layer: ``a*B*L^2`` per full-attention layer -- the quadratic term
  (0 with ``flash_attention_2``, which unpads). The eager path saves the fp32 softmax and
  its ``a`` copy: ``heads*(F + a)`` per ``L^2`` per layer, padded or not.
* Vision varlen attention (:mod:`mvtrain.attention`) also saves the int64 gather index
  (8 bytes per token per attention).
* Cross-entropy saves the fp32 ``log_softmax`` output (``F*vocab`` per label position: with
  a 150k-250k vocab the biggest per-token term) and the int64 targets.

Per decoder layer (full attention, Qwen3.5, all trainable): input RMSNorm ``2F*H + F``;
q/k/v input ``a*H``; q_norm (``F*2*nh*d`` in fp32 / ``F*nh*d`` in bf16) ``+ F*nh + F*nh*d``;
k_norm ``2F*nkv*d + F*nkv``; RoPE'd q, k + v + out ``a*(2nh + 2nkv)*d``, lse ``F*nh``; gate
sigmoid, contiguous output, gated product ``3a*nh*d``; post RMSNorm ``2F*H + F``; MLP input
``a*H``, SiLU input, SiLU output, up output, down input ``4a*I``. RoPE ``cos``/``sin``
(``2a*rot``) are shared by all layers. Linear-attention (gated delta net) layers are an
ESTIMATE (flash-linear-attention kernels, not measurable on CPU): conv input/output
``2a*C`` (``C = 2*nk*dk + nv*dv``), gate terms ``3F*nv + a*nv``, chunk matrices ``a*64*nv``,
gated RMSNorm ``(3F + 2a)*nv*dv``, projections' inputs ``a*(H + nv*dv)``.

Vision (4.6), per patch of a layer that sees it (layers up to ``insert_layer_id`` see all
patches; later ones a quarter in 16x mode): LayerNorms ``2(a*V + 2s)``, q/k/v + out
``4a*V`` + lse ``F*heads`` + index 8, GELU input ``a*Vi``; plus ``4a*V + a*Vi`` for the
inputs of trainable linears. The patch conv saves the pixels (``a*3*14*14``) and the
position ids (8) when it trains. The window merger and the 2x2 MLP merger add their
LayerNorm / linear / GELU inputs at their token counts.

Modes: LoRA freezes everything but the adapters (frozen linears keep no inputs; the norms
keep only what the input gradient needs; the first layer's input needs none; vision and
merger keep nothing). Frozen vision keeps nothing in the tower when its input needs no
gradient. Gradient checkpointing (non-reentrant) keeps each checkpointed layer's input
(``a*H`` / ``a*V``) and recomputes one layer in backward (a transient). NOTE:
``model_setup`` calls ``enable_input_require_grads()``, which also hooks the vision tower's
patch embedding, so under checkpointing the frozen tower's window merger keeps activations
(and runs backward): ``vision_input_requires_grad`` defaults to ``grad_ckpt`` to match.

The 2.6 family (Qwen2/Qwen3/Llama LLM, SigLIP with eager per-slice attention, resampler) is
the same accounting applied to its published architecture: an ESTIMATE.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mvtrain.memory.dims import TextDims, VisionDims, text_dims, vision_dims

F = 4
"""Bytes of fp32."""
INDEX = 8
"""Bytes of an int64 index."""
DUMMY_PATCHES = 16
"""Patches of the dummy 4x4 image a text-only micro-batch runs through the vision tower."""
SLICE_PATCHES_26 = 1024
"""2.6 family: patches of a padded 448x448 slice (32x32), the per-slice attention length."""


@dataclass(frozen=True)
class TrainingSetup:
    """How the model is trained (what :mod:`mvtrain.model_setup` does for the run)."""

    bf16: bool = True
    lora: bool = False
    lora_rank: int = 8
    freeze_vision: bool = False
    grad_ckpt: bool = False
    vision_input_requires_grad: bool | None = None
    """None: same as ``grad_ckpt`` (``enable_input_require_grads`` hooks the vision input)."""
    attention: str = "sdpa"
    """LLM attention: ``"sdpa"`` (default), ``"flash"`` (flash_attention_2: unpadded, no
    quadratic term) or ``"eager"``. For the 2.6 family it also selects the vision tower's
    (``"flash"``, else eager: its remote code has no SDPA path)."""
    device_type: str = "cuda"
    downsample_mode: str | None = None
    """None: the config's ("16x"); "4x" for the minicpmv-4.6-4x profile."""

    @property
    def act_bytes(self) -> int:
        return 2 if self.bf16 else 4


UNITS = ("token", "loss_row", "patch", "image_token", "padded_token", "quad", "const")


@dataclass(frozen=True)
class Term:
    """One line of the breakdown: ``bytes`` per ``unit``."""

    name: str
    unit: str
    bytes: float


@dataclass(frozen=True)
class ActivationModel:
    """Bytes saved for backward, by unit; see the module doc for the derivation.

    ``saved = bytes_per_token*T + logits_bytes_per_token*R + bytes_per_patch*P
    + image_bytes_per_token*T [images] + padded_bytes_per_token*T [padded]
    + quadratic_bytes_per_token_sq*B*L^2 [padded or eager] + const_bytes`` with ``T`` padded
    tokens (``B*L``), ``R = B*(L-1)`` label positions, ``P`` padded patches (the dummy
    image's when 0).
    """

    bytes_per_token: float
    bytes_per_patch: float
    logits_bytes_per_token: float
    quadratic_bytes_per_token_sq: float
    quadratic_needs_padding: bool
    image_bytes_per_token: float
    padded_bytes_per_token: float
    const_bytes: float
    dummy_patches: int
    recompute_bytes_per_token: float
    """Transient, gradient checkpointing: one layer recomputed in backward (0 without)."""
    recompute_bytes_per_patch: float
    recompute_quadratic_bytes_per_token_sq: float
    """Transient, checkpointing: one layer's mask copy, per sample and ``L^2``."""
    logits_transient_bytes_per_token: float
    """Transient at the loss (fp32 gradient of the log-probs and its input), per label row."""
    grad_transient_bytes: float
    """Transient: the largest trainable parameter's full gradient before ZeRO reduces it."""
    estimate: bool
    terms: tuple[Term, ...] = field(default=(), repr=False)

    def saved_bytes(
        self,
        padded_tokens: int,
        padded_patches: int,
        batch_size: int | None = None,
        max_len: int | None = None,
        padded: bool | None = None,
    ) -> int:
        """Predicted bytes held between forward and backward for one micro-batch.

        ``padded``: whether the batch has padding (a mask); None assumes so when
        ``batch_size > 1``. Without ``batch_size``/``max_len`` the batch is taken as one
        sequence of ``padded_tokens``.
        """
        b = batch_size or 1
        length = max_len or max(1, padded_tokens // b)
        if padded is None:
            padded = b > 1
        rows = b * max(length - 1, 0) if padded_tokens else 0
        patches = padded_patches if padded_patches > 0 else self.dummy_patches
        total = (
            self.bytes_per_token * padded_tokens
            + self.logits_bytes_per_token * rows
            + self.bytes_per_patch * patches
            + self.const_bytes
        )
        if padded_patches > 0:
            total += self.image_bytes_per_token * padded_tokens
        if padded:
            total += self.padded_bytes_per_token * padded_tokens
        if padded or not self.quadratic_needs_padding:
            total += self.quadratic_bytes_per_token_sq * b * length * length
        return int(round(total))

    def peak_bytes(
        self,
        padded_tokens: int,
        padded_patches: int,
        batch_size: int | None = None,
        max_len: int | None = None,
        padded: bool | None = None,
    ) -> int:
        """Predicted activation peak: saved bytes plus the largest transient -- the loss (fp32
        log-prob gradients, ``2F*vocab`` per token, plus the largest parameter gradient) or,
        under checkpointing, one recomputed layer. The transients are modelled, not measured
        (the saved-tensor check cannot see them): the GPU probe refines them."""
        saved = self.saved_bytes(padded_tokens, padded_patches, batch_size, max_len, padded)
        b = batch_size or 1
        length = max_len or max(1, padded_tokens // b)
        patches = padded_patches if padded_patches > 0 else self.dummy_patches
        loss = self.logits_transient_bytes_per_token * padded_tokens + self.grad_transient_bytes
        recompute = (
            self.recompute_bytes_per_token * padded_tokens
            + self.recompute_bytes_per_patch * patches
            + self.recompute_quadratic_bytes_per_token_sq * b * length * length
        )
        return int(round(saved + max(loss, recompute)))

    def to_dict(self) -> dict[str, Any]:
        """The coefficients (no breakdown) as a JSON-ready dict."""
        out = {k: v for k, v in self.__dict__.items() if k != "terms"}
        out["breakdown"] = self.breakdown()
        return out

    def breakdown(self) -> list[dict[str, Any]]:
        """The terms as ``{"name", "unit", "bytes"}`` rows (for ``plan --json``)."""
        return [{"name": t.name, "unit": t.unit, "bytes": t.bytes} for t in self.terms]


def predict_peak_activation_bytes(
    model: ActivationModel,
    padded_tokens: int,
    padded_patches: int,
    batch_size: int | None = None,
    max_len: int | None = None,
    padded: bool | None = None,
) -> int:
    """:meth:`ActivationModel.peak_bytes` as a function."""
    return model.peak_bytes(padded_tokens, padded_patches, batch_size, max_len, padded)


class _Ledger:
    """Named terms; the same (name, unit) added again (another layer) is summed."""

    def __init__(self) -> None:
        self._bytes: dict[tuple[str, str], float] = {}

    def add(self, name: str, unit: str, value: float, times: float = 1) -> None:
        if value and times:
            key = (name, unit)
            self._bytes[key] = self._bytes.get(key, 0.0) + float(value) * times

    @property
    def terms(self) -> list[Term]:
        return [Term(name, unit, value) for (name, unit), value in self._bytes.items()]

    def total(self, unit: str) -> float:
        return sum(v for (_, u), v in self._bytes.items() if u == unit)


def _rmsnorm(
    width: int,
    rows: int,
    x_grad: bool,
    w_train: bool,
    a: int,
    style: str,
    upcast_storage: int | None = None,
) -> tuple[float, float]:
    """(bytes per token, constant bytes) an RMSNorm saves; ``rows`` norms per token (heads);
    ``upcast_storage``: per-token bytes of the parent storage when ``x.float()`` is a view."""
    upcast = upcast_storage if (a == F and upcast_storage) else F * width
    per_token = (upcast + F * rows) if x_grad else 0
    if w_train:
        per_token += F * width if style == "qwen35" else a * width
    const = F * (width // rows) if (x_grad and style == "qwen35") else 0
    return per_token, const


def _text(led: _Ledger, td: TextDims, st: TrainingSetup, x0_grad: bool) -> tuple[float, float]:
    """Add the language model's terms; return the checkpointing recompute transient
    (bytes per token, quadratic bytes per ``L^2``) of the costliest layer."""
    a, r = st.act_bytes, st.lora_rank
    train, lora = not st.lora, st.lora
    h, nh, nkv, d, i = td.hidden, td.heads, td.kv_heads, td.head_dim, td.intermediate
    lin = train or lora

    def full_layer(x_grad: bool) -> tuple[float, float, float]:
        tok = const = 0.0
        t, c = _rmsnorm(h, 1, x_grad, train, a, td.norm_style)
        tok, const = tok + t, const + c
        tok += a * h if lin else 0
        q_out = nh * d * (2 if td.attn_output_gate else 1)
        if td.qk_norm:
            t, c = _rmsnorm(nh * d, nh, True, train, a, td.norm_style, upcast_storage=F * q_out)
            tok, const = tok + t, const + c
            t, c = _rmsnorm(nkv * d, nkv, True, train, a, td.norm_style)
            tok, const = tok + t, const + c
        tok += a * (nh * d + 2 * nkv * d) + a * nh * d + F * nh  # q, k, v, out, lse
        tok += 2 * a * nh * d if td.attn_output_gate else 0  # sigmoid(gate), output copy
        tok += a * nh * d if lin else 0  # o_proj input
        t, c = _rmsnorm(h, 1, True, train, a, td.norm_style)
        tok, const = tok + t, const + c
        tok += (a * h if lin else 0) + 3 * a * i + (a * i if lin else 0)
        tok += 7 * a * r if lora else 0
        return tok, const, 2 * a * (nh - nkv) * d

    def linear_layer(x_grad: bool) -> tuple[float, float]:
        nk, nv, dk, dv = td.lin_k_heads, td.lin_v_heads, td.lin_k_dim, td.lin_v_dim
        conv = 2 * nk * dk + nv * dv
        tok = const = 0.0
        t, c = _rmsnorm(h, 1, x_grad, train, a, td.norm_style)
        tok, const = tok + t, const + c
        tok += (a * h + a * nv * dv) if train else 0  # in_proj_* and out_proj inputs
        tok += 2 * a * conv + 3 * F * nv + a * nv + a * 64 * nv + a  # conv, gates, chunks, mask
        tok += (3 * F + 2 * a) * nv * dv + F * nv  # gated RMSNorm
        t, c = _rmsnorm(h, 1, True, train, a, td.norm_style)
        tok, const = tok + t, const + c
        tok += (a * h if lin else 0) + 3 * a * i + (a * i if lin else 0)
        tok += 3 * a * r if lora else 0
        return tok, const

    recompute = recompute_quad = 0.0
    for index, kind in enumerate(td.layer_types):
        x_grad = x0_grad if index == 0 else True
        if kind == "linear_attention":
            tok, const = linear_layer(x_grad)
            pad = 0.0
        else:
            tok, const, pad = full_layer(x_grad)
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
    if td.full_layers:
        led.add("llm.rope cos/sin", "token", 2 * a * td.rotary_dim)
    t, c = _rmsnorm(h, 1, True, train, a, td.norm_style)
    led.add("llm.final_norm", "token", t)
    led.add("llm.final_norm", "const", c)
    if train:
        led.add("llm.embed_tokens ids", "token", INDEX)
        led.add("lm_head input", "token", a * h)
    led.add("loss log_softmax + targets", "loss_row", F * td.vocab + INDEX)
    led.add("loss total_weight", "const", F)
    return (recompute, recompute_quad) if st.grad_ckpt else (0.0, 0.0)


def _vit_layer(vd: VisionDims, a: int, s: int, train: bool, grad: bool, ckpt: bool) -> float:
    v, vi = vd.hidden, vd.intermediate
    if ckpt:
        return a * v
    if not (train or grad):
        return 0.0
    tok = 2 * (a * v + 2 * s) + INDEX + 4 * a * v + F * vd.heads + a * vi
    return tok + ((3 * a * v + a * vi) if train else 0)


def _vision46(led: _Ledger, vd: VisionDims, st: TrainingSetup) -> tuple[float, bool]:
    """Add the 4.6 vision terms (per patch); return (recompute bytes/patch, features grad)."""
    a = st.act_bytes
    s = F if st.device_type == "cuda" else a
    v, vi = vd.hidden, vd.intermediate
    train = not (st.lora or st.freeze_vision)
    vin = st.grad_ckpt if st.vision_input_requires_grad is None else st.vision_input_requires_grad
    grad = train or vin
    merger_train = not st.lora
    use_vit_merger = vd.downsample_mode != "4x" and vd.insert_layer_id >= 0
    if train:
        led.add(
            "vision.patch_embedding pixels + position ids",
            "patch",
            a * vd.channels * vd.patch_size**2 + INDEX,
        )
    pre = vd.insert_layer_id + 1 if use_vit_merger else vd.layers
    post = vd.layers - pre
    layer = _vit_layer(vd, a, s, train, grad, st.grad_ckpt)
    led.add("vision.encoder layers (full res)", "patch", layer, pre)
    after = 0.25 if use_vit_merger else 1.0
    if use_vit_merger and grad:
        tok = (a * v + 2 * s) + INDEX + (INDEX + 4 * a * v + F * vd.heads) + (a * v + s / 2)
        tok += a * vi + ((3 * a * v + a * vi) if train else 0)
        led.add("vision.vit_merger (window attention + MLP)", "patch", tok)
    led.add("vision.encoder layers (after merger)", "patch", layer * after, post)
    if grad:
        led.add("vision.post_layernorm", "patch", (a * v + 2 * s) * after)
    merged = after / 4
    if merger_train or grad:
        tok = 8 * a * v + 2 * s + (8 * a * v if merger_train else 0)
        led.add("merger (2x2 MLP)", "patch", tok * merged)
    recompute = (_vit_layer(vd, a, s, train, grad, False)) if st.grad_ckpt else 0.0
    return recompute, merger_train or grad


def _vision26(led: _Ledger, vd: VisionDims, st: TrainingSetup) -> tuple[float, bool]:
    """ESTIMATE for the 2.6 family: SigLIP over slices padded to :data:`SLICE_PATCHES_26`
    (eager attention unless ``attention="flash"``: the remote code has no SDPA path), then
    the resampler cross-attention into the LLM width."""
    a = st.act_bytes
    s = F if st.device_type == "cuda" else a
    v, e, q = vd.hidden, vd.llm_hidden, vd.query_num
    train = not (st.lora or st.freeze_vision)
    vin = st.grad_ckpt if st.vision_input_requires_grad is None else st.vision_input_requires_grad
    grad = train or vin
    if train:
        led.add(
            "vpm.patch_embedding pixels + position ids",
            "patch",
            a * vd.channels * vd.patch_size**2 + INDEX,
        )
    if st.attention == "flash":
        attention = F * vd.heads
    else:  # fp32 softmax + its cast + the float mask, per key of the padded slice
        attention = vd.heads * SLICE_PATCHES_26 * (F + a) + a * SLICE_PATCHES_26
    full = 2 * (a * v + 2 * s) + 5 * a * v + a * vd.intermediate + attention
    if st.grad_ckpt:
        layer = a * v
    elif grad:
        layer = full + ((3 * a * v + a * vd.intermediate) if train else 0)
    else:
        layer = 0.0
    led.add("vpm.encoder layers", "patch", layer, vd.layers)
    resampler_train = not st.lora
    if resampler_train or grad:
        tok = a * v + 2 * (a * e + 2 * s) + 3 * a * e + vd.resampler_heads * q * (F + a)
        led.add("resampler (kv proj, norms, cross-attention)", "patch", tok)
    return (full if st.grad_ckpt else 0.0), resampler_train or grad


def activation_model(config: Any, setup: TrainingSetup | None = None) -> ActivationModel:
    """The :class:`ActivationModel` of a native config or :class:`RemoteConfig` under ``setup``."""
    st = setup or TrainingSetup()
    if st.attention not in ("sdpa", "flash", "eager"):
        raise ValueError(f"attention must be sdpa, flash or eager, got {st.attention!r}")
    td, vd = text_dims(config), vision_dims(config, st.downsample_mode)
    a = st.act_bytes
    led = _Ledger()
    if vd.family == "4.6":
        recompute_patch, features_grad = _vision46(led, vd, st)
    else:
        recompute_patch, features_grad = _vision26(led, vd, st)
    x0_grad = (not st.lora) or st.grad_ckpt or features_grad
    recompute_token, recompute_quad = _text(led, td, st, x0_grad)
    if x0_grad and vd.family == "4.6":
        led.add("image placeholder mask", "image_token", 1)
    embed_params = td.vocab * td.hidden
    grad_transient = 0.0 if st.lora else a * embed_params
    return ActivationModel(
        bytes_per_token=led.total("token"),
        bytes_per_patch=led.total("patch"),
        logits_bytes_per_token=led.total("loss_row"),
        quadratic_bytes_per_token_sq=led.total("quad"),
        quadratic_needs_padding=st.attention == "sdpa",
        image_bytes_per_token=led.total("image_token"),
        padded_bytes_per_token=led.total("padded_token"),
        const_bytes=led.total("const"),
        dummy_patches=DUMMY_PATCHES if vd.family == "4.6" else 0,
        recompute_bytes_per_token=recompute_token,
        recompute_bytes_per_patch=recompute_patch,
        recompute_quadratic_bytes_per_token_sq=recompute_quad,
        logits_transient_bytes_per_token=2 * F * td.vocab,
        grad_transient_bytes=grad_transient,
        estimate=vd.family != "4.6" or td.linear_layers > 0,
        terms=tuple(led.terms),
    )
