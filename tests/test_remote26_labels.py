"""Labels of the 2.6 family against the official ``finetune/dataset.py`` arithmetic.

The tokenizer is the real ``MiniCPMVTokenizerFast`` (``tokenization_minicpmv_fast.py`` from
``../shared/reference/minicpmv-2.6``) over the tiny vocabulary with ``assistant`` one token;
the official label code is ``official_labels.py`` (copied, provenance there). Both label rules
are checked: ``"official"`` (the 2.6 default) equals the official target exactly; ``"mvkit"``
differs by exactly the one extra eos target per assistant turn.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from official_labels import official_target
from remote26_fixtures import REFERENCE_26, build_remote_tokenizer, require_reference

from mvshards.schema import SampleMeta
from mvtrain.data.tokenize import IGNORE_INDEX, tokenize_sample

QWEN3_STYLE_TEMPLATE = (
    "{%- set ns = namespace(last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if message.role == 'user' and ns.last_query_index == messages|length - 1 %}"
    "{%- set ns.last_query_index = index %}{%- endif %}{%- endfor %}"
    "{%- for message in messages %}{%- set content = message.content %}"
    "{%- if message.role == 'user' %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{%- set reasoning_content = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n')"
    ".split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index %}"
    "{%- if loop.last or (not loop.last and reasoning_content) %}"
    "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + "
    "'\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)
"""The assistant branch of the Qwen3 chat template that MiniCPM-V 4.5's tokenizer uses (the
``reasoning_content`` split on ``</think>``, the think block written for answers after the
last user turn, contents stripped of newlines), without the tool and system branches."""


def _tokenizer(root: Path, template: str | None = None) -> Any:
    from transformers import AutoTokenizer

    require_reference()
    build_remote_tokenizer(root)
    shutil.copyfile(
        REFERENCE_26 / "tokenization_minicpmv_fast.py", root / "tokenization_minicpmv_fast.py"
    )
    tok = AutoTokenizer.from_pretrained(str(root), trust_remote_code=True)
    if template is not None:
        tok.add_tokens(["<think>", "</think>"])  # added tokens in the Qwen3 vocabulary
        tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def tok26(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return _tokenizer(tmp_path_factory.mktemp("tok26"))


@pytest.fixture(scope="module")
def tok45(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return _tokenizer(tmp_path_factory.mktemp("tok45"), QWEN3_STYLE_TEMPLATE)


CONVERSATIONS_26 = [
    [{"role": "user", "content": "What is shown?"}, {"role": "assistant", "content": "A cat."}],
    [
        {"role": "user", "content": "Describe this image in detail."},
        {"role": "assistant", "content": "The image shows a cat\non a table."},
        {"role": "user", "content": "How many people are there?"},
        {"role": "assistant", "content": "There are two dogs."},
    ],
    [{"role": "user", "content": "Say it."}, {"role": "assistant", "content": "\nThe car is red."}],
    [{"role": "user", "content": "assistant"}, {"role": "assistant", "content": "assistant 42"}],
]

CONVERSATIONS_45 = [
    [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "<think>R.</think>A."}],
    [
        {"role": "user", "content": "Why?"},
        {"role": "assistant", "content": "<think>R.</think>\nA."},
    ],
    [
        {"role": "user", "content": "Why?"},
        {"role": "assistant", "content": "<think>\nR.\n</think>\n\nThe answer."},
    ],
    [{"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Plain answer."}],
    [
        {"role": "user", "content": "Why?"},
        {"role": "assistant", "content": "\nStarts with a newline."},
    ],
    [
        {"role": "user", "content": "First?"},
        {"role": "assistant", "content": "<think>Old reasoning.</think>One."},
        {"role": "user", "content": "Second?"},
        {"role": "assistant", "content": "<think>New reasoning.</think>Two."},
    ],
]


def _ours(tok: Any, turns: list[dict[str, str]], rule: str | None) -> tuple[list, list]:
    out = tokenize_sample(SampleMeta("000000001", "x", turns), tok, "minicpmv-2.6", rule)
    return out.input_ids, out.labels[1:] + [IGNORE_INDEX]  # pre-shifted, as the 2.6 adapter


def _check_both_rules(tok: Any, turns: list[dict[str, str]]) -> None:
    ids, target = official_target(turns, tok)
    our_ids, official = _ours(tok, turns, None)  # the 2.6 default is the official rule
    assert our_ids == ids
    assert official == target, tok.convert_ids_to_tokens(ids)
    _, mvkit = _ours(tok, turns, "mvkit")
    diff = [i for i, (a, b) in enumerate(zip(mvkit, target, strict=True)) if a != b]
    assert len(diff) == sum(t["role"] == "assistant" for t in turns)
    assert all(mvkit[i] == IGNORE_INDEX and target[i] == tok.eos_id for i in diff)
    assert all(ids[i] == tok.convert_tokens_to_ids("<|im_end|>") for i in diff)


@pytest.mark.parametrize("case", range(len(CONVERSATIONS_26)))
def test_labels_match_official_qwen2(tok26: Any, case: int) -> None:
    assert tok26.convert_tokens_to_ids("assistant") != tok26.unk_token_id
    _check_both_rules(tok26, CONVERSATIONS_26[case])


@pytest.mark.parametrize("case", range(len(CONVERSATIONS_45)))
def test_thinking_answers_match_official(tok45: Any, case: int) -> None:
    _check_both_rules(tok45, CONVERSATIONS_45[case])


def test_unknown_label_rule_is_refused(tok26: Any) -> None:
    with pytest.raises(ValueError, match="label rule"):
        _ours(tok26, CONVERSATIONS_26[0], "shifted")
