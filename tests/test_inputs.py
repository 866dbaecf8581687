"""Several data files in one build (``mvprep build a.json b.jsonl``), and failing builds that
reject too much: real files, real tars, real subprocesses for the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pipeline_data import make_pipeline_dataset

from mvprep.build import build
from mvprep.inputs import input_names, open_inputs
from mvprep.merge import merge
from mvprep.options import BuildOptions
from mvprep.partition import Part
from mvshards.index import load_index
from mvshards.schema import SampleMeta
from mvshards.tario import iter_members

MVPREP = [sys.executable, "-m", "mvprep.cli"]


def _write_json(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1))
    return path


def _write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n\n" for r in records))
    return path


def _text_record(rid: str, answer: str = "Fine.") -> dict:
    return {
        "id": rid,
        "conversations": [
            {"role": "user", "content": "Hello?"},
            {"role": "assistant", "content": answer},
        ],
    }


# --------------------------------------------------------------------------- fast: numbering


def test_records_are_numbered_across_files_in_the_order_given(tmp_path: Path) -> None:
    (tmp_path / "more").mkdir()
    a = _write_json(tmp_path / "a.json", [_text_record(f"a{i}") for i in range(3)])
    b = _write_jsonl(tmp_path / "more" / "b.jsonl", [_text_record(f"b{i}") for i in range(4)])
    c = _write_json(tmp_path / "c.data", [_text_record("c0")])  # sniffed: a JSON list
    inputs = open_inputs([a, b, c])
    assert inputs.num_records == 8 and inputs.multi
    assert [f.name for f in inputs.files] == ["a.json", "more/b.jsonl", "c.data"]
    got = [(i, raw["id"], file.name) for i, raw, file in inputs.read_range(2, 8)]
    assert got == [
        (2, "a2", "a.json"),
        (3, "b0", "more/b.jsonl"),
        (4, "b1", "more/b.jsonl"),
        (5, "b2", "more/b.jsonl"),
        (6, "b3", "more/b.jsonl"),
        (7, "c0", "c.data"),
    ]
    assert inputs.source_of(5) == {"file": "more/b.jsonl", "index": 2}
    assert inputs.files[1].root == (tmp_path / "more").resolve()
    assert open_inputs([a]).source_of(1) is None  # one file: no source recorded
    assert open_inputs([a, b, c]) is inputs  # opened once per process
    # names do not depend on the folder the build is started from
    assert input_names([str(a), str(b)]) == ["a.json", "more/b.jsonl"]


def test_a_file_given_twice_is_refused(tmp_path: Path) -> None:
    a = _write_json(tmp_path / "a.json", [_text_record("a0")])
    with pytest.raises(ValueError, match="given twice"):
        BuildOptions(data_path=(a, tmp_path / "." / "a.json"), out_dir=tmp_path / "out")


def test_one_file_options_and_params_are_unchanged(tmp_path: Path) -> None:
    a = _write_json(tmp_path / "a.json", [_text_record("a0")])
    b = _write_json(tmp_path / "b.json", [_text_record("b0")])
    one = BuildOptions(data_path=(a,), out_dir=tmp_path / "out")
    assert one == BuildOptions(data_path=a, out_dir=tmp_path / "out")
    assert one.params()["data_path"] == str(a.resolve())
    two = BuildOptions(data_path=[a, b], out_dir=tmp_path / "out")
    assert two.params()["data_path"] == [str(a.resolve()), str(b.resolve())]


def test_sample_meta_source_is_optional_and_old_json_still_reads() -> None:
    meta = SampleMeta(key="000000003", id="x", conversations=[{"role": "user", "content": "hi"}])
    old = meta.to_json()
    assert "source" not in old  # one-file builds: the JSON is what it always was
    assert SampleMeta.from_json(old).source is None
    meta.source = {"file": "b.jsonl", "index": 1}
    again = SampleMeta.from_json(json.loads(json.dumps(meta.to_json())))
    assert again.source == {"file": "b.jsonl", "index": 1}


# --------------------------------------------------------------------------- builds


@pytest.fixture(scope="module")
def split_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """The pipeline set (good and bad records) as one file, and split into a JSON list and a
    JSON Lines file in the same folder (so image paths are the same in both)."""
    data = make_pipeline_dataset(tmp_path_factory.mktemp("multi") / "set", count=6)
    records = json.loads(data.read_text())
    a = _write_json(data.with_name("a.json"), records[:5])
    b = _write_jsonl(data.with_name("b.jsonl"), records[5:])
    return data, [a, b]


def _options(data: Path | tuple[Path, ...], out: Path) -> BuildOptions:
    return BuildOptions(data_path=data, out_dir=out, max_res=448, samples_per_shard=4)


def _members(out: Path) -> dict[str, dict[str, bytes]]:
    return {p.name: dict(iter_members(p)) for p in sorted(out.glob("*.tar"))}


@pytest.mark.slow
def test_two_files_build_as_their_concatenation_plus_the_source(
    split_set: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    whole, (a, b) = split_set
    n_a = len(json.loads(a.read_text()))
    one = build(_options(whole, tmp_path / "one"), workers=2, progress=False)
    two = build(_options((a, b), tmp_path / "two"), workers=2, progress=False)
    assert one.ok and two.ok
    ones, twos = _members(tmp_path / "one"), _members(tmp_path / "two")
    assert ones.keys() == twos.keys()
    sources = {}
    for shard, members in ones.items():
        assert members.keys() == twos[shard].keys()
        for name, data in members.items():
            if not name.endswith(".json"):
                assert twos[shard][name] == data, name  # the same image bytes
                continue
            mine = json.loads(twos[shard][name])
            source = mine.pop("source")
            assert mine == json.loads(data), name  # equal except the source
            sources[mine["key"]] = source
    assert sources  # every sample said where it came from, by file and position in it
    for key, source in sources.items():
        index = int(key)
        want = {"file": "a.json", "index": index} if index < n_a else {}
        want = want or {"file": "b.jsonl", "index": index - n_a}
        assert source == want
    ref, got = load_index(tmp_path / "one"), load_index(tmp_path / "two")
    assert ref.keys.tolist() == got.keys.tolist()
    assert ref.num_tokens.tolist() == got.num_tokens.tolist()
    rejects_one = [json.loads(x) for x in (tmp_path / "one/rejects.jsonl").read_text().splitlines()]
    rejects_two = [json.loads(x) for x in (tmp_path / "two/rejects.jsonl").read_text().splitlines()]
    assert [(r["index"], r["id"], r["reason"]) for r in rejects_one] == [
        (r["index"], r["id"], r["reason"]) for r in rejects_two
    ]
    for r in rejects_two:
        file, local = ("a.json", r["index"]) if r["index"] < n_a else ("b.jsonl", r["index"] - n_a)
        assert r["source"] == {"file": file, "index": local}
    params = json.loads((tmp_path / "two/manifest.json").read_text())["params"]
    assert params["data_path"] == [str(a.resolve()), str(b.resolve())]


@pytest.mark.slow
def test_two_files_by_parts_merge_and_resume_give_the_plain_bytes(
    split_set: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    _, files = split_set
    files_t = tuple(files)
    plain = tmp_path / "plain"
    assert build(_options(files_t, plain), workers=2, progress=False).ok
    parts = tmp_path / "parts"
    for i in (2, 1):
        assert build(_options(files_t, parts), workers=1, progress=False, part=Part(i, 2)).ok
    merge(parts, verify_hashes=True)
    resumed = tmp_path / "resumed"  # an interrupted build (unit 1 only), then the rest
    assert build(_options(files_t, resumed), workers=1, progress=False, units=[1]).ok
    assert build(_options(files_t, resumed), workers=2, progress=False).ok
    names = sorted(p.name for p in plain.glob("*.tar")) + ["manifest.json", "rejects.jsonl"]
    names += sorted(f"index/{p.name}" for p in (plain / "index").glob("*.json"))
    assert len(names) > 5
    for other in (parts, resumed):
        for name in names:
            if name.startswith("index/"):  # entries carry timings: compare what they index
                a, b = (json.loads((d / name).read_text()) for d in (plain, other))
                assert (a["sha256"], a["samples"], a["rejects"]) == (
                    b["sha256"],
                    b["samples"],
                    b["rejects"],
                ), name
            else:
                assert (plain / name).read_bytes() == (other / name).read_bytes(), (other, name)


@pytest.mark.slow
def test_cli_images_resolve_against_each_file_s_own_folder(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "one/img").mkdir(parents=True)
    (tmp_path / "two/img").mkdir(parents=True)
    Image.new("RGB", (64, 48), "red").save(tmp_path / "one/img/x.jpg")
    Image.new("RGB", (48, 64), "blue").save(tmp_path / "two/img/x.jpg")

    def rec(rid: str) -> dict:
        conv = [
            {"role": "user", "content": "<image>\nColour?"},
            {"role": "assistant", "content": "A colour."},
        ]
        return {"id": rid, "image": "img/x.jpg", "conversations": conv}

    a = _write_json(tmp_path / "one/a.json", [rec("a0")])
    b = _write_jsonl(tmp_path / "two/b.jsonl", [rec("b0"), rec("b1")])
    out = tmp_path / "out"
    proc = subprocess.run(
        [*MVPREP, "build", str(a), str(b), "--out", str(out), "--no-progress", "--workers", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "records" in proc.stdout and "one/a.json 1, two/b.jsonl 2" in proc.stdout
    metas = {
        name: json.loads(data)
        for name, data in iter_members(out / "000000.tar")
        if name.endswith(".json")
    }
    sizes = {m["id"]: (m["images"][0]["original_size"], m["source"]) for m in metas.values()}
    assert sizes == {
        "a0": ([64, 48], {"file": "one/a.json", "index": 0}),
        "b0": ([48, 64], {"file": "two/b.jsonl", "index": 0}),
        "b1": ([48, 64], {"file": "two/b.jsonl", "index": 1}),
    }


# --------------------------------------------------------------------------- failing builds


def _bad_records() -> list[dict]:
    no_conv = [{"id": f"empty-{i}", "conversations": []} for i in range(3)]
    narrator = {"role": "narrator", "content": "x"}
    roles = [
        {"id": f"role-{i}", "conversations": [{"role": "user", "content": "a"}, narrator]}
        for i in range(2)
    ]
    return [no_conv[0], roles[0], no_conv[1], roles[1], no_conv[2]]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*MVPREP, "build", *args, "--no-progress", "--workers", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_builds_that_reject_everything_or_too_much_fail_with_one_line(tmp_path: Path) -> None:
    data = _write_json(tmp_path / "bad.json", _bad_records())
    out = tmp_path / "out"
    proc = _cli(str(data), "--out", str(out))
    assert proc.returncode == 1
    assert "rejects" in proc.stdout  # the summary table still prints first
    assert proc.stderr.splitlines() == [
        "mvprep: error: all 5 records were rejected, no sample was written (no conversations 3, "
        f"unknown role 2); each reject with its record: {out}/rejects.jsonl"
    ]
    assert len((out / "rejects.jsonl").read_text().splitlines()) == 5

    part_out = tmp_path / "parts"
    proc = _cli(str(data), "--out", str(part_out), "--samples-per-shard", "1", "--part", "2/2")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "mvprep: error: part 2/2: all 2 records were rejected, no sample was written (unknown "
        f"role 2); each reject with its record: {part_out}/index/*.json of part 2/2 ('rejects'); "
        f"{part_out}/rejects.jsonl after mvprep merge"
    ]

    good = [_text_record(f"ok-{i}") for i in range(5)]
    mixed = _write_jsonl(tmp_path / "mixed.jsonl", good)
    out2 = tmp_path / "out2"
    proc = _cli(str(data), str(mixed), "--out", str(out2), "--max-reject-rate", "0.4")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "mvprep: error: 5 of 10 records were rejected (50.0%), more than --max-reject-rate 0.4 "
        f"(no conversations 3, unknown role 2); each reject with its record: {out2}/rejects.jsonl"
    ]
    proc = _cli(str(data), str(mixed), "--out", str(out2), "--max-reject-rate", "0.5")
    assert proc.returncode == 0, proc.stderr  # at the threshold: not more than it
    sources = [json.loads(x)["source"] for x in (out2 / "rejects.jsonl").read_text().splitlines()]
    assert sources == [{"file": "bad.json", "index": i} for i in range(5)]
