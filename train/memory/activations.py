"""Activation memory from the model config: bytes autograd saves per padded token and patch.

The model is an op-by-op count of the tensors each autograd node SAVES for its backward (the
memory held between forward and backward), symbolic in the config dims, checked against
:func:`mvtrain.memory.saved_tensors.measure_saved_bytes` on the tiny model. In reading order:

* :mod:`.activations_ops` -- the notation, what each op saves, the ledger of named terms;
* :mod:`.activations_vision` -- the vision tower and merger (4.6) or resampler (2.6);
* :mod:`.activations_llm` -- the language model's layers, final norm and loss;
* here -- :func:`activation_model` sums them by unit into an :class:`ActivationModel`, whose
  peak is the saved bytes plus the largest transient.

Modes: LoRA freezes everything but the adapters (frozen linears keep no inputs; the norms
keep only what the input gradient needs; the first layer's input needs none; vision and
merger keep nothing). Frozen vision keeps nothing in the tower when its input needs no
gradient. Gradient checkpointing (non-reentrant) keeps each checkpointed layer's input
(``a*H`` / ``a*V``) and recomputes one layer in backward (a transient). NOTE:
:mod:`mvtrain.model.setup` calls ``enable_input_require_grads()``, which also hooks the vision
tower's patch embedding, so under checkpointing the frozen tower's window merger keeps
activations (and runs backward): ``vision_input_requires_grad`` defaults to ``grad_ckpt``.

The loss: the chunked loss (default, :mod:`mvtrain.model.chunked_loss`) saves per label row
the selected hidden state, the target and the selection index (``a*H + 16``) instead of the
fp32 log-probabilities (``F*vocab + 8``), and its transients are one chunk of logits and
their gradient plus the head weight's fp32 gradient accumulator; the plain loss
(``chunked_loss=False``) keeps the per-row log-probabilities and, in backward, their fp32
gradient for every row (:func:`mvtrain.memory.activations_llm.loss_terms`).

The 2.6 family (Qwen2/Qwen3/Llama LLM, SigLIP with eager per-slice attention, resampler) is
the same accounting applied to its published architecture: an ESTIMATE.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mvtrain.memory.activations_llm import loss_transients, text_terms
from mvtrain.memory.activations_ops import Ledger, Term
from mvtrain.memory.activations_vision import vision26_terms, vision46_terms
from mvtrain.memory.dims import text_dims, vision_dims

DUMMY_PATCHES = 16
"""Patches of the dummy 4x4 image a text-only micro-batch runs through the vision tower."""


@dataclass(frozen=True)
class TrainingSetup:
    """How the model is trained (what :mod:`mvtrain.model.setup` does for the run)."""

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
    chunked_loss: bool = True
    """The chunked loss (default) or the plain logits loss (``--no-chunked-loss``)."""

    @property
    def act_bytes(self) -> int:
        return 2 if self.bf16 else 4


@dataclass(frozen=True)
class ActivationModel:
    """Bytes saved for backward, by unit (each part is derived where the module doc says).

    ``saved = bytes_per_token*T + logits_bytes_per_token*R + bytes_per_patch*P
    + image_bytes_per_token*T [images] + padded_bytes_per_token*T [padded]
    + quadratic_bytes_per_token_sq*B*L^2 [padded or eager] + const_bytes`` with ``T`` padded
    tokens (``B*L``), ``R = B*(L-1)`` label positions (the chunked loss: less the image
    tokens, which have no label), ``P`` padded patches (the dummy image's when 0).
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
    """Transient at the loss, per padded token: the plain loss's fp32 gradient of the
    log-probs and its input; the chunked loss's hidden-state gradients."""
    grad_transient_bytes: float
    """Transient: the largest trainable parameter's full gradient before ZeRO reduces it (the
    chunked loss: the head's fp32 accumulator and one chunk's gradient)."""
    estimate: bool
    chunked_loss: bool = False
    loss_chunk_bytes_per_row: float = 0.0
    """Transient, chunked loss: one chunk's logits and their gradient, per row of the chunk."""
    loss_chunk_rows: int = 0
    """Rows of a full chunk (a batch with fewer label rows has one smaller chunk)."""
    loss_one_chunk_rows: int = 0
    """Chunked loss: up to this many label rows the loss is a single chunk, whose head gradient
    is :attr:`one_chunk_grad_transient_bytes` (no fp32 accumulator over chunks)."""
    one_chunk_grad_transient_bytes: float = 0.0
    image_tokens_per_patch: float = 0.0
    """Chunked loss, 4.6 family: LLM image tokens per patch (1/16, 1/4 in "4x"). Image
    tokens have no label, so the chunked loss keeps no row for them (0: not deducted)."""
    terms: tuple[Term, ...] = field(default=(), repr=False)

    def _loss_rows(self, padded_tokens: int, padded_patches: int, b: int, length: int) -> float:
        """Rows the loss keeps: ``B*(L-1)``, less the image tokens for the chunked loss."""
        rows = b * max(length - 1, 0) if padded_tokens else 0
        if self.chunked_loss and padded_patches > 0:
            rows = max(rows - padded_patches * self.image_tokens_per_patch, 0)
        return rows

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
        ``batch_size > 1``. A text-only micro-batch of a family whose adapter runs the dummy
        image has a mask anyway (the image's masked columns). Without
        ``batch_size``/``max_len`` the batch is taken as one sequence of ``padded_tokens``.
        """
        b = batch_size or 1
        length = max_len or max(1, padded_tokens // b)
        if padded is None:
            padded = b > 1
        padded = padded or (padded_patches <= 0 and self.dummy_patches > 0)
        rows = self._loss_rows(padded_tokens, padded_patches, b, length)
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
        """Predicted activation peak: saved bytes plus the largest transient -- the loss (plain:
        fp32 log-prob gradients, ``2F*vocab`` per token, plus the largest parameter gradient;
        chunked: one chunk and the head's gradient accumulator) or,
        under checkpointing, one recomputed layer. The transients are modelled, not measured
        (the saved-tensor check cannot see them): the GPU probe refines them."""
        saved = self.saved_bytes(padded_tokens, padded_patches, batch_size, max_len, padded)
        b = batch_size or 1
        length = max_len or max(1, padded_tokens // b)
        patches = padded_patches if padded_patches > 0 else self.dummy_patches
        rows = self._loss_rows(padded_tokens, padded_patches, b, length)
        chunk, grad = min(self.loss_chunk_rows, rows), self.grad_transient_bytes
        if self.chunked_loss and rows <= self.loss_one_chunk_rows:
            chunk, grad = rows, self.one_chunk_grad_transient_bytes
        loss = (
            self.logits_transient_bytes_per_token * padded_tokens
            + grad
            + self.loss_chunk_bytes_per_row * chunk
        )
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


def _image_tokens_per_patch(vd: Any) -> float:
    """LLM tokens per patch of the 4.6 family's mergers (2x2 window, then 2x2 MLP; "4x": the
    MLP merger only); 0 for the 2.6 family (64 per (sub)image, whatever its patches)."""
    if not vd.family.navit_packing:
        return 0.0
    return 1 / 4 if vd.downsample_mode == "4x" else 1 / 16


def activation_model(config: Any, setup: TrainingSetup | None = None) -> ActivationModel:
    """The :class:`ActivationModel` of a native config or :class:`RemoteConfig` under ``setup``."""
    st = setup or TrainingSetup()
    if st.attention not in ("sdpa", "flash", "eager"):
        raise ValueError(f"attention must be sdpa, flash or eager, got {st.attention!r}")
    td, vd = text_dims(config), vision_dims(config, st.downsample_mode)
    led = Ledger()
    if vd.family.navit_packing:
        recompute_patch, features_grad = vision46_terms(led, vd, st)
    else:
        recompute_patch, features_grad = vision26_terms(led, vd, st)
    x0_grad = (not st.lora) or st.grad_ckpt or features_grad
    recompute_token, recompute_quad = text_terms(led, td, st, x0_grad)
    if x0_grad and vd.family.placeholder_mask:
        led.add("image placeholder mask", "image_token", 1)
    per_token_transient, grad_transient, chunk_bytes, chunk_rows, single_grad, single_rows = (
        loss_transients(td, st)
    )
    return ActivationModel(
        bytes_per_token=led.total("token"),
        bytes_per_patch=led.total("patch"),
        logits_bytes_per_token=led.total("loss_row"),
        quadratic_bytes_per_token_sq=led.total("quad"),
        quadratic_needs_padding=st.attention == "sdpa",
        image_bytes_per_token=led.total("image_token"),
        padded_bytes_per_token=led.total("padded_token"),
        const_bytes=led.total("const"),
        dummy_patches=DUMMY_PATCHES if vd.family.adapter_dummy_image else 0,
        recompute_bytes_per_token=recompute_token,
        recompute_bytes_per_patch=recompute_patch,
        recompute_quadratic_bytes_per_token_sq=recompute_quad,
        logits_transient_bytes_per_token=per_token_transient,
        grad_transient_bytes=grad_transient,
        estimate=vd.family.remote_code or td.linear_layers > 0,
        chunked_loss=st.chunked_loss,
        loss_chunk_bytes_per_row=chunk_bytes,
        loss_chunk_rows=chunk_rows,
        loss_one_chunk_rows=single_rows,
        one_chunk_grad_transient_bytes=single_grad,
        image_tokens_per_patch=_image_tokens_per_patch(vd) if st.chunked_loss else 0.0,
        terms=tuple(led.terms),
    )
