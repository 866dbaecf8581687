"""Measure what autograd really keeps for backward: the ground truth of the activation model.

:func:`measure_saved_bytes` runs one forward of a training step under
``torch.autograd.graph.saved_tensors_hooks`` and sums the bytes of every tensor an autograd
node saves for its backward, then runs the backward so everything is freed again.

Counting rules (they are what makes the number comparable with
:class:`mvtrain.memory.activations.ActivationModel`):

* De-duplicated by storage (``untyped_storage().data_ptr()``): a tensor saved by three nodes
  (the input of ``q_proj``, ``k_proj`` and ``v_proj``) is memory once; a *view* keeps its
  whole base storage alive, so the storage's full ``nbytes`` is counted.
* Parameters and buffers are excluded (their storages are static memory, counted by
  :mod:`mvtrain.memory.static`); so is anything sharing a storage with them (``weight.t()``).
* Only the innermost hook sees a save. Under non-reentrant gradient checkpointing the
  checkpoint installs its own hooks inside each checkpointed layer, so the saves *inside* a
  checkpointed layer are not seen (they are dropped and recomputed in backward, which is the
  point) while the layer inputs the checkpoint keeps (``_NoopSaveInputs``) are. The sum is
  therefore exactly "what is held between forward and backward".

CPU-only and cheap for the tiny model; it also runs on a GPU.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass
class SavedTensorReport:
    """What one forward saved for backward."""

    total_bytes: int
    """Bytes of the distinct non-parameter storages saved (the number to compare)."""
    by_module: dict[str, int] = field(default_factory=dict)
    """Bytes per innermost module that saved the storage first ("" = outside any module)."""
    count: int = 0
    """Distinct storages counted."""


def _static_storages(model: nn.Module) -> set[int]:
    ptrs: set[int] = set()
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.device.type != "meta":
            ptrs.add(tensor.untyped_storage().data_ptr())
    return ptrs


def _default_adapter(model: nn.Module) -> Any:
    from mvtrain.model.adapters import Native46Adapter

    return Native46Adapter(pad_token_id=0)


def measure_saved_tensors(
    model: nn.Module,
    batch: Mapping[str, Any],
    adapter: Any | None = None,
    backward: bool = True,
) -> SavedTensorReport:
    """Forward ``batch`` through ``adapter.forward_loss`` (default: the native 4.6 adapter)
    under a saved-tensors hook; return the :class:`SavedTensorReport`, then backward.

    ``batch`` must already be on the model's device. ``backward=False`` skips the backward
    (the graph is then freed when the loss goes out of scope).
    """
    adapter = adapter if adapter is not None else _default_adapter(model)
    static = _static_storages(model)
    seen: set[int] = set()
    by_module: dict[str, int] = defaultdict(int)
    stack: list[str] = []
    names = {module: name for name, module in model.named_modules()}

    def push(module: nn.Module, *_: Any) -> None:
        stack.append(names.get(module, "?"))

    def pop(module: nn.Module, *_: Any) -> None:
        if stack:
            stack.pop()

    handles = []
    for module in names:
        handles.append(module.register_forward_pre_hook(push))
        handles.append(module.register_forward_hook(pop, always_call=True))

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.layout != torch.strided or tensor.device.type == "meta":
            return tensor
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr in static or ptr in seen or storage.nbytes() == 0:
            return tensor
        seen.add(ptr)
        by_module[stack[-1] if stack else ""] += storage.nbytes()
        return tensor

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, _ = adapter.forward_loss(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    report = SavedTensorReport(
        total_bytes=sum(by_module.values()), by_module=dict(by_module), count=len(seen)
    )
    if backward and loss.requires_grad:
        loss.backward()
        model.zero_grad(set_to_none=True)
    return report


def measure_saved_bytes(
    model: nn.Module, batch: Mapping[str, Any], adapter: Any | None = None
) -> int:
    """Bytes autograd keeps between forward and backward for ``batch`` (see the module doc)."""
    return measure_saved_tensors(model, batch, adapter).total_bytes


def image_tokens_for_grid(rows: int, cols: int, downsample_mode: str = "16x") -> int:
    """LLM tokens the native 4.6 model makes of a ``rows x cols`` patch grid."""
    div = 2 if downsample_mode == "4x" else 4
    if rows % div or cols % div:
        raise ValueError(f"patch grid {rows}x{cols} must be divisible by {div} ({downsample_mode})")
    return (rows // div) * (cols // div)


def synthetic_native_batch(
    lengths: list[int],
    grids: list[list[tuple[int, int]]],
    image_token_id: int,
    pad_token_id: int = 0,
    vocab_size: int = 100,
    downsample_mode: str = "16x",
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """A batch shaped exactly like :meth:`Native46Adapter.collate` output, with random content.

    ``lengths[i]``: tokens of sample i (right-padded to the longest); ``grids[i]``: the patch
    grids ``(rows, cols)`` of its (sub)images, whose image tokens are placed from position 1.
    Labels equal the input ids (``-100`` on padding and image tokens).
    """
    if len(lengths) != len(grids):
        raise ValueError("lengths and grids must have one entry per sample")
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    choices = torch.tensor(
        [i for i in range(min(vocab_size, 4096)) if i not in (image_token_id, pad_token_id)]
    )
    ids = torch.full((len(lengths), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(lengths), width), -100, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for i, (n, sample_grids) in enumerate(zip(lengths, grids, strict=True)):
        image = sum(image_tokens_for_grid(r, c, downsample_mode) for r, c in sample_grids)
        if image + 2 > n:
            raise ValueError(f"sample {i}: {n} tokens cannot hold {image} image tokens + 2")
        row = choices[torch.randint(len(choices), (n,), generator=gen)]
        row[1 : 1 + image] = image_token_id
        ids[i, :n] = row
        labels[i, :n] = torch.where(row == image_token_id, -100, row)
        mask[i, :n] = 1
    flat = [g for sample_grids in grids for g in sample_grids]
    batch: dict[str, Any] = {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "labels": labels.to(device),
        "pixel_values": None,
        "target_sizes": None,
    }
    if flat:
        patches = sum(r * c for r, c in flat)
        pixels = torch.randn((1, 3, 14, patches * 14), generator=gen).to(dtype)
        batch["pixel_values"] = pixels.to(device)
        batch["target_sizes"] = torch.tensor(flat, dtype=torch.int32, device=device)
    return batch


@dataclass(frozen=True)
class SweepRow:
    """One batch of a prediction check: measured vs predicted saved bytes."""

    label: str
    batch_size: int
    max_len: int
    padded_tokens: int
    padded_patches: int
    padded: bool
    measured: int
    predicted: int

    @property
    def error(self) -> float:
        """Relative error of the prediction, ``(predicted - measured) / measured``."""
        return (self.predicted - self.measured) / self.measured


def prediction_sweep(
    model: nn.Module,
    act: Any,
    batches: list[tuple[str, Mapping[str, Any]]],
    adapter: Any | None = None,
) -> list[SweepRow]:
    """Measure each ``(label, batch)`` (collated like :meth:`Native46Adapter.collate`) and
    compare with ``act.saved_bytes`` (an :class:`~mvtrain.memory.activations.ActivationModel`)
    at the batch's padded cost."""
    rows = []
    for label, batch in batches:
        mask = batch["attention_mask"]
        b, length = (int(x) for x in mask.shape)
        grids = batch.get("target_sizes")
        patches = 0 if grids is None else int((grids[:, 0] * grids[:, 1]).sum())
        padded = bool((mask == 0).any())
        measured = measure_saved_bytes(model, batch, adapter)
        predicted = act.saved_bytes(b * length, patches, b, length, padded=padded)
        rows.append(SweepRow(label, b, length, b * length, patches, padded, measured, predicted))
    return rows


def format_sweep(rows: list[SweepRow]) -> str:
    """The rows as a text table (label, B, L, tokens, patches, measured, predicted, error)."""
    lines = [
        f"{'batch':<28} {'B':>2} {'L':>5} {'tokens':>6} {'patches':>7} "
        f"{'measured':>10} {'predicted':>10} {'error':>7}"
    ]
    for r in rows:
        lines.append(
            f"{r.label:<28} {r.batch_size:>2} {r.max_len:>5} {r.padded_tokens:>6} "
            f"{r.padded_patches:>7} {r.measured:>10} {r.predicted:>10} {r.error:>+7.2%}"
        )
    return "\n".join(lines)
