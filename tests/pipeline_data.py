"""A small, seeded dataset for pipeline tests: real files, good and bad records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


def _photo(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack(
        [(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y) * 127 // max(w + h, 1))],
        axis=-1,
    ).astype(np.int16)
    noise = rng.integers(-20, 20, size=(h, w, 3), dtype=np.int16)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def make_pipeline_dataset(root: Path, count: int = 12, seed: int = 0) -> Path:
    """Write ``root/data.json`` with ``count`` good records plus a few bad ones; return it."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "img").mkdir(exist_ok=True)
    sizes = [(640, 480), (1200, 900), (300, 1600), (2000, 1500), (64, 64), (900, 900)]
    records: list[dict] = []
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        name = f"img/{i:03d}.{'png' if i % 5 == 4 else 'jpg'}"
        save_kwargs = {"quality": 90} if name.endswith(".jpg") else {}
        _photo(w, h, seed + i).save(root / name, **save_kwargs)
        if i % 4 == 3:
            second = f"img/{i:03d}b.jpg"
            _photo(h, w, seed + 1000 + i).save(root / second, quality=90)
            records.append(
                {
                    "id": f"multi-{i}",
                    "image": {"<image_00>": name, "<image_01>": second},
                    "conversations": [
                        {"role": "user", "content": "Compare <image_00> and <image_01>."},
                        {"role": "assistant", "content": f"They differ in layout {i}."},
                    ],
                }
            )
        elif i % 6 == 5:
            records.append(
                {
                    "id": f"text-{i}",
                    "conversations": [
                        {"role": "user", "content": "No image here, just text."},
                        {"role": "assistant", "content": "Fine."},
                    ],
                }
            )
        else:
            records.append(
                {
                    "id": f"single-{i}",
                    "image": name,
                    "conversations": [
                        {"role": "user", "content": "<image>\nWhat is shown?"},
                        {"role": "assistant", "content": f"A gradient number {i}."},
                    ],
                }
            )
    (root / "img" / "empty.jpg").write_bytes(b"")
    (root / "img" / "text.jpg").write_text("this is not a jpeg\n")
    good = (root / "img" / "000.jpg").read_bytes()
    (root / "img" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    bad = [
        ("bad-missing", "img/nope.jpg"),
        ("bad-empty", "img/empty.jpg"),
        ("bad-text", "img/text.jpg"),
        ("bad-truncated", "img/truncated.jpg"),
        ("bad-escape", "../outside.jpg"),
    ]
    for rid, path in bad:
        records.append(
            {
                "id": rid,
                "image": path,
                "conversations": [
                    {"role": "user", "content": "<image>\nDescribe."},
                    {"role": "assistant", "content": "Cannot."},
                ],
            }
        )
    records.append(
        {
            "id": "bad-role",
            "conversations": [
                {"role": "user", "content": "hi"},
                {"role": "narrator", "content": "hello"},
            ],
        }
    )
    records.append(
        {
            "id": "bad-multi-one-broken",
            "image": {"<image_00>": "img/000.jpg", "<image_01>": "img/truncated.jpg"},
            "conversations": [
                {"role": "user", "content": "<image_00> vs <image_01>"},
                {"role": "assistant", "content": "same"},
            ],
        }
    )
    data = root / "data.json"
    data.write_text(json.dumps(records, ensure_ascii=False, indent=1))
    return data
