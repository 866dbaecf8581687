"""Input formats: ``messages``/ShareGPT records, Parquet files and save_to_disk folders.

The same records in every format must give the same shards as the MiniCPM-V JSON build
(sample JSON and image members byte for byte; only an image given as bytes has a label for
its ``path``), and every mismatch is a reject with a reason naming the record.
"""

from __future__ import annotations

import base64
import json
import pickle
import sys
from pathlib import Path
from typing import Any

import format_fixtures as F
import pytest
from click.testing import CliRunner
from records_fixtures import qa, turn

from mvprep import records as R
from mvprep.cli import main
from mvprep.readers import DatasetError, check_input_format, open_dataset
from mvprep.records import ImageBytes, Record, RecordError, normalize_record
from mvshards.conversation import expand_placeholders
from mvshards.tario import iter_members

# --------------------------------------------------------------------------- records


def _norm(index: int, raw: dict[str, Any], fmt: str = "auto") -> Record:
    return normalize_record(index, raw, fmt)


def _same_record(got: Record, want: Record, root: Path) -> None:
    """Equal conversations and image names; each image the same path, or bytes equal to
    the file's."""
    assert got.conversations == want.conversations
    assert got.image_names == want.image_names
    for (_, label), (_, path) in zip(got.images, want.images, strict=True):
        if label != path:
            assert label.startswith("<bytes:") and label.endswith(">"), label
            assert got.embedded[label] == (root / path).read_bytes()


@pytest.mark.parametrize("fmt", ["llava", "messages", "sharegpt"])
def test_json_shapes_normalize_to_the_minicpmv_record(tmp_path: Path, fmt: str) -> None:
    F.write_images(tmp_path)
    records = {
        "llava": F.llava_records(),
        "messages": F.messages_records(tmp_path),
        "sharegpt": F.sharegpt_records(),
    }[fmt]
    for i, (raw, ref) in enumerate(zip(records[: F.GOOD], F.CANONICAL, strict=True)):
        want = _norm(i, ref)
        _same_record(_norm(i, raw), want, tmp_path)
        _same_record(_norm(i, raw, fmt), want, tmp_path)  # forced: the same
    assert R.record_shape(records[0]) == ("minicpmv" if fmt == "llava" else fmt)


def test_bytes_labels_name_the_record_and_place() -> None:
    data = base64.b64encode(b"\xff\xd8 not really a jpeg").decode()
    raw = {
        "messages": [
            {"role": "user", "content": [{"type": "image", "image": {"bytes": data}}]},
            {"role": "assistant", "content": "x"},
        ]
    }
    rec = _norm(12, raw)
    label = "<bytes:records[12].messages[0].content[0].image>"
    assert rec.images == [("<image>", label)]
    assert rec.embedded == {label: b"\xff\xd8 not really a jpeg"}
    rec = _norm(3, {"messages": qa("<image>"), "images": [{"bytes": data, "path": "x.jpg"}]})
    assert rec.image_paths == ["<bytes:records[3].images[0]>"]  # bytes win over a path


def test_image_bytes_carry_data_but_pickle_and_serialize_as_labels() -> None:
    blob = ImageBytes("<bytes:t.parquet[2].images[0]>", b"\x89PNG...")
    assert blob.data == b"\x89PNG..." and json.dumps({"b": blob}) == (
        '{"b": "<bytes:t.parquet[2].images[0]>"}'
    )
    back = pickle.loads(pickle.dumps(blob))
    assert back == blob and type(back) is str  # a reject never ships the bytes
    rec = _norm(2, {"conversations": qa("<image>"), "images": [{"bytes": blob, "path": "a"}]})
    assert rec.images == [("<image>", str(blob))] and rec.embedded[str(blob)] == blob.data


def test_system_turn_kept_and_single_image_goes_after_it() -> None:
    conv = [turn("system", "Be brief."), *qa("Describe.")]
    rec = _norm(0, {"image": "a.jpg", "conversations": conv})
    assert rec.conversations[0] == turn("system", "Be brief.")
    out = expand_placeholders(rec.conversations, rec.image_names, ["[IMG]"])
    assert out == [turn("system", "Be brief."), *qa("[IMG]\nDescribe.")]
    rec = _norm(0, {"system": "Be brief.", "messages": qa("<image>Describe."), "images": ["a"]})
    assert rec.conversations == [turn("system", "Be brief."), *qa("<image>Describe.")]
    assert rec.image_names == ["<image>"]


def _msg(content: Any, images: Any = None, **extra: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "messages": [{"role": "user", "content": content}, turn("assistant", "a")]
    }
    if images is not None:
        rec["images"] = images
    return {**rec, **extra}


REJECTS: list[tuple[dict[str, Any], str, str]] = [
    # (record, reason, a word the message must hold)
    (_msg("<image><image><image>", ["a.jpg", "b.jpg"]), R.IMAGE_COUNT_MISMATCH, "3 <image>"),
    (_msg("No tag.", ["a.jpg"]), R.IMAGE_COUNT_MISMATCH, "1 entries"),
    (
        {"conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}]}
        | {"images": ["a.jpg", "b.jpg"]},
        R.IMAGE_COUNT_MISMATCH,
        "2 entries",
    ),
    (_msg([{"type": "image"}, {"type": "text", "text": "?"}]), R.MISSING_IMAGE_DATA, "content[0]"),
    (_msg([{"type": "image"}, {"type": "image"}], ["a.jpg"]), R.IMAGE_COUNT_MISMATCH, "image part"),
    (_msg("<image>", [{"bytes": None, "path": None}]), R.MISSING_IMAGE_DATA, "images[0]"),
    (_msg("<image>", [{}]), R.MISSING_IMAGE_DATA, "images[0]"),
    (_msg("<image>", [{"bytes": "%%% not base64"}]), R.MALFORMED, "base64"),
    (_msg("<image>", [""]), R.MISSING_IMAGE_PATH, "images[0]"),
    (_msg("<image>", ["https://example.com/a.jpg"]), R.MISSING_IMAGE_PATH, "web address"),
    (_msg([{"type": "video", "video": "v.mp4"}]), R.MALFORMED, "'video'"),
    (_msg([{"type": "text"}]), R.MALFORMED, "text part"),
    (_msg("<image_00> hi", []), R.PLACEHOLDER_WITHOUT_IMAGE, "<image_00>"),
    (_msg("What does </image> mean?"), R.RESERVED_TOKEN, "</image>"),
    (
        {"messages": [turn("user", "q"), turn("tool", "42"), turn("assistant", "a")]},
        R.UNKNOWN_ROLE,
        "'tool'",
    ),
    (
        {"conversations": [{"from": "human", "value": "q"}, {"from": "observation", "value": "o"}]}
        | {"images": ["a.jpg"]},
        R.UNKNOWN_ROLE,
        "'observation'",
    ),
    ({"messages": [*qa(), turn("system", "late")]}, R.MALFORMED, "system"),
    ({"messages": [turn("system", "<image>"), *qa()], "images": ["a"]}, R.MALFORMED, "system"),
    ({"system": "s", "messages": [turn("system", "t"), *qa()]}, R.MALFORMED, "'system'"),
    ({"messages": [turn("system", "only")]}, R.NO_CONVERSATIONS, "system"),
    ({"messages": []}, R.NO_CONVERSATIONS, "'messages'"),
    ({"messages": "hello"}, R.MALFORMED, "'messages'"),
    ({"messages": [turn("user", "q")]}, R.NO_CONVERSATIONS, "assistant"),
    (_msg(7), R.MALFORMED, "'content'"),
    (_msg("<image>", 5), R.MALFORMED, "'images'"),
    (_msg([{"type": "image"}, "<image>", "<image>"], ["a", "b"]), R.IMAGE_COUNT_MISMATCH, "2 <"),
    (
        {"image": "a.jpg", "images": ["b.jpg"], "conversations": qa("<image>")},
        R.MALFORMED,
        "both",
    ),
]


@pytest.mark.parametrize("case", range(len(REJECTS)))
def test_each_mismatch_is_a_reject_naming_the_record(case: int) -> None:
    raw, reason, word = REJECTS[case]
    with pytest.raises(RecordError) as info:
        _norm(40 + case, {"id": f"r{case}", **raw})
    assert info.value.reason == reason, str(info.value)
    message = str(info.value)
    assert f"record {40 + case} (id 'r{case}')" in message and word in message
    assert "\n" not in message


def test_part_index_out_of_order_is_a_reject() -> None:
    content = [{"type": "image", "index": 1}, {"type": "image", "index": 0}]
    with pytest.raises(RecordError, match="has index 1 but is image 0") as info:
        _norm(0, _msg(content, ["a.jpg", "b.jpg"]))
    assert info.value.reason == R.MALFORMED
    rec = _norm(0, _msg([{"type": "image", "index": 0}, {"type": "text", "text": "?"}], ["a"]))
    assert rec.conversations[0]["content"] == "<image>?" and rec.image_paths == ["a"]


def test_forced_shape_rejects_other_shapes() -> None:
    sharegpt = {"conversations": qa("<image>"), "images": ["a.jpg"]}
    with pytest.raises(RecordError) as info:
        _norm(1, sharegpt, "minicpmv")
    assert info.value.reason == R.WRONG_SHAPE and "--input-format sharegpt" in str(info.value)
    with pytest.raises(RecordError) as info:
        _norm(1, {"messages": qa()}, "llava")
    assert info.value.reason == R.WRONG_SHAPE
    with pytest.raises(RecordError) as info:
        _norm(1, {"image": "a.jpg", "conversations": qa()}, "messages")
    assert info.value.reason == R.NO_CONVERSATIONS and "'messages'" in str(info.value)
    assert _norm(1, sharegpt, "sharegpt").image_paths == ["a.jpg"]
    with pytest.raises(ValueError, match="unknown input format"):
        _norm(1, sharegpt, "csv")


# --------------------------------------------------------------------------- sources


def test_parquet_rows_by_range_across_row_groups(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    from mvprep import readers

    F.write_images(tmp_path)
    path = F.write_parquet(tmp_path, tmp_path / "t.parquet", row_group_size=2)
    source = open_dataset(path)
    assert source.format == "parquet" and source.num_records == F.GOOD + 1
    assert list(source.offsets) == [0, 2, 4, 6, 7]  # row groups
    rows = list(source.read_range(1, 6))
    assert [i for i, _ in rows] == [1, 2, 3, 4, 5]
    assert [r["id"] for _, r in rows] == [r["id"] for r in F.CANONICAL[1:6]]
    blob = rows[2][1]["images"][0]["bytes"]  # row 3: c.jpg
    assert isinstance(blob, ImageBytes) and blob == "<bytes:t.parquet[3].images[0]>"
    assert blob.data == (tmp_path / "img" / "c.jpg").read_bytes()
    assert [i for i, _ in source.read_range(5, 99)] == [5, 6]
    # workers and Ray tasks get the source (or its offsets) without re-reading the footer
    assert pickle.loads(pickle.dumps(source)).num_records == F.GOOD + 1
    shared = pickle.loads(pickle.dumps(readers.share_offsets(source)))
    readers._offsets_cache.clear()
    assert readers.adopt_offsets(shared)
    assert [r["id"] for _, r in open_dataset(path).read_range(6, 7)] == ["bad"]


def test_parquet_content_parts_and_binary_columns(tmp_path: Path) -> None:
    """Chat datasets as Hugging Face stores them: content parts with an Image struct, parts
    without data next to an ``images`` column (llava-instruct-mix style), and a plain
    binary ``image`` column with MiniCPM-V turns."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    jpeg, png = b"\xff\xd8jpeg", b"\x89PNGpng"
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    part = pa.struct(
        [("type", pa.string()), ("text", pa.string()), ("image", image), ("index", pa.int64())]
    )
    turn_type = pa.struct([("role", pa.string()), ("content", pa.list_(part))])
    schema = pa.schema([("messages", pa.list_(turn_type)), ("images", pa.list_(image))])

    def text(t: str) -> dict[str, Any]:
        return {"type": "text", "text": t, "image": None, "index": None}

    answer = {"role": "assistant", "content": [text("A.")]}
    rows = [
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "text": None, "image": {"bytes": jpeg, "path": "x.jpg"}},
                        text("What?"),
                    ],
                },
                answer,
            ],
            "images": [],
        },
        {
            "messages": [
                {
                    "role": "user",
                    "content": [text("Look: "), {"type": "image", "text": None, "index": 0}],
                },
                answer,
            ],
            "images": [{"bytes": png, "path": None}],
        },
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "p.parquet")
    got = [
        normalize_record(i, raw) for i, raw in open_dataset(tmp_path / "p.parquet").read_range(0, 2)
    ]
    first = "<bytes:p.parquet[0].messages[0].content[0].image>"
    assert got[0].conversations == qa("<image>What?", "A.") and got[0].images == [
        ("<image>", first)
    ]
    assert got[0].embedded == {first: jpeg}
    second = "<bytes:p.parquet[1].images[0]>"
    assert got[1].conversations == qa("Look: <image>", "A.") and got[1].embedded == {second: png}

    turn_struct = pa.struct([("from", pa.string()), ("value", pa.string())])
    flat = pa.schema([("image", pa.binary()), ("conversations", pa.list_(turn_struct))])
    conv = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A."}]
    rows = [{"image": jpeg, "conversations": conv}]
    pq.write_table(pa.Table.from_pylist(rows, schema=flat), tmp_path / "f.parquet")
    ((_, raw),) = open_dataset(tmp_path / "f.parquet").read_range(0, 1)
    rec = normalize_record(0, raw)
    assert rec.images == [("<image>", "<bytes:f.parquet[0].image>")]
    assert rec.embedded == {"<bytes:f.parquet[0].image>": jpeg}


def test_parquet_sniffed_without_extension_and_container_override(tmp_path: Path) -> None:
    pytest.importorskip("pyarrow")
    F.write_images(tmp_path)
    path = F.write_parquet(tmp_path, tmp_path / "rows.bin")
    assert open_dataset(path).format == "parquet"
    check_input_format(path, "parquet")
    check_input_format(path, "messages")  # shapes are checked per record
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"conversations": qa()}]), encoding="utf-8")
    with pytest.raises(DatasetError, match="--input-format parquet, but .* is read as json"):
        check_input_format(data, "parquet")
    with pytest.raises(DatasetError, match="--input-format hf-disk"):
        check_input_format(data, "hf-disk")
    with pytest.raises(DatasetError, match="not a file or a datasets.save_to_disk folder"):
        open_dataset(tmp_path / "img")


def test_missing_pyarrow_is_one_line_naming_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "t.parquet"
    path.write_bytes(b"PAR1" + b"\0" * 16 + b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    with pytest.raises(DatasetError) as info:
        open_dataset(path)
    assert "pip install 'mvkit[parquet]'" in str(info.value) and "\n" not in str(info.value)


# --------------------------------------------------------------------------- builds


def _cli(*args: str) -> Any:
    result = CliRunner().invoke(main, ["build", *args, "--workers", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    return result


def _members(out: Path) -> dict[str, bytes]:
    return {name: data for tar in sorted(out.glob("*.tar")) for name, data in iter_members(tar)}


def _rejects(out: Path) -> list[dict[str, Any]]:
    text = (out / "rejects.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines()]


def _comparable(members: dict[str, bytes]) -> tuple[dict[str, bytes], dict[str, Any], list]:
    """Image members as they are; sample JSON parsed, without the stored source record,
    images given as bytes with their label set aside (returned)."""
    images = {k: v for k, v in members.items() if not k.endswith(".json")}
    metas, labels = {}, []
    for name, data in members.items():
        if name.endswith(".json"):
            meta = json.loads(data)
            meta.pop("source", None)
            for image in meta["images"]:
                if image["path"].startswith("<bytes:"):
                    labels.append(image["path"])
                    image["path"] = "<bytes>"
            metas[name] = meta
    return images, metas, labels


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every format built with the same options (3 records a shard); name -> OUT."""
    pytest.importorskip("pyarrow")
    pytest.importorskip("datasets")
    root = tmp_path_factory.mktemp("formats")
    outs = {}
    for name, data in F.write_all_formats(root).items():
        outs[name] = root / f"out-{name}"
        _cli(str(data), "--out", str(outs[name]), "--samples-per-shard", "3")
    return outs


@pytest.mark.slow
def test_every_format_builds_the_minicpmv_shards(built: dict[str, Path]) -> None:
    ref_images, ref_metas, ref_labels = _comparable(_members(built["minicpmv"]))
    assert len(ref_metas) == F.GOOD and not ref_labels
    assert sum(1 for k in ref_images if ".ref" in k) >= 2  # sliced images are in the test
    expected_labels = {
        "minicpmv": [],
        "llava": [],
        "sharegpt": [],
        "messages": [
            "<bytes:records[4].images[0]>",
            "<bytes:records[5].messages[0].content[0].image>",
        ],
        "parquet": [
            f"<bytes:train.parquet[{i}].images[{k}]>"
            for i, r in enumerate(F.CANONICAL)
            for k in range(len(F._image_list(r)))
        ],
        "hf-disk": [
            f"<bytes:disk[{i}].images[{k}]>"
            for i, r in enumerate(F.CANONICAL)
            for k in range(len(F._image_list(r)))
        ],
    }
    for name, out in built.items():
        images, metas, labels = _comparable(_members(out))
        assert images == ref_images, name  # every image member, byte for byte
        assert metas == {k: _with_bytes_paths(m, metas[k]) for k, m in ref_metas.items()}, name
        assert labels == expected_labels[name], name
        rejects = _rejects(out)
        assert [r["index"] for r in rejects] == [F.GOOD], name
        if name in ("parquet", "hf-disk"):  # the stored record holds the label, not bytes
            assert rejects[0]["reason"] == R.IMAGE_COUNT_MISMATCH
            assert rejects[0]["record"]["images"][0]["bytes"].startswith("<bytes:")


def _with_bytes_paths(ref: dict[str, Any], got: dict[str, Any]) -> dict[str, Any]:
    """``ref`` with the image paths that ``got`` has as bytes set to ``<bytes>`` too."""
    out = json.loads(json.dumps(ref))
    for mine, theirs in zip(out["images"], got["images"], strict=False):
        if theirs["path"] == "<bytes>":
            mine["path"] = "<bytes>"
    return out


@pytest.mark.slow
def test_parquet_parts_merge_and_resume_equal_the_plain_build(
    built: dict[str, Path], tmp_path: Path
) -> None:
    data = built["parquet"].parent / "train.parquet"
    out = tmp_path / "parts"
    for part in ("1/2", "2/2"):
        _cli(str(data), "--out", str(out), "--samples-per-shard", "3", "--part", part)
    merged = CliRunner().invoke(main, ["merge", str(out)])
    assert merged.exit_code == 0, merged.output
    files = ("manifest.json", "rejects.jsonl")

    def dataset(folder: Path) -> dict[str, bytes]:
        shards = {p.name: p.read_bytes() for p in sorted(folder.glob("*.tar"))}
        return {**shards, **{f: (folder / f).read_bytes() for f in files}}

    plain = dataset(built["parquet"])
    assert len([k for k in plain if k.endswith(".tar")]) == 3
    assert dataset(out) == plain
    (out / "000001.tar").unlink()  # resume: only the missing shard is redone, same bytes
    _cli(str(data), "--out", str(out), "--samples-per-shard", "3")
    assert dataset(out) == plain


@pytest.mark.slow
def test_rejects_of_a_real_build_name_their_records(tmp_path: Path) -> None:
    data = tmp_path / "bad.jsonl"
    good = {"id": "good", "messages": qa("Hi.")}
    rows = [good, *({"id": f"r{i}", **raw} for i, (raw, _, _) in enumerate(REJECTS))]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    _cli(str(data), "--out", str(out), "--samples-per-shard", "50")
    rejects = _rejects(out)
    assert [r["reason"] for r in rejects] == [reason for _, reason, _ in REJECTS]
    for r in rejects:
        assert f"record {r['index']} (id '{r['id']}')" in r["error"]


@pytest.mark.slow
def test_system_turn_reaches_the_trainer_with_exact_counts(tmp_path: Path) -> None:
    """A messages record with a system prompt: counted exactly with a real tokenizer and
    tokenized by the trainer to the same length, the system text kept and not labelled."""
    from transformers import AutoTokenizer

    from mvshards.schema import SampleMeta
    from mvshards.tiny_tokenizer import build_tiny_tokenizer
    from mvtrain.data.tokenize import IGNORE_INDEX, tokenize_sample

    F.write_images(tmp_path)
    tok_dir = build_tiny_tokenizer(tmp_path / "tok")
    record = {
        "messages": [turn("system", "Answer briefly."), *qa("<image>Colour?", "Green.")],
        "images": ["img/a.jpg"],
    }
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps(record) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    _cli(str(data), "--out", str(out), "--tokenizer", str(tok_dir), "--profile", "minicpmv-4.6")
    meta = SampleMeta.from_json(json.loads(_members(out)["000000000.json"]))
    assert meta.token_count_exact and meta.conversations[0] == turn("system", "Answer briefly.")
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    sample = tokenize_sample(meta, tokenizer, "minicpmv-4.6")
    assert len(sample.input_ids) == meta.num_tokens
    text = tokenizer.decode(sample.input_ids)
    assert "<|im_start|>system\nAnswer briefly.<|im_end|>" in text
    labelled = tokenizer.decode([t for t in sample.labels if t != IGNORE_INDEX])
    assert "Green." in labelled and "Answer" not in labelled
