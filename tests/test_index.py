"""The index beside the shards (entries, build params, manifest, rejects, load_index) and
``verify_dataset`` against real shards with real, deliberately damaged, files."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shard_fixtures import encode_jpeg, make_sample, write_shard

import mvshards
from mvshards.cost import SampleCost
from mvshards.image_table import (
    IMAGE_COLUMNS,
    IMAGE_TABLE_KEY,
    add_image_rows,
    new_image_table,
    read_image_table,
)
from mvshards.index import (
    CorruptEntryWarning,
    IndexMismatchError,
    IndexMissingError,
    ShardEntry,
    check_build_params,
    entry_path,
    load_index,
    read_build_params,
    read_entry,
    shard_name,
    write_build_params,
    write_entry,
    write_manifest,
    write_rejects,
)
from mvshards.tario import ShardWriter
from mvshards.verify import verify_dataset

PARAMS: dict[str, Any] = {
    "profile": "minicpmv-4.6",
    "max_res": 1344,
    "max_slice_nums": 9,
    "image_format": "jpeg",
    "quality": 95,
    "samples_per_shard": 3,
}
PLAN = [["text", "one", "reject"], ["sliced", "two", "one"], ["reject", "reject"]]
"""Records 0..7 in three units; ``reject`` marks a rejected record."""


def _reject(index: int) -> dict[str, Any]:
    reason = "missing file" if index % 2 else "truncated image"
    return {
        "index": index,
        "id": f"rec-{index}",
        "reason": reason,
        "error": f"FileNotFoundError: images/{index}.jpg",
        "record": {"id": f"rec-{index}", "image": f"images/{index}.jpg"},
    }


def build_out(
    out: Path, plan: list[list[str]] = PLAN, image_table: bool = True, ranges: bool = True
) -> list[ShardEntry]:
    """A finished build in ``out``, written the way mvprep writes one (``image_table=False``:
    as an mvprep that wrote no per-image table; ``ranges=False``: no sample byte ranges)."""
    out.mkdir(exist_ok=True)
    write_build_params(out, PARAMS)
    entries = []
    index = 0
    for unit, kinds in enumerate(plan):
        start = index
        samples, rejects = [], []
        for kind in kinds:
            if kind == "reject":
                rejects.append(_reject(index))
            else:
                samples.append(make_sample(index, kind))
            index += 1
        info = write_shard(out / shard_name(unit), samples)
        stats: dict[str, Any] = {"images": sum(len(m.images) for m, _ in samples)}
        if image_table:
            table = new_image_table()
            for meta, _ in samples:
                add_image_rows(table, meta.images)
            stats[IMAGE_TABLE_KEY] = table
        entry = ShardEntry(
            unit=unit,
            shard=shard_name(unit),
            record_range=[start, index],
            sha256=info.sha256,
            num_bytes=info.num_bytes,
            num_samples=len(samples),
            samples=[meta.index_row() for meta, _ in samples],
            rejects=rejects,
            stats={**stats, "wall_seconds": 0.5},
            sample_offsets=list(info.sample_offsets) if ranges else None,
        )
        write_entry(out, entry)
        entries.append(entry)
    write_rejects(out, entries)
    write_manifest(out, PARAMS, entries, extra={"wall_seconds": 1.5})
    return entries


@pytest.fixture
def out(tmp_path) -> Path:
    build_out(tmp_path / "out")
    return tmp_path / "out"


# --- entries ---------------------------------------------------------------------------


def test_names():
    assert shard_name(3) == "000003.tar"
    assert entry_path(Path("/o"), 12) == Path("/o/index/000012.json")


rows = st.lists(
    st.tuples(
        st.integers(0, 10**9).map(lambda i: f"{i:09d}"),
        st.integers(0, 10**6),
        st.integers(0, 10**5),
        st.integers(0, 20),
    ).map(list),
    max_size=20,
)
rejects = st.lists(
    st.fixed_dictionaries(
        {
            "index": st.integers(0, 10**9),
            "id": st.text(max_size=10),
            "reason": st.text(max_size=20),
            "error": st.text(max_size=50),
            "record": st.none() | st.dictionaries(st.text(max_size=5), st.text(max_size=5)),
        }
    ),
    max_size=5,
)


@settings(max_examples=60, deadline=None)
@given(
    samples=rows,
    rejects=rejects,
    unit=st.integers(0, 999_999),
    stats=st.dictionaries(
        st.text(max_size=8), st.integers() | st.floats(allow_nan=False), max_size=4
    ),
)
def test_entry_json_round_trip(samples, rejects, unit, stats):
    entry = ShardEntry(
        unit=unit,
        shard=shard_name(unit),
        record_range=[5, 9],
        sha256="ab" * 32,
        num_bytes=10240,
        num_samples=len(samples),
        samples=samples,
        rejects=rejects,
        stats=stats,
    )
    assert ShardEntry.from_json(json.loads(json.dumps(entry.to_json()))) == entry


def test_entry_file_round_trip(tmp_path):
    entry = ShardEntry(
        3,
        shard_name(3),
        [9, 12],
        "cd" * 32,
        20480,
        1,
        [["000000010", 5, 6, 1]],
        [_reject(9)],
        {"images": 1},
    )
    write_entry(tmp_path, entry)
    assert read_entry(tmp_path, 3) == entry
    assert read_entry(tmp_path, 4) is None  # missing: not finished, no warning
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == ["000003.json"]


def test_sample_offsets_round_trip_and_are_checked_for_shape(tmp_path):
    entry = ShardEntry(3, shard_name(3), [9, 12], "cd" * 32, 20480, 1, [["000000010", 5, 6, 1]])
    assert "sample_offsets" not in entry.to_json()  # as an older mvprep wrote it
    entry.sample_offsets = [0, 3072]
    write_entry(tmp_path, entry)
    assert read_entry(tmp_path, 3) == entry and entry.to_json()["sample_offsets"] == [0, 3072]
    for bad in ([0], [0, 512, 1024], [0, -512], [0, 1.5], [0, True], "0 3072"):
        raw = json.loads(entry_path(tmp_path, 3).read_bytes())
        raw["sample_offsets"] = bad
        entry_path(tmp_path, 3).write_text(json.dumps(raw))
        with pytest.warns(CorruptEntryWarning, match="sample_offsets"):
            assert read_entry(tmp_path, 3) is None


@pytest.mark.parametrize(
    "damage",
    [
        lambda raw: raw[: len(raw) // 2],  # partial write
        lambda raw: b"",
        lambda raw: b"\xff\xfe not json",
        lambda raw: raw.replace(b'"unit": 3', b'"unit": 4'),  # someone else's entry
        lambda raw: raw.replace(b'"num_samples": 1', b'"num_samples": 2'),
        lambda raw: raw.replace(b'"sha256"', b'"sha"'),  # a field missing
        lambda raw: b"[1, 2]",
    ],
)
def test_corrupt_entry_reads_as_none_with_a_warning(tmp_path, damage):
    entry = ShardEntry(3, shard_name(3), [9, 12], "cd" * 32, 20480, 1, [["000000010", 5, 6, 1]])
    write_entry(tmp_path, entry)
    path = entry_path(tmp_path, 3)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.warns(CorruptEntryWarning, match="000003.json: unreadable index entry"):
        assert read_entry(tmp_path, 3) is None


# --- build parameters ------------------------------------------------------------------


def test_build_params_round_trip_and_check(tmp_path):
    assert read_build_params(tmp_path) is None
    assert check_build_params(tmp_path, PARAMS) is False  # a new folder
    write_build_params(tmp_path, {**PARAMS, "pair": (1, 2)})
    assert read_build_params(tmp_path) == {**PARAMS, "pair": [1, 2]}
    assert check_build_params(tmp_path, {**PARAMS, "pair": (1, 2)}) is True


def test_build_params_mismatch_names_the_option(tmp_path):
    write_build_params(tmp_path, {**PARAMS, "max_res": 896, "max_slice_nums": 4})
    with pytest.raises(IndexMismatchError) as err:
        check_build_params(tmp_path, PARAMS)
    message = str(err.value)
    assert f"{tmp_path} was built with --max-res 896, this run asks for 1344" in message
    assert "--max-slice-nums 4, this run asks for 9" in message
    assert message.endswith(": use a new --out or the same options")
    with pytest.raises(IndexMismatchError, match='--format "jpeg", this run asks for "png"'):
        check_build_params(
            tmp_path, {**PARAMS, "max_res": 896, "max_slice_nums": 4, "image_format": "png"}
        )
    with pytest.raises(IndexMismatchError, match=r"--tokenizer "):
        check_build_params(
            tmp_path, {**PARAMS, "max_res": 896, "max_slice_nums": 4, "tokenizer": "/tok"}
        )


# --- manifest and rejects --------------------------------------------------------------


def test_manifest_totals_and_shard_list(tmp_path):
    out = tmp_path / "out"
    entries = build_out(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tool_version"] == mvshards.__version__
    assert manifest["params"] == PARAMS
    assert manifest["extra"] == {"wall_seconds": 1.5}
    metas = [make_sample(i, k)[0] for i, k in enumerate(sum(PLAN, [])) if k != "reject"]
    totals = manifest["totals"]
    assert totals["records"] == 8
    assert totals["samples"] == 5 == len(metas)
    assert totals["rejects"] == 3
    assert totals["rejects_by_reason"] == {"missing file": 1, "truncated image": 2}
    assert totals["shards"] == 3
    assert totals["bytes"] == sum((out / shard_name(u)).stat().st_size for u in range(3))
    assert totals["images"] == sum(len(m.images) for m in metas) == 5
    assert totals["patches"] == sum(m.num_patches for m in metas)
    assert totals["tokens"] == sum(m.num_tokens for m in metas)
    assert totals["max_images_per_sample"] == 2
    assert manifest["shards"][1] == {
        "unit": 1,
        "shard": "000001.tar",
        "sha256": entries[1].sha256,
        "num_bytes": entries[1].num_bytes,
        "num_samples": 3,
        "num_rejects": 0,
        "record_range": [3, 6],
    }
    assert manifest["shards"][2]["num_samples"] == 0  # an all-rejects unit still has a shard


def test_rejects_file_in_record_order(tmp_path):
    entries = build_out(tmp_path / "out")
    assert write_rejects(tmp_path, list(reversed(entries))) == 3
    lines = (tmp_path / "rejects.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [_reject(2), _reject(6), _reject(7)]


# --- load_index ------------------------------------------------------------------------


def test_load_index_opens_no_tar(out, monkeypatch):
    for path in out.glob("*.tar"):
        path.unlink()

    def no_tars(*args, **kwargs):
        raise AssertionError("load_index opened a tar")

    monkeypatch.setattr(tarfile, "open", no_tars)
    index = load_index(out)
    metas = [make_sample(i, k)[0] for i, k in enumerate(sum(PLAN, [])) if k != "reject"]
    assert len(index) == 5
    assert index.sample_rows() == [m.index_row() for m in metas]
    assert list(index.keys) == ["000000000", "000000001", "000000003", "000000004", "000000005"]
    assert index.shard_ids.tolist() == [0, 0, 1, 1, 1]
    assert index.num_images.tolist() == [0, 1, 1, 2, 1]
    assert index.num_tokens.dtype == np.int64 and index.num_patches.sum() == sum(
        m.num_patches for m in metas
    )
    assert index.params == PARAMS
    assert [s.path for s in index.shards] == [out / shard_name(u) for u in range(3)]
    assert [s.num_rejects for s in index.shards] == [1, 0, 2]
    assert index.shards[1].record_range == (3, 6)
    assert index.totals["samples"] == 5


def _metas() -> list[Any]:
    return [make_sample(i, k)[0] for i, k in enumerate(sum(PLAN, [])) if k != "reject"]


def test_load_index_reads_the_per_image_table(out):
    index = load_index(out)
    images = [image for meta in _metas() for image in meta.images]
    assert index.missing_image_table == [] and index.image_columns is not None
    columns = index.image_columns
    assert set(columns) == set(IMAGE_COLUMNS)
    assert columns["slices"].tolist() == [i.layout.num_slices for i in images]
    assert columns["width"].tolist() == [i.layout.original_size[0] for i in images]
    assert columns["patches"].tolist() == [i.layout.num_patches for i in images]
    assert any(i.layout.num_slices for i in images)
    slices = index.slice_costs()
    assert slices is not None
    costs = [SampleCost.from_meta(m) for m in _metas()]
    assert slices[0].tolist() == [c.slices for c in costs]
    assert slices[1].tolist() == [c.max_patches_per_slice for c in costs]
    entry = read_entry(out, 1)
    assert entry is not None and entry.image_columns() is not None


def test_load_index_carries_each_samples_byte_range(out, tmp_path):
    index = load_index(out)
    for shard in index.shards:
        entry = read_entry(out, shard.unit)
        ranges = shard.sample_ranges
        assert entry is not None and ranges is not None and entry.sample_offsets is not None
        assert ranges.keys.tolist() == [row[0] for row in entry.samples]
        assert ranges.offsets.tolist() == entry.sample_offsets
        spans = [ranges.span(k) for k in ranges.keys.tolist()]
        assert spans == list(zip(entry.sample_offsets, entry.sample_offsets[1:], strict=False))
    assert index.shards[1].sample_ranges.span("000000002") is None  # a key of no sample
    build_out(tmp_path / "old", ranges=False)  # an older mvprep's index: no ranges, loads
    assert [s.sample_ranges for s in load_index(tmp_path / "old").shards] == [None] * 3


def test_the_reader_fetches_a_sample_at_its_range_without_the_headers_walk(out, tmp_path):
    from mvtrain.data.shard_access import ShardAccess, ShardReadError

    build_out(tmp_path / "old", ranges=False)
    new, old = load_index(out), load_index(tmp_path / "old")
    kinds = [kind for kind in sum(PLAN, []) if kind != "reject"]
    wanted = [(int(s), str(k)) for s, k in zip(new.shard_ids, new.keys, strict=True)]
    expected = {w: make_sample(int(w[1]), kind)[1] for w, kind in zip(wanted, kinds, strict=True)}

    def read(index: Any, order: list[tuple[int, str]]) -> list[dict[str, bytes]]:
        ranges = [s.sample_ranges for s in index.shards]
        access = ShardAccess(index.shard_paths(), ranges=ranges)
        return [access.members(s, k) for s, k in order]

    assert read(new, wanted) == read(old, wanted) == [expected[w] for w in wanted]
    for folder in (out, tmp_path / "old"):  # garble the first header: sample 000000003's
        with open(folder / "000001.tar", "r+b") as handle:
            handle.write(b"\xff" * 512)
    later = [w for w in wanted if w[0] == 1 and w[1] != "000000003"]
    assert read(load_index(out), later) == [expected[w] for w in later]  # no walk: unhurt
    with pytest.raises(ShardReadError, match="sample 000000004 cannot be read"):
        read(load_index(tmp_path / "old"), later)  # the walk cannot pass the bad header
    with pytest.raises(ShardReadError) as caught:
        read(load_index(out), [(1, "000000003")])
    assert str(caught.value).startswith(
        f"{out / '000001.tar'}: sample 000000003 cannot be read at bytes [0, "
    )


def test_an_index_without_the_per_image_table_loads_without_it(tmp_path):
    build_out(tmp_path / "old", image_table=False)
    index = load_index(tmp_path / "old")
    assert index.image_columns is None and index.slice_costs() is None
    assert index.missing_image_table == [str(entry_path(tmp_path / "old", u)) for u in range(3)]
    assert index.sample_rows() == [m.index_row() for m in _metas()]


def test_a_table_of_the_wrong_length_reads_as_none():
    table = new_image_table()
    add_image_rows(table, make_sample(0, "two")[0].images)
    assert read_image_table({IMAGE_TABLE_KEY: table}, 2) is not None
    assert read_image_table({IMAGE_TABLE_KEY: table}, 3) is None
    assert read_image_table({}, 0) is None and read_image_table(None, 0) is None


def test_load_index_without_manifest_says_how_to_finish(out):
    (out / "manifest.json").unlink()
    with pytest.raises(
        IndexMissingError,
        match="has no manifest.json: the build did not finish; re-run mvprep build to complete it",
    ):
        load_index(out)


def test_load_index_rejects_missing_or_stale_entries(out):
    entry = read_entry(out, 1)
    assert entry is not None
    entry.sha256 = "00" * 32
    write_entry(out, entry)
    with pytest.raises(IndexMissingError, match="000001.json does not match manifest.json"):
        load_index(out)
    entry_path(out, 1).unlink()
    with pytest.raises(IndexMissingError, match="000001.json is missing or unreadable"):
        load_index(out)


def test_load_index_of_an_empty_dataset(tmp_path):
    build_out(tmp_path / "out", plan=[])
    index = load_index(tmp_path / "out")
    assert len(index) == 0 and index.sample_rows() == [] and index.shards == []


# --- verify ----------------------------------------------------------------------------


def _rewrite_shard(out: Path, unit: int, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    """Replace a shard's content and fix its sha256/size everywhere, so that only the deeper
    checks (sample count, rows, members, image sizes) can notice."""
    with ShardWriter(out / shard_name(unit)) as writer:
        for key, members in samples:
            writer.add_sample(key, members)
        info = writer.commit()
    entries = [read_entry(out, u) for u in range(len(PLAN))]
    entries[unit].sha256, entries[unit].num_bytes = info.sha256, info.num_bytes
    if len(info.sample_offsets) == entries[unit].num_samples + 1:  # else the count differs
        entries[unit].sample_offsets = list(info.sample_offsets)
    write_entry(out, entries[unit])
    write_manifest(out, PARAMS, entries, extra={})


def _unit1() -> list[tuple[str, dict[str, bytes]]]:
    return [
        (m.key, members)
        for m, members in (make_sample(i, k) for i, k in [(3, "sliced"), (4, "two"), (5, "one")])
    ]


def test_verify_passes_a_good_build(out):
    report = verify_dataset(out)
    assert report.ok, report.format_report()
    assert (report.shards, report.samples, report.images, report.rejects, report.records) == (
        3,
        5,
        5,
        3,
        8,
    )
    assert report.bytes_hashed == sum(p.stat().st_size for p in out.glob("*.tar"))
    assert report.format_report().startswith("OK ")


def test_verify_detects_a_flipped_byte(out):
    path = out / "000001.tar"
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    path.write_bytes(bytes(raw))
    report = verify_dataset(out)
    assert not report.ok
    assert "000001.tar: sha256 differs from the index (the file changed)" in report.problems
    assert report.format_report().startswith("FAILED ")


def test_verify_detects_a_missing_shard(out):
    (out / "000000.tar").unlink()
    report = verify_dataset(out)
    assert report.problems == ["000000.tar: shard file is missing"]


def test_verify_detects_a_sample_count_mismatch(out):
    _rewrite_shard(out, 1, _unit1()[:2])
    report = verify_dataset(out)
    assert "000001.tar: 2 samples in the tar, the index says 3" in report.problems
    assert "records 5 are in no shard and no reject" not in report.problems  # index-based


def test_verify_detects_a_wrong_image_size(out):
    samples = _unit1()
    samples[0][1]["ref0.jpg"] = encode_jpeg((100, 50), 0)
    _rewrite_shard(out, 1, samples)
    report = verify_dataset(out)
    assert len(report.problems) == 1, report.problems
    assert report.problems[0].startswith(
        "000001.tar: 000000003.ref0.jpg is 100x50, its refine_size is "
    )


def test_verify_detects_missing_and_extra_members(out):
    samples = _unit1()
    del samples[1][1]["src0.jpg"]
    samples[2][1]["zzz.txt"] = b"stray"
    _rewrite_shard(out, 1, samples)
    problems = verify_dataset(out).problems
    assert problems == [
        "000001.tar: 000000004 image 0: member 000000004.src0.jpg is missing",
        "000001.tar: member 000000005.zzz.txt is not named by 000000005.json",
    ]


def test_verify_detects_a_json_that_disagrees_with_its_row(out):
    samples = _unit1()
    obj = json.loads(samples[2][1]["json"])
    obj["num_text_tokens"] += 1
    obj["num_tokens"] += 1
    samples[2][1]["json"] = json.dumps(obj).encode()
    _rewrite_shard(out, 1, samples)
    (problem,) = verify_dataset(out).problems
    assert problem.startswith("000001.tar: 000000005 index row ")


def test_verify_detects_records_in_no_place_or_two(out):
    entry = read_entry(out, 2)
    assert entry is not None
    entry.rejects = [_reject(6), _reject(6)]  # record 7 lost, record 6 twice
    write_entry(out, entry)
    problems = verify_dataset(out).problems
    assert "records 7 are in no shard and no reject" in problems
    assert "records 6 are in several places" in problems


def test_verify_and_the_reader_refuse_a_wrong_sample_range(out):
    from mvtrain.data.shard_access import ShardAccess, ShardReadError

    entry = read_entry(out, 1)
    assert entry is not None and entry.sample_offsets is not None
    right = list(entry.sample_offsets)
    entry.sample_offsets[2] += 512  # the boundary between samples 000000004 and 000000005
    write_entry(out, entry)
    assert verify_dataset(out).problems == [
        f"000001.tar: sample 000000004 lies at bytes [{right[1]}, {right[2]}) of the tar, its "
        f"index entry records [{right[1]}, {right[2] + 512})",
        f"000001.tar: sample 000000005 lies at bytes [{right[2]}, {right[3]}) of the tar, its "
        f"index entry records [{right[2] + 512}, {right[3]})",
    ]
    index = load_index(out)
    access = ShardAccess(index.shard_paths(), ranges=[s.sample_ranges for s in index.shards])
    assert access.members(1, "000000003") == _unit1()[0][1]  # its range is right
    with pytest.raises(ShardReadError) as caught:
        access.members(1, "000000005")
    assert str(caught.value).startswith(f"{out / '000001.tar'}: sample 000000005 ")
    assert str(caught.value).endswith(f"run `mvprep verify {out}` and rebuild the shards it names")


def test_verify_without_manifest(out):
    (out / "manifest.json").unlink()
    report = verify_dataset(out)
    assert not report.ok and "the build did not finish" in report.problems[0]


def test_verify_warns_about_leftovers(out):
    (out / "000009.tar.tmp").write_bytes(b"partial")
    report = verify_dataset(out)
    assert report.ok and report.warnings == ["000009.tar.tmp is an unfinished temporary file"]
