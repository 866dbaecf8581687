"""Counting a sample's text tokens: exact with a tokenizer, a documented estimate without.

A sample's length is ``num_text_tokens + sum(num_image_tokens)``. The image part comes from
the slice layout (``mvshards.layout.num_image_tokens``); this module counts the rest: every
token of the chat-templated conversation *outside* the image spans, including the template's
role markers and the newlines the placeholder rules add around spans.

* :class:`HFTokenCounter` (``--tokenizer PATH``): exact. See its docstring for why.
* :class:`EstimateTokenCounter` (no tokenizer): an estimate that is an upper bound for the
  profile's tokenizer family (byte-level BPE: at most one token per byte), flagged
  ``exact = False`` so the shard says ``token_count_exact: false``; everything computed from
  it is labelled "estimated, upper bound" (build summary, ``mvprep stats``, ``inspect``).
  The trainer tokenizes every sample anyway and uses its own exact length.

Workers call :func:`make_token_counter` once per process; it caches the counter.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from mvprep.records import RecordError
from mvshards.conversation import expand_placeholders, image_markers, split_at_markers
from mvshards.profiles import DEFAULT_PROFILE, get_profile

CHAT_TEMPLATE_ERROR = "chat template error"
"""Reject reason when the tokenizer's chat template refuses a record's conversation."""

IMAGE_SPAN_TOKENS = ("<image>", "</image>", "<slice>", "</slice>", "<image_id>", "</image_id>")
"""Tokens that open and close every image span; they must be special (added) tokens."""


class TokenizerError(Exception):
    """The tokenizer folder cannot be used for exact counts (one line, with the fix)."""


class TokenCounter(Protocol):
    """Counts the text tokens of one sample (image spans excluded)."""

    exact: bool
    """True when the count equals what the trainer's tokenizer produces."""

    def count_text_tokens(
        self, conversations: Sequence[dict[str, str]], image_names: Sequence[str]
    ) -> int:
        """Tokens of the chat-templated sample outside its image spans.

        ``conversations`` are normalised turns with placeholders as written,
        ``image_names`` the placeholders of the sample's images in span order
        (``mvprep.records.Record.image_names``).
        """
        ...

    def info(self) -> dict[str, Any]:
        """What the manifest records about the counter (kind, path, fingerprint)."""
        ...


class HFTokenCounter:
    """Exact counts with a local Hugging Face tokenizer and its chat template.

    Method: expand each image placeholder (with the official rules, so the newlines added
    around spans are there) to a unique marker string, render the chat with
    ``apply_chat_template(..., tokenize=False)``, cut the rendered text at the markers,
    tokenize each piece with ``add_special_tokens=False`` and add up.

    Why this is exact: the trainer tokenizes the same rendered text with the real image
    spans in place of the markers, and every span begins and ends with a special token
    (``<image_id>``/``<image>`` ... ``</image>``/``</slice>``). A tokenizer extracts special
    (added) tokens *before* normalising, pre-tokenizing and applying BPE, and runs those on
    each stretch of text between them on its own. So no token ever spans a span boundary,
    and the text on either side of a span tokenizes exactly as it does alone. That holds
    when the boundary tokens are added tokens that do not swallow neighbouring whitespace
    (``lstrip``/``rstrip``/``single_word`` off), which the constructor checks.
    """

    exact = True

    def __init__(self, tokenizer_path: str | Path) -> None:
        path = Path(tokenizer_path)
        if not path.is_dir():
            raise TokenizerError(
                f"tokenizer folder {path} not found; --tokenizer takes a local Hugging Face "
                "tokenizer folder (the model's folder works)"
            )
        from transformers import AutoTokenizer

        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)
        except Exception as exc:  # any loader failure means the same to the user
            raise TokenizerError(f"cannot load a tokenizer from {path}: {exc}") from exc
        self.path = path
        if not getattr(self.tokenizer, "chat_template", None):
            raise TokenizerError(
                f"tokenizer at {path} has no chat template; exact counts need the model's "
                "template (chat_template.jinja or 'chat_template' in tokenizer_config.json)"
            )
        self._check_span_tokens()

    def _check_span_tokens(self) -> None:
        added = {t.content: t for t in self.tokenizer.added_tokens_decoder.values()}
        for text in IMAGE_SPAN_TOKENS:
            token = added.get(text)
            if token is None:
                raise TokenizerError(
                    f"tokenizer at {self.path} has no {text} token; it is not a MiniCPM-V "
                    "tokenizer (image spans are made of these special tokens)"
                )
            if token.lstrip or token.rstrip or token.single_word:
                raise TokenizerError(
                    f"tokenizer at {self.path}: {text} strips neighbouring whitespace or matches "
                    "single words only, so text next to an image would not count exactly"
                )

    def count_text_tokens(
        self, conversations: Sequence[dict[str, str]], image_names: Sequence[str]
    ) -> int:
        markers = image_markers(len(image_names))
        expanded = expand_placeholders(conversations, image_names, markers)
        try:
            rendered = self.tokenizer.apply_chat_template(
                expanded, tokenize=False, add_generation_prompt=False
            )
        except Exception as exc:  # jinja raises its own TemplateError types
            raise RecordError(
                CHAT_TEMPLATE_ERROR,
                f"the chat template of {self.path} refuses this conversation: {exc}",
            ) from exc
        pieces = split_at_markers(rendered, markers)
        encoded = self.tokenizer(pieces, add_special_tokens=False)["input_ids"]
        return sum(len(ids) for ids in encoded)

    def info(self) -> dict[str, Any]:
        digest = hashlib.sha256()
        for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            file = self.path / name
            if file.is_file():
                digest.update(name.encode() + b"\0" + file.read_bytes())
        return {"kind": "hf", "path": str(self.path), "sha256": digest.hexdigest()}


class EstimateTokenCounter:
    """A tokenizer-free upper bound of the text tokens (``exact = False``).

    MiniCPM-V's language models (the 2.6 family: Qwen2; the 4.6 family: Qwen3) use byte-level
    BPE tokenizers, and every token of a byte-level BPE stands for at least one byte of
    (NFC-normalised) UTF-8 text, while special tokens (``<|im_start|>``, ``<|im_end|>``) are
    one token each. So, with image placeholders expanded by the official rules and the image
    spans removed, the chat-templated text has at most

    ``per turn: 2 + bytes(role + "\\n" + content) + 1``  (ChatML:
    ``<|im_start|>role\\n ... <|im_end|>\\n``)

    plus what the profile's real template may add: the 2.6 family's default system prompt
    (``<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n``, 38) and, for a family
    with an empty thinking block (4.6, ``<think>\\n\\n</think>\\n\\n``; see
    :mod:`mvshards.think_block`), per assistant turn: 19 when its content has no ``</think>``
    (``--think-block never``, or an unclosed ``<think>``: a Qwen3-style thinking template writes
    the block itself before the answers after the last user turn), else 4 (with
    ``--think-block auto`` the block is in the content already and counted as its bytes; such a
    template rewrites ``<think>R</think>A`` as ``<think>\\nR\\n</think>\\n\\nA``, at most 4 bytes
    more, 11 when no ``<think>`` opens it, and drops what it strips). That holds for any text
    in any language, and for any byte-level BPE vocabulary, however small.

    Margin, measured on the demo set (``python scripts/estimate_margin.py``: its 55 valid
    records, exact counts from the tiny test tokenizer ``mvshards.tiny_tokenizer``, a byte-level
    BPE with only ~770 merges, so a *weak* compressor; the test suite checks the bound on the
    demo and test sets and on random conversations):

    ========  ========================  ==========================================
    profile   text tokens: mean / max   whole sample (text + image): mean / max
    ========  ========================  ==========================================
    4.6       2.09x / 2.91x             1.33x / 2.55x (1.15x / 2.55x for 4.6-4x)
    2.6       2.38x / 3.77x             1.43x / 3.41x
    ========  ========================  ==========================================

    (the 2.6 bound also counts the default system prompt; the tiny template has none, so
    the 2.6 numbers there overstate its margin by 38 tokens a sample). Against a real
    150k-vocabulary tokenizer, which packs about 4 bytes of English (about 1.5 of Chinese)
    into a token, the text part is 2-4x the real count; the image tokens, the bulk of most
    samples, are exact either way, and the largest whole-sample ratios are text-only samples.
    For exact counts: ``mvprep build --tokenizer PATH``, or afterwards
    ``mvprep stats DIR --tokenizer PATH`` (or ``--lengths`` with a trainer run's cache).
    """

    exact = False
    TURN_SPECIALS = 2
    """``<|im_start|>`` and ``<|im_end|>``."""
    TURN_TAIL_BYTES = 1
    """The newline after ``<|im_end|>``."""
    DEFAULT_SYSTEM_PROMPT = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    THINK_REWRITE_BYTES = 4
    """What a thinking template may add to a content with ``</think>``: the newlines of
    ``<think>\\n`` + R + ``\\n</think>\\n\\n``."""

    def __init__(self, profile: str | None = None) -> None:
        family = get_profile(profile or DEFAULT_PROFILE).family
        self.profile = profile or DEFAULT_PROFILE
        self.extra_per_sample = (
            self.TURN_SPECIALS + utf8_bytes("system\nYou are a helpful assistant.") + 1
            if family.name == "2.6"
            else 0
        )
        self.think_block = family.non_thinking_prefix
        self.extra_per_answer = utf8_bytes(self.think_block)
        """The most an answer's think block can add (:meth:`_answer_margin`)."""

    def _answer_margin(self, content: str) -> int:
        """Bytes a thinking template may add to an answer (see the class doc)."""
        if not self.think_block:
            return 0
        if "</think>" not in content:
            return self.extra_per_answer
        opened = "<think>" in content.split("</think>", 1)[0]
        return self.THINK_REWRITE_BYTES + (0 if opened else utf8_bytes("<think>"))

    def count_text_tokens(
        self, conversations: Sequence[dict[str, str]], image_names: Sequence[str]
    ) -> int:
        markers = image_markers(len(image_names))
        expanded = expand_placeholders(conversations, image_names, markers)
        total = self.extra_per_sample
        for turn in expanded:
            text = turn["content"]
            for marker in markers:
                text = text.replace(marker, "")
            total += self.TURN_SPECIALS + utf8_bytes(f"{turn['role']}\n{text}")
            total += self.TURN_TAIL_BYTES
            if turn["role"] == "assistant":
                total += self._answer_margin(text)
        return total

    def info(self) -> dict[str, Any]:
        return {
            "kind": "estimate",
            "bound": "upper",
            "rule": "per turn 3 + utf8_bytes(role + newline + content); "
            f"+{self.extra_per_sample} per sample, +{self.extra_per_answer} per answer "
            f"(+{self.THINK_REWRITE_BYTES if self.think_block else 0} with </think>) "
            f"({self.profile})",
        }


ESTIMATE_LABEL = "estimated, upper bound"
"""How output computed from estimated counts is labelled."""


def utf8_bytes(text: str) -> int:
    """UTF-8 bytes of ``text``, or of its NFC form when that is longer (tokenizers of the
    family normalise to NFC first): a bound on its byte-level BPE tokens."""
    raw = len(text.encode("utf-8", "surrogatepass"))
    if text.isascii():
        return raw
    nfc = unicodedata.normalize("NFC", text)
    return max(raw, len(nfc.encode("utf-8", "surrogatepass")))


def estimate_text_tokens(text: str) -> int:
    """The bound on the tokens of ``text`` alone: its UTF-8 bytes (see
    :class:`EstimateTokenCounter`)."""
    return utf8_bytes(text)


_COUNTERS: dict[tuple[str | None, str | None], TokenCounter] = {}


def make_token_counter(
    tokenizer_path: str | Path | None, profile: str | None = None
) -> TokenCounter:
    """The counter for ``tokenizer_path`` (None: the estimate for ``profile``'s tokenizer
    family, default the default profile), built once per process."""
    path = None if tokenizer_path is None else str(Path(tokenizer_path).resolve())
    key = (path, None if path is not None else (profile or DEFAULT_PROFILE))
    counter = _COUNTERS.get(key)
    if counter is None:
        counter = EstimateTokenCounter(profile) if path is None else HFTokenCounter(path)
        _COUNTERS[key] = counter
    return counter


def token_counter_fingerprint(tokenizer_path: str | Path) -> str:
    """:func:`mvshards.lengths_cache.tokenizer_fingerprint` of the ``--tokenizer`` the exact
    counts come from (loaded once per process, as the counter does)."""
    from mvshards.lengths_cache import tokenizer_fingerprint

    counter = make_token_counter(tokenizer_path)
    return tokenizer_fingerprint(counter.tokenizer)  # type: ignore[attr-defined]
