"""ZeRO-2's reduced gradients equal an independent single-process computation when one rank
trains a text-only micro-batch and the other an image micro-batch (every bucket size).

ZeRO-2 reduces gradients in buckets filled in the order they become ready in backward; if the
text-only rank's graph had another shape (its dummy image run outside the image path), the
ranks would sum different parameters slot by slot. The reference is plain autograd in this
process, on the model's plain forward (no dummy image at all), summed over both batches.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import train_fixtures
from train_fixtures import Loaded, _text_only, _with_images

from mvtrain.data.loader import MicroBatch, make_micro_batch
from mvtrain.distributed import free_port
from mvtrain.model.adapters import adapter_for, token_loss_sum
from mvtrain.model.tiny import build_tiny_model

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

_one_thread = train_fixtures._one_thread
tok_dir = train_fixtures.tok_dir
tiny = train_fixtures.tiny
dataset = train_fixtures.dataset
loaded = train_fixtures.loaded

BUCKETS = (1_000, 30_000, 200_000_000)
"""Reduce bucket sizes (elements): smaller than most parameters, a few parameters, all."""
WORKER = Path(__file__).with_name("zero2_grad_worker.py")


def _batches(rows: Loaded, tok: Any) -> list[MicroBatch]:
    adapter = adapter_for("minicpmv-4.6", tok)
    text = _text_only(rows)[:2]
    images = sorted(_with_images(rows), key=lambda s: len(s.tokenized))[:2]
    assert text and images
    return [make_micro_batch(0, text, 1.0, adapter), make_micro_batch(0, images, 1.0, adapter)]


def _summed_gradients(batches: list[MicroBatch], tok_dir: Path) -> dict[str, torch.Tensor]:
    """d/dw of (sum of token losses of both batches) / (their label count), plain autograd."""
    model, _ = build_tiny_model(seed=0, tokenizer_dir=tok_dir)
    total = sum(b.num_label_tokens for b in batches)
    for batch in batches:
        inputs = {k: v for k, v in batch.inputs.items() if k != "labels" and v is not None}
        out = model(**inputs, use_cache=False)
        loss, _ = token_loss_sum(out.logits, batch.inputs["labels"])
        (loss / total).backward()
    return {
        n: (p.grad if p.grad is not None else torch.zeros_like(p))
        for n, p in model.named_parameters()
    }


def test_zero2_reduces_the_summed_gradient_of_a_text_rank_and_an_image_rank(
    loaded: dict[str, Loaded], tiny: tuple[Any, Any], tok_dir: Path, tmp_path: Path
) -> None:
    batches = _batches(loaded["minicpmv-4.6"], tiny[1])
    assert not batches[0].has_images and batches[1].has_images
    torch.save(batches, tmp_path / "batches.pt")
    out = tmp_path / "reduced.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(WORKER)]
    cmd += [str(tmp_path / "batches.pt"), str(tok_dir), str(out), *map(str, BUCKETS)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reduced = torch.load(out, weights_only=False)

    expected = _summed_gradients(batches, tok_dir)
    vision = [n for n in expected if ".vision_tower." in n]
    assert any(expected[n].abs().sum() > 0 for n in vision), "the image batch trains vision"
    scale = max(float(g.abs().max()) for g in expected.values())
    for bucket in BUCKETS:
        got = reduced[bucket]
        assert set(got) == set(expected)
        worst = max(float((got[n] - expected[n]).abs().max()) for n in expected)
        wrong = [
            n for n in expected if not torch.allclose(got[n], expected[n], rtol=1e-4, atol=1e-7)
        ]
        assert not wrong and worst <= 1e-5 * scale, (bucket, worst, scale, wrong[:5])
