"""The trainer's tokenizer on real built shards: exact lengths equal mvprep's counts,
image spans equal transformers' processor, and the label rule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import train_fixtures
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from train_fixtures import MAX_SLICE_NUMS, PROFILES, Loaded

from mvprep.tokens import HFTokenCounter, make_token_counter
from mvshards.conversation import expand_placeholders
from mvshards.layout import assign_image_ids, compute_layout, num_image_tokens
from mvshards.profiles import get_profile
from mvshards.schema import ImageEntry, SampleMeta
from mvtrain.data.tokenize import IGNORE_INDEX, tokenize_sample

# The shared module-scoped fixtures (``loaded`` needs the other four), bound here so that
# this module gets its own instances.
_one_thread = train_fixtures._one_thread
tok_dir = train_fixtures.tok_dir
tiny = train_fixtures.tiny
dataset = train_fixtures.dataset
loaded = train_fixtures.loaded


# --- tokenize ---------------------------------------------------------------------------


@pytest.mark.slow
def test_exact_length_equals_mvprep_count(loaded: dict[str, Loaded], tok_dir: Path) -> None:
    counter = HFTokenCounter(tok_dir)
    for profile in PROFILES:
        rows = loaded[profile]
        for meta, _, sample in rows:
            assert meta.token_count_exact
            assert len(sample.tokenized) == meta.num_tokens, (profile, meta.key)
            recount = counter.count_text_tokens(meta.conversations, meta.image_names)
            assert len(sample.tokenized) == recount + meta.num_image_tokens
            assert len(sample.tokenized.labels) == len(sample.tokenized)
            assert sample.tokenized.num_label_tokens > 0


def _reference_processor(tok: Any) -> Any:
    """transformers' MiniCPMV4_6Processor with only the attributes its span methods read.

    Its constructor also wants a video processor, which needs torchvision (not installed);
    ``replace_image_token`` and ``_prepend_local_ids`` are run as transformers wrote them.
    """
    from transformers import MiniCPMV4_6Processor

    proc = object.__new__(MiniCPMV4_6Processor)
    proc.slice_mode = True
    for name in (
        "image_token",
        "image_start_token",
        "image_end_token",
        "slice_start_token",
        "slice_end_token",
        "image_id_start_token",
        "image_id_end_token",
    ):
        setattr(proc, name, getattr(tok, name))
    return proc


@pytest.mark.slow
def test_native_tokens_equal_transformers_processor(
    tiny: tuple[Any, Any], loaded: dict[str, Loaded], dataset: Path
) -> None:
    from transformers import MiniCPMV4_6ImageProcessorPil

    _, tok = tiny
    processor, images = _reference_processor(tok), MiniCPMV4_6ImageProcessorPil()
    checked = 0
    for meta, _, sample in loaded["minicpmv-4.6"]:
        if not meta.images:
            continue
        originals = [Image.open(dataset.parent / e.path).convert("RGB") for e in meta.images]
        turns = expand_placeholders(
            meta.conversations, meta.image_names, [tok.image_token] * len(originals)
        )
        text = tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=False)
        out = images(images=originals, max_slice_nums=MAX_SLICE_NUMS)
        spans = [
            processor.replace_image_token(out, image_idx=i, image_token_divisor=16)
            for i in range(len(originals))
        ]
        spans = processor._prepend_local_ids([text], spans, tok.image_token)
        parts = text.split(tok.image_token)
        full = parts[0] + "".join(s + p for s, p in zip(spans, parts[1:], strict=True))
        assert tok(full)["input_ids"] == sample.tokenized.input_ids, meta.key
        assert np.asarray(out["target_sizes"]).tolist() == [list(t) for t in sample.tgt_sizes]
        checked += 1
    assert checked >= 8


@pytest.mark.slow
def test_remote26_span_text_is_the_official_one(loaded: dict[str, Loaded], tiny) -> None:
    _, tok = tiny
    sliced = [
        (meta, s)
        for meta, _, s in loaded["minicpmv-2.6"]
        if len(meta.images) == 1 and meta.images[0].layout.grid
    ]
    meta, sample = sliced[0]
    entry = meta.images[0]
    cols, rows = entry.layout.grid
    q = "<unk>" * 64
    official = f"<image_id>{entry.image_id}</image_id><image>{q}</image>" + "\n".join(
        "".join(f"<slice>{q}</slice>" for _ in range(cols)) for _ in range(rows)
    )
    assert official in tok.decode(sample.tokenized.input_ids)
    assert all(b - a == 64 for a, b in sample.tokenized.image_spans)


def _label_text(tok: Any, labels: list[int]) -> str:
    return tok.decode([t for t in labels if t != IGNORE_INDEX])


def test_label_rule_multi_turn_and_lookalike_content(tiny: tuple[Any, Any]) -> None:
    _, tok = tiny
    turns = [
        {"role": "user", "content": "assistant"},
        {"role": "assistant", "content": "assistant"},
        {"role": "user", "content": "Say it again: 42"},
        {"role": "assistant", "content": "42"},
    ]
    meta = SampleMeta(key="000000007", id="x", conversations=turns)
    out = tokenize_sample(meta, tok, "minicpmv-4.6")
    assert _label_text(tok, out.labels) == "assistant<|im_end|>42<|im_end|>"
    rendered = tok.decode(out.input_ids)
    assert rendered == tok.apply_chat_template(turns, tokenize=False)
    # The label tokens are the ones of the assistant turns, at their positions.
    first = rendered.index("<|im_start|>assistant\n") + len("<|im_start|>assistant\n")
    prefix = len(tok(rendered[:first], add_special_tokens=False)["input_ids"])
    assert out.labels[:prefix] == [IGNORE_INDEX] * prefix
    assert out.labels[prefix] == out.input_ids[prefix] != IGNORE_INDEX


def test_labels_with_a_template_that_trims_content(tok_dir: Path) -> None:
    from transformers import AutoTokenizer

    from mvshards.tiny_tokenizer import TINY_CHAT_TEMPLATE

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    tok.chat_template = TINY_CHAT_TEMPLATE.replace(
        "message['content']", "message['content'] | trim"
    )
    turns = [
        {"role": "user", "content": " hello "},
        {"role": "assistant", "content": "  The cat.\n"},
    ]
    out = tokenize_sample(SampleMeta("000000003", "t", turns), tok, "minicpmv-2.6", "mvkit")
    assert "<|im_start|>assistant\nThe cat.<|im_end|>" in tok.decode(out.input_ids)
    assert _label_text(tok, out.labels) == "The cat.<|im_end|>"


_TEXT = st.text(
    alphabet=st.sampled_from(list("abc XYZ 0123.,!?\n\t猫图片éü-_()")), min_size=0, max_size=30
)
_WORD = st.text(alphabet=st.sampled_from(list("abcdXYZ019.!猫é")), min_size=1, max_size=12)


@st.composite
def _samples(draw: st.DrawFn) -> tuple[SampleMeta, str]:
    """A random sample: 0-3 images of random sizes, 1-3 rounds, placeholders in user turns."""
    profile = get_profile(draw(st.sampled_from(PROFILES)))
    n_images = draw(st.integers(0, 3))
    multi = n_images > 1 or (n_images == 1 and draw(st.booleans()))
    names = [f"<image_{i:02d}>" for i in range(n_images)] if multi else ["<image>"] * n_images
    rounds = draw(st.integers(1, 3))
    turns = []
    for r in range(rounds):
        user = draw(_TEXT)
        if r == 0 and n_images == 1 and not multi and draw(st.booleans()):
            user = draw(_TEXT) + "<image>" + user
        if multi and r == 0:
            user = "".join(draw(_TEXT) + name for name in names) + user
        turns.append({"role": "user", "content": user})
        # Assistant content starts and ends with a non-space so its tokens end at its edges.
        turns.append({"role": "assistant", "content": draw(_WORD) + draw(_TEXT) + draw(_WORD)})
    sizes = [(draw(st.integers(16, 2400)), draw(st.integers(16, 2400))) for _ in range(n_images)]
    layouts = [compute_layout(w, h, profile, MAX_SLICE_NUMS) for w, h in sizes]
    form = draw(st.sampled_from(["finetune", "inference", "none"]))
    ids = assign_image_ids(layouts, form)
    entries = [
        ImageEntry(
            f"{i}.jpg",
            "0" * 64,
            lay,
            iid,
            num_image_tokens(lay, profile, iid),
            f"000000001.src{i}.jpg",
            f"000000001.ref{i}.jpg" if lay.grid else None,
        )
        for i, (lay, iid) in enumerate(zip(layouts, ids, strict=True))
    ]
    meta = SampleMeta("000000001", "h", turns, entries, image_names=names)
    return meta, profile.name


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_samples())
def test_property_length_and_labels(case: tuple[SampleMeta, str], tok_dir: Path) -> None:
    meta, profile = case
    counter = make_token_counter(tok_dir)
    assert isinstance(counter, HFTokenCounter)
    tok = counter.tokenizer
    out = tokenize_sample(meta, tok, profile, label_rule="mvkit")
    assert len(out) == counter.count_text_tokens(meta.conversations, meta.image_names) + sum(
        e.num_image_tokens for e in meta.images
    )
    expected = "".join(t["content"] + "<|im_end|>" for t in meta.conversations[1::2])
    assert _label_text(tok, out.labels) == expected
    assert all(
        lab in (IGNORE_INDEX, tid) for lab, tid in zip(out.labels, out.input_ids, strict=True)
    )
