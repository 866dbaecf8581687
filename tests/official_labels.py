"""The official MiniCPM-V label arithmetic, copied for comparison tests.

Provenance: ``finetune/dataset.py`` of https://github.com/OpenBMB/MiniCPM-V at commit
0dbb566de090067266abb76e702fb289f09934c5 (Apache-2.0): ``conversation_to_ids_qwen2`` and the
target loop of ``conversation_to_ids`` (``llm_type == "qwen"``), unchanged except that the
``numpy``/``torch`` imports are local, the unused ``raw_msg`` is dropped and the role check
accepts only what the official code accepts. Used only by tests.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def conversation_to_ids_qwen2(conversation: list[dict[str, str]], tokenizer: Any) -> Any:
    chat = []
    for msg in conversation:
        role = msg["role"]
        message = msg["content"]
        assert role in ["user", "assistant"]
        prefix = "user" if role == "user" else "assistant"
        chat.append({"role": prefix, "content": message})
    assert set([i["role"] for i in chat]) & set(["assistant"])  # noqa: C403, C405
    if "<think>" in chat[-1]["content"] and "</think>" in chat[-1]["content"]:
        enable_thinking = True
    else:
        enable_thinking = False

    ret = tokenizer.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=False, enable_thinking=enable_thinking
    )
    input_ids = tokenizer.apply_chat_template(
        chat, tokenize=True, add_generation_prompt=False, enable_thinking=enable_thinking
    )
    if isinstance(input_ids, dict) or hasattr(input_ids, "keys"):  # transformers 5 BatchEncoding
        input_ids = input_ids["input_ids"]
    input_ids = np.array(input_ids)
    if "<think>\n\n</think>\n\n" in ret:  # noqa: SIM108 (upstream code as is)
        offset = 4
    else:
        offset = 0
    start_idxs = np.where(input_ids == tokenizer.convert_tokens_to_ids("<|im_start|>"))[0]
    assistant_idxs = np.where(input_ids == tokenizer.convert_tokens_to_ids("assistant"))[0]
    end_idxs = np.where(input_ids == tokenizer.convert_tokens_to_ids("<|im_end|>"))[0]

    context = np.ones_like(input_ids, dtype=np.int8)

    for i, assistant_idx in enumerate(assistant_idxs):
        if assistant_idx - 1 in set(start_idxs):
            if i == len(assistant_idxs) - 1:  # noqa: SIM108 (upstream code as is)
                st = assistant_idx + 2 + offset
            else:
                st = assistant_idx + 2
            for end_idx in end_idxs:
                if end_idx > st:
                    context[st : end_idx + 1] = 0
                    break
    return input_ids, context


def official_target(conversation: list[dict[str, str]], tokenizer: Any) -> tuple[list, list]:
    """``(input_ids, target)`` as ``conversation_to_ids(..., llm_type="qwen")`` builds them:
    ``target`` is pre-shifted (``target[i]`` is the label of the logits at ``i``)."""
    input_ids, context = conversation_to_ids_qwen2(conversation, tokenizer)
    ids = torch.from_numpy(np.hstack(input_ids, dtype=np.int32))
    context = torch.from_numpy(np.hstack(context, dtype=np.int8))
    return ids.tolist(), build_target(ids, context, tokenizer).tolist()


def build_target(ids: torch.Tensor, context: torch.Tensor, tokenizer: Any) -> torch.Tensor:
    """Upstream's "build target" loop of ``conversation_to_ids``, verbatim."""
    target = torch.full_like(ids, -100, dtype=torch.int32)
    for i in range(1, len(ids)):
        if context[i] == 0:
            target[i - 1] = ids[i]
        if context[i] == 1 and context[i - 1] == 0:
            if hasattr(tokenizer, "eot_id"):
                target[i - 1] = tokenizer.eot_id
            else:
                target[i - 1] = tokenizer.eos_id
    return target
