"""Training from a bucket: ``mvtrain run --shards s3://...`` reads the index, then each sample
with one ranged GET at the byte range the index records, no tar header walked (or a whole
shard), with read-ahead; 5xx are retried, a 403 is one line
naming the URL; ``--cache-dir`` keeps whole shards for later runs; ``mvtrain plan`` and the
exact-length recount read URLs too.

The endpoint is moto's S3 server on localhost (``s3_server.py``), driven through fsspec/s3fs
exactly as users drive AWS; the shards are the ``shards`` fixture's, uploaded unchanged. The
reference for every result is the same read or run from the local folder.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from run_helpers import TWO_RANK_ARGS, _digests, _losses, _train

from mvshards import storage
from mvshards.command_line import run_cli
from mvshards.index import load_index
from mvshards.storage import ObjectPath, StorageError, location
from mvtrain.batching.sources import SampleLocator, ShardSource, source_names
from mvtrain.data.remote_reads import READS_ENV, ReadSettings, ScheduledReads, use_read_settings
from mvtrain.data.shard_access import ShardAccess

pytestmark = pytest.mark.slow  # moto's S3 server (a few seconds to start), subprocess runs


def _upload(folder: Path, url: str) -> None:
    """Every file under ``folder`` to the objects under ``url``, unchanged."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            target = location(url) / path.relative_to(folder).as_posix()
            storage.write_whole(target, path.read_bytes())


@pytest.fixture(scope="module")
def bucket(shards: Path, s3_server) -> Iterator[str]:
    """The ``shards`` fixture's folder uploaded to ``s3://mvkit-test/<unique>/shards``."""
    url = f"s3://{s3_server.bucket}/train-{uuid.uuid4().hex[:8]}/shards"
    with pytest.MonkeyPatch.context() as patch:
        for key, value in s3_server.aws_env().items():
            patch.setenv(key, value)
        _upload(shards, url)
    yield url


def _batch_log(run: Path) -> list[dict]:
    """The run's batch log, every rank's lines in (rank, step, micro) order."""
    rows = [json.loads(x) for x in (run / "batches.jsonl").read_text().splitlines()]
    return sorted(rows, key=lambda r: (r["rank"], r["step"], r["micro"]))


def _tar_gets(requests: list[tuple[str, str]]) -> list[str]:
    return [path for method, path in requests if method == "GET" and ".tar" in path]


def test_urls_parse_as_shard_folders_with_weights() -> None:
    assert ShardSource.parse("s3://b/x:2") == ShardSource(location("s3://b/x"), 2.0)
    assert ShardSource.parse("s3://b/x") == ShardSource(location("s3://b/x"), 1.0)
    assert ShardSource.parse("s3://b:0.5").weight == 0.5
    assert str(ShardSource.parse("gs://b/p/x:3")) == "gs://b/p/x:3"
    assert ShardSource.parse("data/a:0.5") == ShardSource(Path("data/a"), 0.5)
    assert source_names([location("s3://b/x"), Path("/data/y")]) == ["x", "y"]
    assert source_names([location("s3://b/p/x"), location("s3://c/p/x")]) == ["b/p/x", "c/p/x"]


def test_samples_come_from_the_bucket_as_from_disk_one_get_each(
    shards: Path, bucket: str, s3, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mvtrain.data.lengths import FINGERPRINT_PARAM, exact_lengths, tokenizer_fingerprint
    from mvtrain.model.tiny import load_tiny_tokenizer

    local, remote = load_index(shards), load_index(bucket)
    assert isinstance(remote.out, ObjectPath) and len(remote) == len(local) > 0
    remote.check_shard_files()
    order = [(int(s), str(k)) for s, k in zip(local.shard_ids, local.keys, strict=True)]
    expected = [ShardAccess(local.shard_paths()).members(s, k) for s, k in order]

    ranges = SampleLocator.of_index(remote).shard_ranges  # what the loader reads with
    assert len(ranges) == len(remote.shards) and all(r is not None for r in ranges)
    before = len(s3.requests)
    assert [ShardAccess(remote.shard_paths(), ranges=ranges).members(s, k) for s, k in order] == (
        expected
    )
    tar_requests = [(m, p) for m, p in s3.requests[before:] if ".tar" in p]
    assert len(tar_requests) == len(_tar_gets(tar_requests)) == len(order), (
        "one ranged GET per sample at its recorded range, not one request more (no header walk)"
    )

    before = len(s3.requests)
    walked = ShardAccess(remote.shard_paths())  # as for an index without ranges (older mvprep)
    for shard in range(len(remote.shards)):
        walked.table(shard)  # the header walk: once per shard
    assert _tar_gets(s3.requests[before:]), "without ranges the headers are walked first"
    before = len(s3.requests)
    assert [walked.members(s, k) for s, k in order] == expected
    assert len(_tar_gets(s3.requests[before:])) == len(order), "then one ranged GET per sample"

    flaky = s3.fail(3, method="GET", pattern=r"\.tar$")  # 503s while reading ahead
    reads = ScheduledReads(ShardAccess(remote.shard_paths(), ranges=ranges), order, depth=4)
    try:
        assert [reads.members(s, k) for s, k in order] == expected
    finally:
        reads.close()
    assert flaky.served == 3

    tokenizer, profile = load_tiny_tokenizer(), str(local.params["profile"])
    recount = exact_lengths(remote, tokenizer, profile, None)  # the JSON members over the wire
    assert recount.recounted
    assert recount.tokens.tolist() == exact_lengths(local, tokenizer, profile, None).tokens.tolist()
    exact = location(bucket).parent / "exact"  # the index of a build with this tokenizer
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["params"][FINGERPRINT_PARAM] = tokenizer_fingerprint(tokenizer)
    _upload(shards / "index", str(exact / "index"))
    (exact / "manifest.json").write_text(json.dumps(manifest))
    before = len(s3.requests)
    assert not exact_lengths(load_index(exact), tokenizer, profile, None).recounted
    assert _tar_gets(s3.requests[before:]) == [], "an exact index needs no shard read"

    s3.fail(None, method="GET", pattern=r"\.tar$", status=403, code="AccessDenied")
    with pytest.raises(StorageError, match=r"^s3://\S+/000000\.tar: access denied") as denied:
        ShardAccess(remote.shard_paths(), ranges=ranges).members(*order[0])
    assert "\n" not in str(denied.value)


def test_plan_and_a_denied_bucket_through_the_cli(
    bucket: str, s3, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mvtrain.cli import IS_EXPECTED, main

    monkeypatch.setenv(storage.STORAGE_OPTIONS_ENV, "{}")  # the CLI's callbacks set both:
    monkeypatch.setenv(READS_ENV, "{}")  # restored after the test

    def cli(*argv: str) -> int:
        with pytest.raises(SystemExit) as ended:
            run_cli(main, "mvtrain", IS_EXPECTED, argv=list(argv))
        return int(ended.value.code or 0)

    plan = ["plan", "--shards", f"{bucket}:2", "--model", "tiny", "--gpu-mem", "24GiB", "--json"]
    assert cli(*plan, "--storage-options", '{"use_listings_cache": false}') == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["epoch"]["steps_per_epoch"] > 0
    assert storage.default_storage_options() == {"use_listings_cache": False}

    s3.fail(None, method="GET", pattern=r"/manifest\.json$", status=403, code="AccessDenied")
    assert cli(*plan) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"mvtrain: error: {bucket}/manifest.json: access denied"), err
    assert "\n" not in err


def test_cache_dir_keeps_whole_shards_so_a_second_run_gets_none(
    shards: Path, bucket: str, s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mvtrain.loop import run
    from mvtrain.run_config import RunConfig

    cache = tmp_path / "cache"
    monkeypatch.setenv(READS_ENV, "{}")
    use_read_settings(ReadSettings(cache_dir=cache, read_ahead=2))

    def dry(source: object, out: Path) -> list[dict]:
        config = RunConfig(
            shards=[source],
            model="tiny",
            output=out,
            token_budget=1024,
            patch_budget=4096,
            dry_run=True,
            progress=False,
            tensorboard=False,
            export=False,
            batch_log=out / "batches.jsonl",
        )
        run(config)
        return _batch_log(out)

    first = dry(bucket, tmp_path / "a")
    assert len(list(cache.glob("*.tar"))) == sum(
        1 for s in load_index(shards).shards if s.num_samples
    )
    s3.server.reset()
    second = dry(bucket, tmp_path / "b")
    assert second == first == dry(shards, tmp_path / "local")
    assert _tar_gets(s3.requests) == [], "the second run read every shard from --cache-dir"


@pytest.mark.xdist_group("two_rank_run")  # the run it equals is built once (conftest)
def test_two_ranks_train_from_the_bucket_through_5xx_as_from_disk(
    two_rank_run: Path, bucket: str, s3, tmp_path: Path
) -> None:
    """``two_rank_run`` (conftest) is the same run from the local folder (its checkpoints
    every 2 steps and its export change no result: left out here). Its exact-length cache is
    copied in, so every shard read of this run is a training read, and the 503s hit those."""
    assert TWO_RANK_ARGS[6:] == ("--save-every", "2")
    out = tmp_path / "bucket"
    shutil.copytree(two_rank_run / "cache", out / "cache")
    flaky = s3.fail(3, method="GET", pattern=r"\.tar$")  # 503s: retried with backoff
    log = ("--batch-log", str(out / "batches.jsonl"))
    _train(bucket, out, *TWO_RANK_ARGS[:6], *log, "--no-export", "--read-ahead", "3")
    assert flaky.served == 3
    assert _losses(out) == _losses(two_rank_run)
    assert _digests(out) == _digests(two_rank_run) and len(_digests(out)) == 1
    assert _batch_log(out) == _batch_log(two_rank_run)
    run = json.loads((out / "run.json").read_text())
    assert run["sources"][0]["path"] == bucket and not run["exact_length_recount"]
