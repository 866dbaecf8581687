"""The text that stands for one image in the LLM input: its placeholder span.

Shared by both stages: ``mvprep inspect`` shows it, the trainer tokenizes it. For an image
with layout ``tgt_sizes`` the span is ``<image>`` + one query token per (sub)image query +
``</image>``, then, when sliced, each row of slices as ``<slice>...</slice>`` cells with a
newline between rows, all prefixed with ``<image_id>k</image_id>`` when the image carries an
id. The query counts come from the profile (64 per (sub)image for 2.6, patches // 16 or // 4
for 4.6); the token strings from the model's tokenizer (:class:`SpanTokens`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mvshards.families import Family
from mvshards.profiles import Profile
from mvshards.schema import ImageEntry


@dataclass(frozen=True)
class SpanTokens:
    """The strings an image span is made of."""

    query: str
    """The token repeated once per LLM query position (the model scatters image features there)."""
    image_start: str = "<image>"
    image_end: str = "</image>"
    slice_start: str = "<slice>"
    slice_end: str = "</slice>"
    id_start: str = "<image_id>"
    id_end: str = "</image_id>"


def subimage_query_counts(entry: ImageEntry, profile: Profile) -> list[int]:
    """Query tokens of each (sub)image of one image: the source, then its slices."""
    return [profile.tokens_per_subimage(t) for t in entry.layout.tgt_sizes]


def image_span_text(entry: ImageEntry, profile: Profile, tokens: SpanTokens) -> str:
    """The exact text that replaces one image's placeholder."""
    layout = entry.layout
    counts = subimage_query_counts(entry, profile)
    text = tokens.image_start + tokens.query * counts[0] + tokens.image_end
    if layout.grid is not None:
        cols, rows = layout.grid
        slices = counts[1:]
        text += "\n".join(
            "".join(
                tokens.slice_start + tokens.query * n + tokens.slice_end
                for n in slices[r * cols : (r + 1) * cols]
            )
            for r in range(rows)
        )
    if entry.image_id is not None:
        text = f"{tokens.id_start}{entry.image_id}{tokens.id_end}" + text
    return text


def span_tokens(tokenizer: Any, family: Family) -> SpanTokens:
    """The span strings of ``family`` with this tokenizer: its named tokens when the family
    takes them from the tokenizer, else ``unk_token`` as the query and literal brackets."""
    if family.named_span_tokens:
        query = getattr(tokenizer, "image_token", None) or tokenizer.unk_token
        return SpanTokens(
            query=query,
            image_start=getattr(tokenizer, "image_start_token", None) or "<image>",
            image_end=getattr(tokenizer, "image_end_token", None) or "</image>",
            slice_start=getattr(tokenizer, "slice_start_token", None) or "<slice>",
            slice_end=getattr(tokenizer, "slice_end_token", None) or "</slice>",
            id_start=getattr(tokenizer, "image_id_start_token", None) or "<image_id>",
            id_end=getattr(tokenizer, "image_id_end_token", None) or "</image_id>",
        )
    return SpanTokens(query=tokenizer.unk_token)
