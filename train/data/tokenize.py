"""A stored sample's conversation -> ``input_ids`` and ``labels``, exactly as the model sees it.

Steps (the same for both families; only the image span text differs):

1. Every image placeholder is replaced with the image's real token span
   (:func:`mvshards.image_spans.image_span_text`) by
   :func:`mvshards.conversation.expand_placeholders`, the module mvprep counts with, so
   spans land in the same places and get the same newlines.
2. The tokenizer's chat template renders the turns (``tokenize=False,
   add_generation_prompt=False``).
3. The rendered text is tokenized once with ``add_special_tokens=False``.

The result has exactly ``meta.num_text_tokens + meta.num_image_tokens`` tokens when mvprep
counted with the same tokenizer: mvprep tokenizes the text between image spans piece by
piece, and since every span starts and ends with a special (added) token, which the
tokenizer splits out before BPE, the pieces tokenize the same inside the whole text
(see ``mvprep.tokens.HFTokenCounter``).

Image spans follow each family's processor; labels follow one of :data:`LABEL_RULES` (the
family's ``label_rule`` by default: ``"official"`` for the 2.6 family, ``"mvkit"`` for 4.6).
:func:`tokenize_sample` and :func:`_labels` give both exactly.

The 4.6 family's empty reasoning block (``<think>\n\n</think>\n\n``) is in the stored
conversation already when the shards were built with ``--think-block auto`` (the default; see
:mod:`mvshards.think_block`), so it is rendered like any answer text; it is never labelled:
an empty block (``<think>\\s*</think>\\s*``) at the start of any assistant answer is skipped,
as ms-swift's ``ignore_empty_think`` loss scale does for the Cookbook's 4.6 recipe. A
non-empty reasoning ``<think>R</think>`` written in a record is kept and trained.

Assistant content is located in the rendered text exactly (a second render with markers in
place of the assistant contents, see :func:`_assistant_ranges`); when the chat template
rewrites it (thinking templates move ``<think>...</think>`` and strip newlines), each assistant
turn's region between its role header and its end of turn is used instead. Ranges are mapped
to tokens with the fast tokenizer's offsets: a token is labelled when it *starts* inside the
range (a token that straddles the role header's newline and the content's, e.g. ``"\n\n"``,
belongs to the header, as in the official code).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mvshards.conversation import expand_placeholders, split_at_markers
from mvshards.image_spans import image_span_text, span_tokens, subimage_query_counts
from mvshards.profiles import get_profile
from mvshards.schema import SampleMeta
from mvshards.think_block import empty_think_end

IGNORE_INDEX = -100
END_OF_TURN = "<|im_end|>"
START_OF_TURN = "<|im_start|>"
EMPTY_THINK = "<think>\n\n</think>\n\n"
"""The empty reasoning block thinking templates (MiniCPM-V 4.5, Qwen3) write before the last
answer when it has none: template text, never labelled (the official code's ``offset = 4``).
For a family with a ``non_thinking_prefix`` (4.6) an empty block opening *any* answer is left
unlabelled (:func:`mvshards.think_block.empty_think_end`), as ms-swift's recipe does."""

LABEL_RULES = ("mvkit", "official")
"""``"mvkit"``: every assistant turn's content and its end-of-turn token. ``"official"``: the
same plus, per assistant turn, one more target -- the position right after the end-of-turn
token (the template's newline) is labelled with the eos id (``tokenizer.eot_id`` if the
tokenizer has one, else ``eos_token_id``), so that the logits *at* ``<|im_end|>`` learn to
predict eos, exactly as the official ``finetune/dataset.py`` builds ``target`` (``context[i] ==
1 and context[i - 1] == 0`` -> ``target[i - 1] = eos``)."""


class TokenizeError(ValueError):
    """A sample cannot be tokenized as stored (one line naming the sample and the fix)."""


@dataclass
class TokenizedSample:
    """One sample as token ids, ready to collate."""

    key: str
    input_ids: list[int]
    labels: list[int]
    """Unshifted: ``labels[i]`` is the target *at* position i (``input_ids[i]`` or -100)."""
    image_spans: list[tuple[int, int]] = field(default_factory=list)
    """``(start, end)`` (end exclusive) of every (sub)image's query-token run in
    ``input_ids``, in vision order: image 0's source, its slices row-major, image 1, ...
    This is the 2.6 family's ``image_bound``."""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_label_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def end_of_turn_id(tokenizer: Any) -> int:
    """Id of ``<|im_end|>`` when the vocabulary has it, else the eos id."""
    tid = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if tid is not None and tid != tokenizer.unk_token_id:
        return int(tid)
    if tokenizer.eos_token_id is None:
        raise TokenizeError("tokenizer has neither <|im_end|> nor an eos token to end a turn")
    return int(tokenizer.eos_token_id)


def eos_target_id(tokenizer: Any) -> int:
    """The extra target of the ``"official"`` rule: ``tokenizer.eot_id`` when the tokenizer
    has one (as the official code checks), else its eos id."""
    eot = getattr(tokenizer, "eot_id", None)
    if eot is not None:
        return int(eot)
    if tokenizer.eos_token_id is None:
        raise TokenizeError("the official label rule needs an eos token; the tokenizer has none")
    return int(tokenizer.eos_token_id)


def tokenize_sample(
    meta: SampleMeta, tokenizer: Any, profile_name: str, label_rule: str | None = None
) -> TokenizedSample:
    """Tokenize ``meta``'s conversation with real image spans; labels by :func:`_labels`
    under ``label_rule`` (one of :data:`LABEL_RULES`; None: the profile family's).

    Image spans (``<image_id>k</image_id>`` only when the stored ``image_id`` is not None):

    * 4.6 family, as ``MiniCPMV4_6Processor.replace_image_token`` + ``_prepend_local_ids``:
      ``<image>`` + image_token * (patches // 16, or // 4 in "4x") + ``</image>``, then for a
      sliced image each row of slices ``(<slice> + image_token * n + </slice>) * cols``, rows
      joined by ``"\\n"``. The image token is the tokenizer's ``image_token`` (``<unk>`` in the
      tiny tokenizer).
    * 2.6 family, as the official fine-tuning code (``preprocess`` / ``get_grid_placeholder``
      with ``new_schema``): the same shape with ``<unk>`` * 64 per (sub)image.
    """
    profile = get_profile(profile_name)
    rule = label_rule or profile.family.label_rule
    if rule not in LABEL_RULES:
        raise ValueError(f"label rule must be one of {', '.join(LABEL_RULES)}, got {rule!r}")
    tokens = span_tokens(tokenizer, profile.family)
    spans = [image_span_text(entry, profile, tokens) for entry in meta.images]
    turns = expand_placeholders(meta.conversations, meta.image_names, spans)
    rendered = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=False)
    try:
        enc = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as exc:
        raise TokenizeError(
            f"sample {meta.key}: the tokenizer gives no offsets (a slow tokenizer); "
            "labels need a fast tokenizer (tokenizer.json)"
        ) from exc
    input_ids = [int(t) for t in enc["input_ids"]]
    offsets = [(int(a), int(b)) for a, b in enc["offset_mapping"]]
    every = bool(profile.family.non_thinking_prefix)  # a hybrid thinking family
    ranges = _assistant_ranges(meta.key, tokenizer, turns, rendered, every)
    extra = eos_target_id(tokenizer) if rule == "official" else None
    labels = _labels(ranges, input_ids, offsets, end_of_turn_id(tokenizer), extra)
    expected = [n for entry in meta.images for n in subimage_query_counts(entry, profile)]
    query_id = tokenizer.convert_tokens_to_ids(tokens.query)
    image_spans = _query_runs(input_ids, query_id)
    if [b - a for a, b in image_spans] != expected:
        raise TokenizeError(
            f"sample {meta.key}: the image token {tokens.query!r} forms runs of "
            f"{[b - a for a, b in image_spans]} tokens, its layouts need {expected}; "
            "the text itself probably contains that token -- remove it from the record"
        )
    return TokenizedSample(meta.key, input_ids, labels, image_spans)


def _query_runs(input_ids: Sequence[int], query_id: int) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    start = None
    for i, tid in enumerate(input_ids):
        if tid == query_id:
            if start is None:
                start = i
        elif start is not None:
            runs.append((start, i))
            start = None
    if start is not None:
        runs.append((start, len(input_ids)))
    return runs


def _assistant_ranges(
    key: str,
    tokenizer: Any,
    turns: Sequence[dict[str, str]],
    rendered: str,
    skip_every_empty_think: bool = False,
) -> list[tuple[int, int]]:
    """Character ranges ``[start, end)`` of every assistant turn's answer in ``rendered``.

    Exact method: render again with each assistant content replaced by a unique marker, cut
    at the markers, and put the contents back; when that rebuilds ``rendered`` exactly, the
    template wrote the contents verbatim and the ranges are known. Otherwise the template
    rewrote a content (a thinking template moves ``<think>R</think>`` into its own block and
    strips newlines; another one trims), and each assistant turn's range is its whole region
    from the end of its role header (``<|im_start|>assistant\n``) to its end-of-turn token,
    which is what the official code labels; without such headers, each content (or, failing
    that, the content stripped) is searched in order. In both cases an empty reasoning block
    (:data:`EMPTY_THINK`) that opens the last answer is template text and left out; with
    ``skip_every_empty_think`` (a family with a ``non_thinking_prefix``), an empty block
    ``<think>\\s*</think>\\s*`` that opens *any* answer is, as ms-swift's ``ignore_empty_think``.
    """
    assistant = [n for n, turn in enumerate(turns) if turn["role"] == "assistant"]
    markers = [f"\x00mvkit-assistant-{n}\x00" for n in assistant]
    marked = [dict(turn) for turn in turns]
    for n, marker in zip(assistant, markers, strict=True):
        marked[n]["content"] = marker
    text = tokenizer.apply_chat_template(marked, tokenize=False, add_generation_prompt=False)
    try:
        pieces = split_at_markers(text, markers)
    except ValueError:
        pieces = None
    ranges: list[tuple[int, int]] | None = None
    if pieces is not None:
        found: list[tuple[int, int]] = []
        rebuilt = pieces[0]
        for n, piece in zip(assistant, pieces[1:], strict=True):
            found.append((len(rebuilt), len(rebuilt) + len(turns[n]["content"])))
            rebuilt += turns[n]["content"] + piece
        if rebuilt == rendered:
            ranges = found
    if ranges is None:
        ranges = _header_regions(rendered, len(assistant))
    if ranges is None:
        ranges = _search_contents(key, turns, rendered)
    if skip_every_empty_think:
        ranges = [(min(empty_think_end(rendered, a), b), b) for a, b in ranges]
    elif ranges:
        start, end = ranges[-1]
        if rendered.startswith(EMPTY_THINK, start):
            ranges[-1] = (min(start + len(EMPTY_THINK), end), end)
    return ranges


def _header_regions(rendered: str, count: int) -> list[tuple[int, int]] | None:
    """``[end of "<|im_start|>assistant\n", start of the next "<|im_end|>")`` of every
    assistant turn in ``rendered``; None unless there are exactly ``count`` of them."""
    header = f"{START_OF_TURN}assistant\n"
    regions: list[tuple[int, int]] = []
    pos = rendered.find(header)
    while pos >= 0:
        start = pos + len(header)
        end = rendered.find(END_OF_TURN, start)
        if end < 0:
            return None
        regions.append((start, end))
        pos = rendered.find(header, end)
    return regions if len(regions) == count else None


def _search_contents(
    key: str, turns: Sequence[dict[str, str]], rendered: str
) -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    cursor = 0
    for n, turn in enumerate(turns):
        content = turn["content"]
        pos = rendered.find(content, cursor)
        if pos < 0:  # templates that trim content (``| trim``) write it stripped
            content = content.strip()
            pos = rendered.find(content, cursor)
        if pos < 0:
            if turn["role"] == "assistant":
                raise TokenizeError(
                    f"sample {key}: assistant turn {n} is not written verbatim by the chat "
                    "template, so its label tokens cannot be located"
                )
            continue
        if turn["role"] == "assistant":
            ranges.append((pos, pos + len(content)))
        cursor = pos + len(content)
    return ranges


def _labels(
    ranges: Sequence[tuple[int, int]],
    input_ids: Sequence[int],
    offsets: Sequence[tuple[int, int]],
    eot_id: int,
    extra_target: int | None = None,
) -> list[int]:
    """Unshifted labels: tokens starting in each range, then the first end-of-turn token
    (and, with ``extra_target``, that id at the position after it).

    Label rule ``"mvkit"`` (unshifted, aligned with ``input_ids``; ``-100`` = no loss): the
    tokens of every assistant turn's answer plus the end-of-turn token (``<|im_end|>``, else
    the tokenizer's eos) that closes the turn; everything else -- system and user turns, role
    headers and the newline after them, template newlines, an empty reasoning block the
    template adds, image spans in user turns -- is ``-100``. These are the tokens the official
    MiniCPM-V fine-tuning code (``finetune/dataset.py``, ``conversation_to_ids_qwen2``:
    ``context[st : end_idx + 1] = 0`` with ``st = assistant_idx + 2 (+ 4)``) supervises.

    Label rule ``"official"`` (``extra_target`` set, :data:`LABEL_RULES`): also
    ``labels[e + 1] = extra_target`` after each assistant end-of-turn token ``e`` that has a
    following token: the official code's target for the logits at ``<|im_end|>`` is eos, not
    the template's newline. The 2.6 adapter shifts these labels left by one, as the official
    code hands them to its loss; the native loss shifts inside
    :func:`mvtrain.model.adapters.token_loss_sum`.
    """
    labels = [IGNORE_INDEX] * len(input_ids)
    t = 0
    for i, (start, end) in enumerate(ranges):
        limit = ranges[i + 1][0] if i + 1 < len(ranges) else None
        while t < len(offsets) and offsets[t][0] < start:
            t += 1
        while t < len(offsets) and offsets[t][0] < end:
            if offsets[t][1] > offsets[t][0]:
                labels[t] = input_ids[t]
            t += 1
        while t < len(offsets) and (limit is None or offsets[t][0] < limit):
            t += 1
            if input_ids[t - 1] == eot_id:
                labels[t - 1] = eot_id
                if extra_target is not None and t < len(input_ids):
                    labels[t] = extra_target
                break
    return labels
