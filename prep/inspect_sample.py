"""``mvprep inspect``: one stored sample as a picture, and the text the model will see.

Per image, one row: the refine image (the source when the image is not sliced) with the
layout's slice grid drawn in magenta and every slice numbered in vision order (1..n; the
source is 0), the source thumbnail beside it, and a caption with the sizes, the patch grids
and the token counts. The grid is drawn from the stored *layout*, scaled by the stored
*pixels*, so a layout that does not fit its image shows as lines that miss the image edges.
The layout is also checked (:func:`layout_problems`): stored pixel sizes, equal slices,
patch grids, token count, and the layout that ``compute_layout`` gives today for the
original size and the build's parameters; every problem is written in red under the row
and the row gets a red frame.

The placeholder text is :func:`mvtrain.data.tokenize.image_span_text` (no tokenizer needed: the
span strings default to ``<unk>`` as the image token, the tiny and 2.6 tokenizers' choice)
substituted by :func:`mvshards.conversation.expand_placeholders`, the code the trainer runs.

A sample is found by key from the manifest alone (keys are record numbers, and each shard
lists its record range), or by record id by scanning the shards' JSON members (image bytes
are seeked over) and, failing that, the index's rejects.
"""

from __future__ import annotations

import contextlib
import json
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from mvshards.conversation import expand_placeholders
from mvshards.image_spans import SpanTokens, image_span_text
from mvshards.index import entry_path, read_manifest
from mvshards.layout import compute_layout, num_image_tokens
from mvshards.profiles import get_profile
from mvshards.schema import ImageEntry, SampleMeta, sample_key
from mvshards.storage import Location, location, open_read

PANEL = 640
"""Longest side, in pixels, of the main (refine) image as drawn."""
THUMB = 280
"""Longest side of the source thumbnail."""
PAD = 16
LINE = (255, 0, 255)
"""Colour of the slice grid lines (3 px wide, centred on the slice boundaries)."""
PROBLEM = (220, 0, 0)
BACKGROUND = (255, 255, 255)
PROBLEM_PREFIX = "LAYOUT PROBLEM: "


class InspectError(Exception):
    """The sample cannot be found or read; the message names it and the fix."""


@dataclass
class ImagePanel:
    """Where image ``index`` of the sample landed on the canvas."""

    index: int
    main_origin: tuple[int, int]
    """Canvas pixel of the main image's top-left corner."""
    main_scale: float
    """Canvas pixels per stored pixel of the main image."""
    main_size: tuple[int, int]
    """Stored size of the main image (refine, or source when not sliced)."""
    sliced: bool
    grid_xs: list[int] = field(default_factory=list)
    """Canvas x of every vertical grid line (slice boundaries, outer edges included)."""
    grid_ys: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


@dataclass
class Inspection:
    """One sample: its meta, where it lives, the picture and the text the model sees."""

    meta: SampleMeta
    shard: Location
    image: Image.Image
    panels: list[ImagePanel]
    turns: list[dict[str, str]]
    """The conversation with every image placeholder replaced by its exact span text."""
    query_token: str

    @property
    def problems(self) -> list[str]:
        return [p for panel in self.panels for p in panel.problems]


def _font(size: int) -> Any:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def normalise_key(key: str) -> str:
    """The stored form of sample ``key``: ``"7"`` and ``"000000007"`` are both ``000000007``."""
    text = key.strip()
    if not text.isdigit():
        raise InspectError(f"{key!r} is not a sample key (digits, e.g. 42); use --id ID")
    return sample_key(int(text))


def shard_of_key(out: Location | str, key: str) -> Location:
    """The shard whose record range holds sample ``key`` (the manifest alone)."""
    manifest = read_manifest(out)
    record = int(normalise_key(key))
    for item in manifest["shards"]:
        start, stop = item["record_range"]
        if start <= record < stop:
            return location(out) / item["shard"]
    raise InspectError(f"{out}: no shard holds record {record} (key {key}); see manifest.json")


@contextlib.contextmanager
def _open_tar(shard: Location) -> Iterator[tarfile.TarFile]:
    """A shard (a file or an object) opened for random access."""
    with open_read(shard) as raw, tarfile.open(fileobj=raw, mode="r:") as tar:
        yield tar


def read_members(shard: Location, key: str) -> dict[str, bytes]:
    """``{ext: bytes}`` of sample ``key``, reading only its members' bytes."""
    found: dict[str, bytes] = {}
    with _open_tar(shard) as tar:
        for member in tar:
            name_key, _, ext = member.name.partition(".")
            if name_key == key:
                handle = tar.extractfile(member)
                assert handle is not None
                found[ext] = handle.read()
            elif found or name_key > key:  # members are sorted by name
                break
    return found


def find_by_id(out: Location | str, record_id: str) -> tuple[Location, str]:
    """``(shard, key)`` of the first sample whose record id is ``record_id``."""
    out = location(out)
    manifest = read_manifest(out)
    for item in manifest["shards"]:
        shard = out / item["shard"]
        with _open_tar(shard) as tar:
            for member in tar:
                if not member.name.endswith(".json"):
                    continue
                handle = tar.extractfile(member)
                assert handle is not None
                obj = json.loads(handle.read())
                if str(obj.get("id")) == record_id:
                    return shard, str(obj["key"])
    for item in manifest["shards"]:
        _raise_if_rejected(out, int(item["unit"]), lambda r: str(r.get("id")) == record_id)
    raise InspectError(f"{out}: no sample or reject has record id {record_id!r}")


def _raise_if_rejected(out: Location, unit: int, match: Any) -> None:
    """Raise InspectError naming the reason when a reject of ``unit`` satisfies ``match``."""
    try:
        entry = json.loads(entry_path(out, unit).read_bytes())
    except (OSError, ValueError):
        return
    for reject in entry.get("rejects", []):
        if match(reject):
            error = (str(reject.get("error") or "").strip().splitlines() or [""])[-1]
            raise InspectError(
                f"record {reject['index']} (id {reject.get('id')!r}) was rejected "
                f"({reject['reason']}): {error}"
            )


def layout_problems(
    entry: ImageEntry,
    source: Image.Image,
    refine: Image.Image | None,
    profile_name: str,
    max_slice_nums: int | None,
) -> list[str]:
    """Everything wrong with one image's stored layout, as one-line messages."""
    layout, profile, problems = entry.layout, get_profile(profile_name), []
    if source.size != tuple(layout.source_size):
        problems.append(
            f"source image is {_wh(source.size)}, layout says {_wh(layout.source_size)}"
        )
    if (layout.grid is None) != (refine is None):
        problems.append("layout and members disagree on whether the image is sliced")
    if layout.grid is not None and layout.refine_size is not None:
        cols, rows = layout.grid
        rw, rh = layout.refine_size
        if refine is not None and refine.size != (rw, rh):
            problems.append(f"refine image is {_wh(refine.size)}, layout says {_wh((rw, rh))}")
        if rw % cols or rh % rows:
            problems.append(f"refine {_wh((rw, rh))} does not cut into {cols}x{rows} equal slices")
        cell = (rw // cols, rh // rows)
        if layout.slice_sizes != [cell] * (cols * rows):
            problems.append(f"slice sizes {layout.slice_sizes} are not {cols * rows} x {cell}")
    patch = profile.patch_size
    grids = [(h // patch, w // patch) for w, h in [layout.source_size, *layout.slice_sizes]]
    if [tuple(t) for t in layout.tgt_sizes] != grids:
        problems.append(f"patch grids {layout.tgt_sizes} are not {grids} (sizes / {patch})")
    if max_slice_nums is not None:
        expected = compute_layout(*layout.original_size, profile, max_slice_nums)
        if expected != layout:
            problems.append(
                f"stored layout {_describe(layout)}; compute_layout({_wh(layout.original_size)}, "
                f"{profile_name}, max_slice_nums={max_slice_nums}) gives {_describe(expected)}"
            )
    tokens = num_image_tokens(layout, profile, entry.image_id)
    if tokens != entry.num_image_tokens:
        problems.append(f"{entry.num_image_tokens} image tokens stored, the layout needs {tokens}")
    return problems


def _wh(size: Any) -> str:
    return f"{size[0]}x{size[1]}" if size else "none"


def _describe(layout: Any) -> str:
    return (
        f"grid {_wh(layout.grid)} refine {_wh(layout.refine_size)} source {_wh(layout.source_size)}"
    )


def _decode(members: dict[str, bytes], member: str, key: str) -> Image.Image:
    ext = member.partition(".")[2]
    if ext not in members:
        raise InspectError(f"sample {key}: member {member} is missing from its shard")
    return Image.open(BytesIO(members[ext])).convert("RGB")


def _caption(entry: ImageEntry, name: str, profile_name: str) -> list[str]:
    layout, profile = entry.layout, get_profile(profile_name)
    counts = [profile.tokens_per_subimage(t) for t in layout.tgt_sizes]
    src = layout.tgt_sizes[0]
    lines = [
        f"{name}  {entry.path}  original {_wh(layout.original_size)}",
        f"0 source {_wh(layout.source_size)}: patch grid {src[0]}x{src[1]} (rows x cols), "
        f"{counts[0]} query tokens",
    ]
    if layout.grid is not None and layout.refine_size is not None:
        cell, t = layout.slice_sizes[0], layout.tgt_sizes[1]
        lines.append(
            f"1..{layout.num_slices} slices: grid {layout.grid[0]}x{layout.grid[1]} (cols x rows)"
            f" of refine {_wh(layout.refine_size)}, each {_wh(cell)}, patch grid "
            f"{t[0]}x{t[1]}, {counts[1]} query tokens"
        )
    else:
        lines.append("not sliced: the model sees the source only")
    id_text = "no image id" if entry.image_id is None else f"image id {entry.image_id}"
    lines.append(
        f"patches {layout.num_patches:,}  image tokens {entry.num_image_tokens} ({id_text})"
    )
    return lines


def render_sample(
    meta: SampleMeta,
    members: dict[str, bytes],
    profile_name: str,
    max_slice_nums: int | None = None,
) -> tuple[Image.Image, list[ImagePanel]]:
    """Draw every image of ``meta`` from its stored ``members``; return canvas and panels."""
    font, small, big = _font(15), _font(13), _font(18)
    exact = "exact" if meta.token_count_exact else "estimated"
    header = (
        f"sample {meta.key}  id {meta.id!r}  tokens {meta.num_tokens:,} ({exact}; "
        f"{meta.num_text_tokens:,} text)  patches {meta.num_patches:,}  images {len(meta.images)}"
    )
    rows: list[tuple[Image.Image, Image.Image, ImagePanel, list[str]]] = []
    for i, entry in enumerate(meta.images):
        source = _decode(members, entry.source_member, meta.key)
        refine = _decode(members, entry.refine_member, meta.key) if entry.refine_member else None
        problems = layout_problems(entry, source, refine, profile_name, max_slice_nums)
        main = refine if refine is not None and entry.layout.grid is not None else source
        scale = PANEL / max(main.size)
        panel = ImagePanel(i, (0, 0), scale, main.size, main is refine, problems=problems)
        name = meta.image_names[i] if i < len(meta.image_names) else f"image {i}"
        rows.append((main, source, panel, _caption(entry, name, profile_name)))
    line_h = 20
    width = 2 * PAD + PANEL + PAD + THUMB
    for _, _, panel, caption in rows:
        for text in caption + [PROBLEM_PREFIX + t for t in panel.problems]:
            width = max(width, int(font.getlength(text)) + 2 * PAD)
    width = max(width, int(big.getlength(header)) + 2 * PAD)
    heights = [
        PAD
        + max(round(m.size[1] * p.main_scale), THUMB + line_h)
        + PAD
        + line_h * (len(c) + len(p.problems))
        for m, _, p, c in rows
    ]
    canvas = Image.new("RGB", (width, PAD + 28 + sum(heights) + PAD), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, PAD), header, fill=(0, 0, 0), font=big)
    y = PAD + 28
    for (main, source, panel, caption), height in zip(rows, heights, strict=True):
        _draw_row(canvas, draw, y, main, source, panel, meta.images[panel.index], small)
        ty = y + PAD + max(round(main.size[1] * panel.main_scale), THUMB + line_h) + PAD // 2
        for text in caption:
            draw.text((PAD, ty), text, fill=(0, 0, 0), font=font)
            ty += line_h
        for text in panel.problems:
            draw.text((PAD, ty), PROBLEM_PREFIX + text, fill=PROBLEM, font=font)
            ty += line_h
        if panel.problems:
            draw.rectangle((2, y + 2, width - 3, y + height - 3), outline=PROBLEM, width=4)
        y += height
    return canvas, [p for _, _, p, _ in rows]


def _draw_row(
    canvas: Image.Image,
    draw: ImageDraw.ImageDraw,
    y: int,
    main: Image.Image,
    source: Image.Image,
    panel: ImagePanel,
    entry: ImageEntry,
    font: Any,
) -> None:
    s = panel.main_scale
    ox, oy = PAD, y + PAD
    panel.main_origin = (ox, oy)
    canvas.paste(main.resize((round(main.size[0] * s), round(main.size[1] * s))), (ox, oy))
    layout = entry.layout
    if panel.sliced and layout.grid is not None and layout.refine_size is not None:
        cols, rows = layout.grid
        cell_w, cell_h = layout.refine_size[0] // cols, layout.refine_size[1] // rows
        panel.grid_xs = [ox + round(c * cell_w * s) for c in range(cols + 1)]
        panel.grid_ys = [oy + round(r * cell_h * s) for r in range(rows + 1)]
        top, bottom = panel.grid_ys[0], panel.grid_ys[-1]
        left, right = panel.grid_xs[0], panel.grid_xs[-1]
        for x in panel.grid_xs:
            draw.rectangle((x - 1, top - 1, x + 1, bottom + 1), fill=LINE)
        for yy in panel.grid_ys:
            draw.rectangle((left - 1, yy - 1, right + 1, yy + 1), fill=LINE)
        for n, (x0, y0, x1, y1) in enumerate(layout.slice_boxes(), start=1):
            cx, cy = ox + (x0 + x1) / 2 * s, oy + (y0 + y1) / 2 * s
            _label(draw, (cx, cy), str(n), _font(max(12, min(28, round((x1 - x0) * s / 4)))))
    tx = PAD + PANEL + PAD
    ts = THUMB / max(source.size)
    thumb = source.resize((round(source.size[0] * ts), round(source.size[1] * ts)))
    canvas.paste(thumb, (tx, oy))
    draw.rectangle((tx - 1, oy - 1, tx + thumb.size[0], oy + thumb.size[1]), outline=(0, 0, 0))
    draw.text((tx, oy + thumb.size[1] + 4), "0 = source (thumbnail)", fill=(0, 0, 0), font=font)


def _label(draw: ImageDraw.ImageDraw, centre: tuple[float, float], text: str, font: Any) -> None:
    x0, y0, x1, y1 = draw.textbbox(centre, text, font=font, anchor="mm")
    draw.rectangle((x0 - 4, y0 - 3, x1 + 4, y1 + 3), fill=(0, 0, 0))
    draw.text(centre, text, fill=(255, 255, 255), font=font, anchor="mm")


def placeholder_turns(
    meta: SampleMeta, profile_name: str, tokens: SpanTokens | None = None
) -> list[dict[str, str]]:
    """The conversation as the model gets it before the chat template: spans in place."""
    profile = get_profile(profile_name)
    tokens = tokens or SpanTokens(query="<unk>")
    spans = [image_span_text(entry, profile, tokens) for entry in meta.images]
    return expand_placeholders(meta.conversations, meta.image_names, spans)


def compact_text(text: str, query: str) -> str:
    """``text`` with every run of two or more ``query`` tokens written ``[query x N]``."""
    pattern = re.compile(f"(?:{re.escape(query)}){{2,}}")
    return pattern.sub(lambda m: f"[{query} x {len(m.group(0)) // len(query)}]", text)


def inspect_sample(
    out: Location | str,
    key: str | None = None,
    record_id: str | None = None,
    tokens: SpanTokens | None = None,
) -> Inspection:
    """Find a sample by ``key`` or ``record_id``, draw it and build its placeholder text."""
    out = location(out)
    if (key is None) == (record_id is None):
        raise InspectError("give a sample KEY or --id ID (one of them)")
    if record_id is not None:
        shard, key = find_by_id(out, record_id)
    else:
        assert key is not None
        key = normalise_key(key)
        shard = shard_of_key(out, key)
    members = read_members(shard, key)
    if "json" not in members:
        unit = int(shard.stem) if shard.stem.isdigit() else -1
        _raise_if_rejected(out, unit, lambda r: r.get("index") == int(key))
        raise InspectError(
            f"{shard.name} has no sample {key}: the record was rejected or the key is wrong "
            f"(see {out / 'rejects.jsonl'})"
        )
    meta = SampleMeta.from_json(json.loads(members["json"]))
    params = read_manifest(out).get("params", {})
    profile = params.get("profile", "minicpmv-4.6")
    image, panels = render_sample(meta, members, profile, params.get("max_slice_nums"))
    tokens = tokens or SpanTokens(query="<unk>")
    return Inspection(
        meta, shard, image, panels, placeholder_turns(meta, profile, tokens), tokens.query
    )
