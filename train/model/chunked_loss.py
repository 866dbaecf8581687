"""The chunked cross-entropy: the loss from the last hidden states, never the full logits.

The plain loss (:func:`mvtrain.model.adapters.token_loss_sum`) materialises the logits
``[tokens, vocab]``, their fp32 log-probabilities (saved for backward) and, in backward,
their fp32 gradient: with a 150k-250k vocabulary that is the largest activation of the
model. Here instead:

* the model runs its own forward -- through the engine, PEFT and autocast exactly as before
  -- with its output head (``lm_head``) passing its input through unchanged
  (:func:`head_returns_hidden`), so ``out.logits`` is the last hidden state ``[B, L, H]``
  (after anything the LLM does right before its head, e.g. MiniCPM's hidden scaling);
* only the label positions are kept (:func:`select_label_rows`: one ``index_select``, which
  saves its int64 index);
* :class:`ChunkedCrossEntropy` computes each label row's loss ``chunk`` rows at a time
  (logits, then the log-sum-exp in place in one fp32 copy, less the target's logit) and
  saves only its inputs: the selected hidden rows, the targets and the head weight (a
  parameter). Its backward recomputes each chunk's logits and turns them in place into their
  gradient, so at most one chunk of ``[rows, vocab]`` logits (fp32, plus the cast to the
  compute dtype) exists at a time. The head weight's gradient is accumulated in fp32 over the
  chunks and returned in the weight's dtype; a frozen head (LoRA) gets none, and a
  micro-batch without labels still gives the head a zero gradient (every rank's backward
  fills the same ZeRO-2 buckets).
* Below fp32, that accumulator (``[vocab, hidden]`` fp32) can cost more than the logits it
  saves: a micro-batch of up to :func:`one_chunk_rows` label rows is one chunk, whose head
  gradient is one matmul in the compute dtype, as in the plain loss.

The autocast state of the forward (the plain torch engine's bf16) is re-entered in backward,
so the recomputed chunk is the forward's, op for op.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mvtrain.data.tokenize import IGNORE_INDEX

CHUNK_BYTES = 256 * 2**20
"""fp32 logits per chunk: with the 4.6 vocabulary (248,320) 270 label rows, with 2.6's
(151,666) 442."""


def chunk_rows_for(vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Label rows per chunk: ``chunk_bytes`` of fp32 logits (at least 1)."""
    return max(1, chunk_bytes // (4 * vocab))


def one_chunk_rows(
    vocab: int, hidden: int, act_bytes: int, head_trains: bool, chunk_bytes: int = CHUNK_BYTES
) -> int:
    """The most label rows the loss takes as one chunk.

    Over several chunks of ``c`` rows (:func:`chunk_rows_for`) the head weight's gradient is
    summed in an fp32 buffer, ``4*vocab*hidden`` bytes, besides each chunk's product in the
    compute dtype (``act_bytes``); one chunk needs no buffer (its gradient is one matmul, as in
    the plain loss). A chunk of ``N`` rows holds ``(4 + act_bytes)*vocab`` bytes per row, so
    below fp32 one chunk costs less up to ``N = c + 4*hidden/(4 + act_bytes)`` rows. In fp32
    the buffer is the gradient itself, and a frozen head (LoRA) has none: then ``c``."""
    rows = chunk_rows_for(vocab, chunk_bytes)
    if act_bytes >= 4 or not head_trains:
        return rows
    return rows + (4 * hidden) // (4 + act_bytes)


def _passthrough(hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return hidden


def output_head(model: nn.Module) -> nn.Linear:
    """The model's output head (``get_output_embeddings()``: ``lm_head``, the 2.6 family's
    ``llm.lm_head``), through PEFT; ValueError when it is not a bias-free linear layer."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise ValueError(
            f"the chunked loss needs a bias-free nn.Linear output head, this model has "
            f"{type(head).__name__}: train with --no-chunked-loss"
        )
    return head


@contextmanager
def head_returns_hidden(head: nn.Module) -> Iterator[None]:
    """While inside, ``head(x)`` returns ``x``: the model's ``logits`` are its last hidden
    states. The head's own ``forward`` (an instance attribute some wrappers set, or the
    class's) is restored on exit, also after an exception (an out-of-memory error)."""
    own = head.__dict__.get("forward")
    head.forward = _passthrough  # type: ignore[method-assign]
    try:
        yield
    finally:
        if own is None:
            del head.forward
        else:
            head.forward = own  # type: ignore[method-assign]


def check_hidden(hidden: torch.Tensor, head: nn.Linear) -> None:
    """ValueError unless ``hidden`` is ``[B, L, in_features]`` (the model returned what its
    head was given, nothing derived from it)."""
    if hidden.dim() != 3 or hidden.shape[-1] != head.in_features:
        raise ValueError(
            f"the model's output with its head passed through has shape {tuple(hidden.shape)}, "
            f"not [B, L, {head.in_features}]: it transforms the logits after its head, which "
            "the chunked loss cannot follow; train with --no-chunked-loss"
        )


def _shifted_exp(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(exp(x - max) fp32 [rows, V], its row sums [rows, 1], the row maxima [rows, 1])`` of
    ``x = logits.float()``, in place in that fp32 copy (or in ``logits`` when already fp32):
    one ``[rows, vocab]`` fp32 tensor, no temporary."""
    x = logits.float()
    peak = x.amax(dim=-1, keepdim=True)
    x.sub_(peak).exp_()
    return x, x.sum(dim=-1, keepdim=True), peak


def _chunk_losses(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Each row's cross-entropy, fp32 ``[rows]``: ``log(sum(exp(x - max))) + max - x[target]``
    of ``x = linear(hidden, weight).float()``, the plain loss's ``-log_softmax(x)[target]``."""
    logits = F.linear(hidden, weight)
    picked = logits.gather(1, targets.unsqueeze(1)).float()
    exp, total, peak = _shifted_exp(logits)
    del logits, exp
    return (total.log_() + peak - picked).squeeze(1)


class ChunkedCrossEntropy(torch.autograd.Function):
    """``(hidden [N, H], weight [V, H], targets int64 [N], rows) -> fp32 [N]``: each row's
    cross-entropy, ``rows`` rows at a time, recomputed per chunk in backward.

    Backward per chunk: the logits again (in the forward's autocast state), their gradient
    ``g * (softmax - onehot)`` in place in one fp32 ``[rows, vocab]`` tensor, cast to the
    logits' dtype as autograd's ``float()`` backward does, then the two matmuls of the
    linear layer's backward; the weight's gradient is summed over the chunks in fp32."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int
    ) -> torch.Tensor:
        device_type = hidden.device.type
        ctx.autocast = (
            device_type,
            torch.is_autocast_enabled(device_type),
            torch.get_autocast_dtype(device_type),
        )
        ctx.rows = rows
        losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            stop = start + rows
            losses[start:stop] = _chunk_losses(hidden[start:stop], weight, targets[start:stop])
        ctx.save_for_backward(hidden, weight, targets)
        return losses

    @staticmethod
    def backward(ctx: Any, grad_losses: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        hidden, weight, targets = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight: torch.Tensor | None = None
        one_chunk = hidden.shape[0] <= ctx.rows  # the head's gradient is one matmul
        if need_weight and not one_chunk:
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        device_type, enabled, dtype = ctx.autocast
        with torch.no_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            for start in range(0, hidden.shape[0], ctx.rows):
                stop = start + ctx.rows
                h, t = hidden[start:stop], targets[start:stop]
                logits = F.linear(h, weight)
                compute_dtype = logits.dtype
                probs, total, _ = _shifted_exp(logits)
                del logits
                probs.div_(total)  # softmax
                probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                probs.mul_(grad_losses[start:stop].unsqueeze(1))
                grad_logits = probs.to(compute_dtype)
                del probs
                if grad_hidden is not None:
                    grad_hidden[start:stop] = torch.mm(grad_logits, weight)
                if need_weight and one_chunk:
                    grad_weight = torch.mm(grad_logits.t(), h)
                elif grad_weight is not None:
                    if grad_logits.dtype == h.dtype == torch.float32 and not enabled:
                        grad_weight.addmm_(grad_logits.t(), h)
                    else:
                        grad_weight += torch.mm(grad_logits.t(), h)
                del grad_logits
        if need_weight and grad_weight is None:  # no label rows: a zero gradient all the same
            grad_weight = torch.zeros_like(weight)
        if grad_weight is not None and grad_weight.dtype != weight.dtype:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None


def select_label_rows(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    pre_shifted: bool,
    label_count: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hidden rows [N, H], targets [N], their batch rows [N], keep [B, L])``: the hidden
    states at the label positions and what they predict.

    ``pre_shifted=False``: the hidden state at ``i`` predicts ``labels[:, i+1]``; True:
    ``labels[:, i]``. ``label_count`` (N, known on the host) selects without a device sync;
    None counts on the device and reads the count (one sync).
    """
    batch, length, width = hidden.shape
    labels = labels.to(hidden.device).long()
    if not pre_shifted:
        labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], 1)
    keep = labels != IGNORE_INDEX
    flat_keep = keep.reshape(-1)
    if label_count is None:
        index = flat_keep.nonzero().squeeze(1)
    else:
        torch._assert_async(flat_keep.sum() == label_count, "label_count is not the label count")
        index = torch.nonzero_static(flat_keep, size=label_count).squeeze(1)
    rows = hidden.reshape(batch * length, width).index_select(0, index)
    targets = labels.reshape(-1).index_select(0, index)
    return rows, targets, torch.div(index, length, rounding_mode="floor"), keep


def chunked_token_losses(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    pre_shifted: bool,
    label_count: int | None = None,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(token losses fp32 [N], their batch rows [N], keep [B, L])`` of the label positions
    (see :func:`select_label_rows`), ``chunk_rows`` rows at a time (None: one chunk up to
    :func:`one_chunk_rows`, else :func:`chunk_rows_for` the vocabulary)."""
    rows, targets, row_ids, keep = select_label_rows(hidden, labels, pre_shifted, label_count)
    step = chunk_rows
    if step is None:
        device = hidden.device.type
        autocast = torch.is_autocast_enabled(device)
        compute = torch.get_autocast_dtype(device) if autocast else weight.dtype
        vocab, width = weight.shape
        single = one_chunk_rows(vocab, width, compute.itemsize, weight.requires_grad)
        step = max(1, rows.shape[0]) if rows.shape[0] <= single else chunk_rows_for(vocab)
    losses = ChunkedCrossEntropy.apply(rows, weight, targets, step)
    return losses, row_ids, keep
