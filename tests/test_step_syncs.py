"""The step reads device values on the host at most once per optimizer step.

On a GPU every ``.item()``, ``.tolist()``, ``float(t)`` or ``int(t)`` of a device tensor
waits for all queued work. The test counts such reads made by mvtrain's own step machinery
(frames in ``mvtrain.step``, ``mvtrain.model.adapters``, ``mvtrain.data.loader``, ``mvtrain.loop``)
while a window of several micro-batches trains, on CPU, where the same calls are made.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import train_fixtures
from torch.overrides import TorchFunctionMode
from train_fixtures import Loaded, _text_only, _with_images

from mvtrain.budgets import Budgets
from mvtrain.data.loader import make_micro_batch
from mvtrain.distributed import DistInfo
from mvtrain.engine import make_engine
from mvtrain.metrics import BatchLog
from mvtrain.model.adapters import adapter_for
from mvtrain.model.pixel_input import to_device
from mvtrain.model.tiny import build_tiny_model
from mvtrain.step import WindowRunner

_one_thread = train_fixtures._one_thread
tok_dir = train_fixtures.tok_dir
tiny = train_fixtures.tiny
dataset = train_fixtures.dataset
loaded = train_fixtures.loaded

HOST_READS = {"item", "tolist", "__float__", "__int__", "__bool__", "__index__"}
WATCHED_SOURCES = {
    str(Path(__import__(m, fromlist=["x"]).__file__).resolve())
    for m in ("mvtrain.step", "mvtrain.model.adapters", "mvtrain.data.loader", "mvtrain.loop")
}


class HostReads(TorchFunctionMode):
    """Counts host reads of tensors whose caller is one of the watched modules."""

    def __init__(self) -> None:
        super().__init__()
        self.where: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS:
            frame = sys._getframe(1)  # the caller of the tensor method (C, no frame of its own)
            if str(Path(frame.f_code.co_filename).resolve()) in WATCHED_SOURCES:
                self.where.append(f"{frame.f_code.co_filename}:{frame.f_lineno} {name}")
        return func(*args, **(kwargs or {}))


@pytest.mark.slow
@pytest.mark.parametrize("engine_name", ["torch"])
def test_one_window_of_three_micro_batches_reads_the_device_once(
    loaded: dict[str, Loaded], tok_dir: Path, engine_name: str
) -> None:
    model, tok = build_tiny_model(seed=0, tokenizer_dir=tok_dir)
    adapter = adapter_for("minicpmv-4.6", tok)
    rows = loaded["minicpmv-4.6"]
    text, images = _text_only(rows), _with_images(rows)
    window = [
        make_micro_batch(0, text[:1], 1.0, adapter),
        make_micro_batch(1, images[:1], 1.0, adapter),
        make_micro_batch(2, text[1:2] + images[1:2], 1.0, adapter),
    ]
    info = DistInfo(rank=0, world_size=1, local_rank=0, backend="gloo")
    engine = make_engine(
        model,
        info,
        use_deepspeed=False,
        lr=1e-3,
        weight_decay=0.0,
        warmup_steps=0,
        total_steps=10,
        grad_accum=3,
    )
    runner = WindowRunner(engine, adapter, info, torch.device("cpu"), BatchLog(None))
    counter = HostReads()
    with counter:
        result = runner.run(window, Budgets(1 << 30, 1 << 30), step=0)
    assert len(counter.where) <= 1, counter.where
    assert result.tokens == sum(b.real_tokens for b in window)

    # The loss it reports is the global per-token mean of the window, computed independently.
    reference, _ = build_tiny_model(seed=0, tokenizer_dir=tok_dir)
    total = sum(b.num_label_tokens for b in window)
    with torch.no_grad():
        sums = [adapter.forward_loss(reference, to_device(b.inputs, "cpu"))[0] for b in window]
    assert abs(result.loss - float(sum(sums)) / total) < 1e-5 * abs(result.loss)
