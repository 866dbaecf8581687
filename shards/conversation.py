"""Image placeholders in a conversation: where each image's token span goes.

Both stages use this module, so the offline token count and the trainer's tokenisation
put image spans in exactly the same places. It reproduces the placeholder handling of the
official MiniCPM-V fine-tuning code (``finetune/dataset.py``, ``preprocess``):

* **Single image** (the record's ``image`` is one path; its name is ``<image>``): every
  ``<image>`` in the *first* turn (the first after a system prompt) is replaced by the
  image's span; when that turn has no ``<image>``, ``span + "\\n"`` is prepended to it.
  Other turns are left alone.
* **Several images** (``image`` is a dict ``{"<image_00>": path, ...}``): in *every* turn
  the text is cut with ``re.split(r"(<image_\\d+>)", content)``, each placeholder part is
  replaced by its image's span, and the parts are joined again with ``"\\n"``. The join
  puts a newline on both sides of every span, and keeps empty parts: ``"<image_00>x"``
  becomes ``"\\n" + span + "\\nx"`` and ``"a<image_00>"`` becomes ``"a\\n" + span + "\\n"``.
  That is what the official code feeds the model, so it is reproduced exactly, quirks
  included. A turn without placeholders is unchanged (one part, nothing to join).

Which records are acceptable (one placeholder per image, no stray placeholders) is decided
in ``mvprep.records``; this module only performs the substitution. Pure Python, no torch.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence

SINGLE_IMAGE_NAME = "<image>"
"""The placeholder (and name) of the only image of a single-image record."""

MULTI_IMAGE_PATTERN = re.compile(r"<image_\d+>")
"""A multi-image placeholder; the official code splits on ``(<image_\\d+>)``."""

_SPLIT_PATTERN = re.compile(r"(<image_\d+>)")


def is_multi_image_name(name: str) -> bool:
    """True when ``name`` is a whole ``<image_NN>`` placeholder."""
    return MULTI_IMAGE_PATTERN.fullmatch(name) is not None


def expand_placeholders(
    conversations: Sequence[dict[str, str]],
    image_names: Sequence[str],
    placeholder_texts: Sequence[str],
) -> list[dict[str, str]]:
    """Return a deep copy of ``conversations`` with every image's placeholder replaced.

    ``image_names[i]`` is the placeholder of image ``i`` (``"<image>"`` for the single-image
    form, ``"<image_NN>"`` otherwise) and ``placeholder_texts[i]`` the text that replaces it
    (the real token span, or a marker string for counting). With no images the copy is
    returned unchanged. Raises ``ValueError`` for a multi-image placeholder in the text
    that names no image (the official code raises there too); ``mvprep.records`` rejects
    such records before they get here.
    """
    if len(image_names) != len(placeholder_texts):
        raise ValueError(
            f"{len(image_names)} image names but {len(placeholder_texts)} placeholder texts"
        )
    out = copy.deepcopy(list(conversations))
    if not image_names:
        return out
    if len(image_names) == 1 and image_names[0] == SINGLE_IMAGE_NAME:
        text = placeholder_texts[0]
        first = out[1] if len(out) > 1 and out[0].get("role") == "system" else out[0]
        if SINGLE_IMAGE_NAME in first["content"]:
            first["content"] = first["content"].replace(SINGLE_IMAGE_NAME, text)
        else:
            first["content"] = text + "\n" + first["content"]
        return out
    mapping = dict(zip(image_names, placeholder_texts, strict=True))
    for turn in out:
        parts = _SPLIT_PATTERN.split(turn["content"])
        # re.split with one capturing group puts the placeholders at the odd positions.
        for i in range(1, len(parts), 2):
            try:
                parts[i] = mapping[parts[i]]
            except KeyError:
                raise ValueError(f"placeholder {parts[i]} names no image of the sample") from None
        turn["content"] = "\n".join(parts)
    return out


def image_markers(count: int) -> list[str]:
    """``count`` distinct marker strings that stand in for image spans while counting.

    They contain NUL characters, which real text does not, and no whitespace, so chat
    templates that trim or inspect content leave them intact. ``split_at_markers`` checks
    that each one survives exactly once.
    """
    return [f"\x00mvkit-image-{i}\x00" for i in range(count)]


def split_at_markers(text: str, markers: Sequence[str]) -> list[str]:
    """Cut ``text`` at the markers; return the ``len(markers) + 1`` pieces between them.

    Raises ``ValueError`` unless every marker occurs exactly once (a template that drops or
    repeats a turn, or text that happens to contain a marker, would make counts wrong).
    """
    for marker in markers:
        n = text.count(marker)
        if n != 1:
            raise ValueError(f"image marker {marker!r} occurs {n} times in the rendered chat")
    if not markers:
        return [text]
    pattern = "|".join(re.escape(m) for m in markers)
    return re.split(pattern, text)
