"""Input records: readers (JSON, JSONL), normalisation, reject reasons, placeholders, paths."""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mvprep import records as R
from mvprep.readers import DatasetError, JsonLinesSource, open_dataset
from mvprep.records import Record, RecordError, normalize_record, resolve_image_path
from mvshards.conversation import expand_placeholders, image_markers, split_at_markers


def turn(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def qa(question: str = "What is this?", answer: str = "A cat.") -> list[dict[str, str]]:
    return [turn("user", question), turn("assistant", answer)]


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def read_all(path: Path) -> list[tuple[int, object]]:
    source = open_dataset(path)
    return list(source.read_range(0, source.num_records))


# --------------------------------------------------------------------------- readers


def test_json_list_reads_every_record(tmp_path: Path) -> None:
    recs = [{"id": f"r{i}", "conversations": qa()} for i in range(5)]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(recs), encoding="utf-8")
    source = open_dataset(path)
    assert (source.format, source.num_records, source.root) == ("json", 5, tmp_path.absolute())
    assert read_all(path) == list(enumerate(recs))
    assert list(source.read_range(2, 4)) == [(2, recs[2]), (3, recs[3])]
    assert list(source.read_range(4, 100)) == [(4, recs[4])]


def test_relative_data_path_gets_an_absolute_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.jsonl").write_text(json.dumps({"conversations": qa()}) + "\n")
    monkeypatch.chdir(tmp_path)
    source = open_dataset("sub/d.jsonl")
    assert source.root == tmp_path.absolute() / "sub" and source.root.is_absolute()


def test_jsonl_broken_line_is_one_reject_and_indices_stay(tmp_path: Path) -> None:
    good = [{"id": f"r{i}", "conversations": qa()} for i in range(4)]
    lines = [
        json.dumps(good[0]),
        "",  # blank lines are not records
        json.dumps(good[1]),
        '{"id": "broken", "conversations": [',  # record 2: not valid JSON
        "   ",
        "[1, 2, 3]",  # record 3: valid JSON, not an object
        json.dumps(good[2]),
        json.dumps(good[3]),
    ]
    path = write_jsonl(tmp_path / "data.jsonl", lines)
    source = open_dataset(path)
    assert (source.format, source.num_records) == ("jsonl", 6)
    items = read_all(path)
    assert [i for i, _ in items] == list(range(6))
    assert items[0][1] == good[0] and items[1][1] == good[1]
    assert items[4][1] == good[2] and items[5][1] == good[3]
    for index in (2, 3):
        err = items[index][1]
        assert isinstance(err, RecordError)
        assert err.reason == R.MALFORMED
        assert f"record {index}" in str(err) and "data.jsonl" in str(err)
    # A range that starts after blank lines seeks to the right line.
    assert list(source.read_range(4, 6)) == [(4, good[2]), (5, good[3])]


def test_jsonl_without_final_newline_and_with_bom_and_crlf(tmp_path: Path) -> None:
    recs = [{"id": "a", "conversations": qa()}, {"id": "b", "conversations": qa()}]
    data = b"\xef\xbb\xbf" + json.dumps(recs[0]).encode() + b"\r\n" + json.dumps(recs[1]).encode()
    path = tmp_path / "data.jsonl"
    path.write_bytes(data)
    assert read_all(path) == list(enumerate(recs))


def test_json_with_bom(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"conversations": qa()}]).encode())
    assert read_all(path) == [(0, {"conversations": qa()})]


def test_format_sniffed_for_other_extensions(tmp_path: Path) -> None:
    rec = {"conversations": qa()}
    as_json = tmp_path / "a.txt"
    as_json.write_text("\n  " + json.dumps([rec, rec]), encoding="utf-8")
    as_jsonl = tmp_path / "b.data"
    as_jsonl.write_text(json.dumps(rec) + "\n" + json.dumps(rec) + "\n", encoding="utf-8")
    assert open_dataset(as_json).format == "json"
    assert open_dataset(as_jsonl).format == "jsonl"
    assert read_all(as_json) == read_all(as_jsonl) == [(0, rec), (1, rec)]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.json", None, "not found"),
        ("empty.json", "", "is empty"),
        ("blank.jsonl", "\n \n", "is empty"),
        ("object.json", '{"conversations": []}', "not a list"),
        ("invalid.json", '[{"id": 1},', "not valid JSON"),
        ("lines.json", '{"id": 1}\n{"id": 2}\n', "name it .jsonl"),
        ("binary.json", b"[\xff\xfe]", "not UTF-8"),
        ("weird.txt", "hello", "cannot tell the format"),
    ],
)
def test_unusable_dataset_file_is_fatal(
    tmp_path: Path, name: str, content: str | bytes | None, message: str
) -> None:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(DatasetError, match=message) as info:
        open_dataset(path)
    assert name in str(info.value)


def test_directory_is_not_a_dataset(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not a file"):
        open_dataset(tmp_path)


def test_sources_pickle_for_workers(tmp_path: Path) -> None:
    recs = [{"id": str(i), "conversations": qa()} for i in range(3)]
    json_path = tmp_path / "d.json"
    json_path.write_text(json.dumps(recs), encoding="utf-8")
    jsonl_path = write_jsonl(tmp_path / "d.jsonl", [json.dumps(r) for r in recs])
    for path in (json_path, jsonl_path):
        source = open_dataset(path)
        blob = pickle.dumps(source)
        assert len(blob) < 1000  # the JSON list itself does not travel
        clone = pickle.loads(blob)
        assert list(clone.read_range(0, 3)) == list(enumerate(recs))


def test_jsonl_edited_after_indexing_is_fatal(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"conversations": qa()})] * 3)
    source = open_dataset(path)
    path.write_text(json.dumps({"conversations": qa("changed")}) + "\n", encoding="utf-8")
    with pytest.raises(DatasetError, match="changed since it was indexed"):
        list(source.read_range(0, 3))


def test_bad_range_is_an_error(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"conversations": qa()})])
    source = open_dataset(path)
    with pytest.raises(ValueError):
        list(source.read_range(1, 0))
    assert list(source.read_range(5, 9)) == []


_line = st.one_of(
    st.builds(lambda i: json.dumps({"id": i, "conversations": qa(str(i))}), st.integers(0, 99)),
    st.just('{"broken": '),
    st.just("42"),
)


@settings(max_examples=40, deadline=None)
@given(
    lines=st.lists(st.tuples(_line, st.integers(0, 2)), min_size=1, max_size=30),
    fmt=st.sampled_from(["json", "jsonl"]),
    cuts=st.lists(st.integers(0, 40), max_size=6),
)
def test_read_range_partitions_equal_a_full_read(
    lines: list[tuple[str, int]], fmt: str, cuts: list[int]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        if fmt == "jsonl":
            text = "".join(line + "\n" + "\n" * blanks for line, blanks in lines)
        else:
            text = json.dumps([json.loads(line) for line, _ in lines if line != '{"broken": '])
        path = Path(tmp) / f"data.{fmt}"
        path.write_text(text, encoding="utf-8")
        source = open_dataset(path)
        full = list(source.read_range(0, source.num_records))
        assert [i for i, _ in full] == list(range(source.num_records))
        edges = sorted({0, source.num_records, *(min(c, source.num_records) for c in cuts)})
        parts = []
        for start, stop in zip(edges, edges[1:], strict=False):
            parts.extend(source.read_range(start, stop))
        assert _comparable(parts) == _comparable(full)


def _comparable(items: list[tuple[int, object]]) -> list[tuple[int, object]]:
    return [(i, (x.reason, str(x)) if isinstance(x, RecordError) else x) for i, x in items]


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
    ({"conversations": [turn("system", "Be brief."), *qa()]}, R.UNKNOWN_ROLE),
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
    ({"images": ["a.jpg"], "conversations": qa()}, R.MALFORMED),
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


def test_non_object_in_json_list_is_a_reader_reject(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"conversations": qa()}, "text", None]), encoding="utf-8")
    items = read_all(path)
    assert items[0] == (0, {"conversations": qa()})
    for index in (1, 2):
        err = items[index][1]
        assert isinstance(err, RecordError) and err.reason == R.MALFORMED
        assert f"record {index} (d.json" in str(err)
    assert "JSON string" in str(items[1][1]) and "JSON null" in str(items[2][1])


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


def test_jsonl_source_type(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"conversations": qa()})] * 2)
    source = open_dataset(path)
    assert isinstance(source, JsonLinesSource)
    assert list(source.offsets) == [0, len(json.dumps({"conversations": qa()})) + 1]
