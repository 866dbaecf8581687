"""Memory bench: the chunked loss against the plain loss, measured on CPU and predicted.

Usage::

    python scripts/bench_memory.py [--tokens 256 1024 2048] [--vocab 248320] [--threads 2]

A narrow model -- the tiny MiniCPM-V 4.6 (text hidden 64, 2 layers) with the real 4.6
vocabulary size (248,320) -- trains one step (forward + backward, fp32) on one text sequence
of each token count, every token a label, with the chunked loss on and off. Each point runs in
its own process and reports:

* ``saved``: the bytes autograd holds between forward and backward, measured with a
  saved-tensors hook (:func:`mvtrain.memory.saved_tensors.measure_saved_tensors`: distinct
  non-parameter storages), next to the plan's prediction
  (:meth:`~mvtrain.memory.activations.ActivationModel.saved_bytes`);
* ``rss``: the process's peak resident memory during the step above its resident memory
  before it (``VmHWM`` after resetting it through ``/proc/self/clear_refs``; gradients freed
  as they are produced, as ZeRO does and as ``mvtrain probe`` measures), next to the plan's
  activation peak (:meth:`~mvtrain.memory.activations.ActivationModel.peak_bytes`, which adds
  the loss's transients). Linux only.

Then per token count the ratio plain / chunked of each, and a summary table.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

MiB = 2**20


def _status() -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` of this process, bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, value = line.split(":")
            out[key] = int(value.split()[0]) * 1024
    return out


def _model(vocab: int) -> tuple[Any, Any]:
    """The tiny 4.6 model with a ``vocab``-token vocabulary (fp32, train mode)."""
    import torch
    from transformers import MiniCPMV4_6ForConditionalGeneration

    from mvtrain.model.attention import use_batched_varlen_attention
    from mvtrain.model.tiny import load_tiny_tokenizer, tiny_model_config

    tokenizer = load_tiny_tokenizer()
    config = tiny_model_config(tokenizer)
    config.text_config.vocab_size = vocab
    torch.manual_seed(0)
    model = MiniCPMV4_6ForConditionalGeneration(config).train()
    use_batched_varlen_attention(model)
    return model, tokenizer


def point(tokens: int, chunked: bool, vocab: int, threads: int) -> dict[str, Any]:
    """One step at ``tokens`` tokens; the measured and predicted bytes (see the module doc)."""
    import torch

    from mvtrain.memory import TrainingSetup, activation_model
    from mvtrain.memory.probe import gradients_freed_as_produced
    from mvtrain.memory.saved_tensors import measure_saved_tensors, synthetic_native_batch
    from mvtrain.model.adapters import Native46Adapter

    torch.set_num_threads(threads)
    model, tokenizer = _model(vocab)
    config = model.config
    batch = synthetic_native_batch(
        [tokens], [[]], config.image_token_id, tokenizer.pad_token_id, vocab
    )
    adapter = Native46Adapter(tokenizer.pad_token_id, chunked_loss=chunked)
    saved = measure_saved_tensors(model, batch, adapter).total_bytes  # also the warm-up
    model.zero_grad(set_to_none=True)
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status()["VmRSS"]
    with gradients_freed_as_produced(model):
        loss, _ = adapter.forward_loss(model, batch)
        loss.backward()
    peak = _status()["VmHWM"] - before
    act = activation_model(
        config, TrainingSetup(bf16=False, device_type="cpu", chunked_loss=chunked)
    )
    return {
        "tokens": tokens,
        "loss": "chunked" if chunked else "plain",
        "saved": saved,
        "saved_predicted": act.saved_bytes(tokens, 0, 1, tokens),
        "rss_peak": peak,
        "peak_predicted": act.peak_bytes(tokens, 0, 1, tokens),
    }


def _run_point(tokens: int, chunked: bool, vocab: int, threads: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--point", str(tokens), "--vocab", str(vocab)]
    cmd += ["--threads", str(threads), "--loss", "chunked" if chunked else "plain"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(
            f"point {tokens} {'chunked' if chunked else 'plain'} failed:\n{proc.stderr}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mib(value: float) -> str:
    return f"{value / MiB:9.1f}"


def report(rows: list[dict[str, Any]]) -> str:
    """The points side by side, the plain / chunked ratios, and the summary."""
    lines = [
        "MiB; saved = held between forward and backward (saved-tensors hook), rss = peak "
        "resident above the start of the step",
        f"{'tokens':>6} {'loss':<8} {'saved':>9} {'plan':>9} {'rss':>9} {'plan peak':>9}",
    ]
    for r in rows:
        lines.append(
            f"{r['tokens']:>6} {r['loss']:<8} {_mib(r['saved'])} {_mib(r['saved_predicted'])} "
            f"{_mib(r['rss_peak'])} {_mib(r['peak_predicted'])}"
        )
    lines += [
        "",
        "plain / chunked",
        f"{'tokens':>6} {'saved':>8} {'plan':>8} {'rss':>8} {'plan':>8}",
    ]
    by = {(r["tokens"], r["loss"]): r for r in rows}
    summary = []
    for tokens in sorted({r["tokens"] for r in rows}):
        off, on = by[(tokens, "plain")], by[(tokens, "chunked")]
        ratios = [
            off[k] / max(on[k], 1)
            for k in ("saved", "saved_predicted", "rss_peak", "peak_predicted")
        ]
        lines.append(f"{tokens:>6} " + " ".join(f"{x:7.1f}x" for x in ratios))
        summary.append((tokens, off, on, ratios))
    lines += [
        "",
        "summary: tokens | saved plain -> chunked (x) | rss peak plain -> chunked (x) | "
        "plan peak plain -> chunked (x)",
    ]
    for tokens, off, on, ratios in summary:
        lines.append(
            f"  {tokens:>5} | {off['saved'] / MiB:8.1f} -> {on['saved'] / MiB:7.1f} MiB "
            f"({ratios[0]:.1f}x) | {off['rss_peak'] / MiB:8.1f} -> {on['rss_peak'] / MiB:7.1f} "
            f"MiB ({ratios[2]:.1f}x) | {off['peak_predicted'] / MiB:8.1f} -> "
            f"{on['peak_predicted'] / MiB:7.1f} MiB ({ratios[3]:.1f}x)"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 2048])
    parser.add_argument("--vocab", type=int, default=248320, help="the 4.6 vocabulary size")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--json", action="store_true", help="also print the rows as JSON")
    parser.add_argument("--point", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--loss", choices=["chunked", "plain"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.point is not None:
        print(json.dumps(point(args.point, args.loss == "chunked", args.vocab, args.threads)))
        return
    print(f"narrow tiny 4.6 model, vocabulary {args.vocab:,}, fp32 on CPU, one text sequence")
    rows = []
    for tokens in args.tokens:
        for chunked in (True, False):
            rows.append(_run_point(tokens, chunked, args.vocab, args.threads))
            r = rows[-1]
            print(
                f"  {tokens} tokens {r['loss']}: saved {r['saved'] / MiB:.1f} MiB, "
                f"rss peak {r['rss_peak'] / MiB:.1f} MiB",
                flush=True,
            )
    print()
    print(report(rows))
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
