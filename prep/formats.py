"""Record shapes with ``<image>`` tags: ``messages`` and ShareGPT, -> the MiniCPM-V form.

* ``messages`` (ms-swift, LLaMA-Factory, OpenAI style)::

      {"messages": [{"role": "system"|"user"|"assistant", "content": ...}], "images": [...]}

  ``content`` is a string, or a list of parts: ``{"type": "text", "text": str}``,
  ``{"type": "image", "image": IMAGE}`` (also ``"path"``/``"url"`` for ``"image"``) and
  ``{"type": "image_url", "image_url": {"url": IMAGE}}``. Text parts are joined with
  nothing between them, an image part stands where its ``<image>`` would.
* ShareGPT (LLaMA-Factory): ``{"conversations": [{"from": "human"|"gpt"|"system",
  "value": str}], "images": [...]}`` (``role``/``content`` turns work too).

Both may have a top-level ``"system": str`` (LLaMA-Factory), kept as a first system turn.
An ``IMAGE`` is a path (relative to the data file's folder), ``{"path": ...}``,
``{"bytes": ...}`` (base64 in JSON), or a ``data:...;base64,`` URL.

Images: the n-th ``<image>`` tag in the text (turn order, then position) is ``images[n]``;
their numbers must be equal ("image count mismatch" otherwise). An image part without data
(``{"type": "image"}``, as Hugging Face chat datasets write it next to an ``images``
column) counts like a tag; with no ``images`` to take from it is a reject ("missing image
data"). An image part with data is its own image, in its place.

The result is exactly the record the MiniCPM-V form gives: one image whose tag is in the
first user turn is named ``<image>`` (``"image": path``); otherwise the tags become
``<image_00>``, ``<image_01>``, ... in order (``"image": {"<image_00>": path, ...}``). So the
same record in any shape gives the same sample.
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from typing import Any

from mvprep.records import (
    IMAGE_COUNT_MISMATCH,
    MALFORMED,
    MISSING_IMAGE_DATA,
    NO_CONVERSATIONS,
    PLACEHOLDER_WITHOUT_IMAGE,
    RecordError,
    Shape,
    check_reserved_tokens,
    check_turns,
    first_dialogue_turn,
    image_ref,
    json_type_name,
    turn_role,
)
from mvshards.conversation import MULTI_IMAGE_PATTERN, SINGLE_IMAGE_NAME

TAG = SINGLE_IMAGE_NAME
_TAG_PATTERN = re.compile(re.escape(TAG))


@dataclass(frozen=True)
class _ImagePart:
    """An image content part: ``value`` its data (None: the next entry of ``images``)."""

    value: Any
    loc: str
    index: Any = None
    """The part's own ``index`` (Hugging Face chat datasets), checked against its order."""


Segment = str | _ImagePart


def normalize_tagged(
    index: int, raw: dict[str, Any], shape: Shape, where: str
) -> tuple[list[dict[str, str]], list[tuple[str, str]], dict[str, bytes]]:
    """``(conversations, images, embedded)`` of a ``messages`` or ShareGPT record, as
    :class:`mvprep.records.Record` holds them; raise :class:`RecordError`."""
    key = "messages" if shape == "messages" else "conversations"
    turns = _turns(raw, key, where)
    listed = _listed_images(raw.get("images"), where)

    tags = sum(s.count(TAG) for _, segs in turns for s in segs if isinstance(s, str))
    slots = [s for _, segs in turns for s in segs if isinstance(s, _ImagePart) and s.value is None]
    if tags + len(slots) != len(listed):
        if slots and not listed:
            raise RecordError(
                MISSING_IMAGE_DATA,
                f"{where}: {slots[0].loc} is an image part with no image data and the record "
                "has no 'images'; give the part an image (path or bytes) or add 'images'",
            )
        parts = f" and {len(slots)} image parts without data" if slots else ""
        raise RecordError(
            IMAGE_COUNT_MISMATCH,
            f"{where} has {tags} {TAG} tags{parts} but {len(listed)} entries in 'images'; "
            f"the n-th {TAG} is the n-th image, so their numbers must be equal",
        )

    embedded: dict[str, bytes] = {}
    labels: list[str] = []
    conversations: list[dict[str, str]] = []
    taken = 0

    def take_listed() -> str:
        nonlocal taken
        label = image_ref(listed[taken], f"images[{taken}]", index, where, embedded)
        taken += 1
        return label

    for role, segments in turns:
        pieces: list[str] = []
        for seg in segments:
            if isinstance(seg, str):
                for n, text in enumerate(seg.split(TAG)):
                    if n:
                        labels.append(take_listed())
                        pieces.append(TAG)
                    pieces.append(text)
                continue
            if seg.value is None:
                if isinstance(seg.index, int) and seg.index != taken:
                    raise RecordError(
                        MALFORMED,
                        f"{where}: {seg.loc} has index {seg.index} but is image {taken} in "
                        "order; image parts take the 'images' entries in order",
                    )
                labels.append(take_listed())
            else:
                labels.append(image_ref(seg.value, seg.loc, index, where, embedded))
            pieces.append(TAG)
        conversations.append({"role": role, "content": "".join(pieces)})

    check_turns(conversations, where)
    check_reserved_tokens(conversations, where)
    for i, turn in enumerate(conversations):
        stray = MULTI_IMAGE_PATTERN.search(turn["content"])
        if stray:
            raise RecordError(
                PLACEHOLDER_WITHOUT_IMAGE,
                f"{where}: turn {i} has {stray.group()}; in this format images are marked "
                f"with {TAG} tags (or image parts), the n-th tag being the n-th image",
            )
        if turn["role"] == "system" and TAG in turn["content"]:
            raise RecordError(
                MALFORMED,
                f"{where}: the system turn holds an image; put images in user turns",
            )
    return conversations, _name_images(conversations, labels), embedded


def _name_images(conversations: list[dict[str, str]], labels: list[str]) -> list[tuple[str, str]]:
    """Name the images as the MiniCPM-V form would (renaming the tags in place)."""
    if not labels:
        return []
    first = first_dialogue_turn(conversations)
    if len(labels) == 1 and TAG in conversations[first]["content"]:
        return [(SINGLE_IMAGE_NAME, labels[0])]
    names = [f"<image_{k:02d}>" for k in range(len(labels))]
    counter = iter(names)
    for turn in conversations:
        turn["content"] = _TAG_PATTERN.sub(lambda _: next(counter), turn["content"])
    return list(zip(names, labels, strict=True))


def _turns(raw: dict[str, Any], key: str, where: str) -> list[tuple[str, list[Segment]]]:
    value = raw.get(key)
    if isinstance(value, str) and value.lstrip().startswith("["):
        with contextlib.suppress(json.JSONDecodeError):  # a column holding JSON text
            value = json.loads(value)
    if value is None or value == []:
        raise RecordError(
            NO_CONVERSATIONS,
            f"{where} has no {key!r}; add a list of user/assistant turns",
        )
    if not isinstance(value, list):
        raise RecordError(
            MALFORMED, f"{where}: {key!r} is a {json_type_name(value)}, not a list of turns"
        )
    turns: list[tuple[str, list[Segment]]] = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise RecordError(MALFORMED, f"{where}: turn {i} is not an object")
        if turn.get("role") is not None or "content" in turn:
            role_key, content_key = "role", "content"
        else:
            role_key, content_key = "from", "value"
        if turn.get(role_key) is None:
            raise RecordError(
                MALFORMED,
                f"{where}: turn {i} has no {role_key!r}; give each turn a role and a content",
            )
        role = turn_role(turn[role_key], role_key, i, where)
        content = turn.get(content_key)
        if isinstance(content, str):
            segments: list[Segment] = [content]
        elif isinstance(content, list):
            loc = f"{key}[{i}].content"
            segments = [_part(part, f"{loc}[{p}]", where) for p, part in enumerate(content)]
        else:
            raise RecordError(
                MALFORMED,
                f"{where}: turn {i} {content_key!r} is "
                f"{'missing' if content is None else 'a ' + json_type_name(content)}, "
                "not a string or a list of parts",
            )
        turns.append((role, segments))
    system = raw.get("system")
    if system is not None and system != "":
        if not isinstance(system, str):
            raise RecordError(
                MALFORMED, f"{where}: 'system' is a {json_type_name(system)}, not a string"
            )
        if turns and turns[0][0] == "system":
            raise RecordError(
                MALFORMED, f"{where} has a 'system' field and a system turn; keep one of them"
            )
        turns.insert(0, ("system", [system]))
    return turns


def _part(part: Any, loc: str, where: str) -> Segment:
    if isinstance(part, str):
        return part
    if not isinstance(part, dict):
        raise RecordError(
            MALFORMED, f"{where}: {loc} is a {json_type_name(part)}, not a content part"
        )
    kind = part.get("type")
    if kind is None:
        kind = "text" if isinstance(part.get("text"), str) else "image"
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise RecordError(MALFORMED, f"{where}: {loc} is a text part without a 'text' string")
        return text
    if kind == "image_url":
        value = part.get("image_url")
        if isinstance(value, dict):
            value = value.get("url")
        return _ImagePart(value, f"{loc}.image_url", part.get("index"))
    if kind == "image":
        for name in ("image", "path", "url"):
            if part.get(name) is not None:
                return _ImagePart(part[name], f"{loc}.{name}", part.get("index"))
        if part.get("bytes") is not None:
            return _ImagePart({"bytes": part["bytes"]}, f"{loc}.bytes", part.get("index"))
        return _ImagePart(None, loc, part.get("index"))
    raise RecordError(
        MALFORMED,
        f"{where}: {loc} has type {kind!r}; accepted content parts: text, image, image_url",
    )


def _listed_images(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, str | dict):
        return [value]
    if not isinstance(value, list):
        raise RecordError(
            MALFORMED, f"{where}: 'images' is a {json_type_name(value)}, not a list of images"
        )
    return value
