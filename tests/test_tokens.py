"""Token counting: the tiny tokenizer, the exact counter against one-shot tokenization, the
estimate."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mvprep.records import RecordError, normalize_record
from mvprep.tokens import (
    CHAT_TEMPLATE_ERROR,
    EstimateTokenCounter,
    HFTokenCounter,
    TokenizerError,
    estimate_text_tokens,
    make_token_counter,
)
from mvshards.conversation import expand_placeholders
from mvshards.profiles import PROFILES
from mvshards.tiny_tokenizer import TINY_SPECIAL_TOKENS, build_tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tiny-tokenizer"))


@pytest.fixture(scope="module")
def counter(tiny_dir: Path) -> HFTokenCounter:
    return HFTokenCounter(tiny_dir)


# --------------------------------------------------------------------------- tiny tokenizer


def test_tiny_tokenizer_is_deterministic(tmp_path: Path, tiny_dir: Path) -> None:
    again = build_tiny_tokenizer(tmp_path / "again")
    names = sorted(p.name for p in tiny_dir.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    assert "tokenizer.json" in names
    for name in names:
        assert (tiny_dir / name).read_bytes() == (again / name).read_bytes(), name


def test_tiny_tokenizer_loads_with_specials_and_template(counter: HFTokenCounter) -> None:
    tok = counter.tokenizer
    assert 300 <= len(tok) <= 2048
    for text in TINY_SPECIAL_TOKENS.values():
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == text
    assert tok.pad_token == "<|endoftext|>" and tok.unk_token == "<unk>"
    assert tok.image_start_token == "<image>" and tok.image_token == "<unk>"
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
        tokenize=False,
    )
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    text = "Any text: 你好, émoji 🙂, tabs\tand\nnewlines"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


# --------------------------------------------------------------------------- exact counter


def image_span(image_id: int | None, queries: int, grid: tuple[int, int] | None) -> str:
    """A real image span built from special tokens, in the MiniCPM-V manner."""
    s = TINY_SPECIAL_TOKENS
    span = s["image_start"] + s["unk"] * queries + s["image_end"]
    if grid:
        cols, rows = grid
        row = (s["slice_start"] + s["unk"] * queries + s["slice_end"]) * cols
        span += "\n".join([row] * rows)
    if image_id is not None:
        span = f"{s['image_id_start']}{image_id}{s['image_id_end']}" + span
    return span


_FRAGMENTS = [*"ab cdegt\n\t.,:!?<>_/0123456789你好猫éZ", " the", "th", "he", "in", "img"]
_FRAGMENTS += ["\n\n", "  ", "<|im_end|>"]
_text = st.lists(st.sampled_from(_FRAGMENTS), max_size=20)
"""Text near the tokenizer's edge cases; it cannot spell a placeholder (no "image")."""


def _turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


_A = _turn("assistant", "ok")


@st.composite
def samples(draw: st.DrawFn) -> tuple[dict, list[str]]:
    """A valid raw record (0-3 images, placeholders anywhere) and one span per image."""
    n_turns = draw(st.integers(1, 3)) * 2
    chunks = [draw(_text) for _ in range(n_turns)]  # placeholders go between chunks
    mode = draw(st.sampled_from(["none", "single-in-place", "single-prepended", "multi"]))
    raw: dict = {}
    n_images = 0
    if mode.startswith("single"):
        n_images = 1
        raw["image"] = "a.jpg"
        if mode == "single-in-place":
            chunks[0].insert(draw(st.integers(0, len(chunks[0]))), "<image>")
    elif mode == "multi":
        n_images = draw(st.integers(1, 3))
        names = [f"<image_{i:02d}>" for i in range(n_images)]
        raw["image"] = {name: f"{i}.jpg" for i, name in enumerate(names)}
        for name in names:
            t = draw(st.integers(0, n_turns - 1))
            chunks[t].insert(draw(st.integers(0, len(chunks[t]))), name)
    contents = ["".join(c) for c in chunks]
    roles = ["user", "assistant"] * (n_turns // 2)
    raw["conversations"] = [{"role": r, "content": c} for r, c in zip(roles, contents, strict=True)]
    spans = [
        image_span(
            draw(st.one_of(st.none(), st.integers(0, 12))),
            draw(st.integers(1, 5)),
            draw(st.one_of(st.none(), st.tuples(st.integers(1, 3), st.integers(1, 3)))),
        )
        for _ in range(n_images)
    ]
    return raw, spans


_SPAN = "<image><unk></image>"


@settings(max_examples=150, deadline=None)
@given(sample=samples())
@example(sample=({"image": "a.jpg", "conversations": [_turn("user", "th<image>e"), _A]}, [_SPAN]))
@example(sample=({"image": "a.jpg", "conversations": [_turn("user", "\n\n"), _A]}, [_SPAN]))
@example(
    sample=(
        {"image": {"<image_00>": "a"}, "conversations": [_turn("user", "\n<image_00>\n"), _A]},
        [_SPAN],
    )
)
def test_exact_count_equals_one_shot_tokenization(
    counter: HFTokenCounter, sample: tuple[dict, list[str]]
) -> None:
    raw, spans = sample
    rec = normalize_record(0, raw)
    tok = counter.tokenizer
    full = tok.apply_chat_template(
        expand_placeholders(rec.conversations, rec.image_names, spans),
        tokenize=False,
        add_generation_prompt=False,
    )
    one_shot = len(tok(full, add_special_tokens=False)["input_ids"])
    span_tokens = sum(len(tok(s, add_special_tokens=False)["input_ids"]) for s in spans)
    assert counter.count_text_tokens(rec.conversations, rec.image_names) == one_shot - span_tokens


def test_exact_count_by_hand(counter: HFTokenCounter) -> None:
    """A case small enough to check by hand: the newlines around spans are text tokens."""
    conv = [{"role": "user", "content": "<image_00>"}, {"role": "assistant", "content": ""}]
    # Rendered: "<|im_start|>user\n" + "\n" SPAN "\n" + "<|im_end|>\n<|im_start|>assistant\n..."
    before = "<|im_start|>user\n\n"
    after = "\n<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n"
    tok = counter.tokenizer
    expected = sum(len(tok(t, add_special_tokens=False)["input_ids"]) for t in (before, after))
    assert expected >= 8
    assert counter.count_text_tokens(conv, ["<image_00>"]) == expected


def test_counter_rejects_unusable_tokenizers(tmp_path: Path, tiny_dir: Path) -> None:
    with pytest.raises(TokenizerError, match="not found"):
        HFTokenCounter(tmp_path / "nope")
    no_template = tmp_path / "no-template"
    shutil.copytree(tiny_dir, no_template)
    (no_template / "chat_template.jinja").unlink()
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match="no chat template"):
        HFTokenCounter(no_template)


def test_template_refusal_is_a_record_reject(tmp_path: Path, tiny_dir: Path) -> None:
    strict = tmp_path / "strict"
    shutil.copytree(tiny_dir, strict)
    (strict / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    )
    strict_counter = HFTokenCounter(strict)
    conv = [
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": "c"},
    ]
    with pytest.raises(RecordError) as info:
        strict_counter.count_text_tokens(conv, [])
    assert info.value.reason == CHAT_TEMPLATE_ERROR
    assert "roles must alternate" in str(info.value)


def test_make_token_counter_caches_per_process(tiny_dir: Path) -> None:
    a = make_token_counter(str(tiny_dir))
    assert a.exact is True
    assert make_token_counter(tiny_dir) is a
    assert make_token_counter(None) is make_token_counter(None)
    assert make_token_counter(None).exact is False
    info = a.info()
    assert info["kind"] == "hf" and len(info["sha256"]) == 64


# --------------------------------------------------------------------------- estimate


def test_estimate_is_flagged_and_follows_its_rule() -> None:
    est = EstimateTokenCounter("minicpmv-4.6")
    assert est.exact is False
    conv = [
        {"role": "user", "content": "<image_00>Describe it."},  # "\n" + "\nDescribe it."
        {"role": "assistant", "content": "一只猫"},
    ]
    user_text = "user\n\n\nDescribe it."  # role, newline, the span's newlines, the text
    assert estimate_text_tokens(user_text) == 19
    assert estimate_text_tokens("一只猫") == 9  # UTF-8 bytes
    think = len("<think>\n\n</think>\n\n")
    answer = 2 + len(b"assistant\n") + 9 + 1 + think
    assert est.count_text_tokens(conv, ["<image_00>"]) == (2 + 19 + 1) + answer
    assert est.count_text_tokens([{"role": "user", "content": ""}], []) == 2 + 5 + 1
    system = 2 + len("system\nYou are a helpful assistant.") + 1
    old = EstimateTokenCounter("minicpmv-2.6")
    assert old.count_text_tokens(conv, ["<image_00>"]) == system + (2 + 19 + 1) + answer - think
    assert est.info()["kind"] == "estimate" and est.info()["bound"] == "upper"
    assert make_token_counter(None, "minicpmv-2.6") is not make_token_counter(None)


@settings(max_examples=50, deadline=None)
@given(a=st.text(max_size=60), b=st.text(max_size=60))
def test_estimate_grows_with_text(a: str, b: str) -> None:
    assert estimate_text_tokens(a + b) >= max(estimate_text_tokens(a), estimate_text_tokens(b))
    assert estimate_text_tokens(a) >= len(a)


@settings(max_examples=120, deadline=None)
@given(sample=samples())
@example(sample=({"image": "a.jpg", "conversations": [_turn("user", "ﬃ\u0958 x"), _A]}, [_SPAN]))
def test_estimate_is_an_upper_bound_of_the_exact_count(
    counter: HFTokenCounter, sample: tuple[dict, list[str]]
) -> None:
    """Any conversation, any text: the estimate of every profile is at least the exact count
    (the tiny tokenizer: a byte-level BPE with few merges, the weakest of the family)."""
    raw, _ = sample
    rec = normalize_record(0, raw)
    exact = counter.count_text_tokens(rec.conversations, rec.image_names)
    for profile in PROFILES:
        estimate = EstimateTokenCounter(profile).count_text_tokens(
            rec.conversations, rec.image_names
        )
        assert estimate >= exact, profile


@settings(max_examples=60, deadline=None)
@given(user=st.text(max_size=80), answer=st.text(max_size=80))
def test_estimate_bounds_arbitrary_text(counter: HFTokenCounter, user: str, answer: str) -> None:
    conv = [_turn("user", user), _turn("assistant", answer)]
    try:
        rec = normalize_record(0, {"conversations": conv})
    except RecordError:  # placeholders or reserved tokens: not a valid text-only record
        return
    exact = counter.count_text_tokens(rec.conversations, [])
    for profile in PROFILES:
        assert EstimateTokenCounter(profile).count_text_tokens(rec.conversations, []) >= exact
