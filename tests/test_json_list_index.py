"""The streaming byte-offset index of a JSON list (``mvprep.json_index``) and its reader.

Every property runs with tiny chunks too, so elements, strings, escapes, numbers and
multi-byte characters are cut at chunk borders.
"""

from __future__ import annotations

import json
import tempfile
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mvprep import readers
from mvprep.json_index import JsonListError, index_json_list, read_elements
from mvprep.readers import DatasetError, open_dataset

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
_values = st.recursive(
    _scalars,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=4)
    ),
    max_leaves=12,
)
_ws = st.sampled_from(["", " ", "\n", "\r\n", "\t ", "\n\n  "])


def _write(tmp: str, text: str, bom: bool = False) -> Path:
    path = Path(tmp) / "data.json"
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode("utf-8"))
    return path


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    elements=st.lists(_values, max_size=8),
    spaces=st.lists(_ws, min_size=20, max_size=20),
    ascii_only=st.booleans(),
    bom=st.booleans(),
    chunk=st.sampled_from([1, 2, 3, 7, 64, 1 << 20]),
)
def test_offsets_give_back_every_element(elements, spaces, ascii_only, bom, chunk) -> None:
    parts = [json.dumps(e, ensure_ascii=ascii_only) for e in elements]
    text = spaces[0] + "[" + spaces[1]
    for i, part in enumerate(parts):
        text += (
            part + spaces[(2 + i) % 20] + ("," + spaces[(3 + i) % 20] if i < len(parts) - 1 else "")
        )
    text += "]" + spaces[19]
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(tmp, text, bom)
        offsets = index_json_list(path, chunk_bytes=chunk)
        assert len(offsets) == len(elements) + 1
        got = [v for _, v in read_elements(path, offsets, 0, len(elements))]
        assert got == json.loads(text)
        raw = path.read_bytes()
        for i, part in enumerate(parts):  # each offset is exactly where the element starts
            assert raw[offsets[i] : offsets[i] + len(part.encode())] == part.encode()
        if elements:
            assert raw[offsets[-1] - 1 : offsets[-1]] == parts[-1].encode()[-1:]


@settings(max_examples=200, deadline=None)
@given(
    elements=st.lists(_values, min_size=1, max_size=5),
    cut=st.integers(0, 10_000),
    insert=st.sampled_from(["", ",", "]", "[", "{", '"', "x", "\\", "\x01", "1"]),
    chunk=st.sampled_from([1, 5, 1 << 20]),
)
def test_refuses_exactly_what_json_loads_refuses(elements, cut, insert, chunk) -> None:
    text = json.dumps(elements, ensure_ascii=False)
    cut %= len(text) + 1
    text = text[:cut] + insert + text[cut:]
    try:
        expected = json.loads(text)
    except json.JSONDecodeError:
        expected = None
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(tmp, text)
        if isinstance(expected, list):
            offsets = index_json_list(path, chunk_bytes=chunk)
            assert [v for _, v in read_elements(path, offsets, 0, len(expected))] == expected
        else:
            with pytest.raises(JsonListError, match="data.json"):
                index_json_list(path, chunk_bytes=chunk)


def test_error_names_the_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text('[\n {"id": 1},\n {"id": 2,,}\n]', encoding="utf-8")
    with pytest.raises(JsonListError, match=r"line 3, column 11"):
        index_json_list(path, chunk_bytes=4)


def test_cut_number_is_not_taken_for_a_shorter_one(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text("[123456789, 1e100, -0.5]", encoding="utf-8")
    for chunk in range(1, 12):
        offsets = index_json_list(path, chunk_bytes=chunk)
        assert [v for _, v in read_elements(path, offsets, 0, 3)] == [123456789, 1e100, -0.5]


@pytest.mark.slow
def test_a_big_list_is_indexed_without_holding_it(tmp_path: Path) -> None:
    record = {"id": "x", "image": "img/0001.jpg", "conversations": [{"role": "user"}] * 8}
    record["conversations"][0] = {"role": "user", "content": "说明 <image>\n" + "ab" * 200}
    path = tmp_path / "big.json"
    with open(path, "w", encoding="utf-8") as f:
        f.write("[")
        for i in range(20_000):
            f.write(("," if i else "") + json.dumps({**record, "id": str(i)}, ensure_ascii=False))
        f.write("]")
    size = path.stat().st_size
    assert size > 10_000_000
    tracemalloc.start()
    try:
        offsets = index_json_list(path, chunk_bytes=64 << 10)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(offsets) == 20_001
    assert peak < 2_000_000, f"indexing held {peak} bytes of a {size}-byte file"
    source = open_dataset(path)
    assert [r["id"] for _, r in source.read_range(12_345, 12_348)] == ["12345", "12346", "12347"]


def test_open_dataset_indexes_once_per_process(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"conversations": []}] * 3), encoding="utf-8")
    calls = []
    real = readers.index_json_list
    monkeypatch.setattr(readers, "index_json_list", lambda p: calls.append(p) or real(p))
    first = open_dataset(path)
    second = open_dataset(path)
    assert len(calls) == 1 and second.offsets is first.offsets
    path.write_text(json.dumps([{"conversations": []}] * 2), encoding="utf-8")
    with pytest.raises(DatasetError, match="changed since it was indexed"):
        list(first.read_range(0, 2))
    assert open_dataset(path).num_records == 2 and len(calls) == 2


def test_list_of_non_objects_gives_per_record_rejects(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    path.write_text('[{"conversations": []}, 42, "x", {"conversations": []}]', encoding="utf-8")
    items = list(open_dataset(path).read_range(0, 4))
    assert [type(v).__name__ for _, v in items] == ["dict", "RecordError", "RecordError", "dict"]
    assert "record 1" in str(items[1][1]) and "number" in str(items[1][1])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[]", None),
        (" [ ] ", None),
        ("[1,]", "Expecting value"),
        ("[1 2]", "Expecting ','"),
        ("[1] x", "Extra data"),
        ('"just a string"', "holds a JSON string, not a list"),
        ('{"a": 1} {"a": 2}', "name it .jsonl"),
        ("[", "Expecting value"),
    ],
)
def test_top_level_shapes(tmp_path: Path, text: str, message: str | None) -> None:
    path = tmp_path / "d.json"
    path.write_text(text, encoding="utf-8")
    if message is None:
        assert list(index_json_list(path)) == [text.index("]")]
    else:
        with pytest.raises(JsonListError, match=message):
            index_json_list(path)


def test_offsets_handed_to_another_process_are_adopted_not_rescanned(
    tmp_path: Path, monkeypatch
) -> None:
    import pickle

    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"conversations": [], "id": str(i)} for i in range(5)]))
    shared = pickle.loads(pickle.dumps(readers.share_offsets(open_dataset(path))))
    readers._offsets_cache.clear()  # as in a fresh worker process
    monkeypatch.setattr(readers, "index_json_list", lambda p: pytest.fail("re-indexed"))
    assert readers.adopt_offsets(shared)
    assert [r["id"] for _, r in open_dataset(path).read_range(3, 5)] == ["3", "4"]
    path.write_text(json.dumps([{"conversations": []}]))  # another file now: not adopted
    readers._offsets_cache.clear()
    assert not readers.adopt_offsets(shared) and not readers._offsets_cache
