"""Text and record tables of the demo data set (see ``make_demo_data.py``): what each image
shows, the questions and text-only turns, the record-kind cycle, the LLaVA records and every
bad record the build must reject."""

from __future__ import annotations

import random
from typing import Any

IMAGES = "images"
"""Folder of the image files under the output folder; record paths start with it."""


# What each image shows: (English description, Chinese description).
SUBJECT = {
    "astronaut": ("an astronaut in an orange suit in front of a flag", "一位穿橙色宇航服的宇航员"),
    "chelsea": ("a ginger tabby cat looking to the side", "一只橘色虎斑猫望向一侧"),
    "coffee": ("a cup of coffee with latte art on a saucer", "一杯带拉花的咖啡放在碟子上"),
    "rocket": ("a rocket on its launch pad", "一枚停在发射台上的火箭"),
    "hubble": ("a deep-field photo full of distant galaxies", "一张布满遥远星系的深空照片"),
    "retina": ("a fundus photo of a human retina", "一张人眼视网膜眼底照片"),
    "ihc": ("a tissue section with brown and blue stain", "一张棕色和蓝色染色的组织切片"),
    "camera": ("a man with a camera on a tripod, in grayscale", "一位男子和三脚架上的相机"),
    "page": ("a scanned page of printed text", "一页扫描的印刷文字"),
    "logo": ("the scikit-image logo on a transparent background", "透明背景上的软件标志"),
    "horse": ("the black silhouette of a horse", "一匹马的黑色剪影"),
    "mosaic": (
        "a collage of an astronaut, coffee, a rocket and a cat",
        "宇航员、咖啡、火箭和猫的拼贴",
    ),
    "screenshot": ("a phone screenshot of a chat app", "一张聊天应用的手机截图"),
    "motorcycle": ("a motorcycle parked in a room", "一辆停在室内的摩托车"),
    "tiny": ("a tiny checkered icon", "一个很小的格子图标"),
}
QUESTIONS = [
    ("What is shown in this picture?", "这张图片里有什么?"),
    ("Describe the image briefly.", "请简要描述这张图片。"),
    ("What is the main subject here?", "图中的主体是什么?"),
]
TEXT_ONLY = [
    (
        "Write a haiku about data pipelines.",
        "Bytes in tidy rows, / shards march to the GPU, / no waste.",
    ),
    ("用一句话解释什么是数据分片。", "数据分片就是把大数据集切成固定大小的小文件,便于并行读取。"),
]


def round_turns(user: str, answer: str, llava: bool = False) -> list[dict[str, str]]:
    """One round, a user turn then an assistant turn (``from``/``value`` keys if ``llava``)."""
    if llava:
        return [{"from": "human", "value": user}, {"from": "gpt", "value": answer}]
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


def pick_qa(subject: str, rng: random.Random, zh: bool) -> tuple[str, str]:
    """A random question about ``subject`` and its answer, in Chinese if ``zh``."""
    q_en, q_zh = rng.choice(QUESTIONS)
    en, cn = SUBJECT[subject]
    return (q_zh, f"图中是{cn}。") if zh else (q_en, f"It shows {en}.")


CYCLE = "SSMSSXSSMSST"
"""Record kinds, repeated: S single image, M multi-image, X multi-turn, T text-only."""


def _bad(
    rid: str,
    why: str,
    image: str | dict[str, str] | None,
    user: str | None = "<image>\nWhat is this?",
    turns: list | None = None,
):
    rec: dict[str, Any] = {"id": rid}
    if image is not None:
        rec["image"] = image
    if turns is not None:
        rec["conversations"] = turns
    elif user is not None:
        rec["conversations"] = round_turns(user, "An answer.")
    return rid, why, rec


BAD_RECORDS: list[tuple[str, str, dict[str, Any]]] = [
    _bad("bad-missing-file", "image file does not exist", f"{IMAGES}/does_not_exist.jpg"),
    _bad("bad-empty-file", "image file is empty (0 bytes)", f"{IMAGES}/bad_empty.jpg"),
    _bad("bad-text-as-jpg", "a text file named .jpg (not an image)", f"{IMAGES}/bad_text.jpg"),
    _bad(
        "bad-truncated-jpeg", "a JPEG cut off after 40% of its bytes", f"{IMAGES}/bad_truncated.jpg"
    ),
    _bad(
        "bad-decompression-bomb",
        "a 20000x20000 1-bit PNG (400 MP, ~50 KB on disk): over the pixel limit",
        f"{IMAGES}/bad_bomb.png",
    ),
    _bad(
        "bad-placeholder-no-image",
        "<image> placeholder in the text but no image in the record",
        None,
        "<image>\nWhat is in the picture?",
    ),
    _bad(
        "bad-unknown-role",
        "a turn with role 'robot' (only user/assistant are allowed)",
        f"{IMAGES}/astronaut.jpg",
        turns=[{"role": "user", "content": "<image>\nWho?"}, {"role": "robot", "content": "Beep."}],
    ),
    _bad(
        "bad-no-conversations", "a record without 'conversations'", f"{IMAGES}/astronaut.jpg", None
    ),
    _bad(
        "bad-path-escape",
        "path '../outside.jpg' escapes the data folder: the reason must say so, not 'missing'",
        "../outside.jpg",
    ),
    _bad(
        "bad-multi-one-missing",
        "multi-image record whose second image is missing: rejected whole",
        {"<image_00>": f"{IMAGES}/astronaut.jpg", "<image_01>": f"{IMAGES}/gone.png"},
        "<image_00>\n<image_01>\nCompare them.",
    ),
    _bad(
        "bad-multi-missing-placeholder",
        "multi-image record whose text lacks <image_01>: placement is ambiguous",
        {"<image_00>": f"{IMAGES}/astronaut.jpg", "<image_01>": f"{IMAGES}/chelsea.jpg"},
        "<image_00>\nDescribe the pictures.",
    ),
]
"""(id, what it tests, record) of every record the build must reject."""


LLAVA_SINGLES = [
    ("astronaut.jpg", False, "<image>\n{q}"),
    ("coffee.png", True, "<image>\n{q}"),
    ("rocket.jpg", False, "{q}\n<image>"),
    ("phone_portrait_exif6.jpg", True, "<image>\n{q}"),
]
"""LLaVA single-image records: (file, Chinese?, user text template)."""
