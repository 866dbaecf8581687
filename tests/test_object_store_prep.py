"""Prep against a real S3 endpoint: ``mvprep build --out s3://...`` writes the objects a local
build writes, survives ``kill -9`` mid-upload, retries 5xx, stops on 403 or a missing bucket
with one line; ``--part`` + ``merge``, ``--runner ray``, ``verify``, ``stats`` and
``inspect`` work on the bucket, and stock webdataset reads its shards.

The endpoint is moto's S3 server on localhost (``s3_server.py``), driven through the same
fsspec/s3fs path users take (``s3://`` URLs, the AWS environment variables); the faults are
real HTTP responses on the wire. Nothing of ours is mocked.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from pipeline_data import make_pipeline_dataset

from mvprep.build import build
from mvprep.cli import IS_EXPECTED, main
from mvprep.merge import MergeIncompleteError, merge
from mvprep.options import BuildOptions
from mvprep.partition import Part
from mvshards import storage
from mvshards.command_line import run_cli
from mvshards.index import load_index
from mvshards.storage import ObjectPath, StorageError, location
from mvshards.verify import verify_dataset

MVPREP = [sys.executable, "-m", "mvprep.cli"]
SPS = 3
DATASET_FILES = ("manifest.json", "rejects.jsonl", "README.md")


def _options(data, out, **kw) -> BuildOptions:
    return BuildOptions(data_path=data, out_dir=out, max_res=448, samples_per_shard=SPS, **kw)


def _shards(out) -> dict[str, bytes]:
    out = location(out)
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.tar"))}


def _dataset_bytes(out) -> dict[str, bytes]:
    """Every shard and dataset file, and every shard's recorded sample byte ranges: what must
    not depend on where the build wrote."""
    out = location(out)
    ranges = {
        f"ranges of {s.path.name}": json.dumps(s.sample_ranges.offsets.tolist()).encode()
        for s in load_index(out).shards
        if s.sample_ranges is not None
    }
    assert len(ranges) == len(_shards(out)), "every entry records its samples' byte ranges"
    files = {name: (out / name).read_bytes() for name in DATASET_FILES}
    return {**_shards(out), **files, **ranges}


def _tarfile_offsets(shard: bytes) -> list[int]:
    """Where tarfile finds each sample of ``shard``: its first header, then one past the
    padded end of each sample (what an index entry's ``sample_offsets`` must say)."""
    offsets: list[int] = []
    key = None
    with tarfile.open(fileobj=io.BytesIO(shard)) as tar:
        for m in tar.getmembers():
            if m.name.split(".")[0] != key:
                key = m.name.split(".")[0]
                offsets.append(m.offset)
            end = m.offset_data + -(-m.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    return [*offsets, end] if offsets else [0]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 good records and 7 bad ones: 5 units of 3 records."""
    return make_pipeline_dataset(tmp_path_factory.mktemp("data") / "set", count=8)


@pytest.fixture(scope="module")
def reference(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ref") / "out"
    assert build(_options(dataset, out), workers=1, progress=False).ok
    return out


def _upload_tree(folder: Path, url: str) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            storage.write_whole(
                location(url) / path.relative_to(folder).as_posix(), path.read_bytes()
            )


def _cli(*argv: str) -> int:
    """``mvprep ARGV`` in this process, through the real entry point; its exit code."""
    with pytest.raises(SystemExit) as exc:
        run_cli(main, "mvprep", IS_EXPECTED, argv=list(argv))
    return int(exc.value.code or 0)


# ----------------------------------------------------------------------------- storage layer


def test_locations_and_the_errors_that_need_no_store(monkeypatch: pytest.MonkeyPatch) -> None:
    assert location("data/x.json") == Path("data/x.json")
    assert location("file:///tmp/x") == Path("/tmp/x")
    obj = location("s3://bkt/pre/fix/")
    assert isinstance(obj, ObjectPath) and obj.url == "s3://bkt/pre/fix"
    assert str(obj / "index" / "1.json") == "s3://bkt/pre/fix/index/1.json"
    assert (obj / "a.tar").parent == obj and (obj / "a.tar").name == "a.tar"
    assert (obj / "img/1.jpg").is_relative_to(obj) and not (obj / "../x").is_relative_to(obj)
    with pytest.raises(TypeError):
        open(obj, "rb")  # noqa: SIM115 - no __fspath__: never a local folder named "s3:"
    with pytest.raises(ValueError, match="no bucket"):
        location("s3:///x")
    with pytest.raises(ValueError, match="is not JSON"):
        storage.parse_storage_options("{bad")
    monkeypatch.setenv(storage.STORAGE_OPTIONS_ENV, '{"anon": true, "a": 1}')
    assert location("s3://b/x", {"a": 2}).options == {"anon": True, "a": 2}
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # the gcs extra not installed
    with pytest.raises(StorageError, match=r"^gs://bucket/x: .* pip install 'mvkit\[gcs\]'$"):
        location("gs://bucket/x").read_bytes()
    with pytest.raises(StorageError, match="unknown storage protocol nosuch://"):
        location("nosuch://bucket/x").read_bytes()


@pytest.mark.slow
def test_storage_layer_on_s3(s3, monkeypatch: pytest.MonkeyPatch) -> None:
    obj = location(s3.url("a"))

    storage.write_whole(obj / "x.bin", b"0123456789")
    assert (obj / "x.bin").read_bytes() == b"0123456789"
    assert storage.read_range(obj / "x.bin", 2, 5) == b"234"
    with storage.open_read(obj / "x.bin") as f:
        f.seek(7)
        assert f.read() == b"789"
    assert storage.create_whole(obj / "claim", b"first") is True
    assert storage.create_whole(obj / "claim", b"second") is False
    assert (obj / "claim").read_bytes() == b"first"
    assert storage.list_sizes(obj) == {"x.bin": 10, "claim": 5}
    assert storage.size_of(obj / "missing") is None
    with pytest.raises(FileNotFoundError, match=s3.url("a/missing")):
        (obj / "missing").read_bytes()
    storage.delete(obj / "claim")
    assert not (obj / "claim").exists() and (obj / "x.bin").is_file() and obj.is_dir()

    flaky = s3.fail(3, method="PUT", pattern=r"/y\.bin$")  # 503 three times, then moto
    storage.write_whole(obj / "y.bin", b"y")
    assert flaky.served == 3 and (obj / "y.bin").read_bytes() == b"y"

    s3.fail(None, pattern=r"/secret$", status=403, code="AccessDenied")
    with pytest.raises(StorageError, match=r"^s3://.*/a/secret: access denied") as denied:
        (obj / "secret").read_bytes()
    assert "\n" not in str(denied.value)
    with pytest.raises(StorageError, match="bucket does not exist"):
        location("s3://no-such-bucket-here/x").read_bytes()
    # a multipart upload that cannot complete is aborted: no object, no parts left behind
    monkeypatch.setattr(storage, "UPLOAD_BLOCK", 5 << 20)  # S3's smallest part
    big = os.urandom(11 << 20)
    refused = s3.fail(None, "POST", r"/a/big\.bin\?uploadId=", status=403, code="AccessDenied")
    with pytest.raises(StorageError, match="access denied"):
        storage.upload_file(io.BytesIO(big), obj / "big.bin")
    assert storage.size_of(obj / "big.bin") is None
    assert not obj.filesystem().list_multipart_uploads(obj.bucket)
    refused.release()
    storage.upload_file(io.BytesIO(big), obj / "big.bin")
    assert storage.sha256_of(obj / "big.bin") == hashlib.sha256(big).hexdigest()
    parts = [p for m, p in s3.requests if m == "PUT" and "/a/big.bin?" in p and "partNumber" in p]
    assert len(parts) >= 4  # two multipart uploads of 3 parts each (the first aborted)

    monkeypatch.setattr(storage, "BACKOFF", storage.Backoff(tries=3, first=0.01))
    down = s3.fail(None, method="PUT", pattern=r"/down$")
    with pytest.raises(StorageError, match=r"still failing after 3 tries"):
        (obj / "down").write_bytes(b"x")
    assert down.served == 3


# ----------------------------------------------------------------------------- builds


@pytest.mark.slow
def test_build_to_s3_writes_the_local_objects_and_reads_back_through_every_reader(
    s3, dataset: Path, reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    url = s3.url("out")
    # transient faults on the wire: 503s on two shard uploads and on reading an image
    shard_faults = s3.fail(2, method="PUT", pattern=r"/out/00000[02]\.tar$")
    assert build(_options(dataset, url), workers=1, progress=False).ok
    assert shard_faults.served == 2
    assert _dataset_bytes(url) == _dataset_bytes(reference)  # same data file: same manifest
    assert (location(url) / "build.json").read_bytes() == (reference / "build.json").read_bytes()

    report = verify_dataset(url)
    assert report.ok and report.shards == 5, report.format_report()
    index = load_index(url)
    for shard in index.shards:  # the ranges mvprep recorded are where tarfile finds them
        assert shard.sample_ranges is not None
        recorded = shard.sample_ranges.offsets.tolist()
        assert recorded == _tarfile_offsets(shard.path.read_bytes()), shard.path
    index.check_shard_files()
    assert len(index) == len(load_index(reference))
    assert _cli("stats", url, "--json") == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["counts"]["samples"] == len(index) and stats["dataset"] == url
    png = tmp_path / "one.png"
    assert _cli("inspect", url, str(index.keys[0]), "--png", str(png)) == 0
    assert png.is_file() and "sample " in capsys.readouterr().out
    assert _cli("verify", url) == 0 and capsys.readouterr().out.startswith("OK s3://")

    # stock webdataset, through the README's fsspec one-liner (pipe: runs any command)
    import webdataset as wds

    cat = (
        "import fsspec,shutil,sys; "
        "shutil.copyfileobj(fsspec.open(sys.argv[1]).open(), sys.stdout.buffer)"
    )
    shard = f'pipe:{sys.executable} -c "{cat}" {index.shards[1].path}'
    keys = [sample["__key__"] for sample in wds.WebDataset([shard], shardshuffle=False)]
    assert keys == [str(k) for k, i in zip(index.keys, index.shard_ids, strict=True) if i == 1]
    assert keys

    # a permanent error through the real CLI: one line naming the URL
    bad = "s3://no-such-bucket-mvkit/out"
    assert _cli("build", str(dataset), "--out", bad, "--no-progress") == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mvprep: error: {bad}/build.json: ")
    assert "bucket does not exist" in lines[0]


@pytest.mark.slow
def test_data_and_images_from_the_bucket_with_faults(
    s3, dataset: Path, reference: Path, tmp_path: Path
) -> None:
    _upload_tree(dataset.parent, s3.url("data"))
    image_fault = s3.fail(2, method="GET", pattern=r"/data/img/000\.jpg$")
    out = tmp_path / "out"
    assert build(_options(s3.url("data/data.json"), out), workers=1, progress=False).ok
    assert image_fault.served == 2
    assert _shards(out) == _shards(reference)  # relative image paths resolved in the bucket
    params = json.loads((out / "build.json").read_text())
    assert params["data_path"] == s3.url("data/data.json")

    # a permanent fault stops the build with one line naming the URL
    s3.fail(None, method="PUT", pattern=r"/denied/index/", status=403, code="AccessDenied")
    with pytest.raises(StorageError, match=r"/denied/index/000000\.json: access denied"):
        build(_options(dataset, s3.url("denied")), workers=1, progress=False)


@pytest.mark.slow
def test_kill_9_mid_upload_leaves_no_shard_and_resumes_byte_identically(
    s3, dataset: Path, reference: Path
) -> None:
    url = s3.url("killed")
    stuck = s3.hang(method="PUT", pattern=r"/killed/000001\.tar$")
    cmd = [*MVPREP, "build", str(dataset), "--out", url, "--samples-per-shard", str(SPS)]
    cmd += ["--max-res", "448", "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(
        cmd, env=s3.env(), start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        while not stuck.seen.wait(0.1):
            assert proc.poll() is None, f"the build ended before the upload: {proc.stderr.read()}"
            assert time.monotonic() < deadline, "no upload of 000001.tar within 120 s"
        os.killpg(proc.pid, signal.SIGKILL)  # the build and its worker, mid-upload
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        stuck.release()
    out = location(url)
    assert sorted(storage.list_sizes(out)) == ["000000.tar", "build.json"]  # no 000001.tar
    assert sorted(storage.list_sizes(out / "index")) == ["000000.json"]
    # a whole shard whose entry was never written (killed between upload and entry) is
    # unfinished: ignored by readers, overwritten by the re-run
    (out / "000002.tar").write_bytes(b"left over by a killed build")
    with pytest.raises(MergeIncompleteError, match="000001.tar, 000002.tar"):
        merge(url)

    rerun = build(_options(dataset, url), workers=1, progress=False)
    assert rerun.ok and rerun.skipped_units == [0]
    assert _dataset_bytes(url) == _dataset_bytes(reference)


@pytest.mark.slow
def test_parts_then_merge_on_s3_equal_the_local_build(s3, dataset: Path, reference: Path) -> None:
    url = s3.url("parts")
    assert build(_options(dataset, url), workers=1, progress=False, part=Part(1, 2)).ok
    with pytest.raises(MergeIncompleteError, match=r"2/2 \(never started\)"):
        merge(url)
    assert build(_options(dataset, url), workers=1, progress=False, part=Part(2, 2)).ok
    merge(url)
    assert _dataset_bytes(url) == _dataset_bytes(reference)
    assert len(list((location(url) / "parts").glob("*.json"))) == 2


@pytest.mark.slow
@pytest.mark.xdist_group("ray")  # on the worker of test_runners' Ray tests: one local Ray
def test_ray_build_into_the_bucket_with_storage_options(
    s3_server, dataset: Path, reference: Path
) -> None:
    from mvprep.runners.ray_runner import ray_installed, start_ray

    if not ray_installed():
        pytest.skip("Ray is not installed: pip install 'mvkit[ray]'")
    start_ray(num_cpus=2)  # as test_runners' session fixture does; it reuses this one
    # explicit storage options (what --storage-options passes): they travel with the task
    options = {
        "endpoint_url": s3_server.endpoint,
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"region_name": "us-east-1"},
    }
    url = location(f"s3://{s3_server.bucket}/ray-{os.getpid()}/out", options)
    result = build(_options(dataset, url), workers=2, progress=False, runner="ray")
    assert result.ok, result.failed_units
    assert _dataset_bytes(url) == _dataset_bytes(reference)
