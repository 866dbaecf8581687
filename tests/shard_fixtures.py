"""Shared helpers of the shard tests (test_tario, test_index, test_readers_compat): real
``SampleMeta`` objects whose layouts come from ``compute_layout`` and whose images are JPEGs
at exactly the layout sizes (``make_sample``), and one shard of them (``write_shard``)."""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

from mvshards.layout import compute_layout, num_image_tokens
from mvshards.profiles import get_profile
from mvshards.schema import ImageEntry, SampleMeta, refine_member, sample_key, source_member
from mvshards.tario import ShardFileInfo, ShardWriter

PROFILE = get_profile("minicpmv-4.6")
MAX_SLICE_NUMS = 9
KINDS: dict[str, list[tuple[int, int]]] = {
    "text": [],  # text-only: just {key}.json
    "one": [(300, 200)],  # one unsliced image: .src0.jpg
    "sliced": [(1600, 1000)],  # one sliced image: .ref0.jpg + .src0.jpg
    "two": [(300, 200), (1600, 1000)],  # two images, the second sliced
}


def encode_jpeg(size: tuple[int, int], seed: int) -> bytes:
    """A small, fast JPEG of exactly ``size`` whose colour depends on ``seed``."""
    colour = (seed * 37 % 256, seed * 91 % 256, seed * 53 % 256)
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG", quality=70)
    return buf.getvalue()


def make_sample(index: int, kind: str) -> tuple[SampleMeta, dict[str, bytes]]:
    """Sample of input record ``index`` with the images of ``KINDS[kind]``.

    Returns the meta and the members as ``{ext: bytes}`` (``json``, ``src0.jpg``...).
    """
    key = sample_key(index)
    members: dict[str, bytes] = {}
    images = []
    for i, (w, h) in enumerate(KINDS[kind]):
        layout = compute_layout(w, h, PROFILE, MAX_SLICE_NUMS)
        src = source_member(key, i, "jpg")
        members[src.split(".", 1)[1]] = encode_jpeg(layout.source_size, index + i)
        ref = None
        if layout.refine_size is not None:
            ref = refine_member(key, i, "jpg")
            members[ref.split(".", 1)[1]] = encode_jpeg(layout.refine_size, index + i + 1)
        images.append(
            ImageEntry(
                path=f"images/{index}_{i}.jpg",
                sha256=f"{index:064x}",
                layout=layout,
                image_id=None,
                num_image_tokens=num_image_tokens(layout, PROFILE, None),
                source_member=src,
                refine_member=ref,
            )
        )
    placeholder = "<image>\n" if images else ""
    meta = SampleMeta(
        key=key,
        id=f"rec-{index}",
        conversations=[
            {"role": "user", "content": f"{placeholder}question {index}"},
            {"role": "assistant", "content": f"answer {index}"},
        ],
        images=images,
        num_text_tokens=10 + index,
        token_count_exact=False,
        image_names=["<image>"] * len(images),
    )
    members["json"] = json.dumps(meta.to_json(), sort_keys=True).encode()
    return meta, members


def write_shard(path: Path, samples: list[tuple[SampleMeta, dict[str, bytes]]]) -> ShardFileInfo:
    """Write ``samples`` (already in key order) as one shard."""
    with ShardWriter(path) as writer:
        for meta, members in samples:
            writer.add_sample(meta.key, members)
        return writer.commit()
