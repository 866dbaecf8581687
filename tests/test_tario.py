"""Shard writer/reader: deterministic bytes, strict member order, atomic commit.

The sample helpers (``make_sample``, ``write_shard``) live in ``shard_fixtures``, shared
with the index and reader-compatibility tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shard_fixtures import make_sample, write_shard

from mvshards.tario import (
    FIXED_MTIME,
    ShardWriter,
    iter_members,
    iter_shard,
    read_sample,
    sha256_file,
    split_member_name,
    write_atomic,
)

MIXED = ["text", "one", "sliced", "two"]


def test_equal_input_gives_byte_identical_shards(tmp_path, monkeypatch):
    samples = [make_sample(i, kind) for i, kind in enumerate(MIXED)]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = write_shard(tmp_path / "a" / "000000.tar", samples)
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 86_400 * 365)  # a year later
    monkeypatch.chdir(tmp_path / "b")  # and from another working directory
    os.utime(tmp_path / "a" / "000000.tar", (0, 0))  # file times are not part of the bytes
    second = write_shard(tmp_path / "b" / "000000.tar", samples)
    assert first.path.read_bytes() == second.path.read_bytes()
    assert first.sha256 == second.sha256 == sha256_file(second.path)
    assert first.num_bytes == second.path.stat().st_size
    assert first.num_members == sum(len(m) for _, m in samples)


def test_headers_are_fixed(tmp_path):
    info = write_shard(tmp_path / "s.tar", [make_sample(i, k) for i, k in enumerate(MIXED)])
    raw = info.path.read_bytes()
    assert raw[257:265] == b"ustar  \x00"  # GNU format magic; no PAX extended headers
    assert b"PaxHeader" not in raw and b"mtime=" not in raw
    with tarfile.open(info.path) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == sorted(m.name for m in members)
    for m in members:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (
            FIXED_MTIME,
            0,
            0,
            "",
            "",
            0o644,
        )
        assert m.isfile() and not m.pax_headers


def _tarfile_spans(path: Path) -> list[tuple[int, int]]:
    """Per sample, as tarfile reads the tar: its first member's header offset (a GNU long
    name's ``././@LongLink`` header included) to its last member's padded data end."""
    spans: dict[str, list[int]] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            end = m.offset_data + -(-m.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            spans.setdefault(m.name.split(".")[0], [m.offset, end])[1] = end
    return [(start, stop) for start, stop in spans.values()]


def test_sample_offsets_are_where_tarfile_finds_each_sample(tmp_path):
    samples = [make_sample(i, k) for i, k in enumerate(MIXED)]
    with ShardWriter(tmp_path / "s.tar") as writer:
        for meta, members in samples:
            writer.add_sample(meta.key, members)
        writer.add_sample("z" * 120, {"json": b"{}", "txt": b"x" * 700})  # a GNU long name
        info = writer.commit()
    offsets = info.sample_offsets
    assert len(offsets) == len(samples) + 2 and offsets[0] == 0
    assert list(zip(offsets, offsets[1:], strict=False)) == _tarfile_spans(info.path)
    tail = info.path.read_bytes()[offsets[-1] :]  # then only the end-of-archive zeros
    assert len(tail) >= 2 * tarfile.BLOCKSIZE and tail == bytes(len(tail))
    with ShardWriter(tmp_path / "e.tar") as writer:
        assert writer.commit().sample_offsets == (0,)  # no sample: one offset


def test_reader_groups_members_by_key(tmp_path):
    samples = [make_sample(i, k) for i, k in enumerate(MIXED)]
    info = write_shard(tmp_path / "s.tar", samples)
    read = list(iter_shard(info.path))
    assert [k for k, _ in read] == [m.key for m, _ in samples]
    for (_, got), (_, want) in zip(read, samples, strict=True):
        assert got == want
    assert sorted(read[3][1]) == ["json", "ref1.jpg", "src0.jpg", "src1.jpg"]
    assert read_sample(info.path, samples[2][0].key) == samples[2][1]
    with pytest.raises(KeyError, match="no sample with key '999999999'"):
        read_sample(info.path, "999999999")


def test_split_member_name_follows_webdataset():
    assert split_member_name("000000042.src0.jpg") == ("000000042", "src0.jpg")
    assert split_member_name("dir/000000042.json") == ("dir/000000042", "json")
    assert split_member_name("nodot") is None


member_names = st.lists(
    st.tuples(
        st.text("abc0129_-", min_size=1, max_size=6),
        st.text("abcjsonpg0129.", min_size=1, max_size=8).filter(lambda e: not e.startswith(".")),
    ),
    max_size=12,
    unique=True,
)


@settings(max_examples=40, deadline=None)
@given(names=member_names, payload=st.binary(max_size=700))
def test_roundtrip_any_sorted_members(names, payload):
    members = sorted(f"{k}.{e}" for k, e in names)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "x.tar"
        with ShardWriter(path) as writer:
            for n, name in enumerate(members):
                writer.add(name, payload[n:] + name.encode())
            info = writer.commit()
        assert info.sha256 == sha256_file(path)
        assert info.num_bytes == path.stat().st_size and info.num_bytes % 10240 == 0
        got = list(iter_members(path))
        assert [n for n, _ in got] == members
        assert [d for _, d in got] == [payload[n:] + m.encode() for n, m in enumerate(members)]
        # grouping: every key once, members of a key consecutive (sorted names guarantee it)
        grouped = list(iter_shard(path))
        keys = [k for k, _ in grouped]
        assert len(keys) == len(set(keys)) == len({n.split(".", 1)[0] for n in members})
        assert sum(len(s) for _, s in grouped) == len(members)


@pytest.mark.parametrize(
    "first, second",
    [
        ("000000002.json", "000000001.json"),
        ("000000001.src0.jpg", "000000001.json"),
        ("000000001.json", "000000001.json"),
    ],
)
def test_non_increasing_names_are_rejected(tmp_path, first, second):
    with ShardWriter(tmp_path / "s.tar") as writer:
        writer.add(first, b"{}")
        with pytest.raises(ValueError, match="strictly increasing name order"):
            writer.add(second, b"{}")
    assert list(tmp_path.iterdir()) == []  # left without commit: aborted


@pytest.mark.parametrize("name", ["nodot", ".json", "a/b.json", "a.b/c"])
def test_bad_member_names_are_rejected(tmp_path, name):
    with ShardWriter(tmp_path / "s.tar") as writer, pytest.raises(ValueError, match="key.ext"):
        writer.add(name, b"x")


def test_abort_leaves_nothing_and_keeps_an_existing_shard(tmp_path):
    final = tmp_path / "000001.tar"
    writer = ShardWriter(final)
    writer.add("000000001.json", b"{}")
    assert writer.tmp_path.exists() and not final.exists()
    writer.abort()
    assert list(tmp_path.iterdir()) == []

    info = write_shard(final, [make_sample(1, "one")])
    before = final.read_bytes()
    with ShardWriter(final) as writer:
        writer.add("000000001.json", b"other")
        writer.abort()
    assert final.read_bytes() == before and info.sha256 == sha256_file(final)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000001.tar"]


def test_exception_before_commit_leaves_no_final_file(tmp_path):
    final = tmp_path / "000000.tar"
    with pytest.raises(RuntimeError, match="boom"), ShardWriter(final) as writer:
        writer.add_sample("000000000", make_sample(0, "sliced")[1])
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_kill_before_commit_leaves_no_final_file(tmp_path):
    final = tmp_path / "000000.tar"
    script = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from mvshards.tario import ShardWriter
        w = ShardWriter(Path({str(final)!r}))
        for i in range(50):
            w.add(f"{{i:09d}}.json", b"x" * 5000)
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], check=False)
    assert proc.returncode == -9
    assert not final.exists()  # only the temporary file may remain
    info = write_shard(final, [make_sample(0, "text")])  # a re-run truncates it and commits
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000000.tar"]
    assert [k for k, _ in iter_shard(final)] == ["000000000"] and info.num_members == 1


def test_empty_shard_is_a_valid_tar(tmp_path):
    with ShardWriter(tmp_path / "e.tar") as writer:
        info = writer.commit()
    assert info.num_members == 0 and info.num_bytes == 10240
    assert list(iter_shard(info.path)) == []
    with tarfile.open(info.path) as tar:
        assert tar.getmembers() == []


def test_use_after_commit_is_an_error(tmp_path):
    with ShardWriter(tmp_path / "s.tar") as writer:
        writer.add("a.json", b"{}")
        writer.commit()
        with pytest.raises(RuntimeError, match="after commit"):
            writer.add("b.json", b"{}")
        with pytest.raises(RuntimeError, match="after commit"):
            writer.commit()
    assert (tmp_path / "s.tar").exists()


def test_write_atomic_replaces_whole_file(tmp_path):
    path = tmp_path / "f.json"
    write_atomic(path, b"one")
    write_atomic(path, b"two")
    assert path.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]
