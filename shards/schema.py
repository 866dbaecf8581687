"""The per-sample record stored in a shard: what the trainer may rely on without pixels.

One sample is one input record. In the tar it is a group of members sharing the sample
key (WebDataset convention: everything before the first dot of the member name):

* ``{key}.json``           -- :meth:`SampleMeta.to_json` (conversation, layouts, counts)
* ``{key}.src{i}.{ext}``   -- image ``i`` resized to ``source_size``
* ``{key}.ref{i}.{ext}``   -- image ``i`` resized to ``refine_size`` (only when sliced)

Keys are the zero-padded position of the record in the input (``000000042``), so they are
unique in a dataset, sort in input order, and name the record in errors and rejects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mvshards.layout import SliceLayout

SCHEMA_VERSION = 1
KEY_DIGITS = 9


def sample_key(record_index: int) -> str:
    """The sample key of the input record at position ``record_index`` (0-based)."""
    return f"{record_index:0{KEY_DIGITS}d}"


def source_member(key: str, image_index: int, ext: str) -> str:
    return f"{key}.src{image_index}.{ext}"


def refine_member(key: str, image_index: int, ext: str) -> str:
    return f"{key}.ref{image_index}.{ext}"


@dataclass
class ImageEntry:
    """One image of a sample: where it came from, its layout and its members in the tar."""

    path: str
    """The path as written in the input record (relative to the data file's folder)."""
    sha256: str
    """Hex digest of the source file's bytes."""
    layout: SliceLayout
    image_id: int | None
    """The ``<image_id>k</image_id>`` number this image carries, None when it has none."""
    num_image_tokens: int
    source_member: str
    refine_member: str | None

    @property
    def num_patches(self) -> int:
        return self.layout.num_patches

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "sha256": self.sha256,
            "original_size": list(self.layout.original_size),
            **self.layout.to_dict(),
            "image_id": self.image_id,
            "num_image_tokens": self.num_image_tokens,
            "source_member": self.source_member,
            "refine_member": self.refine_member,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ImageEntry:
        layout = SliceLayout(
            original_size=_size(obj["original_size"]),
            source_size=_size(obj["source_size"]),
            grid=_size(obj["grid"]) if obj["grid"] else None,
            refine_size=_size(obj["refine_size"]) if obj["refine_size"] else None,
            slice_sizes=[_size(s) for s in obj["slice_sizes"]],
            tgt_sizes=[_size(t) for t in obj["tgt_sizes"]],
        )
        return cls(
            path=obj["path"],
            sha256=obj["sha256"],
            layout=layout,
            image_id=obj.get("image_id"),
            num_image_tokens=obj["num_image_tokens"],
            source_member=obj["source_member"],
            refine_member=obj["refine_member"],
        )


@dataclass
class SampleMeta:
    """Everything about one sample except its pixels."""

    key: str
    id: str
    conversations: list[dict[str, str]]
    """Normalised turns ``{"role": "user"|"assistant", "content": str}``; image
    placeholders are left as written (``<image>`` or ``<image_NN>``)."""
    images: list[ImageEntry] = field(default_factory=list)
    num_text_tokens: int = 0
    token_count_exact: bool = False
    image_names: list[str] = field(default_factory=list)
    """The placeholder each image answers to (``<image>`` or ``<image_NN>``), in image order."""
    source: dict[str, Any] | None = None
    """Where the record came from when the build read several data files:
    ``{"file": "b.jsonl", "index": 12}`` (the file relative to the folder holding all the
    inputs, the record's 0-based position in it). None (and absent from the JSON) for a
    one-file build, whose key is the position in its file; older shards have none."""
    channel: str | None = None
    """The record's channel (its ``channel``, else ``source``, else ``dataset`` string field,
    else ``mvprep build --channel``): the trainer reports loss per channel. None (and absent
    from the JSON) when it has none; older shards have none."""

    @property
    def num_patches(self) -> int:
        return sum(image.num_patches for image in self.images)

    @property
    def num_image_tokens(self) -> int:
        return sum(image.num_image_tokens for image in self.images)

    @property
    def num_tokens(self) -> int:
        return self.num_text_tokens + self.num_image_tokens

    def to_json(self) -> dict[str, Any]:
        obj = {
            "schema_version": SCHEMA_VERSION,
            "key": self.key,
            "id": self.id,
            "conversations": self.conversations,
            "image_names": self.image_names,
            "images": [image.to_json() for image in self.images],
            "num_images": len(self.images),
            "num_patches": self.num_patches,
            "num_image_tokens": self.num_image_tokens,
            "num_text_tokens": self.num_text_tokens,
            "num_tokens": self.num_tokens,
            "token_count_exact": self.token_count_exact,
        }
        if self.source is not None:
            obj["source"] = dict(self.source)
        if self.channel is not None:
            obj["channel"] = self.channel
        return obj

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> SampleMeta:
        version = obj.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"sample {obj.get('key')!r} has schema_version {version}, this mvkit reads "
                f"{SCHEMA_VERSION}: rebuild the shards with this version of mvprep"
            )
        channel = obj.get("channel")
        if channel is not None and not isinstance(channel, str):
            raise ValueError(f"sample {obj.get('key')!r} has a channel that is not a string")
        return cls(
            key=obj["key"],
            id=obj["id"],
            conversations=obj["conversations"],
            images=[ImageEntry.from_json(image) for image in obj["images"]],
            num_text_tokens=obj["num_text_tokens"],
            token_count_exact=obj["token_count_exact"],
            image_names=obj.get("image_names", []),
            source=obj.get("source"),
            channel=channel,
        )

    def index_row(self) -> list[Any]:
        """The row the index keeps for planning: ``[key, num_tokens, num_patches, num_images]``
        (the channel is kept beside the rows: :attr:`mvshards.index.ShardEntry.channels`)."""
        return [self.key, self.num_tokens, self.num_patches, len(self.images)]


def _size(value: list[int] | tuple[int, int]) -> tuple[int, int]:
    a, b = value
    return int(a), int(b)
