"""The same records in every input format mvprep reads (test_input_formats).

:func:`write_all_formats` writes one folder of images and the records of :data:`CANONICAL`
(MiniCPM-V form) again as LLaVA JSON, ``messages`` JSONL (string tags, content parts,
base64 bytes, a data: URL), ShareGPT JSON (with a top-level ``system``), a Parquet file
with the images embedded as bytes (written with pyarrow, several row groups) and a
``datasets.save_to_disk`` folder with an Image list column. Every file ends with one bad
record (a reject in every format), so the good records have the same keys everywhere.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

IMAGES = {"a.jpg": (400, 300), "b.png": (200, 100), "c.jpg": (1100, 800)}
"""Image name -> size; c.jpg is large enough to be sliced (refine image, several slices)."""


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


CANONICAL: list[dict[str, Any]] = [
    {
        "id": "single",
        "image": "img/a.jpg",
        "conversations": [_user("<image>\nWhat is shown?"), _assistant("A gradient.")],
    },
    {
        "id": "multi",
        "image": {"<image_00>": "img/b.png", "<image_01>": "img/c.jpg"},
        "conversations": [
            _user("Compare <image_00> and <image_01>."),
            _assistant("Different sizes."),
        ],
    },
    {"id": "text", "conversations": [_user("Say hi."), _assistant("Hi.")]},
    {
        "id": "system",
        "image": "img/c.jpg",
        "conversations": [
            {"role": "system", "content": "Answer in one word."},
            _user("<image>Colour?"),
            _assistant("Green."),
        ],
    },
    {
        "id": "later",
        "image": {"<image_00>": "img/a.jpg"},
        "conversations": [
            _user("Hello."),
            _assistant("Hi."),
            _user("<image_00>\nAnd this?"),
            _assistant("A photo."),
        ],
    },
    {
        "id": "two-turns",
        "image": {"<image_00>": "img/a.jpg", "<image_01>": "img/b.png"},
        "conversations": [
            _user("<image_00>First."),
            _assistant("Ok."),
            _user("Then <image_01>"),
            _assistant("Done."),
        ],
    },
]
"""The reference records (MiniCPM-V fine-tuning form); each other format says the same."""

GOOD = len(CANONICAL)


def _photo(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 // w, y * 255 // h, (x + y) * 127 // (w + h)], axis=-1)
    noise = rng.integers(-12, 12, size=(h, w, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def write_images(root: Path) -> None:
    (root / "img").mkdir(parents=True, exist_ok=True)
    for seed, (name, (w, h)) in enumerate(IMAGES.items()):
        kwargs = {"quality": 90} if name.endswith(".jpg") else {}
        _photo(w, h, seed).save(root / "img" / name, **kwargs)


def _b64(root: Path, name: str) -> str:
    return base64.b64encode((root / "img" / name).read_bytes()).decode("ascii")


def _shift_tags(turns: list[dict[str, str]]) -> list[dict[str, str]]:
    """MiniCPM-V placeholders (``<image_NN>``, ``<image>``) -> plain ``<image>`` tags."""
    out = []
    for t in turns:
        text = t["content"]
        for n in range(10):
            text = text.replace(f"<image_{n:02d}>", "<image>")
        out.append({"role": t["role"], "content": text})
    return out


def _image_list(record: dict[str, Any]) -> list[str]:
    image = record.get("image")
    if image is None:
        return []
    if isinstance(image, str):
        return [image]
    return list(image.values())  # CANONICAL's dicts are in placeholder order


def minicpmv_records() -> list[dict[str, Any]]:
    bad = {"id": "bad", "image": "img/nope.jpg", "conversations": [_user("x"), _assistant("y")]}
    return [*CANONICAL, bad]


def llava_records() -> list[dict[str, Any]]:
    names = {"user": "human", "assistant": "gpt", "system": "system"}
    out = []
    for r in minicpmv_records():
        turns = [{"from": names[t["role"]], "value": t["content"]} for t in r["conversations"]]
        out.append({**r, "conversations": turns})
    return out


def messages_records(root: Path) -> list[dict[str, Any]]:
    """Each canonical record as ``messages`` + ``images``, in a different spelling each."""
    recs: list[dict[str, Any]] = []
    for r in CANONICAL:
        recs.append(
            {"id": r["id"], "messages": _shift_tags(r["conversations"]), "images": _image_list(r)}
        )
    # 1: content parts, an image part and an image_url part (paths), no 'images'
    recs[1] = {
        "id": "multi",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Compare "},
                    {"type": "image", "image": "img/b.png"},
                    {"type": "text", "text": " and "},
                    {"type": "image_url", "image_url": {"url": "img/c.jpg"}},
                    {"type": "text", "text": "."},
                ],
            },
            _assistant("Different sizes."),
        ],
    }
    del recs[2]["images"]  # text only: no 'images' at all
    recs[3]["images"] = [{"path": "img/c.jpg"}]
    recs[4]["images"] = [{"bytes": _b64(root, "a.jpg")}]
    # 5: a data: URL image part in turn 0, a tag + 'images' in turn 2
    recs[5] = {
        "id": "two-turns",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": f"data:image/jpeg;base64,{_b64(root, 'a.jpg')}"},
                    {"type": "text", "text": "First."},
                ],
            },
            _assistant("Ok."),
            _user("Then <image>"),
            _assistant("Done."),
        ],
        "images": ["img/b.png"],
    }
    bad = {"id": "bad", "messages": [_user("<image><image>"), _assistant("y")], "images": []}
    return [*recs, bad]


def sharegpt_records() -> list[dict[str, Any]]:
    names = {"user": "human", "assistant": "gpt"}
    out: list[dict[str, Any]] = []
    for r in CANONICAL:
        turns = _shift_tags(r["conversations"])
        rec: dict[str, Any] = {"id": r["id"]}
        if turns[0]["role"] == "system":  # LLaMA-Factory's top-level 'system'
            rec["system"] = turns.pop(0)["content"]
        rec["conversations"] = [{"from": names[t["role"]], "value": t["content"]} for t in turns]
        rec["images"] = _image_list(r)
        out.append(rec)
    bad = {"id": "bad", "conversations": [{"from": "human", "value": "x"}], "images": ["a"]}
    return [*out, bad]


def table_rows(root: Path, *, embed: bool) -> list[dict[str, Any]]:
    """``messages`` + ``images`` rows as Hugging Face datasets stores them: each image a
    ``{bytes, path}`` struct (bytes embedded, path the file name)."""
    rows = []
    for r in CANONICAL:
        images = [
            {
                "bytes": (root / p).read_bytes() if embed else None,
                "path": Path(p).name if embed else p,
            }
            for p in _image_list(r)
        ]
        rows.append({"id": r["id"], "messages": _shift_tags(r["conversations"]), "images": images})
    a = (root / "img" / "a.jpg").read_bytes()
    bad_images = [{"bytes": a, "path": "a.jpg"}, {"bytes": a, "path": "a.jpg"}]
    rows.append(
        {
            "id": "bad",
            "messages": [_user("<image><image><image>"), _assistant("y")],
            "images": bad_images,
        }
    )
    return rows


def write_parquet(root: Path, path: Path, row_group_size: int = 3) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    turn = pa.struct([("role", pa.string()), ("content", pa.string())])
    schema = pa.schema(
        [("id", pa.string()), ("messages", pa.list_(turn)), ("images", pa.list_(image))]
    )
    table = pa.Table.from_pylist(table_rows(root, embed=True), schema=schema)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def write_save_to_disk(root: Path, folder: Path) -> Path:
    """ShareGPT rows (top-level system) with an ``images`` list of ``datasets.Image``."""
    import datasets

    rows = sharegpt_records()
    for row in rows[:-1]:
        row["images"] = [str(root / p) for p in row["images"]]
        row.setdefault("system", None)
    rows[-1]["images"] = [str(root / "img" / "a.jpg")]
    rows[-1]["system"] = None
    turn = {"from": datasets.Value("string"), "value": datasets.Value("string")}
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "conversations": datasets.List(turn),
            "images": datasets.List(datasets.Image()),
            "system": datasets.Value("string"),
        }
    )
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(folder))
    return folder


def write_all_formats(root: Path) -> dict[str, Path]:
    """Every format's data file (or folder) under ``root``; name -> path."""
    write_images(root)
    files = {
        "minicpmv": root / "minicpmv.json",
        "llava": root / "llava.json",
        "messages": root / "messages.jsonl",
        "sharegpt": root / "sharegpt.json",
    }
    files["minicpmv"].write_text(json.dumps(minicpmv_records()), encoding="utf-8")
    files["llava"].write_text(json.dumps(llava_records()), encoding="utf-8")
    lines = [json.dumps(r) for r in messages_records(root)]
    files["messages"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    files["sharegpt"].write_text(json.dumps(sharegpt_records()), encoding="utf-8")
    files["parquet"] = write_parquet(root, root / "train.parquet")
    files["hf-disk"] = write_save_to_disk(root, root / "disk")
    return files
