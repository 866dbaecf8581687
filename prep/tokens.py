"""Counting a sample's text tokens: exact with a tokenizer, a documented estimate without.

A sample's length is ``num_text_tokens + sum(num_image_tokens)``. The image part comes from
the slice layout (``mvshards.layout.num_image_tokens``); this module counts the rest: every
token of the chat-templated conversation *outside* the image spans, including the template's
role markers and the newlines the placeholder rules add around spans.

* :class:`HFTokenCounter` (``--tokenizer PATH``): exact. See its docstring for why.
* :class:`EstimateTokenCounter` (no tokenizer): an estimate, flagged ``exact = False`` so
  the shard says ``token_count_exact: false``; the trainer tokenizes every sample anyway
  and uses its own exact length.

Workers call :func:`make_token_counter` once per process; it caches the counter.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from mvprep.records import RecordError
from mvshards.conversation import expand_placeholders, image_markers, split_at_markers

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
    """A tokenizer-free estimate of the text tokens (``exact = False``).

    Rule, per turn of the conversation with image placeholders expanded by the official
    rules and the image spans then removed:

    ``TURN_OVERHEAD + ceil(ascii_chars / 4) + non_ascii_chars``

    * ``TURN_OVERHEAD = 5``: a Qwen-style template wraps each turn as
      ``<|im_start|>role\\n ... <|im_end|>\\n`` (start, role, newline, end, newline).
    * about 4 ASCII characters per token: the usual rate of English text under a 150k
      byte-level BPE (code and digits run denser, so this undercounts them).
    * one token per non-ASCII character: about right for Chinese and Japanese; generous
      for accented Latin text.

    A system prompt the real template may add is not counted. Use it for planning only: the
    trainer tokenizes every sample and works with the exact length.
    """

    exact = False
    TURN_OVERHEAD = 5
    ASCII_CHARS_PER_TOKEN = 4

    def count_text_tokens(
        self, conversations: Sequence[dict[str, str]], image_names: Sequence[str]
    ) -> int:
        markers = image_markers(len(image_names))
        expanded = expand_placeholders(conversations, image_names, markers)
        total = 0
        for turn in expanded:
            text = turn["content"]
            for marker in markers:
                text = text.replace(marker, "")
            total += self.TURN_OVERHEAD + estimate_text_tokens(text)
        return total

    def info(self) -> dict[str, Any]:
        return {
            "kind": "estimate",
            "rule": "per turn 5 + ceil(ascii_chars / 4) + non_ascii_chars",
        }


def estimate_text_tokens(text: str) -> int:
    """``ceil(ascii_chars / 4) + non_ascii_chars`` (see :class:`EstimateTokenCounter`)."""
    ascii_chars = len(text.encode("ascii", "ignore"))
    non_ascii = len(text) - ascii_chars
    return math.ceil(ascii_chars / EstimateTokenCounter.ASCII_CHARS_PER_TOKEN) + non_ascii


_COUNTERS: dict[str | None, TokenCounter] = {}


def make_token_counter(tokenizer_path: str | Path | None) -> TokenCounter:
    """The counter for ``tokenizer_path`` (None: the estimate), built once per process."""
    key = None if tokenizer_path is None else str(Path(tokenizer_path).resolve())
    counter = _COUNTERS.get(key)
    if counter is None:
        counter = EstimateTokenCounter() if key is None else HFTokenCounter(key)
        _COUNTERS[key] = counter
    return counter
