"""Input files: readers (JSON list, JSONL), broken lines, unusable files, read_range."""

from __future__ import annotations

import json
import pickle
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from records_fixtures import qa, read_all, write_jsonl

from mvprep import records as R
from mvprep.readers import DatasetError, JsonLinesSource, open_dataset
from mvprep.records import RecordError

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


def test_jsonl_source_type(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [json.dumps({"conversations": qa()})] * 2)
    source = open_dataset(path)
    assert isinstance(source, JsonLinesSource)
    assert list(source.offsets) == [0, len(json.dumps({"conversations": qa()})) + 1]
