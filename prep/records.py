"""One input record -> a normalised :class:`Record`, or a :class:`RecordError` saying why not.

Accepted shapes (one dataset may mix them, even within one record's turns):

* MiniCPM-V fine-tuning format: ``{"id", "image", "conversations": [{"role", "content"}]}``
  with ``role`` ``user`` or ``assistant``; ``image`` is one path (a string) or a dict
  ``{"<image_00>": path, "<image_01>": path, ...}``.
* LLaVA style: turns ``{"from": "human"|"gpt", "value": str}``.

``id`` may be missing (the record's position is used) or a number (kept as its string).
A record without ``image`` (or with ``"image": null`` or ``{}``) is text-only and valid.

Role names: ``user``/``human`` -> user, ``assistant``/``gpt`` -> assistant. Anything else,
``system`` included, is rejected with reason "unknown role": the official fine-tuning code
asserts ``role in ["user", "assistant"]``, and silently dropping or merging a system
prompt would train on something other than what the file says. Fold a system prompt into
the first user turn to keep it.

Placeholder rules (the official ``finetune/dataset.py``; substitution itself lives in
``mvshards.conversation``):

* single image (``image`` a string, or a dict whose only key is ``<image>``): at most one
  ``<image>``, and only in the first turn; when there is none the image goes in front of
  the first turn (not an error). ``<image>`` twice, or in a later turn, is ambiguous.
* several images: every key is ``<image_NN>`` and occurs exactly once in the text; images
  are ordered by where their placeholder first appears (turn order, then position), which
  is the order their spans appear in the token sequence.
* ``<image>`` or ``<image_NN>`` in the text of a record that has no such image is rejected:
  the text would reach the tokenizer as a literal, and ``<image>`` is a special token.

Conversations: a non-empty list, first turn from the user, at least one assistant turn
(nothing to learn otherwise), every content a string, and no text that spells one of the
special tokens image spans are made of (``</image>``, ``<slice>``, ``<unk>``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mvshards.conversation import MULTI_IMAGE_PATTERN, SINGLE_IMAGE_NAME, is_multi_image_name

MALFORMED = "malformed record"
NO_CONVERSATIONS = "no conversations"
UNKNOWN_ROLE = "unknown role"
PLACEHOLDER_WITHOUT_IMAGE = "placeholder without image"
IMAGE_WITHOUT_PLACEHOLDER = "image without placeholder"
AMBIGUOUS_PLACEHOLDER = "ambiguous placeholder"
PATH_OUTSIDE_ROOT = "path outside data folder"
MISSING_IMAGE_PATH = "missing image path"
RESERVED_TOKEN = "reserved token in text"

RESERVED_TOKENS = ("</image>", "<slice>", "</slice>", "<image_id>", "</image_id>", "<unk>")
"""Special tokens that make up image spans (``<image>`` is the placeholder, checked apart).
Text containing one would be tokenized as part of an image span and break the trainer's
image bounds, so such records are rejected."""

ROLE_NAMES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}
"""Accepted role names (``role`` or LLaVA ``from``) and the role each one means."""


class RecordError(Exception):
    """A record that cannot become a sample.

    ``reason`` is a short category (the module constants above; rejects are grouped by it),
    ``str(error)`` the one-line detail that names the record and the fix.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class Record:
    """A valid input record, normalised.

    ``conversations`` holds ``{"role": "user"|"assistant", "content": str}`` turns with the
    placeholders as written (nothing prepended). ``images`` pairs each placeholder name with
    the image path as written in the file (relative to the data file's folder), in the order
    the images' spans appear; a single image is named ``<image>``.
    """

    index: int
    id: str
    conversations: list[dict[str, str]]
    images: list[tuple[str, str]] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def image_names(self) -> list[str]:
        return [name for name, _ in self.images]

    @property
    def image_paths(self) -> list[str]:
        return [path for _, path in self.images]


def json_type_name(value: Any) -> str:
    """The JSON name of a parsed value's type (``array``, ``string``, ``null``, ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    names = {dict: "object", list: "array", str: "string", int: "number", float: "number"}
    return names.get(type(value), type(value).__name__)


def describe(index: int, record_id: str | None = None) -> str:
    """How errors name a record: ``record 12 (id 'abc')`` or ``record 12``."""
    if record_id is None or record_id == str(index):
        return f"record {index}"
    return f"record {index} (id {record_id!r})"


def normalize_record(index: int, raw: Any) -> Record:
    """Check and normalise the raw record at position ``index``; raise :class:`RecordError`."""
    if not isinstance(raw, dict):
        raise RecordError(
            MALFORMED,
            f"{describe(index)} is a JSON {json_type_name(raw)}, not an object; "
            "each record must be an object with 'conversations'",
        )
    raw_id = raw.get("id")
    record_id = str(index) if raw_id is None else str(raw_id)
    where = describe(index, record_id)
    conversations = _normalize_conversations(raw.get("conversations"), where)
    _check_reserved_tokens(conversations, where)
    if "image" not in raw and raw.get("images") not in (None, [], {}):
        raise RecordError(
            MALFORMED,
            f"{where} has 'images' but no 'image'; this format names the field 'image' "
            '(one path, or a dict {"<image_00>": path, ...})',
        )
    images = _normalize_images(raw.get("image"), conversations, where)
    return Record(index=index, id=record_id, conversations=conversations, images=images, raw=raw)


def _normalize_conversations(value: Any, where: str) -> list[dict[str, str]]:
    if value is None or value == []:
        raise RecordError(
            NO_CONVERSATIONS,
            f"{where} has no 'conversations'; add a list of user/assistant turns",
        )
    if not isinstance(value, list):
        raise RecordError(
            MALFORMED,
            f"{where}: 'conversations' is a {json_type_name(value)}, not a list of turns",
        )
    turns: list[dict[str, str]] = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise RecordError(MALFORMED, f"{where}: turn {i} is not an object")
        if "role" in turn or "content" in turn:
            role_key, content_key = "role", "content"
        else:
            role_key, content_key = "from", "value"
        if role_key not in turn:
            raise RecordError(
                MALFORMED,
                f"{where}: turn {i} has no 'role' (or LLaVA 'from'); "
                "give each turn a role and a content",
            )
        name = turn[role_key]
        role = ROLE_NAMES.get(name) if isinstance(name, str) else None
        if role is None:
            raise RecordError(
                UNKNOWN_ROLE,
                f"{where}: turn {i} has {role_key} {name!r}; accepted: user/human, "
                "assistant/gpt (fold a system prompt into the first user turn)",
            )
        content = turn.get(content_key)
        if not isinstance(content, str):
            raise RecordError(
                MALFORMED,
                f"{where}: turn {i} {content_key!r} is "
                f"{'missing' if content is None else 'a ' + json_type_name(content)}, not a string",
            )
        turns.append({"role": role, "content": content})
    if turns[0]["role"] != "user":
        raise RecordError(
            MALFORMED,
            f"{where}: the first turn is the assistant's; conversations must start with the user",
        )
    if not any(t["role"] == "assistant" for t in turns):
        raise RecordError(
            NO_CONVERSATIONS,
            f"{where} has no assistant turn, so nothing to learn; add the answer or drop it",
        )
    return turns


def _normalize_images(
    value: Any, conversations: list[dict[str, str]], where: str
) -> list[tuple[str, str]]:
    if value is None or value == {}:
        _check_no_placeholders(conversations, where)
        return []
    if isinstance(value, str):
        return _single_image(_check_path(value, SINGLE_IMAGE_NAME, where), conversations, where)
    if not isinstance(value, dict):
        raise RecordError(
            MALFORMED,
            f"{where}: 'image' is a JSON {json_type_name(value)}; give one path or a dict "
            '{"<image_00>": path, ...} with <image_NN> placeholders in the text',
        )
    if list(value) == [SINGLE_IMAGE_NAME]:
        path = _check_path(value[SINGLE_IMAGE_NAME], SINGLE_IMAGE_NAME, where)
        return _single_image(path, conversations, where)
    for name in value:
        if not is_multi_image_name(name):
            raise RecordError(
                MALFORMED,
                f"{where}: image key {name!r} is not an <image_NN> placeholder; name the "
                "images <image_00>, <image_01>, ... and put those placeholders in the text",
            )
    paths = {name: _check_path(path, name, where) for name, path in value.items()}
    return _multi_image(paths, conversations, where)


def _check_path(path: Any, name: str, where: str) -> str:
    if not isinstance(path, str) or not path.strip():
        raise RecordError(
            MISSING_IMAGE_PATH,
            f"{where}: image {name} has path {path!r}; give the image file's path "
            "relative to the data file's folder",
        )
    return path


def _single_image(
    path: str, conversations: list[dict[str, str]], where: str
) -> list[tuple[str, str]]:
    for i, turn in enumerate(conversations):
        n = turn["content"].count(SINGLE_IMAGE_NAME)
        if i == 0 and n > 1:
            raise RecordError(
                AMBIGUOUS_PLACEHOLDER,
                f"{where}: <image> occurs {n} times in the first turn but the record has one "
                "image; keep one <image> (or use an image dict with <image_NN> names)",
            )
        if i > 0 and n:
            raise RecordError(
                AMBIGUOUS_PLACEHOLDER,
                f"{where}: <image> in turn {i}; a single image's placeholder must be in the "
                "first turn (or absent, and the image goes first)",
            )
        stray = MULTI_IMAGE_PATTERN.search(turn["content"])
        if stray:
            raise RecordError(
                PLACEHOLDER_WITHOUT_IMAGE,
                f"{where}: turn {i} has {stray.group()} but the record has a single image "
                "named <image>; give 'image' as a dict keyed by the <image_NN> names",
            )
    return [(SINGLE_IMAGE_NAME, path)]


def _multi_image(
    paths: dict[str, str], conversations: list[dict[str, str]], where: str
) -> list[tuple[str, str]]:
    order: list[str] = []
    for i, turn in enumerate(conversations):
        content = turn["content"]
        if SINGLE_IMAGE_NAME in content:
            raise RecordError(
                PLACEHOLDER_WITHOUT_IMAGE,
                f"{where}: turn {i} has <image> but the record's images are named "
                f"{', '.join(paths)}; use those placeholders",
            )
        for match in MULTI_IMAGE_PATTERN.finditer(content):
            name = match.group()
            if name not in paths:
                raise RecordError(
                    PLACEHOLDER_WITHOUT_IMAGE,
                    f"{where}: turn {i} has {name} but 'image' has no such key "
                    f"(keys: {', '.join(paths)}); add the image or remove the placeholder",
                )
            if name in order:
                raise RecordError(
                    AMBIGUOUS_PLACEHOLDER,
                    f"{where}: {name} occurs more than once; each image's placeholder must "
                    "appear exactly once",
                )
            order.append(name)
    missing = [name for name in paths if name not in order]
    if missing:
        raise RecordError(
            IMAGE_WITHOUT_PLACEHOLDER,
            f"{where}: image {missing[0]} has no placeholder in the text, so its place is "
            "ambiguous; put the placeholder where the image belongs",
        )
    return [(name, paths[name]) for name in order]


def _check_reserved_tokens(conversations: list[dict[str, str]], where: str) -> None:
    for i, turn in enumerate(conversations):
        for token in RESERVED_TOKENS:
            if token in turn["content"]:
                raise RecordError(
                    RESERVED_TOKEN,
                    f"{where}: turn {i} contains {token}, a special token of image spans; "
                    "remove it or write it differently",
                )


def _check_no_placeholders(conversations: list[dict[str, str]], where: str) -> None:
    for i, turn in enumerate(conversations):
        content = turn["content"]
        found = SINGLE_IMAGE_NAME if SINGLE_IMAGE_NAME in content else None
        match = MULTI_IMAGE_PATTERN.search(content)
        found = found or (match.group() if match else None)
        if found:
            raise RecordError(
                PLACEHOLDER_WITHOUT_IMAGE,
                f"{where}: turn {i} has {found} but the record has no 'image'; "
                "add the image or remove the placeholder",
            )


def resolve_image_path(root: Path, path: str, allow_outside_root: bool) -> Path:
    """The file an image path names: ``path`` relative to ``root`` (the data file's folder).

    Symlinks are resolved before the check, so a link inside the folder that points outside
    it counts as outside. An absolute path is accepted when it lies inside ``root``. Paths
    that end outside ``root`` raise :class:`RecordError` ("path outside data folder") unless
    ``allow_outside_root``. Returns the resolved path; whether the file exists is for the
    decoder to find out.
    """
    if not path or not path.strip():
        raise RecordError(MISSING_IMAGE_PATH, "empty image path; give the image file's path")
    try:
        base = Path(root).resolve()
        resolved = (base / path).resolve()  # an absolute path replaces base
    except (OSError, ValueError, RuntimeError) as exc:
        raise RecordError(MALFORMED, f"image path {path!r} cannot be resolved: {exc}") from exc
    if not allow_outside_root and not resolved.is_relative_to(base):
        raise RecordError(
            PATH_OUTSIDE_ROOT,
            f"image path {path!r} resolves to {resolved}, outside the data folder {base}; "
            "move the image under the data folder or pass --allow-outside-root to allow it",
        )
    return resolved
