"""One input record -> one sample: layouts, token counts, resized and encoded images.

Everything is computed in memory before a single byte is written, so a record that fails
half-way (its third image is truncated, its token count is over the limit) leaves nothing
behind: it becomes exactly one reject.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mvprep.imaging import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    ImageHeader,
    decode_stored,
    encode_image,
    extension_for,
    output_subsampling,
    probe_image,
    read_image_bytes,
    resize_outputs,
)
from mvprep.options import BuildOptions
from mvprep.records import Record, resolve_image_path
from mvprep.tokens import TokenCounter
from mvshards.layout import SliceLayout, assign_image_ids, compute_layout, num_image_tokens
from mvshards.profiles import get_profile
from mvshards.schema import ImageEntry, SampleMeta, refine_member, sample_key, source_member
from mvshards.think_block import apply_think_block


class SampleTooLongError(Exception):
    """The sample's token count is over ``--max-tokens``; it is rejected, never truncated."""

    reason = "too many tokens"


@dataclass
class BuiltSample:
    """A finished sample: its metadata and its tar members, name -> bytes."""

    meta: SampleMeta
    members: dict[str, bytes]

    @property
    def num_images(self) -> int:
        return len(self.meta.images)


@dataclass
class _ProbedImage:
    name: str
    path: str
    data: bytes
    sha256: str  # hex digest of ``data``, taken right after the read (bytes still in cache)
    header: ImageHeader
    layout: SliceLayout


@contextmanager
def _naming(path: str) -> Iterator[None]:
    """Make every image error name the image path (as written in the record)."""
    try:
        yield
    except ImageError as exc:
        if path in str(exc):
            raise
        raise ImageError(exc.reason, f"{path}: {exc}") from exc


@dataclass(frozen=True)
class _Render:
    """Encodes the stored images of one decoded image (resized by
    :func:`mvprep.imaging.resize_outputs`: the refine image from the decoded pixels, the
    source from the refine image when that is larger, EXIF orientation applied last)."""

    bgr: bool  # pixels in B-G-R order, else RGB
    subsampling: str  # JPEG chroma subsampling of the outputs
    options: BuildOptions

    def __call__(self, pixels: np.ndarray) -> bytes:
        opts = self.options
        return encode_image(pixels, opts.image_format, opts.quality, self.subsampling, bgr=self.bgr)


def build_sample(
    record: Record,
    root: Path,
    options: BuildOptions,
    counter: TokenCounter,
    on_image: Callable[[], None] | None = None,
    source: dict[str, Any] | None = None,
) -> BuiltSample:
    """Turn one normalised record into a sample, or raise the error that rejects it.

    ``source`` (several data files: ``{"file", "index"}``) is stored in the sample's JSON,
    and so is the channel: the record's own, else ``options.channel`` (``--channel``).
    Raises ``RecordError`` (bad record or path), ``ImageError`` (bad image) or
    ``SampleTooLongError``. Cheap checks (headers, layouts, token counts) run before any
    image is decoded, so an over-long sample costs no decode.
    """
    profile = get_profile(options.profile)
    max_slices = options.resolved_max_slice_nums
    max_pixels = options.max_pixels or DEFAULT_MAX_PIXELS
    key = sample_key(record.index)

    probed: list[_ProbedImage] = []
    for name, path in record.images:
        data = record.embedded.get(path)  # given as bytes: ``path`` is their label
        if data is None:
            file_path = resolve_image_path(root, path, options.allow_outside_root)
        with _naming(path):
            data = read_image_bytes(file_path) if data is None else data
            digest = hashlib.sha256(data).hexdigest()
            header = probe_image(data, max_pixels=max_pixels, name=path)
        layout = compute_layout(header.size[0], header.size[1], profile, max_slices)
        probed.append(_ProbedImage(name, path, data, digest, header, layout))

    image_ids = assign_image_ids([p.layout for p in probed], options.resolved_image_id_form)
    image_tokens = [
        num_image_tokens(p.layout, profile, image_id)
        for p, image_id in zip(probed, image_ids, strict=True)
    ]
    image_names = [p.name for p in probed]
    # the 4.6 family's empty think block (--think-block): stored, so the trainer renders it too
    conversations = apply_think_block(record.conversations, profile.family, options.think_block)
    num_text_tokens = counter.count_text_tokens(conversations, image_names)
    total_tokens = num_text_tokens + sum(image_tokens)
    if options.max_tokens is not None and total_tokens > options.max_tokens:
        raise SampleTooLongError(
            f"record {record.id!r} has {total_tokens} tokens ({num_text_tokens} text + "
            f"{sum(image_tokens)} image) > --max-tokens {options.max_tokens}; shorten the "
            "conversation, lower --max-res, or raise --max-tokens"
        )

    ext = extension_for(options.image_format)
    members: dict[str, bytes] = {}
    entries: list[ImageEntry] = []
    for i, (p, image_id, tokens) in enumerate(zip(probed, image_ids, image_tokens, strict=True)):
        layout = p.layout
        min_size = layout.source_size
        if layout.refine_size is not None:
            min_size = (
                max(min_size[0], layout.refine_size[0]),
                max(min_size[1], layout.refine_size[1]),
            )
        # Pixels stay in stored orientation: the outputs are resized (the source from the
        # refine image when that is larger) and then rotated (cheaper than rotating the
        # decode). JPEGs decode to B-G-R as cheaply as to RGB and OpenCV's encoders take
        # B-G-R, so they skip the channel swap;
        # libpng decodes RGB natively, so PNGs swap once, on the smaller outputs.
        bgr = p.header.format in ("JPEG", "MPO")
        with _naming(p.path):
            pixels, orientation = decode_stored(
                p.data, p.header, min_size, p.path, bgr=bgr, imaging_path=options.imaging_path
            )
        source_px, refine_px = resize_outputs(
            pixels, orientation, layout.source_size, layout.refine_size
        )
        render = _Render(bgr, output_subsampling(p.header), options)
        src_name = source_member(key, i, ext)
        members[src_name] = render(source_px)
        ref_name = None
        if refine_px is not None:
            ref_name = refine_member(key, i, ext)
            members[ref_name] = render(refine_px)
        entries.append(
            ImageEntry(
                path=p.path,
                sha256=p.sha256,
                layout=layout,
                image_id=image_id,
                num_image_tokens=tokens,
                source_member=src_name,
                refine_member=ref_name,
            )
        )
        if on_image is not None:
            on_image()

    meta = SampleMeta(
        key=key,
        id=record.id,
        conversations=conversations,
        images=entries,
        num_text_tokens=num_text_tokens,
        token_count_exact=counter.exact,
        image_names=image_names,
        source=source,
        channel=record.channel or options.channel,
    )
    members[f"{key}.json"] = json.dumps(
        meta.to_json(), ensure_ascii=False, sort_keys=True, separators=(",", ":")
    ).encode("utf-8")
    return BuiltSample(meta=meta, members=members)
