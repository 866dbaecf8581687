"""Generate the bundled demo / test data set: real photos, odd formats, and bad records.

Usage: ``python scripts/make_demo_data.py OUT_DIR [--seed 0] [--count N] [--with-bad|--no-bad]
[--drawn-photos]``

Nothing is downloaded: photos are scikit-image's bundled samples (only those that load
offline), everything else is drawn here from a seeded RNG. The same seed gives byte-identical
files. ``--drawn-photos`` replaces the photos with drawn stand-ins of the same sizes and modes
(smooth random colour fields), so the set can be made without scikit-image (the ``test``
extra), e.g. by ``scripts/gpu_check.py``. Written under ``OUT_DIR``:

* ``demo.json``: MiniCPM-V fine-tuning records (a JSON list; ``image`` a path or a dict of
  ``<image_NN>`` keys; ``conversations`` of ``role``/``content`` turns), English and Chinese,
  including text-only and multi-image records, and (``--with-bad``) records the build must
  reject, with ids starting ``bad-``.
* ``demo_llava.jsonl``: a few LLaVA-style records (``from: human|gpt``, ``value``).
* ``demo_cookbook.jsonl``: records as the MiniCPM-V 4.6 Cookbook's ms-swift / LLaMA-Factory
  recipes take them (``messages`` of ``role``/``content`` with ``<image>`` tags or content
  parts, an ``images`` list, a ``channel``), including a system turn.
* ``images/``: the image files; paths in the data files are relative to ``OUT_DIR``.
* ``expected.json``: ids of good, LLaVA and bad records (bad id -> what it tests) and, per
  good image, its upright size (after EXIF), format, mode and EXIF orientation.
* ``README.txt``: the same, in words.
"""

from __future__ import annotations

import argparse
import json
import random
import struct
import sys
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SCRIPTS = str(Path(__file__).resolve().parent)
if SCRIPTS not in sys.path:  # run as a script it is there; loaded by file path (tests) not
    sys.path.insert(0, SCRIPTS)
from demo_tables import (  # noqa: E402
    BAD_RECORDS,
    CYCLE,
    IMAGES,
    LLAVA_SINGLES,
    SUBJECT,
    TEXT_ONLY,
    pick_qa,
    round_turns,
)

PHOTOS = [
    *("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina"),
    *("immunohistochemistry", "camera", "page", "logo", "horse"),
]
"""scikit-image samples bundled in the wheel (no pooch download needed, checked on 0.26)."""

DRAWN_PHOTOS: dict[str, tuple[int, int, str]] = {
    "astronaut": (512, 512, "RGB"),
    "chelsea": (300, 451, "RGB"),
    "coffee": (400, 600, "RGB"),
    "rocket": (427, 640, "RGB"),
    "hubble_deep_field": (872, 1000, "RGB"),
    "retina": (1411, 1411, "RGB"),
    "immunohistochemistry": (512, 512, "RGB"),
    "camera": (512, 512, "L"),
    "page": (191, 384, "L"),
    "logo": (500, 500, "RGBA"),
    "horse": (328, 400, "1"),
    "motorcycle": (500, 741, "RGB"),
}
"""Height, width and PIL mode of each photo (as scikit-image 0.26 ships them), for the drawn
stand-ins of ``--drawn-photos``."""


# file name -> (subject, writer); writers take (photos, rng) and save to the given path.
Writer = Callable[[Path, dict[str, Image.Image], np.random.Generator], None]


def _load_photos() -> dict[str, Image.Image]:
    """scikit-image's bundled photos as PIL images (imported lazily: start-up stays light)."""
    try:
        from skimage import data
    except ImportError as e:  # pragma: no cover - environment problem
        raise SystemExit(
            "make_demo_data: scikit-image is needed for the bundled photos; install it with "
            "`pip install scikit-image` (the `test` extra), or pass --drawn-photos"
        ) from e
    photos = {name: Image.fromarray(getattr(data, name)()) for name in PHOTOS}
    photos["motorcycle"] = Image.fromarray(data.stereo_motorcycle()[0])
    return photos


def _drawn_photo(name: str, height: int, width: int, mode: str) -> Image.Image:
    """A smooth random colour field of the photo's size and mode, seeded by its name."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    coarse = rng.integers(0, 256, (max(2, height // 64), max(2, width // 64), 4), np.uint8)
    field = np.asarray(
        Image.fromarray(coarse, "RGBA").resize((width, height), Image.Resampling.BICUBIC)
    )
    if mode == "RGBA":
        return Image.fromarray(field, "RGBA")
    rgb = Image.fromarray(np.ascontiguousarray(field[..., :3]), "RGB")
    if mode == "1":
        return rgb.convert("L").point(lambda v: 255 if v >= 128 else 0).convert("1")
    return rgb.convert(mode)


def _drawn_photos() -> dict[str, Image.Image]:
    """Stand-ins for :func:`_load_photos` drawn with numpy and PIL only."""
    return {name: _drawn_photo(name, *shape) for name, shape in DRAWN_PHOTOS.items()}


def _mosaic(photos: dict[str, Image.Image], size: tuple[int, int], rng: np.random.Generator):
    """A 2x2 collage of real photos upscaled to ``size`` (phone-like resolution)."""
    names = ["astronaut", "coffee", "rocket", "chelsea"]
    order = [names[i] for i in rng.permutation(len(names))]
    w, h = size
    out = Image.new("RGB", size)
    for i, name in enumerate(order):
        tile = photos[name].convert("RGB").resize((w // 2, h // 2), Image.Resampling.BICUBIC)
        out.paste(tile, ((i % 2) * (w // 2), (i // 2) * (h // 2)))
    return out


def _screenshot(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A chat-app-like screenshot: flat colours and many sharp text edges."""
    w, h = size
    img = Image.new("RGB", size, (246, 246, 248))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=34)
    draw.rectangle((0, 0, w, 120), fill=(30, 110, 220))
    draw.text((40, 40), "Chat  12:34", fill="white", font=font)
    words = ["hello", "demo", "slice", "photo", "token", "shard", "image", "model", "data"]
    y = 160
    while y < h - 200:
        mine = bool(rng.integers(2))
        n = int(rng.integers(2, 6))
        text = " ".join(words[int(i)] for i in rng.integers(0, len(words), n))
        x0 = w // 3 if mine else 40
        box = (x0, y, x0 + 2 * w // 3 - 40, y + 110)
        draw.rounded_rectangle(box, 24, fill=(150, 230, 140) if mine else (255, 255, 255))
        draw.text((box[0] + 30, y + 36), text, fill=(20, 20, 20), font=font)
        y += 150
    draw.rectangle((0, h - 140, w, h), fill=(225, 225, 230))
    return img


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def _write_bomb_png(path: Path, side: int = 20000) -> None:
    """A 1-bit ``side x side`` PNG of zeros: a few KB on disk, 400 MP when decoded."""
    row = b"\x00" * (1 + (side + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row * 500) for _ in range(side // 500)) + comp.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def _good_images() -> dict[str, tuple[str, Writer]]:
    """Every good image file: name -> (subject, writer). Order is the coverage order."""
    P = Image.Resampling

    def save(img_fn, **kw) -> Writer:
        """A writer that saves ``img_fn(photos, rng)`` with the encoder options ``kw``."""
        return lambda p, ph, rng: img_fn(ph, rng).save(p, **kw)

    def palette_alpha(ph, rng):
        rgba = ph["logo"].convert("RGBA").resize((300, 300), P.BICUBIC)
        pal = rgba.convert("RGB").quantize(63, dither=Image.Dither.NONE)
        idx = np.array(pal)
        idx[np.array(rgba)[..., 3] < 128] = 63
        out = Image.fromarray(idx, "P")
        out.putpalette(pal.getpalette()[: 63 * 3] + [0, 0, 0])
        out.info["transparency"] = 63
        return out

    def gif(p, ph, rng):
        small = ph["chelsea"].resize((226, 150), P.BICUBIC)
        frames = [small.quantize(64), small.transpose(Image.Transpose.FLIP_LEFT_RIGHT).quantize(64)]
        frames[0].save(p, save_all=True, append_images=frames[1:], duration=200, loop=0)

    def la(ph, rng):
        gray = ph["camera"].resize((256, 256), P.BICUBIC)
        alpha = Image.linear_gradient("L").resize((256, 256))
        return Image.merge("LA", (gray, alpha))

    def tiny(ph, rng):
        cells = (rng.integers(0, 2, (4, 4)) * 200 + 30).astype(np.uint8)
        return Image.fromarray(cells).resize((20, 20), P.NEAREST).convert("RGB")

    def phone_exif6(p, ph, rng):  # upright 3024x4032, stored rotated: orientation 6
        upright = _mosaic(ph, (3024, 4032), rng)
        upright.rotate(90, expand=True).save(p, quality=85, exif=_exif(6))

    def rocket_exif3(p, ph, rng):  # stored upside down: orientation 3
        upright = ph["rocket"].resize((800, 534), P.BICUBIC)
        upright.rotate(180).save(p, quality=90, exif=_exif(3))

    def gray16(ph, rng):
        return Image.fromarray(np.asarray(ph["camera"], dtype=np.uint16) * 257)

    def strip(ph, rng):
        return _mosaic(ph, (1200, 3000), rng).crop((450, 0, 750, 3000))

    def photo(name: str) -> Callable[[dict[str, Image.Image], Any], Image.Image]:
        return lambda ph, rng: ph[name]

    return {
        "astronaut.jpg": ("astronaut", save(photo("astronaut"), quality=92)),
        "chelsea.jpg": ("chelsea", save(photo("chelsea"), quality=90)),
        "phone_4000x3000.jpg": (
            "mosaic",
            save(lambda ph, r: _mosaic(ph, (4000, 3000), r), quality=85),
        ),
        "phone_portrait_exif6.jpg": ("mosaic", phone_exif6),
        "screenshot_1080x2400.png": (
            "screenshot",
            save(lambda ph, r: _screenshot((1080, 2400), r)),
        ),
        "coffee.png": ("coffee", save(photo("coffee"))),
        "rocket.jpg": ("rocket", save(photo("rocket"), quality=90)),
        "rocket_exif3.jpg": ("rocket", rocket_exif3),
        "chelsea_cmyk.jpg": (
            "chelsea",
            save(lambda ph, r: ph["chelsea"].convert("CMYK"), quality=90),
        ),
        "logo_palette_alpha.png": ("logo", save(palette_alpha)),
        "camera_gray.png": ("camera", save(photo("camera"))),
        "camera_16bit.png": ("camera", save(gray16)),
        "chelsea_anim.gif": ("chelsea", gif),
        "motorcycle.webp": ("motorcycle", save(photo("motorcycle"), quality=80, method=4)),
        "ihc.bmp": ("ihc", save(photo("immunohistochemistry"))),
        "coffee.tif": ("coffee", save(photo("coffee"), compression="tiff_lzw")),
        "tall_strip_300x3000.jpg": ("mosaic", save(strip, quality=88)),
        "tiny_20x20.png": ("tiny", save(tiny)),
        "hubble.jpg": ("hubble", save(photo("hubble_deep_field"), quality=90)),
        "retina.jpg": ("retina", save(photo("retina"), quality=88)),
        "camera_alpha_la.png": ("camera", save(la)),
        "horse_1bit.png": ("horse", save(lambda ph, r: ph["horse"].convert("1"))),
        "page_scan.png": ("page", save(photo("page"))),
        "logo_rgba.png": ("logo", save(photo("logo"))),
    }


def _good_records(images: dict[str, tuple[str, Writer]], count: int, rng: random.Random):
    """``count`` records; single-image records walk every image first (all formats covered)."""
    names = list(images)
    small = [n for n in names if "phone" not in n and "screenshot" not in n]
    records: list[dict[str, Any]] = []
    singles = multis = 0
    for n in range(count):
        kind, zh = CYCLE[n % len(CYCLE)], rng.random() < 0.4
        if kind == "S":
            name = names[singles] if singles < len(names) else small[singles % len(small)]
            q, a = pick_qa(images[name][0], rng, zh)
            user = [f"<image>\n{q}", q, f"{q}\n<image>"][singles % 3]  # start, absent, end
            rec: dict[str, Any] = {
                "image": f"{IMAGES}/{name}",
                "conversations": round_turns(user, a),
            }
            singles += 1
        elif kind == "M":
            k = 2 + multis % 2
            picks = [small[(3 * multis + 5 * j) % len(small)] for j in range(k)]
            subs = [SUBJECT[images[x][0]][1 if zh else 0] for x in picks]
            imgs = {f"<image_{j:02d}>": f"{IMAGES}/{x}" for j, x in enumerate(picks)}
            if k == 2:
                user = (
                    "<image_00>和<image_01>有什么不同?"
                    if zh
                    else "Compare <image_00> with <image_01>."
                )
                ans = (
                    f"第一张是{subs[0]},第二张是{subs[1]}。"
                    if zh
                    else (f"The first is {subs[0]}; the second is {subs[1]}.")
                )
            else:  # placeholders out of key order: images follow the text order
                user = (
                    "<image_02>、<image_00>和<image_01>分别是什么?"
                    if zh
                    else "What do <image_02>, <image_00> and <image_01> show?"
                )
                ans = "; ".join(subs[j] for j in (2, 0, 1))
            rec = {"image": imgs, "conversations": round_turns(user, ans)}
            multis += 1
        elif kind == "T":
            q, a = rng.choice(TEXT_ONLY)
            rec = {"conversations": round_turns(q, a)}
        else:
            name = small[(7 * n) % len(small)]
            q, a = pick_qa(images[name][0], rng, zh)
            follow = ("这是照片吗?", "是的。") if zh else ("Is it a photo?", "Yes.")
            rec = {
                "image": f"{IMAGES}/{name}",
                "conversations": round_turns(f"<image>\n{q}", a) + round_turns(*follow),
            }
        records.append({"id": f"demo-{n:03d}", **rec})
    return records


def _write_bad_files(img_dir: Path) -> None:
    (img_dir / "bad_empty.jpg").write_bytes(b"")
    (img_dir / "bad_text.jpg").write_text("this is not a JPEG, just text\n", encoding="utf-8")
    data = (img_dir / "rocket.jpg").read_bytes()
    (img_dir / "bad_truncated.jpg").write_bytes(data[: len(data) * 2 // 5])
    _write_bomb_png(img_dir / "bad_bomb.png")


def _llava_records(images: dict[str, tuple[str, Writer]], rng: random.Random):
    """A few LLaVA-style records: single images, text-only, and a Chinese multi-turn one."""
    recs = []
    for n, (name, zh, template) in enumerate(LLAVA_SINGLES):
        q, a = pick_qa(images[name][0], rng, zh)
        conv = round_turns(template.format(q=q), a, llava=True)
        recs.append({"id": f"llava-{n:03d}", "image": f"{IMAGES}/{name}", "conversations": conv})
    recs.append(
        {"id": "llava-004", "conversations": round_turns("What is 2 + 3?", "5.", llava=True)}
    )
    conv = round_turns("<image>\n这是什么动物?", "这是一只猫。", llava=True)
    conv += round_turns("它是什么颜色?", "橘色带条纹。", llava=True)
    recs.append({"id": "llava-005", "image": f"{IMAGES}/chelsea.jpg", "conversations": conv})
    return recs


COOKBOOK_SINGLES = ["chelsea.jpg", "astronaut.jpg", "coffee.png", "rocket.jpg"]
"""Images of the Cookbook-style records (all also used by demo.json)."""


def _cookbook_records(images: dict[str, tuple[str, Writer]], rng: random.Random):
    """Cookbook-style records: ``messages`` + ``images`` + ``channel``, as string tags, as
    content parts, two images, and text-only with a system turn."""
    recs: list[dict[str, Any]] = []
    for n, name in enumerate(COOKBOOK_SINGLES):
        q, a = pick_qa(images[name][0], rng, zh=n % 2 == 1)
        if n < 2:
            user: Any = f"<image>{q}"
        else:
            user = [{"type": "image"}, {"type": "text", "text": q}]
        recs.append(
            {
                "id": f"cookbook-{n:03d}",
                "messages": [
                    {"role": "user", "content": user},
                    {"role": "assistant", "content": a},
                ],
                "images": [f"{IMAGES}/{name}"],
                "channel": "caption",
            }
        )
    pair = [f"{IMAGES}/{COOKBOOK_SINGLES[0]}", f"{IMAGES}/{COOKBOOK_SINGLES[1]}"]
    subs = [SUBJECT[images[x.split("/", 1)[1]][0]][0] for x in pair]
    recs.append(
        {
            "id": "cookbook-004",
            "messages": [
                {"role": "user", "content": "<image><image>What do the two pictures show?"},
                {"role": "assistant", "content": f"The first {subs[0]}, the second {subs[1]}."},
            ],
            "images": pair,
            "channel": "compare",
        }
    )
    for n, (q, a) in enumerate(rng.sample(TEXT_ONLY, 2), start=5):
        recs.append(
            {
                "id": f"cookbook-{n:03d}",
                "messages": [
                    {"role": "system", "content": "You are a concise assistant."},
                    {"role": "user", "content": q},
                    {"role": "assistant", "content": a},
                ],
                "channel": "chat",
            }
        )
    return recs


def _image_info(path: Path) -> dict[str, Any]:
    with Image.open(path) as im:
        orientation = im.getexif().get(0x0112, 1)
        w, h = im.size
        if orientation in (5, 6, 7, 8):
            w, h = h, w
        return {
            "size": [w, h],
            "format": im.format,
            "mode": im.mode,
            "exif_orientation": orientation,
        }


def _readme(seed: int, good: list[str], llava: list[str], bad: dict[str, str]) -> str:
    lines = [
        "mvkit demo data set (generated by scripts/make_demo_data.py; nothing downloaded)",
        f"seed {seed}: the same seed gives byte-identical files.",
        "",
        "demo.json: MiniCPM-V fine-tuning records (a JSON list), English and Chinese:",
        "  single images (<image> at the start, at the end, or absent = prepended),",
        "  multi-image records ({'<image_00>': ..., '<image_01>': ...}; in some the placeholders",
        "  are out of key order in the text), text-only and multi-turn records.",
        "demo_llava.jsonl: LLaVA-style records (from: human|gpt, value).",
        "demo_cookbook.jsonl: 4.6 Cookbook-style records (messages + images + channel).",
        "images/: photos from scikit-image (real) plus drawn images: phone-size JPEGs",
        "  (4000x3000; 3024x4032 stored rotated with EXIF orientation 6), EXIF 3,",
        "  CMYK JPEG, palette PNG with transparency, LA, 1-bit, 8- and 16-bit gray,",
        "  RGBA PNG, animated GIF (first frame counts), WebP, BMP, TIFF (LZW),",
        "  a 1080x2400 screenshot, a 300x3000 strip, a 20x20 icon.",
        "expected.json: good/LLaVA/bad ids and every good image's upright size, format, mode.",
        "",
        f"good records: {len(good)}; LLaVA records: {len(llava)}; bad records: {len(bad)}",
    ]
    if bad:
        lines += ["", "Bad records (ids start with 'bad-'); the build must reject each one:"]
        lines += [f"  {rid:32s} {why}" for rid, why in bad.items()]
    return "\n".join(lines) + "\n"


def make_demo_dataset(
    out_dir: Path,
    seed: int = 0,
    count: int = 48,
    with_bad: bool = True,
    drawn_photos: bool = False,
) -> Path:
    """Write the demo set under ``out_dir`` and return the path of ``demo.json``;
    ``drawn_photos``: drawn stand-ins instead of scikit-image's photos (no scikit-image)."""
    if count < 1:
        raise ValueError(f"--count must be at least 1, got {count}")
    out_dir = Path(out_dir)
    img_dir = out_dir / IMAGES
    img_dir.mkdir(parents=True, exist_ok=True)
    text_rng = random.Random(seed)
    images = _good_images()
    records = _good_records(images, count, text_rng)
    llava = _llava_records(images, text_rng)
    cookbook = _cookbook_records(images, random.Random(seed + 7919))  # leaves text_rng alone

    bad_recs = [rec for _, _, rec in BAD_RECORDS] if with_bad else []
    used: list[str] = []  # good image files referenced by any record, first use first
    if with_bad:
        used.append(f"{IMAGES}/rocket.jpg")  # the truncated JPEG is cut from it
    for rec in records + llava + bad_recs + cookbook:
        paths = rec.get("image") or rec.get("images") or {}
        if isinstance(paths, dict):
            paths = list(paths.values())
        for rel in [paths] if isinstance(paths, str) else paths:
            if rel not in used and rel.removeprefix(f"{IMAGES}/") in images:
                used.append(rel)
    photos = _drawn_photos() if drawn_photos else _load_photos()
    for rel in used:
        name = rel.split("/", 1)[1]
        # one RNG per file: an image's bytes do not depend on which others are written
        images[name][1](
            out_dir / rel, photos, np.random.default_rng([seed, zlib.crc32(rel.encode())])
        )

    bad = {}
    if with_bad:
        _write_bad_files(img_dir)
        step = len(records) / (len(BAD_RECORDS) + 1)
        for j, rec in reversed(list(enumerate(bad_recs))):
            records.insert(round((j + 1) * step), dict(rec))
        bad = {rid: why for rid, why, _ in BAD_RECORDS}

    data_path = out_dir / "demo.json"
    data_path.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    jsonl = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in llava)
    (out_dir / "demo_llava.jsonl").write_text(jsonl, encoding="utf-8")
    jsonl = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in cookbook)
    (out_dir / "demo_cookbook.jsonl").write_text(jsonl, encoding="utf-8")
    good_ids = [r["id"] for r in records if not r["id"].startswith("bad-")]
    expected = {
        "seed": seed,
        "data": data_path.name,
        "llava": "demo_llava.jsonl",
        "good_ids": good_ids,
        "llava_ids": [r["id"] for r in llava],
        "cookbook": "demo_cookbook.jsonl",
        "cookbook_ids": [r["id"] for r in cookbook],
        "bad": bad,
        "images": {rel: _image_info(out_dir / rel) for rel in sorted(used)},
    }
    (out_dir / "expected.json").write_text(json.dumps(expected, indent=1) + "\n", encoding="utf-8")
    (out_dir / "README.txt").write_text(
        _readme(seed, good_ids, expected["llava_ids"], bad), encoding="utf-8"
    )
    return data_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=48, help="good MiniCPM-V records")
    bad = parser.add_mutually_exclusive_group()
    bad.add_argument(
        "--with-bad",
        dest="with_bad",
        action="store_true",
        default=True,
        help="add records the build must reject (the default)",
    )
    bad.add_argument("--no-bad", dest="with_bad", action="store_false", help="only good records")
    parser.add_argument(
        "--drawn-photos",
        action="store_true",
        help="drawn stand-ins of the photos' sizes and modes (no scikit-image needed)",
    )
    args = parser.parse_args(argv)
    path = make_demo_dataset(
        args.out_dir,
        seed=args.seed,
        count=args.count,
        with_bad=args.with_bad,
        drawn_photos=args.drawn_photos,
    )
    print(path)


if __name__ == "__main__":
    main()
