"""The 4.6 family's empty think block (``--think-block auto|never``), against the recipes.

The reference rendering is a reproduction of ms-swift's training encode for the Cookbook's 4.6
recipe (modelscope/ms-swift @ 3602360a562313afbf2ef6065fdf61f271a2c5b9):
``Template._add_non_thinking_prefix`` (``swift/template/base.py``) with the ``minicpmv4_6``
meta (``swift/template/templates/minicpm.py``: ChatML, ``non_thinking_prefix=
'<think>\\n\\n</think>\\n\\n'``), and its ``ignore_empty_think`` loss scale
(``swift/loss_scale/config/ignore_empty_think.json``: ``^<think>\\s*</think>\\s*`` weight 0).
LLaMA-Factory's ``minicpm_v_4_6`` template (hiyouga/LlamaFactory @ ff6d4d12,
``src/llamafactory/data/template.py``) renders the same text from records that carry the block,
as the Cookbook's do. Sources and the rule: :mod:`mvshards.think_block`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import format_fixtures as F
import pytest
from click.testing import CliRunner
from records_fixtures import qa, turn

from mvprep.cli import main
from mvprep.tokens import EstimateTokenCounter, HFTokenCounter
from mvshards.families import NATIVE_46, REMOTE_26
from mvshards.index import read_manifest
from mvshards.schema import SampleMeta
from mvshards.tario import iter_members
from mvshards.think_block import apply_think_block, empty_think_end
from mvshards.tiny_tokenizer import build_tiny_tokenizer
from mvtrain.data.tokenize import IGNORE_INDEX, tokenize_sample

EMPTY = "<think>\n\n</think>\n\n"
P46 = "minicpmv-4.6"

CONVERSATIONS = [
    qa("What is this?", "A cat."),
    qa("Count.", EMPTY + "Three."),  # the Cookbook's records carry the block already
    qa("Why?", "<think>It has whiskers.</think>\n\nA cat."),
    qa("Why?", "<think>\nR.\n</think>\n\nThe answer."),
    [turn("system", "Be brief."), *qa("Hi?", "Hello.")],
    [*qa("First?", "One."), *qa("Second?", "<think>Because.</think>Two."), *qa("Third?", "3.")],
    qa("Say it.", "\nStarts with a newline."),
]


def swift_render(messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """ms-swift's training text for ``minicpmv4_6`` (default loss strategy) and the character
    ranges its loss covers in each answer (``<|im_end|>`` excluded, compared separately)."""
    prefix = "<think>\n\n</think>\n\n"
    text, trained = "", []
    for m in messages:
        content = m["content"]
        if m["role"] == "assistant":
            if not content.startswith("<think>"):  # _add_non_thinking_prefix
                content = prefix + content
            text += "<|im_start|>assistant\n"
            start = len(text)
            skip = re.match(r"<think>\s*</think>\s*", content)  # ignore_empty_think
            trained.append((start + (skip.end() if skip else 0), start + len(content)))
            text += content + "<|im_end|>\n"
        else:
            text += f"<|im_start|>{m['role']}\n{content}<|im_end|>\n"
    return text, trained


def llamafactory_render(messages: list[dict[str, str]]) -> str:
    """LLaMA-Factory's ``minicpm_v_4_6`` slots (a system turn given, so its default system
    prompt is not used): the contents as written."""
    out = ""
    for m in messages:
        if m["role"] == "system":
            out += f"<|im_start|>system\n{m['content']}<|im_end|>\n"
        elif m["role"] == "user":
            out += f"<|im_start|>user\n{m['content']}<|im_end|>\n<|im_start|>assistant\n"
        else:
            out += f"{m['content']}<|im_end|>\n"
    return out


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("think")
    paths = {
        "chatml": build_tiny_tokenizer(root / "chatml"),
        "thinking": build_tiny_tokenizer(root / "thinking", thinking=True),
    }
    return {k: (p, AutoTokenizer.from_pretrained(str(p))) for k, p in paths.items()}


def _tokenize(turns: list[dict[str, str]], tok: Any) -> Any:
    return tokenize_sample(SampleMeta("000000001", "x", turns), tok, P46)


# --------------------------------------------------------------------------- the rule


def test_rule_adds_the_block_where_the_recipes_do() -> None:
    turns = [*qa("Q1", "A1"), *qa("Q2", "<think>R</think>A2"), *qa("Q3", EMPTY + "A3")]
    got = apply_think_block(turns, NATIVE_46, "auto")
    assert [t["content"] for t in got] == [
        "Q1",
        EMPTY + "A1",
        "Q2",
        "<think>R</think>A2",
        "Q3",
        EMPTY + "A3",
    ]
    assert turns[1]["content"] == "A1"  # a copy
    assert apply_think_block(turns, NATIVE_46, "never") == turns
    assert apply_think_block(turns, REMOTE_26, "auto") == turns  # 2.6: no effect
    with pytest.raises(ValueError, match="--think-block"):
        apply_think_block(turns, NATIVE_46, "always")
    text = "x" + EMPTY + "A"
    assert empty_think_end(text, 1) == 1 + len(EMPTY)
    assert empty_think_end("x<think>R</think>A", 1) == 1


@pytest.mark.parametrize("case", range(len(CONVERSATIONS)))
def test_chatml_rendering_and_labels_equal_ms_swift(tokenizers: dict[str, Any], case: int) -> None:
    turns = CONVERSATIONS[case]
    _, tok = tokenizers["chatml"]
    stored = apply_think_block(turns, NATIVE_46, "auto")
    want, trained = swift_render(turns)
    assert tok.apply_chat_template(stored, tokenize=False) == want
    if turns[0]["role"] == "system":  # else LLaMA-Factory adds its default system prompt
        assert llamafactory_render(stored) == want
    out = _tokenize(stored, tok)
    assert tok.decode(out.input_ids) == want
    labelled = [t for t in out.labels if t != IGNORE_INDEX]
    assert tok.decode(labelled) == "".join(want[a:b] + "<|im_end|>" for a, b in trained)


def test_cookbook_record_renders_as_llamafactory(tokenizers: dict[str, Any]) -> None:
    turns = [turn("system", "S."), *qa("<image>\nCount the people.", EMPTY + "So 8.")]
    _, tok = tokenizers["chatml"]
    stored = apply_think_block(turns, NATIVE_46, "auto")
    assert stored == turns  # the block is not doubled
    assert tok.apply_chat_template(stored, tokenize=False) == llamafactory_render(turns)


@pytest.mark.parametrize("case", range(len(CONVERSATIONS)))
def test_thinking_template_answer_follows_the_prompt(tokenizers: dict[str, Any], case: int) -> None:
    """With a thinking-style template the final answer is rendered exactly as the model is
    prompted with thinking off (the generation prompt ends in the empty block) -- for a
    single-turn record also exactly as ms-swift renders it --, a record's own reasoning is
    kept, and the empty block is not labelled."""
    turns = CONVERSATIONS[case]
    _, tok = tokenizers["thinking"]
    stored = apply_think_block(turns, NATIVE_46, "auto")
    rendered = tok.apply_chat_template(stored, tokenize=False)
    answer = turns[-1]["content"]
    final = answer.split("</think>")[-1].strip()  # the template trims
    if "</think>" not in answer or answer.startswith(EMPTY):
        prompt = tok.apply_chat_template(
            stored[:-1], tokenize=False, add_generation_prompt=True, enable_thinking=False
        )
        assert rendered == prompt + final + "<|im_end|>\n"
        if len(turns) == 2:
            assert rendered == swift_render([turns[0], turn("assistant", final)])[0]
    else:  # its reasoning, in the template's layout
        reasoning = answer.split("</think>")[0].split("<think>")[-1].strip()
        assert rendered.endswith(f"<think>\n{reasoning}\n</think>\n\n{final}<|im_end|>\n")
    out = _tokenize(stored, tok)
    assert tok.decode(out.input_ids) == rendered
    labelled = tok.decode([t for t in out.labels if t != IGNORE_INDEX])
    assert "<think>\n\n</think>" not in labelled
    assert labelled.endswith(final + "<|im_end|>")
    if "It has whiskers." in answer:
        assert labelled == "<think>\nIt has whiskers.\n</think>\n\nA cat.<|im_end|>"


def test_never_renders_no_block(tokenizers: dict[str, Any]) -> None:
    turns = qa("What is this?", "A cat.")
    _, tok = tokenizers["chatml"]
    stored = apply_think_block(turns, NATIVE_46, "never")
    out = _tokenize(stored, tok)
    assert "<think>" not in tok.decode(out.input_ids)
    assert tok.decode([t for t in out.labels if t != IGNORE_INDEX]) == "A cat.<|im_end|>"
    auto = _tokenize(apply_think_block(turns, NATIVE_46, "auto"), tok)
    assert (
        len(auto.input_ids) > len(out.input_ids) and auto.num_label_tokens == out.num_label_tokens
    )


# --------------------------------------------------------------------------- counting


@pytest.mark.parametrize("kind", ["chatml", "thinking"])
@pytest.mark.parametrize("mode", ["auto", "never"])
def test_estimate_bounds_exact_counts(tokenizers: dict[str, Any], kind: str, mode: str) -> None:
    path, _ = tokenizers[kind]
    exact, estimate = HFTokenCounter(path), EstimateTokenCounter(P46)
    odd = [qa("Q", "no open</think>A"), qa("Q", "<think>unclosed"), qa("Q", "<think>a</think>b")]
    for turns in [*CONVERSATIONS, *odd]:
        stored = apply_think_block(turns, NATIVE_46, mode)
        n = exact.count_text_tokens(stored, [])
        assert estimate.count_text_tokens(stored, []) >= n, stored


@pytest.mark.parametrize(
    ("answer", "margin"),
    [("A.", 19), (EMPTY + "A.", 4), ("<think>R</think>A.", 4), ("R</think>A.", 11)],
)
def test_estimate_margin_follows_the_rule(answer: str, margin: int) -> None:
    """Per answer: the block's 19 bytes when a template may add it, else what a thinking
    template may add when it rewrites ``<think>R</think>A``; nothing for the 2.6 family."""
    turns = qa("Q", answer)
    user = 2 + len("user\nQ") + 1
    plain = user + 2 + len(f"assistant\n{answer}".encode()) + 1
    assert EstimateTokenCounter(P46).count_text_tokens(turns, []) == plain + margin
    system = 2 + len("system\nYou are a helpful assistant.") + 1
    assert EstimateTokenCounter("minicpmv-2.6").count_text_tokens(turns, []) == plain + system


def _answers(turns: list[dict[str, str]]) -> list[str]:
    return [t["content"] for t in turns if t["role"] == "assistant"]


RECORDS: list[dict[str, Any]] = [
    {"messages": qa("<image>What colour?", "Green."), "images": ["img/a.jpg"]},
    {"messages": qa("<image>\nCount.", EMPTY + "So 8."), "images": ["img/c.jpg"]},
    {
        "messages": [*qa("Why?", "<think>R.</think>A."), *qa("<image>And?", "B.")],
        "images": ["img/b.png"],
    },
    {"messages": [turn("system", "Be brief."), *qa("Hi?", "Hello.")]},
]


def _build(tmp_path: Path, tok_dir: Path, mode: str, profile: str = P46) -> Path:
    F.write_images(tmp_path)
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n", encoding="utf-8")
    out = tmp_path / f"out-{mode}-{profile}-{tok_dir.name}"
    args = [str(data), "--out", str(out), "--tokenizer", str(tok_dir), "--profile", profile]
    result = CliRunner().invoke(
        main, ["build", *args, "--think-block", mode, "--workers", "1", "--no-progress"]
    )
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["chatml", "thinking"])
@pytest.mark.parametrize("mode", ["auto", "never"])
def test_build_counts_equal_trainer_counts(
    tmp_path: Path, tokenizers: dict[str, Any], kind: str, mode: str
) -> None:
    tok_dir, tok = tokenizers[kind]
    out = _build(tmp_path, tok_dir, mode)
    assert read_manifest(out)["params"]["think_block"] == mode
    assert json.loads((out / "build.json").read_text())["think_block"] == mode
    members = {n: d for tar in sorted(out.glob("*.tar")) for n, d in iter_members(tar)}
    metas = [
        SampleMeta.from_json(json.loads(d))
        for n, d in sorted(members.items())
        if n.endswith(".json")
    ]
    assert len(metas) == 4
    for meta, record in zip(metas, RECORDS, strict=True):
        assert meta.token_count_exact
        assert len(tokenize_sample(meta, tok, P46).input_ids) == meta.num_tokens
        want = apply_think_block(record["messages"], NATIVE_46, mode)
        assert _answers(meta.conversations) == _answers(want)
    answers = [a for m in metas for a in _answers(m.conversations)]
    assert "<think>R.</think>A." in answers  # a record's own reasoning is stored as written
    assert ("Green." in answers) == (mode == "never")


@pytest.mark.slow
def test_26_builds_ignore_the_option(tmp_path: Path, tokenizers: dict[str, Any]) -> None:
    tok_dir, _ = tokenizers["chatml"]
    out = _build(tmp_path, tok_dir, "auto", "minicpmv-2.6")
    assert "think_block" not in read_manifest(out)["params"]
    members = {n: d for tar in sorted(out.glob("*.tar")) for n, d in iter_members(tar)}
    meta = SampleMeta.from_json(json.loads(members["000000000.json"]))
    assert meta.conversations[1]["content"] == "Green."
