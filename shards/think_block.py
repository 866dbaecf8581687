"""The empty reasoning block of hybrid thinking models: when an answer gets one, and its labels.

MiniCPM-V 4.6 is a hybrid thinking model (a Qwen3.5 language model): an answer without
reasoning is written after an empty block, ``<think>\\n\\n</think>\\n\\n``, which is also what
its chat template puts in the prompt when thinking is off (``enable_thinking=False``). Its
fine-tuning recipes train it that way. What they do, from their public sources:

* **ms-swift** (the Cookbook's ``finetune/swift/swift_minicpmv46.md``, OpenSQZ/MiniCPM-V-CookBook
  @ 8c0471bd95e7ae9b26117432067ffb3028888df8: ``swift sft --template minicpmv4_6
  --add_non_thinking_prefix true --loss_scale ignore_empty_think``; code: modelscope/ms-swift
  @ 3602360a562313afbf2ef6065fdf61f271a2c5b9):

  - ``swift/template/templates/minicpm.py`` registers ``minicpmv4_6`` as a ChatML template with
    ``is_thinking=True``, ``thinking_prefix='<think>\\n'``,
    ``non_thinking_prefix='<think>\\n\\n</think>\\n\\n'``.
  - ``swift/template/base.py`` ``Template._add_non_thinking_prefix`` (training,
    ``add_non_thinking_prefix`` defaults to True): every assistant turn whose content does
    **not start with** ``'<think>'`` gets ``non_thinking_prefix`` prepended -- every turn
    under the default loss strategy, only the last round under ``last_round``. A content that
    starts with ``<think>`` (its own reasoning, or an empty block already written) is kept
    as it is; in training with the default strategy ``preserve_thinking`` is True, so no
    reasoning is removed either.
  - ``swift/arguments/base_args/template_args.py`` ``_set_loss_scale``: for such a hybrid
    template ``+ignore_empty_think`` is appended to ``loss_scale``;
    ``swift/loss_scale/config/ignore_empty_think.json`` gives ``^<think>\\s*</think>\\s*`` at
    the start of a response weight 0: **the empty block is not trained**; a non-empty
    reasoning and the answer are.

* **LLaMA-Factory** (the Cookbook's ``finetune/llama-factory/llamafactory_minicpmv46.md`` @
  77974797a3ab261cdbec96a01ca567d27390fae2, ``template: minicpm_v_4_6``; code:
  hiyouga/LlamaFactory @ ff6d4d12eeb035d6ce06805a5733dd7b29f2ac30,
  ``src/llamafactory/data/template.py``): ``minicpm_v_4_6`` is a plain ``Template`` (not the
  ``ReasoningTemplate``), ``{{content}}<|im_end|>\\n`` after
  ``<|im_start|>assistant\\n``: it adds nothing itself, and the recipe tells users to write
  ``<think>\\n\\n</think>\\n\\n`` at the start of every answer in the data (as the Cookbook's
  example records do). The rendered text is the same as ms-swift's; there the block is part of
  the response and so labelled (LLaMA-Factory labels the whole response).

mvkit follows ms-swift, the one recipe that states a rule in code: ``--think-block auto``
(the default) prepends :attr:`Family.non_thinking_prefix` to every assistant turn that does
not start with ``<think>``, and the trainer leaves an empty block at the start of any answer
unlabelled (:func:`empty_think_end`), as ``ignore_empty_think`` does and as the model sees
it at inference, where the block is part of the prompt. ``--think-block never`` adds
nothing: answers are rendered as the records write them (a chat template that adds a block
itself, as Qwen3-style thinking templates do before the final answer, still does).

``mvprep build`` applies the rule to each record's turns before anything else (image
placeholders, counting), and stores the result as the sample's conversation: the stored
conversation is what the trainer renders, so counts and training agree by construction and
the trainer needs no option. The mode is recorded in ``build.json`` and the manifest
(``params.think_block``) for families with a prefix. Pure Python, no torch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from mvshards.families import Family

THINK_BLOCK_MODES = ("auto", "never")
"""``--think-block`` choices: ``auto`` -- as the family's recipes (above); ``never`` -- no block
is added."""
DEFAULT_THINK_BLOCK = "auto"
THINK_OPEN = "<think>"
"""An answer starting with this already carries its block (ms-swift's ``startswith`` test)."""
EMPTY_THINK_PATTERN = re.compile(r"<think>\s*</think>\s*")
"""An empty reasoning block and the whitespace after it: ms-swift's ``ignore_empty_think``
pattern (``^<think>\\s*</think>\\s*``), matched at the start of an answer."""


def check_think_block(mode: str) -> str:
    """``mode`` when it is one of :data:`THINK_BLOCK_MODES`, else ``ValueError``."""
    if mode not in THINK_BLOCK_MODES:
        raise ValueError(
            f"--think-block must be one of {', '.join(THINK_BLOCK_MODES)}, got {mode!r}"
        )
    return mode


def apply_think_block(
    conversations: Sequence[dict[str, str]], family: Family, mode: str = DEFAULT_THINK_BLOCK
) -> list[dict[str, str]]:
    """A copy of ``conversations`` with the family's non-thinking prefix in front of every
    assistant content that does not start with ``<think>`` (``mode="auto"``); an unchanged
    copy for ``"never"`` or a family without a prefix."""
    check_think_block(mode)
    out = [dict(turn) for turn in conversations]
    prefix = family.non_thinking_prefix
    if mode == "never" or not prefix:
        return out
    for turn in out:
        if turn["role"] == "assistant" and not turn["content"].startswith(THINK_OPEN):
            turn["content"] = prefix + turn["content"]
    return out


def empty_think_end(text: str, start: int) -> int:
    """Where the answer proper starts when ``text[start:]`` opens with an empty reasoning
    block (:data:`EMPTY_THINK_PATTERN`): the index after it; else ``start``."""
    match = EMPTY_THINK_PATTERN.match(text, start)
    return match.end() if match else start
