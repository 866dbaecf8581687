"""Input records: normalisation, reject reasons, placeholders, paths."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from records_fixtures import qa, read_all, turn

from mvprep import records as R
from mvprep.records import Record, RecordError, normalize_record, resolve_image_path
from mvshards.conversation import expand_placeholders, image_markers, split_at_markers

# --------------------------------------------------------------------------- records


def test_minicpmv_single_image() -> None:
    raw = {"id": "a1", "image": "img/cat.jpg", "conversations": qa("<image>\nWhat is it?")}
    rec = normalize_record(3, raw)
    assert rec == Record(3, "a1", qa("<image>\nWhat is it?"), [("<image>", "img/cat.jpg")], raw)
    assert rec.image_names == ["<image>"] and rec.image_paths == ["img/cat.jpg"]


def test_single_image_without_placeholder_is_accepted_unchanged() -> None:
    rec = normalize_record(0, {"image": "a.jpg", "conversations": qa("Describe.")})
    assert rec.conversations == qa("Describe.")
    assert rec.images == [("<image>", "a.jpg")]
    assert rec.id == "0"


def test_image_dict_with_only_image_key_is_single_image() -> None:
    rec = normalize_record(0, {"image": {"<image>": "a.jpg"}, "conversations": qa("<image> hi")})
    assert rec.images == [("<image>", "a.jpg")]


def test_multi_image_ordered_by_first_occurrence_in_text() -> None:
    raw = {
        "id": 17,
        "image": {"<image_00>": "a.jpg", "<image_01>": "b.jpg", "<image_02>": "c.jpg"},
        "conversations": [
            turn("user", "Compare <image_02> with <image_00>."),
            turn("assistant", "The first is brighter."),
            turn("user", "And <image_01>?"),
            turn("assistant", "Darker."),
        ],
    }
    rec = normalize_record(5, raw)
    assert rec.id == "17"
    assert rec.images == [("<image_02>", "c.jpg"), ("<image_00>", "a.jpg"), ("<image_01>", "b.jpg")]


def test_llava_style_turns() -> None:
    raw = {
        "id": "llava-1",
        "image": "coco/1.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nWhat is the man doing?"},
            {"from": "gpt", "value": "Surfing."},
            {"from": "human", "value": "Where?"},
            {"from": "gpt", "value": "At the beach."},
        ],
    }
    rec = normalize_record(0, raw)
    assert rec.conversations == [
        turn("user", "<image>\nWhat is the man doing?"),
        turn("assistant", "Surfing."),
        turn("user", "Where?"),
        turn("assistant", "At the beach."),
    ]
    assert rec.images == [("<image>", "coco/1.jpg")]


@pytest.mark.parametrize("image", [None, {}])
def test_text_only_records_are_valid(image: object) -> None:
    raw = {"conversations": qa("Hi"), "image": image}
    rec = normalize_record(2, raw)
    assert rec.images == [] and rec.id == "2"
    assert normalize_record(2, {"conversations": qa("Hi")}).images == []


REJECTS: list[tuple[object, str]] = [
    ("just a string", R.MALFORMED),
    ({"id": "no-conv"}, R.NO_CONVERSATIONS),
    ({"conversations": []}, R.NO_CONVERSATIONS),
    ({"conversations": "hello"}, R.MALFORMED),
    ({"conversations": ["hello", "there"]}, R.MALFORMED),
    ({"conversations": [{"content": "x"}, turn("assistant", "y")]}, R.MALFORMED),
    ({"conversations": [turn("tool", "42"), *qa()]}, R.UNKNOWN_ROLE),
    ({"conversations": [*qa(), turn("system", "Be brief.")]}, R.MALFORMED),
    (
        {"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]},
        R.UNKNOWN_ROLE,
    ),
    ({"conversations": [turn("user", "q"), {"role": "assistant", "content": 5}]}, R.MALFORMED),
    ({"conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]}, R.MALFORMED),
    ({"conversations": [turn("assistant", "a"), turn("user", "q")]}, R.MALFORMED),
    ({"conversations": [turn("user", "q"), turn("user", "q2")]}, R.NO_CONVERSATIONS),
    ({"conversations": [turn("user", "q")]}, R.NO_CONVERSATIONS),
    ({"conversations": qa("<image> what?")}, R.PLACEHOLDER_WITHOUT_IMAGE),
    ({"conversations": qa("<image_00> what?")}, R.PLACEHOLDER_WITHOUT_IMAGE),
    ({"image": "a.jpg", "conversations": qa("<image><image> what?")}, R.AMBIGUOUS_PLACEHOLDER),
    (
        {
            "image": "a.jpg",
            "conversations": [*qa(), turn("user", "<image>"), turn("assistant", "x")],
        },
        R.AMBIGUOUS_PLACEHOLDER,
    ),
    ({"image": "a.jpg", "conversations": qa("<image_00> what?")}, R.PLACEHOLDER_WITHOUT_IMAGE),
    (
        {"image": {"<image_00>": "a.jpg"}, "conversations": qa("<image_00> vs <image_01>")},
        R.PLACEHOLDER_WITHOUT_IMAGE,
    ),
    (
        {
            "image": {"<image_00>": "a.jpg", "<image_01>": "b.jpg"},
            "conversations": qa("<image_00>"),
        },
        R.IMAGE_WITHOUT_PLACEHOLDER,
    ),
    (
        {"image": {"<image_00>": "a.jpg", "<image_01>": "b.jpg"}, "conversations": qa("<image>")},
        R.PLACEHOLDER_WITHOUT_IMAGE,
    ),
    (
        {"image": {"<image_00>": "a.jpg"}, "conversations": qa("<image_00>", "<image_00>")},
        R.AMBIGUOUS_PLACEHOLDER,
    ),
    ({"image": "", "conversations": qa()}, R.MISSING_IMAGE_PATH),
    ({"image": {"<image_00>": None}, "conversations": qa("<image_00>")}, R.MISSING_IMAGE_PATH),
    ({"image": ["a.jpg", "b.jpg"], "conversations": qa()}, R.MALFORMED),
    ({"image": 7, "conversations": qa()}, R.MALFORMED),
    ({"image": {"img1": "a.jpg"}, "conversations": qa("img1")}, R.MALFORMED),
    ({"images": ["a.jpg"], "conversations": qa()}, R.IMAGE_COUNT_MISMATCH),  # ShareGPT
    ({"conversations": qa("What does </image> mean?")}, R.RESERVED_TOKEN),
    ({"image": "a.jpg", "conversations": qa("<image>", "It says <unk>.")}, R.RESERVED_TOKEN),
]


def test_every_reject_reason_from_a_real_file(tmp_path: Path) -> None:
    """A dataset file full of bad records: each one rejected with its reason, none crash."""
    good = {"id": "good", "image": "a.jpg", "conversations": qa("<image> ok")}
    rows = [good, *(raw for raw, _ in REJECTS), good]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    results = []
    for index, raw in read_all(path):
        if isinstance(raw, RecordError):  # unreadable: the reader already says why
            results.append(raw)
            continue
        try:
            results.append(normalize_record(index, raw))
        except RecordError as err:
            results.append(err)
    assert isinstance(results[0], Record) and isinstance(results[-1], Record)
    for index, (result, (_, reason)) in enumerate(zip(results[1:-1], REJECTS, strict=True), 1):
        assert isinstance(result, RecordError), f"record {index} should be rejected"
        assert result.reason == reason, f"record {index}: {result}"
        assert f"record {index}" in str(result)
        assert "\n" not in str(result)


def test_reject_names_record_id() -> None:
    with pytest.raises(RecordError) as info:
        normalize_record(12, {"id": "abc", "conversations": [turn("robot", "x")]})
    assert info.value.reason == R.UNKNOWN_ROLE
    assert "record 12 (id 'abc')" in str(info.value) and "'robot'" in str(info.value)


# --------------------------------------------------------------------------- expansion


def test_expand_single_image_in_place() -> None:
    conv = [turn("user", "Look: <image>\nWhat?"), turn("assistant", "A <image> tag.")]
    out = expand_placeholders(conv, ["<image>"], ["[IMG]"])
    assert out == [turn("user", "Look: [IMG]\nWhat?"), turn("assistant", "A <image> tag.")]
    assert conv[0]["content"] == "Look: <image>\nWhat?"  # input untouched


def test_expand_single_image_prepended() -> None:
    out = expand_placeholders(qa("What?"), ["<image>"], ["[IMG]"])
    assert out == qa("[IMG]\nWhat?")


def test_expand_multi_image_joins_parts_with_newlines() -> None:
    conv = [
        turn("user", "Compare <image_00> and <image_01>."),
        turn("assistant", "No images here."),
        turn("user", "<image_02>"),
        turn("assistant", "Also<image_03>x"),
    ]
    names = ["<image_00>", "<image_01>", "<image_02>", "<image_03>"]
    out = expand_placeholders(conv, names, ["A", "B", "C", "D"])
    assert [t["content"] for t in out] == [
        "Compare \nA\n and \nB\n.",
        "No images here.",
        "\nC\n",
        "Also\nD\nx",
    ]


def test_expand_without_images_is_a_copy() -> None:
    conv = qa("<image> stays")
    out = expand_placeholders(conv, [], [])
    assert out == conv and out is not conv and out[0] is not conv[0]


def test_expand_rejects_unknown_placeholder_and_mismatched_lists() -> None:
    with pytest.raises(ValueError, match="<image_05>"):
        expand_placeholders(qa("<image_05>"), ["<image_00>"], ["A"])
    with pytest.raises(ValueError):
        expand_placeholders(qa(), ["<image>"], [])


def test_markers_split_rendered_text() -> None:
    markers = image_markers(2)
    assert len(set(markers)) == 2
    assert split_at_markers(f"a{markers[0]}b{markers[1]}", markers) == ["a", "b", ""]
    assert split_at_markers("plain", []) == ["plain"]
    with pytest.raises(ValueError, match="occurs 2 times"):
        split_at_markers(markers[0] * 2, markers[:1])


# --------------------------------------------------------------------------- paths


def test_paths_inside_root_resolve(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    target = tmp_path / "img" / "a.jpg"
    target.write_bytes(b"x")
    assert resolve_image_path(tmp_path, "img/a.jpg", False) == target.resolve()
    assert resolve_image_path(tmp_path, "img/../img/a.jpg", False) == target.resolve()
    assert resolve_image_path(tmp_path, str(target), False) == target.resolve()
    # Existence is the decoder's business.
    assert resolve_image_path(tmp_path, "img/missing.jpg", False).name == "missing.jpg"


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_paths_escaping_root_are_rejected(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "data"
    (root / "img").mkdir(parents=True)
    outside = tmp_path / "secret.jpg"
    outside.write_bytes(b"x")
    if kind == "dotdot":
        path = "img/../../secret.jpg"
    elif kind == "absolute":
        path = str(outside)
    else:
        os.symlink(outside, root / "img" / "link.jpg")
        path = "img/link.jpg"
    with pytest.raises(RecordError) as info:
        resolve_image_path(root, path, allow_outside_root=False)
    assert info.value.reason == R.PATH_OUTSIDE_ROOT
    assert "--allow-outside-root" in str(info.value) and path in str(info.value)
    assert resolve_image_path(root, path, allow_outside_root=True) == outside.resolve()


def test_symlink_within_root_is_fine(tmp_path: Path) -> None:
    (tmp_path / "real.jpg").write_bytes(b"x")
    os.symlink(tmp_path / "real.jpg", tmp_path / "link.jpg")
    assert resolve_image_path(tmp_path, "link.jpg", False) == (tmp_path / "real.jpg").resolve()


def test_empty_path_is_missing(tmp_path: Path) -> None:
    with pytest.raises(RecordError) as info:
        resolve_image_path(tmp_path, " ", False)
    assert info.value.reason == R.MISSING_IMAGE_PATH
