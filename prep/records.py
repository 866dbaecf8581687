"""One input record -> a normalised :class:`Record`, or a :class:`RecordError` saying why not.

Accepted shapes (detected per record from its keys, or forced with ``input_format``, the
``--input-format`` of ``mvprep build``; one dataset may mix them):

* MiniCPM-V fine-tuning format: ``{"id", "image", "conversations": [{"role", "content"}]}``;
  ``image`` is one image (a path string) or a dict ``{"<image_00>": image, ...}``.
* LLaVA style: the same with turns ``{"from": "human"|"gpt", "value": str}``.
* ``messages`` + ``images`` (ms-swift, LLaMA-Factory, OpenAI style) and ShareGPT
  ``conversations`` + ``images``: see :mod:`mvprep.formats`. They end in exactly the
  ``Record`` the MiniCPM-V form of the same record gives.

An image (in ``image``, ``images`` or a content part) is a path relative to the data file's
folder, or ``{"path": ...}``, or ``{"bytes": ...}`` (base64 text in JSON; raw bytes in
Parquet/Arrow, carried as :class:`ImageBytes`). Bytes win over a path when both are given
(Hugging Face ``datasets`` Image structs carry both); the image's ``path`` in the sample is
then a label saying where the bytes came from (``<bytes:records[12].images[0]>``,
``<bytes:train.parquet[12].images[0]>``).

``id`` may be missing (the record's position is used) or a number (kept as its string).
A record without images is text-only and valid.

Channel (any shape): the first of the record's ``channel``, ``source`` and ``dataset``
fields that is a non-empty string (other values are skipped: a ``source`` object is not a
channel); none when there is none (``mvprep build --channel`` may then give one). It is
kept in the sample JSON and the index, and the trainer reports loss per channel.

Role names: ``user``/``human`` -> user, ``assistant``/``gpt`` -> assistant, ``system`` ->
system (only as the first turn: it is kept and rendered by the chat template). Anything
else is rejected with reason "unknown role".

Placeholder rules (the official ``finetune/dataset.py``; substitution itself lives in
``mvshards.conversation``):

* single image (``image`` a string, or a dict whose only key is ``<image>``): at most one
  ``<image>``, and only in the first non-system turn; when there is none the image goes in
  front of that turn (not an error). ``<image>`` twice, or in a later turn, is ambiguous.
* several images: every key is ``<image_NN>`` and occurs exactly once in the text; images
  are ordered by where their placeholder first appears (turn order, then position), which
  is the order their spans appear in the token sequence.
* ``<image>`` or ``<image_NN>`` in the text of a record that has no such image is rejected:
  the text would reach the tokenizer as a literal, and ``<image>`` is a special token.

Conversations: a non-empty list, an optional system turn first, then a user turn, at least
one assistant turn (nothing to learn otherwise), every content a string, and no text that
spells one of the special tokens image spans are made of (``</image>``, ``<slice>``, ...).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from mvshards.conversation import MULTI_IMAGE_PATTERN, SINGLE_IMAGE_NAME, is_multi_image_name
from mvshards.storage import Location, ObjectPath, is_url, location

MALFORMED = "malformed record"
NO_CONVERSATIONS = "no conversations"
UNKNOWN_ROLE = "unknown role"
PLACEHOLDER_WITHOUT_IMAGE = "placeholder without image"
IMAGE_WITHOUT_PLACEHOLDER = "image without placeholder"
AMBIGUOUS_PLACEHOLDER = "ambiguous placeholder"
PATH_OUTSIDE_ROOT = "path outside data folder"
MISSING_IMAGE_PATH = "missing image path"
RESERVED_TOKEN = "reserved token in text"
IMAGE_COUNT_MISMATCH = "image count mismatch"
MISSING_IMAGE_DATA = "missing image data"
WRONG_SHAPE = "not the --input-format shape"

CHANNEL_FIELDS = ("channel", "source", "dataset")
"""Record fields a channel is read from, first string wins (:func:`record_channel`)."""

InputFormat = Literal["auto", "minicpmv", "llava", "messages", "sharegpt", "parquet", "hf-disk"]
INPUT_FORMATS: tuple[str, ...] = get_args(InputFormat)
"""``--input-format`` values: ``auto`` (files and record shapes detected), a record shape
(``minicpmv``/``llava``: ``conversations`` + ``image``; ``messages``; ``sharegpt``), or a
container (``parquet``, ``hf-disk``: a ``datasets.save_to_disk`` folder) whose rows' shapes
are detected."""
Shape = Literal["minicpmv", "messages", "sharegpt"]

RESERVED_TOKENS = ("</image>", "<slice>", "</slice>", "<image_id>", "</image_id>", "<unk>")
"""Special tokens that make up image spans (``<image>`` is the placeholder, checked apart).
Text containing one would be tokenized as part of an image span and break the trainer's
image bounds, so such records are rejected."""

ROLE_NAMES = {
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "system": "system",
}
"""Accepted role names (``role`` or LLaVA ``from``) and the role each one means (a system
turn only as the first turn)."""


class ImageBytes(str):
    """Image bytes inside a raw record as a reader hands it over (Parquet/Arrow binary).

    The string value is a short label saying where the bytes came from
    (``<bytes:train.parquet[12].images[0]>``): what the sample's image ``path`` and a
    reject's stored record show, so both stay small JSON. ``data`` holds the bytes. Pickles
    as the plain label: a reject never carries the bytes between processes.
    """

    data: bytes

    def __new__(cls, label: str, data: bytes) -> ImageBytes:
        obj = super().__new__(cls, label)
        obj.data = data
        return obj

    def __reduce__(self) -> tuple[Any, ...]:
        return (str, (str(self),))


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
    placeholders as written (nothing prepended); a first ``system`` turn is kept.
    ``images`` pairs each placeholder name with the image path as written in the file
    (relative to the data file's folder), or for an image given as bytes the label of
    :attr:`embedded`, in the order the images' spans appear; a single image is named
    ``<image>``.
    """

    index: int
    id: str
    conversations: list[dict[str, str]]
    images: list[tuple[str, str]] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)
    embedded: dict[str, bytes] = field(default_factory=dict)
    """Images given as bytes: their label (the ``images`` path) -> the encoded bytes."""
    channel: str | None = None
    """The record's channel (:func:`record_channel`), None when it names none."""

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


def record_channel(raw: dict[str, Any]) -> str | None:
    """The first of ``raw``'s :data:`CHANNEL_FIELDS` that is a non-empty string, else None."""
    for name in CHANNEL_FIELDS:
        value = raw.get(name)
        if isinstance(value, str) and value:
            return value
    return None


def record_shape(raw: dict[str, Any], input_format: str = "auto") -> Shape:
    """The shape ``raw`` is read as: forced by a shape ``input_format``, else from its keys
    (``messages`` -> messages; ``conversations`` with an ``images`` list and no ``image``
    -> ShareGPT; anything else -> MiniCPM-V/LLaVA)."""
    if input_format in ("minicpmv", "llava"):
        return "minicpmv"
    if input_format in ("messages", "sharegpt"):
        return input_format  # type: ignore[return-value]
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"unknown input format {input_format!r}; use one of {INPUT_FORMATS}")
    if raw.get("messages") is not None and raw.get("conversations") is None:
        return "messages"  # (a table may have both columns, one of them null)
    if raw.get("images") not in (None, [], {}) and raw.get("image") in (None, "", {}):
        return "sharegpt"
    return "minicpmv"


def normalize_record(index: int, raw: Any, input_format: str = "auto") -> Record:
    """Check and normalise the raw record at position ``index``; raise :class:`RecordError`.

    ``input_format`` (``--input-format``): a record shape forces that shape, anything else
    detects it per record (:func:`record_shape`)."""
    if not isinstance(raw, dict):
        raise RecordError(
            MALFORMED,
            f"{describe(index)} is a JSON {json_type_name(raw)}, not an object; "
            "each record must be an object with 'conversations' or 'messages'",
        )
    raw_id = raw.get("id")
    record_id = str(index) if raw_id is None else str(raw_id)
    where = describe(index, record_id)
    shape = record_shape(raw, input_format)
    if shape != "minicpmv":
        from mvprep.formats import normalize_tagged  # imports this module

        conversations, images, embedded = normalize_tagged(index, raw, shape, where)
        return Record(index, record_id, conversations, images, raw, embedded, record_channel(raw))
    if raw.get("messages") is not None and raw.get("conversations") is None:
        raise RecordError(
            WRONG_SHAPE,
            f"{where} has 'messages' but --input-format {input_format} reads 'conversations' "
            "records; use --input-format messages (or auto)",
        )
    conversations = _normalize_conversations(raw.get("conversations"), where)
    check_reserved_tokens(conversations, where)
    if raw.get("image") in (None, "", {}) and raw.get("images") not in (None, [], {}):
        raise RecordError(
            WRONG_SHAPE,
            f"{where} has 'images' but no 'image'; --input-format {input_format} names the "
            "field 'image' (one path, or a dict {\"<image_00>\": path, ...}); use "
            "--input-format sharegpt (or auto) for an 'images' list with <image> tags",
        )
    if raw.get("image") not in (None, "", {}) and raw.get("images") not in (None, [], {}):
        raise RecordError(
            MALFORMED, f"{where} has both 'image' and 'images'; give the images in one of them"
        )
    embedded: dict[str, bytes] = {}
    images = _normalize_images(raw.get("image"), conversations, where, index, embedded)
    return Record(index, record_id, conversations, images, raw, embedded, record_channel(raw))


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
        role = turn_role(turn[role_key], role_key, i, where)
        content = turn.get(content_key)
        if not isinstance(content, str):
            raise RecordError(
                MALFORMED,
                f"{where}: turn {i} {content_key!r} is "
                f"{'missing' if content is None else 'a ' + json_type_name(content)}, not a string",
            )
        turns.append({"role": role, "content": content})
    check_turns(turns, where)
    return turns


def turn_role(name: Any, role_key: str, i: int, where: str) -> str:
    """The role turn ``i`` has (``role``/``from`` value ``name``), or the reject."""
    role = ROLE_NAMES.get(name) if isinstance(name, str) else None
    if role is None:
        raise RecordError(
            UNKNOWN_ROLE,
            f"{where}: turn {i} has {role_key} {name!r}; accepted: system (first turn), "
            "user/human, assistant/gpt",
        )
    return role


def check_turns(turns: list[dict[str, str]], where: str) -> None:
    """An optional system turn first, then a user turn; at least one assistant turn."""
    for i, t in enumerate(turns):
        if t["role"] == "system" and i > 0:
            raise RecordError(
                MALFORMED,
                f"{where}: turn {i} is a system turn; a system prompt must be the first turn",
            )
    first = first_dialogue_turn(turns)
    if first >= len(turns):
        raise RecordError(NO_CONVERSATIONS, f"{where} has only a system turn; add the dialogue")
    if turns[first]["role"] != "user":
        raise RecordError(
            MALFORMED,
            f"{where}: the first turn is the assistant's; conversations must start with the user",
        )
    if not any(t["role"] == "assistant" for t in turns):
        raise RecordError(
            NO_CONVERSATIONS,
            f"{where} has no assistant turn, so nothing to learn; add the answer or drop it",
        )


def first_dialogue_turn(turns: list[dict[str, str]]) -> int:
    """Index of the first turn that is not the system prompt (where a single image goes)."""
    return 1 if turns and turns[0]["role"] == "system" else 0


def _normalize_images(
    value: Any,
    conversations: list[dict[str, str]],
    where: str,
    index: int,
    embedded: dict[str, bytes],
) -> list[tuple[str, str]]:
    if value is None or value == {}:
        _check_no_placeholders(conversations, where)
        return []
    if isinstance(value, str) or is_image_struct(value):
        label = image_ref(value, "image", index, where, embedded)
        return _single_image(label, conversations, where)
    if not isinstance(value, dict):
        raise RecordError(
            MALFORMED,
            f"{where}: 'image' is a JSON {json_type_name(value)}; give one path or a dict "
            '{"<image_00>": path, ...} with <image_NN> placeholders in the text',
        )
    if list(value) == [SINGLE_IMAGE_NAME]:
        loc = f"image[{SINGLE_IMAGE_NAME!r}]"
        label = image_ref(value[SINGLE_IMAGE_NAME], loc, index, where, embedded)
        return _single_image(label, conversations, where)
    for name in value:
        if not is_multi_image_name(name):
            raise RecordError(
                MALFORMED,
                f"{where}: image key {name!r} is not an <image_NN> placeholder; name the "
                "images <image_00>, <image_01>, ... and put those placeholders in the text",
            )
    paths = {
        name: image_ref(v, f"image[{name!r}]", index, where, embedded) for name, v in value.items()
    }
    return _multi_image(paths, conversations, where)


def is_image_struct(value: Any) -> bool:
    """True for ``{"path": ...}`` / ``{"bytes": ...}`` (a Hugging Face Image struct)."""
    return isinstance(value, dict) and bool(value) and set(value) <= {"bytes", "path"}


def image_ref(value: Any, loc: str, index: int, where: str, embedded: dict[str, bytes]) -> str:
    """One image given at ``loc`` of record ``index``: its path, or for bytes the label the
    bytes are stored under in ``embedded`` (``<bytes:records[12].images[0]>``)."""
    if isinstance(value, ImageBytes):  # a binary column or list element, not a struct
        value = {"bytes": value}
    if isinstance(value, dict) and "bytes" in value and value["bytes"] is not None:
        value = value["bytes"]
        if isinstance(value, ImageBytes):
            label, data = str(value), value.data
        elif isinstance(value, bytes | bytearray):
            label, data = f"<bytes:records[{index}].{loc}>", bytes(value)
        elif isinstance(value, str):
            label, data = f"<bytes:records[{index}].{loc}>", _base64(value, loc, where)
        else:
            raise RecordError(
                MALFORMED,
                f"{where}: {loc} 'bytes' is a {json_type_name(value)}; give the image file's "
                "bytes as a base64 string",
            )
        embedded[label] = data
        return label
    if isinstance(value, dict) and value.get("path") is not None:
        value = value["path"]
    elif isinstance(value, dict):
        raise RecordError(
            MISSING_IMAGE_DATA,
            f"{where}: {loc} has no image data ({_short(value)}); give a path, "
            '{"path": ...} or {"bytes": ...}',
        )
    if isinstance(value, str) and value.startswith("data:"):
        label = f"<bytes:records[{index}].{loc}>"
        head, _, body = value.partition(",")
        if not head.endswith(";base64"):
            raise RecordError(
                MALFORMED, f"{where}: {loc} is a data: URL that is not base64; encode it base64"
            )
        embedded[label] = _base64(body, loc, where)
        return label
    if isinstance(value, str) and value.startswith(("http://", "https://")):
        raise RecordError(
            MISSING_IMAGE_PATH,
            f"{where}: {loc} is a web address ({value[:80]}); download the image and give its "
            "path relative to the data file's folder",
        )
    if not isinstance(value, str) or not value.strip():
        raise RecordError(
            MISSING_IMAGE_PATH,
            f"{where}: image {loc} has path {value!r}; give the image file's path "
            "relative to the data file's folder",
        )
    return value


def _base64(text: str, loc: str, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RecordError(
            MALFORMED,
            f"{where}: {loc} 'bytes' is not valid base64 ({exc}); give the image file's bytes "
            "base64-encoded",
        ) from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _single_image(
    path: str, conversations: list[dict[str, str]], where: str
) -> list[tuple[str, str]]:
    first = first_dialogue_turn(conversations)
    for i, turn in enumerate(conversations):
        n = turn["content"].count(SINGLE_IMAGE_NAME)
        if i == first and n > 1:
            raise RecordError(
                AMBIGUOUS_PLACEHOLDER,
                f"{where}: <image> occurs {n} times in the first turn but the record has one "
                "image; keep one <image> (or use an image dict with <image_NN> names)",
            )
        if i != first and n:
            raise RecordError(
                AMBIGUOUS_PLACEHOLDER,
                f"{where}: <image> in turn {i}; a single image's placeholder must be in the "
                "first user turn (or absent, and the image goes first)",
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


def check_reserved_tokens(conversations: list[dict[str, str]], where: str) -> None:
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


def resolve_image_path(root: Location, path: str, allow_outside_root: bool) -> Location:
    """The file an image path names: ``path`` relative to ``root`` (the data file's folder).

    Symlinks are resolved before the check, so a link inside the folder that points outside
    it counts as outside. An absolute path is accepted when it lies inside ``root``. Paths
    that end outside ``root`` raise :class:`RecordError` ("path outside data folder") unless
    ``allow_outside_root``. Returns the resolved path; whether the file exists is for the
    decoder to find out.

    URLs (:mod:`mvshards.storage`): with a data file in an object store, ``root`` is its
    prefix and a relative path resolves under it (``s3://b/data/img/1.jpg``); an image path
    may itself be a URL (``s3://b/data/img/1.jpg``), inside ``root`` when under its prefix.
    A local path from a data file in a store, or a URL from a local data file, is outside.
    """
    if not path or not path.strip():
        raise RecordError(MISSING_IMAGE_PATH, "empty image path; give the image file's path")
    if isinstance(root, ObjectPath) or is_url(path):
        return _resolve_in_store(root, path, allow_outside_root)
    try:
        base = Path(root).resolve()
        resolved = (base / path).resolve()  # an absolute path replaces base
    except (OSError, ValueError, RuntimeError) as exc:
        raise RecordError(MALFORMED, f"image path {path!r} cannot be resolved: {exc}") from exc
    if not allow_outside_root and not resolved.is_relative_to(base):
        raise _outside(path, resolved, base)
    return resolved


def _resolve_in_store(root: Location, path: str, allow_outside_root: bool) -> Location:
    """:func:`resolve_image_path` when the root or the path is a URL."""
    try:
        if is_url(path):
            options = root.options if isinstance(root, ObjectPath) else None
            resolved: Location = location(path, options).resolve()
        elif isinstance(root, ObjectPath) and not path.startswith("/"):
            resolved = root / path
        else:
            resolved = (Path(root) / path).resolve()  # a local path
    except (OSError, ValueError, RuntimeError) as exc:
        raise RecordError(MALFORMED, f"image path {path!r} cannot be resolved: {exc}") from exc
    inside = type(resolved) is type(root) and resolved.is_relative_to(root)  # type: ignore[arg-type]
    if not allow_outside_root and not inside:
        raise _outside(path, resolved, root)
    return resolved


def _outside(path: str, resolved: Location, base: Location) -> RecordError:
    return RecordError(
        PATH_OUTSIDE_ROOT,
        f"image path {path!r} resolves to {resolved}, outside the data folder {base}; "
        "move the image under the data folder or pass --allow-outside-root to allow it",
    )
