"""Batched varlen SDPA of the 4.6 vision tower (:mod:`mvtrain.model.attention`).

Against a per-sequence SDPA loop and the earlier implementation (kept below as the reference
for "outputs unchanged"), with calls cut to a few sequences (the CUDA batch limit of
``MAX_SDPA_BATCH``), and the per-``cu_seqlens`` plan cache: one plan per distinct tensor in a
forward, never a stale one.
"""

from __future__ import annotations

import gc
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from transformers import AttentionInterface, MiniCPMV4_6ForConditionalGeneration

from mvtrain.memory.saved_tensors import synthetic_native_batch
from mvtrain.model import attention
from mvtrain.model.adapters import Native46Adapter
from mvtrain.model.attention import (
    IMPLEMENTATION,
    plan_varlen,
    use_batched_varlen_attention,
    varlen_plan,
    varlen_sdpa,
)
from mvtrain.model.tiny import build_tiny_model, load_tiny_tokenizer, tiny_model_config

LENGTHS = [4, 4, 3, 4, 0, 7, 4, 1, 3, 4, 4, 7, 2, 4]
"""Sequence lengths with repeats, a zero-length sequence and a singleton."""

REFERENCE = "mvkit_flash_reference_varlen_sdpa"
"""The earlier implementation, registered under a name that still selects the varlen path."""


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def previous_varlen_sdpa(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    is_causal: bool = False,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The implementation before plan caching and chunking: unchunked, one sync per layer."""
    assert cu_seq_lens_q is not None
    cu = cu_seq_lens_q.to(device=query.device, dtype=torch.long)
    starts, lengths = cu[:-1], cu[1:] - cu[:-1]
    out = torch.empty_like(query)
    for length in torch.unique(lengths).tolist():
        if length == 0:
            continue
        chosen = starts[lengths == length]
        index = (chosen[:, None] + torch.arange(length, device=query.device)[None, :]).reshape(-1)

        def gather(
            t: torch.Tensor, idx: torch.Tensor = index, n: int = len(chosen)
        ) -> torch.Tensor:
            heads, dim = t.shape[1], t.shape[3]
            return t[0][:, idx].reshape(heads, n, -1, dim).transpose(0, 1)

        attended = F.scaled_dot_product_attention(
            gather(query),
            gather(key),
            gather(value),
            dropout_p=dropout,
            scale=scaling,
            is_causal=is_causal,
        )
        heads, dim = query.shape[1], query.shape[3]
        out[0][:, index] = attended.transpose(0, 1).reshape(heads, -1, dim)
    return out.transpose(1, 2).contiguous(), None


def loop_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    lengths: list[int],
    scaling: float | None,
    is_causal: bool,
) -> torch.Tensor:
    """One SDPA call per sequence, ``[1, T, H, D]``."""
    outs = []
    start = 0
    for length in lengths:
        span = slice(start, start + length)
        outs.append(
            F.scaled_dot_product_attention(
                query[:, :, span],
                key[:, :, span],
                value[:, :, span],
                scale=scaling,
                is_causal=is_causal,
            )
        )
        start += length
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous()


def cu_of(lengths: list[int]) -> torch.Tensor:
    return F.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)


def qkv(total: int, heads: int = 3, dim: int = 8, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # [1, T, H, D] transposed, like the vision attention's projections.
    return [
        torch.randn(1, total, heads, dim, generator=gen).transpose(1, 2).requires_grad_()
        for _ in range(3)
    ]


def output_and_grads(fn, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """``fn(q, k, v)`` and the gradients of q, k, v for a fixed random cotangent."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * cotangent).sum().backward()
    return [out.detach(), *[t.grad for t in leaves]]


def assert_all_close(got: list[torch.Tensor], want: list[torch.Tensor], atol: float) -> None:
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=atol, msg=f"{name} differs")


# --- varlen_sdpa against references -------------------------------------------------------


@pytest.mark.parametrize("max_batch", [1, 3, None])
@pytest.mark.parametrize("is_causal", [False, True])
def test_matches_per_sequence_loop_and_previous_implementation(
    monkeypatch: pytest.MonkeyPatch, max_batch: int | None, is_causal: bool
) -> None:
    if max_batch is not None:
        monkeypatch.setattr(attention, "MAX_SDPA_BATCH", max_batch)
    cu = cu_of(LENGTHS)
    inputs = qkv(sum(LENGTHS))
    scale = 0.3

    def new(q, k, v):
        return varlen_sdpa(None, q, k, v, scaling=scale, cu_seq_lens_q=cu, is_causal=is_causal)[0]

    def previous(q, k, v):
        return previous_varlen_sdpa(
            None, q, k, v, scaling=scale, cu_seq_lens_q=cu, is_causal=is_causal
        )[0]

    def loop(q, k, v):
        return loop_sdpa(q, k, v, LENGTHS, scale, is_causal)

    got = output_and_grads(new, inputs)
    assert_all_close(got, output_and_grads(loop, inputs), atol=1e-6)
    assert_all_close(got, output_and_grads(previous, inputs), atol=1e-6)


def test_chunked_calls_equal_unchunked(monkeypatch: pytest.MonkeyPatch) -> None:
    cu = cu_of(LENGTHS)
    inputs = qkv(sum(LENGTHS), seed=3)

    def new(q, k, v):
        return varlen_sdpa(None, q, k, v, cu_seq_lens_q=cu)[0]

    whole = output_and_grads(new, inputs)
    batches: list[int] = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, *args, **kwargs):
        batches.append(q.shape[0])
        return sdpa(q, *args, **kwargs)

    monkeypatch.setattr(attention, "MAX_SDPA_BATCH", 3)
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", recording)
    chunked = output_and_grads(new, inputs)
    assert_all_close(chunked, whole, atol=1e-6)
    # 4-token: 7 sequences -> 3+3+1; 7-token: 2; 3-token: 2; 1, 2: one each.
    assert sorted(batches) == [1, 1, 1, 2, 2, 3, 3]
    plan = varlen_plan(cu, sum(LENGTHS), torch.device("cpu"))
    assert plan.calls == ((1, 1), (2, 1), (3, 2), (4, 3), (4, 3), (4, 1), (7, 2))


def test_equal_lengths_keep_packed_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows all of one length: plan order is the packed order, calls cut by the limit."""
    monkeypatch.setattr(attention, "MAX_SDPA_BATCH", 4)
    lengths = [4] * 10
    cu = cu_of(lengths)
    plan = plan_varlen(cu, 40, torch.device("cpu"), 4)
    assert plan.calls == ((4, 4), (4, 4), (4, 2))
    assert torch.equal(plan.order, torch.arange(40))
    inputs = qkv(40, seed=5)

    def new(q, k, v):
        return varlen_sdpa(None, q, k, v, cu_seq_lens_q=cu)[0]

    def loop(q, k, v):
        return loop_sdpa(q, k, v, lengths, None, False)

    assert_all_close(output_and_grads(new, inputs), output_and_grads(loop, inputs), atol=1e-6)


def test_rejects_boundaries_that_do_not_cover_the_tokens() -> None:
    q, k, v = qkv(10)
    for bad in ([0, 4, 8], [0, 6, 4, 10], [2, 10]):
        with pytest.raises(ValueError, match="cu_seqlens"):
            varlen_sdpa(None, q, k, v, cu_seq_lens_q=torch.tensor(bad, dtype=torch.int32))


# --- the plan cache -----------------------------------------------------------------------


def test_plan_is_cached_per_tensor_and_dropped_with_it(monkeypatch: pytest.MonkeyPatch) -> None:
    cu = cu_of(LENGTHS)
    total = sum(LENGTHS)
    cpu = torch.device("cpu")
    first = varlen_plan(cu, total, cpu)
    assert varlen_plan(cu, total, cpu) is first
    assert varlen_plan(cu.clone(), total, cpu) is not first  # equal values, other tensor
    monkeypatch.setattr(attention, "MAX_SDPA_BATCH", 2)
    assert varlen_plan(cu, total, cpu).max_batch == 2  # the limit changed: planned again
    gc.collect()
    before = len(attention._PLANS)
    del cu
    gc.collect()
    assert len(attention._PLANS) == before - 1


def test_in_place_edit_is_planned_again() -> None:
    cu = cu_of([4, 4, 2])
    q, k, v = qkv(10)
    varlen_sdpa(None, q, k, v, cu_seq_lens_q=cu)
    cu[1] = 3  # lengths 3, 5, 2
    out = varlen_sdpa(None, q, k, v, cu_seq_lens_q=cu)[0]
    torch.testing.assert_close(out, loop_sdpa(q, k, v, [3, 5, 2], None, False), rtol=0, atol=1e-6)


def test_inference_mode_tensor() -> None:
    with torch.inference_mode():
        cu = cu_of([4, 4, 2])
        q, k, v = (t.detach() for t in qkv(10))
        out = varlen_sdpa(None, q, k, v, cu_seq_lens_q=cu)[0]
        assert varlen_plan(cu, 10, torch.device("cpu")).version is None
        torch.testing.assert_close(out, loop_sdpa(q, k, v, [4, 4, 2], None, False))


def test_tensor_reusing_a_freed_id_gets_its_own_plan() -> None:
    """A freed ``cu_seqlens`` whose id is taken by a new tensor: the new one is planned."""
    q, k, v = qkv(12)
    reused = 0
    for attempt in range(50):
        old = cu_of([4, 4, 4])
        varlen_sdpa(None, q, k, v, cu_seq_lens_q=old)
        old_id = id(old)
        del old
        lengths = [1 + attempt % 5, 11 - attempt % 5]
        new = cu_of(lengths)
        reused += id(new) == old_id
        out = varlen_sdpa(None, q, k, v, cu_seq_lens_q=new)[0]
        torch.testing.assert_close(out, loop_sdpa(q, k, v, lengths, None, False))
        del new
    if not reused:
        pytest.skip("the interpreter never reused a freed tensor's id")


# --- the tiny model -----------------------------------------------------------------------

GRIDS = [(8, 8), (4, 6), (6, 4), (8, 8), (2, 2)]
"""Patch grids of one vision forward: three slice lengths, 4-token windows."""


def _pixels(grids: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    patches = sum(r * c for r, c in grids)
    gen = torch.Generator().manual_seed(0)
    pixels = torch.randn((1, 3, 14, patches * 14), generator=gen)
    return pixels, torch.tensor(grids, dtype=torch.int32)


def test_tiny_vision_plans_once_per_cu_seqlens_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    """Four vision layers with the merger after layer 1: five attention calls over three
    ``cu_seqlens`` tensors (slices, windows, downsampled slices), three plans; outputs as
    transformers' per-sequence SDPA loop and the earlier implementation give them."""
    config = tiny_model_config(load_tiny_tokenizer())
    config.insert_layer_id = config.vision_config.insert_layer_id = 1
    config.vision_config.num_hidden_layers = 4
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MiniCPMV4_6ForConditionalGeneration(config).float()
    vision = model.model.vision_tower
    pixels, sizes = _pixels(GRIDS)

    def run(implementation: str) -> torch.Tensor:
        vision.config._attn_implementation = implementation
        return vision(pixels, target_sizes=sizes).last_hidden_state.detach()

    assert use_batched_varlen_attention(model)
    # the tensors themselves, kept alive: the id of a freed tensor can come back for the next
    calls: list[torch.Tensor] = []
    plans: list[torch.Tensor] = []

    def counting_sdpa(*args, **kwargs):
        calls.append(kwargs["cu_seq_lens_q"])
        return varlen_sdpa(*args, **kwargs)

    def counting_plan(cu_seqlens, *args, **kwargs):
        plans.append(cu_seqlens)
        return plan_varlen(cu_seqlens, *args, **kwargs)

    AttentionInterface.register(IMPLEMENTATION, counting_sdpa)
    monkeypatch.setattr(attention, "plan_varlen", counting_plan)
    try:
        batched = run(IMPLEMENTATION)
    finally:
        AttentionInterface.register(IMPLEMENTATION, varlen_sdpa)
    assert len(calls) == 5
    distinct = {id(t) for t in calls}
    assert len(plans) == len(distinct) == 3 and {id(t) for t in plans} == distinct

    AttentionInterface.register(REFERENCE, previous_varlen_sdpa)
    torch.testing.assert_close(batched, run(REFERENCE), rtol=0, atol=1e-6)
    torch.testing.assert_close(batched, run("sdpa"), rtol=1e-5, atol=1e-5)


def test_tiny_model_small_chunks_match_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forward + backward of the whole tiny model with SDPA calls of at most 3 sequences."""
    model, tokenizer = build_tiny_model()
    use_batched_varlen_attention(model)
    adapter = Native46Adapter(tokenizer.pad_token_id)
    batch = synthetic_native_batch(
        [80, 60],
        [[(8, 8), (4, 8)], [(8, 4)]],
        model.config.image_token_id,
        tokenizer.pad_token_id,
        model.config.text_config.vocab_size,
    )

    def loss_and_grads() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        loss, _ = adapter.forward_loss(model, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.detach(), grads

    loss, grads = loss_and_grads()
    monkeypatch.setattr(attention, "MAX_SDPA_BATCH", 3)
    small_loss, small_grads = loss_and_grads()
    torch.testing.assert_close(small_loss, loss)
    assert small_grads.keys() == grads.keys()
    assert any("vit_merger.self_attn" in name for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(small_grads[name], grad, msg=f"grad of {name}")
