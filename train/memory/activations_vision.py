"""The vision side of the activation model, per padded patch: the 4.6 tower with its window
merger and 2x2 MLP merger, and the 2.6 SigLIP with its resampler (in the notation and op
rules of :mod:`mvtrain.memory.activations_ops`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mvtrain.memory.activations_ops import INDEX, F, Ledger
from mvtrain.memory.dims import VisionDims

if TYPE_CHECKING:
    from mvtrain.memory.activations import TrainingSetup

SLICE_PATCHES_26 = 1024
"""2.6 family: patches of a padded 448x448 slice (32x32), the per-slice attention length."""


def _vit_layer(vd: VisionDims, a: int, s: int, train: bool, grad: bool, ckpt: bool) -> float:
    """Bytes per patch of a 4.6 encoder layer that sees the patch: LayerNorms
    ``2(a*V + 2s)``, q/k/v + out ``4a*V`` + lse ``F*heads`` + index 8, GELU input ``a*Vi``;
    plus ``4a*V + a*Vi`` for the inputs of trainable linears. Checkpointed: its input
    ``a*V``; nothing when neither its weights nor its input need a gradient."""
    v, vi = vd.hidden, vd.intermediate
    if ckpt:
        return a * v
    if not (train or grad):
        return 0.0
    tok = 2 * (a * v + 2 * s) + INDEX + 4 * a * v + F * vd.heads + a * vi
    return tok + ((3 * a * v + a * vi) if train else 0)


def vision46_terms(led: Ledger, vd: VisionDims, st: TrainingSetup) -> tuple[float, bool]:
    """Add the 4.6 vision terms (per patch); return (recompute bytes/patch, features grad).

    Layers up to ``insert_layer_id`` see all patches, later ones a quarter in 16x mode
    (:func:`_vit_layer` each). The patch conv saves the pixels (``a*3*14*14``: the float32
    pixels the step makes on the device from the loader's uint8 ones, or their bf16 cast)
    and the position ids (8) when it trains. The window merger and the 2x2 MLP merger add their
    LayerNorm / linear / GELU inputs at their token counts. ``enable_input_require_grads()``
    (model setup) also hooks the patch embedding, so under checkpointing a frozen tower's
    window merger keeps activations: ``vision_input_requires_grad`` defaults to ``grad_ckpt``.
    """
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


def vision26_terms(led: Ledger, vd: VisionDims, st: TrainingSetup) -> tuple[float, bool]:
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
