"""The chunked loss (:mod:`mvtrain.model.chunked_loss`) against the plain loss.

In fp32 on the tiny models of both families (the native 4.6 model and the 2.6 family's
remote code), with full fine-tuning, LoRA, frozen vision and gradient checkpointing, with
several chunks: the loss sum, the label count, the per-row sums and counts of
:class:`~mvtrain.model.adapters.TokenLoss`, and every parameter's gradient equal the plain
loss's within 1e-5 relative (of each tensor's largest value, at least 1e-3). Under bf16 autocast the
recomputed chunk is the forward's (one chunk: the plain loss's gradients to fp32 rounding).
Off, the adapter's loss is the plain :func:`token_loss_sum`, bit for bit. The memory model
with the chunked loss off still predicts the saved tensors (on: test_memory_activations).
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import memory_configs
import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from mvtrain.data.tokenize import IGNORE_INDEX
from mvtrain.memory import TrainingSetup, activation_model
from mvtrain.memory.saved_tensors import format_sweep, prediction_sweep, synthetic_native_batch
from mvtrain.model.adapters import (
    Native46Adapter,
    Remote26Adapter,
    TokenLoss,
    adapter_for,
    token_loss_sum,
)
from mvtrain.model.chunked_loss import ChunkedCrossEntropy, head_returns_hidden
from mvtrain.model.lora import LORA_TARGETS
from mvtrain.model.setup import vision_modules

one_thread = memory_configs.one_thread
tiny = memory_configs.tiny

RTOL = 1e-5
FLOOR = 1e-3
CHUNK = 5
"""Label rows per chunk in these tests: many chunks, the last one partial."""

NATIVE_CASES = {
    "image + text, padded": ([40, 24], [[(8, 12), (8, 8)], []]),
    "text only (dummy image)": ([30, 50], [[], []]),
}


def _variant(model: Any, mode: str) -> Any:
    """A copy of ``model`` set up as :func:`mvtrain.model.setup.build_model` does."""
    model = copy.deepcopy(model)
    if mode == "freeze":
        for module in vision_modules(model):
            module.requires_grad_(False)
    if mode == "ckpt":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if mode == "lora":
        config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS)
        model = get_peft_model(model, config)
        with torch.no_grad():  # lora_B starts at zero: make the adapters matter
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.05)
    return model.train()


def _run(model: Any, adapter: Any, batch: dict[str, Any], **kw: Any) -> tuple[TokenLoss, dict]:
    model.zero_grad(set_to_none=True)
    result = adapter.forward_loss(model, batch, **kw)
    result[0].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return result, grads


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Within ``RTOL`` of the tensor's largest value; a tensor whose values are all below
    ``FLOOR`` (a gradient that is zero up to rounding: attention key biases) within
    ``RTOL * FLOOR``."""
    scale = float(want.detach().abs().max()) if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=RTOL, atol=RTOL * max(scale, FLOOR), msg=what)


def _assert_same(plain: tuple[TokenLoss, dict], chunked: tuple[TokenLoss, dict]) -> None:
    (p, p_grads), (c, c_grads) = plain, chunked
    assert isinstance(c, TokenLoss)
    loss, count = c  # unpacks as (loss sum, label count)
    _close(loss, p.loss, "loss sum")
    assert torch.equal(count, p.count) and int(count) > 0
    _close(c.row_loss, p.row_loss, "per-row loss")
    assert torch.equal(c.row_count, p.row_count)
    assert not c.row_loss.requires_grad
    assert c_grads.keys() == p_grads.keys()  # the same parameters get a gradient
    for name, grad in p_grads.items():
        _close(c_grads[name], grad, name)


# --- the native 4.6 family ---------------------------------------------------------------------


def _native_batch(model: Any, tok: Any, case: str) -> dict[str, Any]:
    lengths, grids = NATIVE_CASES[case]
    config = model.config
    return synthetic_native_batch(
        lengths, grids, config.image_token_id, tok.pad_token_id, config.text_config.vocab_size
    )


def _adapters(tok: Any) -> tuple[Native46Adapter, Native46Adapter]:
    plain = Native46Adapter(tok.pad_token_id, chunked_loss=False)
    chunked = Native46Adapter(tok.pad_token_id)
    chunked.loss_chunk_rows = CHUNK
    return plain, chunked


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora", "freeze", "ckpt"])
def test_native_loss_and_gradients_equal_the_plain_loss(tiny: tuple[Any, Any], mode: str) -> None:
    model, tok = tiny
    variant = _variant(model, mode)
    plain, chunked = _adapters(tok)
    for case in NATIVE_CASES:
        batch = _native_batch(model, tok, case)
        want = _run(variant, plain, batch)
        _assert_same(want, _run(variant, chunked, batch))
        if case == "text only (dummy image)":  # the host's label count: the same result
            _assert_same(want, _run(variant, chunked, batch, label_count=plain.label_count(batch)))
    if mode == "lora":
        assert not any("lm_head" in n for n in want[1])  # the frozen head gets no gradient


def test_off_is_the_plain_loss_bit_for_bit(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    batch = _native_batch(model, tok, "image + text, padded")
    adapter = adapter_for("minicpmv-4.6", tok, chunked_loss=False)
    assert not adapter.chunked_loss and adapter_for("4.6", tok).chunked_loss
    with torch.no_grad():
        got = adapter.forward_loss(model, batch)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        want = token_loss_sum(model(**inputs, use_cache=False).logits, batch["labels"])
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    assert torch.equal(got.row_loss, want.row_loss) and torch.equal(got.row_count, want.row_count)


def test_a_batch_without_labels_still_gives_the_head_a_zero_gradient(
    tiny: tuple[Any, Any],
) -> None:
    """ZeRO-2 fills its buckets in the order gradients become ready: a rank whose micro-batch
    has no labels must produce the same gradients (zeros) as one that has."""
    model, tok = tiny
    batch = _native_batch(model, tok, "text only (dummy image)")
    batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
    plain, chunked = _adapters(tok)
    (loss, count), grads = _run(model, chunked, batch)
    assert float(loss) == 0.0 and int(count) == 0
    assert grads.keys() == _run(model, plain, batch)[1].keys()
    assert torch.count_nonzero(grads["lm_head.weight"]) == 0


def test_the_head_is_restored_also_after_an_error(tiny: tuple[Any, Any]) -> None:
    model, _ = tiny
    head = model.lm_head
    x = torch.randn(3, head.in_features)
    with pytest.raises(RuntimeError, match="boom"), head_returns_hidden(head):
        assert head(x) is x
        raise RuntimeError("boom")
    assert "forward" not in head.__dict__
    assert head(x).shape == (3, head.out_features)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_recomputes_the_forwards_chunk_under_autocast(dtype: torch.dtype) -> None:
    """One chunk under bf16 autocast: the same ops as the plain loss, so the same gradients
    (a backward that left autocast would recompute fp32 logits: off by ~1e-3)."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(12, 16, generator=gen, requires_grad=True)
    weight = torch.randn(50, 16, generator=gen, requires_grad=True)
    targets = torch.randint(50, (12,), generator=gen)

    def grads(loss_of: Callable[[], torch.Tensor]) -> list[torch.Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = loss_of()
        return list(torch.autograd.grad(loss, (hidden, weight)))

    def plain() -> torch.Tensor:
        log_probs = F.log_softmax(F.linear(hidden, weight).float(), dim=-1)
        return F.nll_loss(log_probs, targets, reduction="sum")

    def chunked() -> torch.Tensor:
        return ChunkedCrossEntropy.apply(hidden, weight, targets, 12).sum()

    for got, want in zip(grads(chunked), grads(plain), strict=True):
        _close(got, want, str(dtype))


# --- the 2.6 family (remote code) --------------------------------------------------------------


@pytest.fixture(scope="module")
def remote26(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    from remote26_fixtures import build_remote_model, require_reference

    from mvtrain.model.loading import load_model

    require_reference()
    folder = build_remote_model(tmp_path_factory.mktemp("m") / "minicpmv26")
    model, tok, _ = load_model(folder, trust_remote_code=True)
    return model.float().train(), tok


def _remote_batch(tok: Any, with_image: bool) -> dict[str, Any]:
    """Two samples in the official collator's layout (labels pre-shifted), the first with a
    16x16-patch image at positions 10..74 (the resampler's 64 queries) when ``with_image``."""
    gen = torch.Generator().manual_seed(1)
    lengths = (90, 50)
    ids = torch.full((2, 90), tok.pad_token_id)
    labels = torch.full((2, 90), IGNORE_INDEX)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(10, 400, (n,), generator=gen)
        labels[row, 5 : n - 1] = ids[row, 6:n]
    pixels: list[list[torch.Tensor]] = [[], []]
    tgt_sizes: list[Any] = [[], []]
    bounds: list[Any] = [[], []]
    if with_image:
        labels[0, 9:74] = IGNORE_INDEX
        pixels[0] = [torch.randn(3, 14, 16 * 16 * 14, generator=gen)]
        tgt_sizes[0] = torch.tensor([[16, 16]], dtype=torch.int32)
        bounds[0] = torch.tensor([[10, 74]])
    return {
        "input_ids": ids,
        "position_ids": torch.arange(90).expand(2, 90).clone(),
        "attention_mask": ids != tok.pad_token_id,
        "labels": labels,
        "pixel_values": pixels,
        "tgt_sizes": tgt_sizes,
        "image_bound": bounds,
    }


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora", "freeze"])
def test_remote26_loss_and_gradients_equal_the_plain_loss(
    remote26: tuple[Any, Any], mode: str
) -> None:
    model, tok = remote26
    variant = _variant(model, mode)
    plain = Remote26Adapter(tok.pad_token_id, chunked_loss=False)
    chunked = Remote26Adapter(tok.pad_token_id)
    chunked.loss_chunk_rows = CHUNK
    for with_image in (True, False):
        batch = _remote_batch(tok, with_image)
        want = _run(variant, plain, batch)
        _assert_same(want, _run(variant, chunked, batch))
    if mode == "freeze":
        assert not any(n.startswith("vpm.") for n in want[1])


# --- the memory model knows it -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fp32", "lora-bf16"])
def test_saved_tensors_with_the_chunked_loss_off(tiny: tuple[Any, Any], mode: str) -> None:
    """The saved-tensor check of test_memory_activations (there: chunked loss on), off."""
    from test_memory_activations import SYNTHETIC, _setup, _synthetic_batches
    from test_memory_activations import _variant as memory_variant

    model, tok = tiny
    variant = memory_variant(model, mode)
    act = activation_model(model.config, _setup(mode, chunked_loss=False))
    assert not act.chunked_loss
    adapter = Native46Adapter(tok.pad_token_id, chunked_loss=False)
    batches = _synthetic_batches(model.config, tok, cases=SYNTHETIC[1:7])
    rows = prediction_sweep(variant, act, batches, adapter)
    print(format_sweep(rows))
    errors = [abs(r.error) for r in rows]
    assert max(errors) <= 0.15 and statistics.median(errors) <= 0.02


def test_the_chunked_loss_drops_the_log_probs_from_the_model() -> None:
    config = memory_configs.real46_config()
    on = activation_model(config, TrainingSetup())
    off = activation_model(config, TrainingSetup(chunked_loss=False))
    vocab, hidden = 248094, 1024
    assert off.logits_bytes_per_token == 4 * vocab + 8
    assert on.logits_bytes_per_token == 2 * hidden + 16
    assert off.logits_transient_bytes_per_token == 8 * vocab
    assert on.loss_chunk_bytes_per_row * on.loss_chunk_rows < 2**30
    assert on.peak_bytes(4096, 40000) < off.peak_bytes(4096, 40000) - 8 * 2**30


def test_below_fp32_a_micro_batch_up_to_one_chunk_rows_is_one_chunk() -> None:
    """MiniCPM-V 2.6 in bf16 (151,666 x 3,584 head): over several chunks the head's fp32
    gradient accumulator (2.2 GB) costs more than the plain loss's logits up to ~1,800 label
    rows; one chunk needs none. The chunked loss is then never above the plain loss, and its
    peak has no step at the switch from one chunk to several."""
    from mvtrain.memory.params import RemoteConfig
    from mvtrain.model.chunked_loss import chunk_rows_for, one_chunk_rows

    config = RemoteConfig(raw=memory_configs.REAL_26)
    on = activation_model(config, TrainingSetup(bf16=True))
    off = activation_model(config, TrainingSetup(bf16=True, chunked_loss=False))
    vocab, hidden = 151666, 3584
    single = one_chunk_rows(vocab, hidden, 2, head_trains=True)
    assert chunk_rows_for(vocab) < single == on.loss_one_chunk_rows
    assert one_chunk_rows(vocab, hidden, 4, head_trains=True) == chunk_rows_for(vocab)
    assert one_chunk_rows(vocab, hidden, 2, head_trains=False) == chunk_rows_for(vocab)
    for tokens in (64, 256, 1024, single + 1, 2048, 4096):
        assert on.peak_bytes(tokens, 0, 1, tokens) <= off.peak_bytes(tokens, 0, 1, tokens)
    below, above = (on.peak_bytes(n, 0, 1, n) for n in (single + 1, single + 2))
    assert 0 <= above - below < 0.001 * below  # the rows of one chunk cost what the buffer does


def test_one_chunk_gives_the_head_the_plain_losss_gradient_in_bf16() -> None:
    """bf16 weights (DeepSpeed's): one chunk's head gradient is the plain loss's matmul."""
    from mvtrain.model.chunked_loss import chunked_token_losses

    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 40, 32, generator=gen).bfloat16().requires_grad_(True)
    weight = torch.randn(300, 32, generator=gen).bfloat16().requires_grad_(True)
    labels = torch.randint(300, (2, 40), generator=gen)
    labels[:, :5] = IGNORE_INDEX
    losses, _, _ = chunked_token_losses(hidden, weight, labels, pre_shifted=False)
    got = torch.autograd.grad(losses.sum(), (hidden, weight))
    logits = F.linear(hidden[:, :-1], weight).float()
    plain = F.cross_entropy(logits.reshape(-1, 300), labels[:, 1:].reshape(-1), reduction="sum")
    want = torch.autograd.grad(plain, (hidden, weight))
    assert got[1].dtype == torch.bfloat16
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.slow
def test_plan_shows_the_loss_and_the_remedy_when_off(shards: Path) -> None:
    from mvtrain.memory.plan import PlanRequest, make_plan
    from mvtrain.memory.plan_text import format_plan
    from mvtrain.memory.remedies import CHUNKED_LOSS

    model = str(memory_configs.CONFIGS / "minicpmv-4.6")
    on = make_plan(PlanRequest(shards, model))
    off = make_plan(PlanRequest(shards, model, chunked_loss=False))
    assert on.fit.budgets is not None and off.fit.budgets is not None
    assert on.fit.budgets.token_budget > off.fit.budgets.token_budget
    assert CHUNKED_LOSS not in {r.change for r in on.remedies}
    remedy = next(r for r in off.remedies if r.change == CHUNKED_LOSS)
    assert remedy.fit.budgets is not None
    assert remedy.fit.budgets.token_budget == on.fit.budgets.token_budget
    text_on, text_off = format_plan(on), format_plan(off)
    assert "chunked loss" in text_on.splitlines()[0] and "(loss, chunked)" in text_on
    assert "plain loss (--no-chunked-loss)" in text_off.splitlines()[0]
    assert CHUNKED_LOSS in text_off and CHUNKED_LOSS not in text_on
    assert off.to_json()["setup"]["chunked_loss"] is False
