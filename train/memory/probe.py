"""``mvtrain probe``: measure activation memory on the GPU and fit the planner's coefficients.

Runs forward + backward of the real model on synthetic worst-case batches -- the longest
token length alone, the largest patch count with a short text, both together, and points in
between -- records ``torch.cuda.max_memory_allocated`` above the static baseline (the
weights) for each, and fits ``bytes = a * padded_tokens + b * padded_patches + c`` by least
squares. A batch's pixels come as the loader hands them (uint8) and become the model's
float32 input on the GPU by the step's own conversion, so the peak holds what training holds.
Each parameter's gradient is freed as soon as it is accumulated, as ZeRO does once
it has reduced it into its bucket: the persistent gradient storage is the planner's static
memory, so the fit holds activations and transients only. The fit is saved as JSON with the
setup it was measured with (:func:`mvtrain.memory.probe_fit.probe_setup`);
``mvtrain plan --probe FIT`` and ``mvtrain run --probe FIT`` use it when that setup matches.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mvshards.families import NATIVE_46
from mvtrain.memory.probe_fit import FIT_FORMAT
from mvtrain.memory.saved_tensors import image_tokens_for_grid, synthetic_native_batch
from mvtrain.model.pixel_input import PixelPack, model_inputs


@dataclass(frozen=True)
class ProbePoint:
    padded_tokens: int
    padded_patches: int
    batch_size: int
    peak_bytes: int


def probe_shapes(max_tokens: int, max_patches: int) -> list[tuple[int, int, int]]:
    """``(batch_size, length, patches)`` worst-case shapes: longest text, most patches, both."""
    length = max(64, max_tokens)
    shapes = [
        (1, length, 0),
        (1, max(64, length // 2), 0),
        (1, 256, max_patches),
        (1, 256, max(1024, max_patches // 2)),
        (1, length, max_patches),
        (2, max(64, length // 2), max(1024, max_patches // 2)),
    ]
    return shapes


@contextmanager
def gradients_freed_as_produced(model: torch.nn.Module) -> Iterator[None]:
    """Drop each trainable parameter's ``.grad`` right after autograd accumulates it."""

    def drop(param: torch.Tensor) -> None:
        param.grad = None

    handles = [
        p.register_post_accumulate_grad_hook(drop) for p in model.parameters() if p.requires_grad
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def measure_point(model: torch.nn.Module, adapter: Any, batch: dict[str, Any]) -> int:
    """Peak bytes of forward + backward above what is allocated before (the weights)."""
    device = torch.device("cuda")
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    inputs = model_inputs(batch, device)  # the step's conversion: uint8 pixels to float there
    with gradients_freed_as_produced(model):
        loss, _count = adapter.forward_loss(model, inputs)
        loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    model.zero_grad(set_to_none=True)
    del loss, inputs
    return int(peak)


def fit_points(points: list[ProbePoint]) -> dict[str, float]:
    """Least-squares ``peak = a*tokens + b*patches + c`` over the points (``a``, ``b``
    clipped at 0) and the largest relative error of the fit on them."""
    a = np.array([[p.padded_tokens, p.padded_patches, 1.0] for p in points], dtype=np.float64)
    y = np.array([p.peak_bytes for p in points], dtype=np.float64)
    (per_token, per_patch, const), *_ = np.linalg.lstsq(a, y, rcond=None)
    predicted = a @ np.array([per_token, per_patch, const])
    error = float(np.max(np.abs(predicted - y) / np.maximum(y, 1)))
    return {
        "bytes_per_token": float(max(per_token, 0.0)),
        "bytes_per_patch": float(max(per_patch, 0.0)),
        "const_bytes": float(const),
        "max_relative_error": error,
    }


def probe_batch(
    model: torch.nn.Module, pad_id: int, batch_size: int, length: int, patches: int
) -> dict[str, Any]:
    """A synthetic native batch as the loader hands it (random uint8 pixels in a
    :class:`~mvtrain.model.pixel_input.PixelPack`): ``batch_size`` rows of ``length``
    tokens, ``patches`` patches as 32x32 slices in the first sample (its length grows to hold
    their image tokens)."""
    config = model.config
    grids: list[list[tuple[int, int]]] = [[] for _ in range(batch_size)]
    grids[0] = [(32, 32)] * max(0, patches // 1024)
    image_tokens = sum(image_tokens_for_grid(r, c, config.downsample_mode) for r, c in grids[0])
    lengths = [max(length, image_tokens + 2 if i == 0 else 2) for i in range(batch_size)]
    batch = synthetic_native_batch(
        lengths,
        grids,
        image_token_id=config.image_token_id,
        pad_token_id=pad_id,
        vocab_size=config.text_config.vocab_size,
        downsample_mode=config.downsample_mode,
    )
    if batch["pixel_values"] is not None:
        batch["pixel_values"] = random_pixels(grids)
    return batch


def random_pixels(grids: list[list[tuple[int, int]]], seed: int = 0) -> PixelPack:
    """Random uint8 (sub)images of the patch grids ``grids[s]`` of each sample ``s``, packed
    for the 4.6 family."""
    gen = torch.Generator().manual_seed(seed)
    images = [
        [
            torch.randint(0, 256, (r * 14, c * 14, 3), dtype=torch.uint8, generator=gen)
            for r, c in sample_grids
        ]
        for sample_grids in grids
    ]
    return PixelPack.pack(images, NATIVE_46)


def require_cuda() -> None:
    """Raise ``RuntimeError`` (one line, naming ``mvtrain plan``) unless CUDA is available."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            "mvtrain probe measures GPU memory and needs CUDA; on this machine use "
            "`mvtrain plan`, which predicts from the model config"
        )


def run_probe(
    model: torch.nn.Module,
    pad_id: int,
    adapter: Any,
    max_tokens: int,
    max_patches: int,
    out: Path,
    setup: dict[str, Any],
) -> dict[str, Any]:
    """Measure the probe shapes on the GPU, fit, save the fit with ``setup`` (the record of
    :func:`~mvtrain.memory.probe_fit.probe_setup`) to ``out``; return it."""
    require_cuda()
    model.cuda().train()
    points = []
    for batch_size, length, patches in probe_shapes(max_tokens, max_patches):
        batch = probe_batch(model, pad_id, batch_size, length, patches)
        peak = measure_point(model, adapter, batch)
        width = batch["input_ids"].shape[1]
        points.append(ProbePoint(batch_size * width, patches // 1024 * 1024, batch_size, peak))
    param_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return write_fit(points, setup, out, torch.cuda.get_device_name(), param_dtype)


def write_fit(
    points: list[ProbePoint], setup: dict[str, Any], out: Path, device: str, param_dtype: str
) -> dict[str, Any]:
    """Fit ``points`` and save the fit, with the ``setup`` it holds for, to ``out``."""
    result = {
        "format": FIT_FORMAT,
        **fit_points(points),
        "setup": setup,
        "param_dtype": param_dtype,
        "points": [p.__dict__ for p in points],
        "device": device,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    return result
