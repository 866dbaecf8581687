"""A failure the user can act on is one line on stderr, once however many ranks, with the
traceback only under --debug / MVKIT_DEBUG=1; a damaged shard names `mvprep verify`; a
`--png` path without an extension gets one."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest
from run_helpers import MVTRAIN, _env

from mvshards.command_line import DEBUG_ENV, Failure, expected_classes, png_path, run_cli
from mvtrain import launch as launch_module

PROG = "mvtest"


@click.group()
def group() -> None:
    """A command group standing in for mvprep/mvtrain."""


@group.command("fail")
@click.argument("kind")
def fail(kind: str) -> None:
    if kind == "value":
        raise ValueError("the thing is wrong:\n  fix it like this")
    if kind == "key":
        raise KeyError("sample 7 is missing")
    if kind == "bug":
        raise ZeroDivisionError("division by zero")
    if kind == "usage":
        raise click.UsageError("--x and --y: pick one")
    sys.exit(4)


def _run(monkeypatch: pytest.MonkeyPatch, *argv: str, debug: bool = False):
    seen: list[Failure] = []
    if debug:
        monkeypatch.setenv(DEBUG_ENV, "1")
    else:
        monkeypatch.delenv(DEBUG_ENV, raising=False)
    is_expected = expected_classes("builtins:ValueError", "builtins:KeyError")
    with pytest.raises(SystemExit) as ended:
        run_cli(group, PROG, is_expected, lambda _prog, f: seen.append(f), argv=list(argv))
    return ended.value.code, seen


def test_an_expected_failure_is_one_line_without_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    code, seen = _run(monkeypatch, "fail", "value")
    assert code == 1 and len(seen) == 1
    assert seen[0].message == "the thing is wrong: fix it like this"
    assert seen[0].expected and seen[0].traceback == ""
    code, seen = _run(monkeypatch, "fail", "key")
    assert seen[0].message == "sample 7 is missing"  # no KeyError quotes


def test_debug_adds_the_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    _, seen = _run(monkeypatch, "fail", "value", debug=True)
    assert "Traceback" in seen[0].traceback and "ValueError" in seen[0].traceback
    _, seen = _run(monkeypatch, "--debug", "fail", "value")
    assert "Traceback" in seen[0].traceback, "--debug anywhere on the line counts"


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    code, seen = _run(monkeypatch, "fail", "bug")
    assert code == 1 and not seen[0].expected
    assert "ZeroDivisionError" in seen[0].traceback


def test_usage_errors_are_one_line_pointing_to_help(monkeypatch: pytest.MonkeyPatch) -> None:
    code, seen = _run(monkeypatch, "fail", "usage")
    assert code == 2
    assert seen[0].message == "--x and --y: pick one (see `mvtest fail --help`)"
    code, seen = _run(monkeypatch, "fail")
    assert code == 2 and seen[0].message.startswith("Missing argument 'KIND'.")
    code, seen = _run(monkeypatch, "fail", "exit")
    assert code == 4 and not seen


def _failure(rank: int, message: str, expected: bool, at: float, code: int = 1) -> dict:
    tb = "" if expected else f"Traceback (rank {rank})\n"
    return {
        "rank": rank,
        "message": message,
        "code": code,
        "expected": expected,
        "traceback": tb,
        "time": at,
    }


def test_the_launcher_prints_each_cause_once(capsys: pytest.CaptureFixture[str]) -> None:
    report = launch_module._report
    same = {r: _failure(r, "bad model folder", True, 10.0 + r) for r in (0, 1)}
    assert report([1, 1], set(), same) == 1
    assert capsys.readouterr().err == "mvtrain: error: bad model folder\n"
    # rank 1 failed (expected); rank 0's connection reset is a consequence, not shown
    mixed = {
        0: _failure(0, "Connection reset by peer", False, 5.0),
        1: _failure(1, "rank 1 of 2 has no batch", True, 6.0),
    }
    assert report([1, 1], set(), mixed) == 1
    assert capsys.readouterr().err == "mvtrain: error: rank 1 of 2 has no batch\n"
    # different expected lines: each once, with its rank
    two = {0: _failure(0, "a", True, 1.0), 1: _failure(1, "b", True, 1.0, code=3)}
    assert report([1, 3], set(), two) == 1
    assert capsys.readouterr().err == "mvtrain: error: rank 0: a\nmvtrain: error: rank 1: b\n"
    # only bugs: the earliest, with its traceback
    bugs = {0: _failure(0, "late", False, 9.0), 1: _failure(1, "first", False, 2.0)}
    assert report([1, 1], set(), bugs) == 1
    assert capsys.readouterr().err == "Traceback (rank 1)\nmvtrain: error: rank 1: first\n"
    # a rank killed from outside, the other ended by the launcher
    assert report([-15, -9], {0}, {}) == 137
    err = capsys.readouterr().err
    assert err.startswith("mvtrain: error: rank 1 was killed by SIGKILL (the out-of-memory")
    # rank 1 SIGKILLed from outside at t=5; rank 0's error at t=6 is its consequence
    reset = {0: _failure(0, "Connection closed by peer", False, 6.0)}
    assert report([1, -9], set(), reset, [6.1, 5.0]) == 137
    err = capsys.readouterr().err
    assert err.startswith("mvtrain: error: rank 1 was killed by SIGKILL") and "peer" not in err
    assert report([0, 0], set(), {}) == 0 and capsys.readouterr().err == ""


def test_png_paths_get_an_extension() -> None:
    assert png_path(Path("out")) == Path("out.png")
    assert png_path(Path("d/out.jpg")) == Path("d/out.jpg")
    assert png_path(Path("d.x/out")) == Path("d.x/out.png")


def _lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


@pytest.mark.slow
def test_a_bad_model_folder_on_two_ranks_is_one_line(shards: Path, tmp_path: Path) -> None:
    model = tmp_path / "no-model"
    cmd = [
        *MVTRAIN,
        "--shards",
        str(shards),
        "--model",
        str(model),
        "--output",
        str(tmp_path / "out"),
        "--nproc-per-node",
        "2",
        "--no-progress",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 1
    assert _lines(proc.stderr) == [
        f"mvtrain: error: {model}: no config.json; --model takes a local Hugging Face model "
        "folder (download it first, e.g. with `hf download`) or `tiny`"
    ], proc.stderr[-3000:]


@pytest.mark.slow
def test_a_damaged_shard_is_one_line_naming_mvprep_verify(shards: Path, tmp_path: Path) -> None:
    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    tar = sorted(copy.glob("*.tar"))[1]
    size = tar.stat().st_size
    with open(tar, "r+b") as handle:
        handle.truncate(size // 2)
    cmd = [
        *MVTRAIN,
        "--shards",
        str(copy),
        "--model",
        "tiny",
        "--output",
        str(tmp_path / "out"),
        "--no-progress",
        "--max-steps",
        "1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 1
    assert _lines(proc.stderr) == [
        f"mvtrain: error: {tar} is {size // 2} bytes, its index entry says {size}: the shards "
        f"changed since the build; run `mvprep verify {copy}` and re-run the build to rewrite "
        "what it reports"
    ], proc.stderr[-3000:]
    debug = subprocess.run(
        cmd + ["--debug"], capture_output=True, text=True, timeout=300, env=_env()
    )
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert _lines(debug.stderr)[-1] == _lines(proc.stderr)[0]


@pytest.mark.slow  # the shards fixture builds a data set
def test_a_garbled_sample_of_the_right_size_names_its_shard_and_mvprep_verify(
    shards: Path, tmp_path: Path
) -> None:
    import tarfile

    from mvshards.index import load_index
    from mvtrain.data.lengths import exact_lengths
    from mvtrain.data.shard_access import ShardReadError
    from mvtrain.model.tiny import load_tiny_tokenizer

    copy = tmp_path / "shards"
    shutil.copytree(shards, copy)
    tar_path = sorted(copy.glob("*.tar"))[0]
    with tarfile.open(tar_path) as tar:
        member = next(m for m in tar if m.name.endswith(".json"))
    with open(tar_path, "r+b") as handle:  # same size: only a content check can see it
        handle.seek(member.offset_data)
        handle.write(b"\xff" * member.size)
    index = load_index(copy)
    index.check_shard_files()  # sizes still agree
    with pytest.raises(ShardReadError) as caught:
        exact_lengths(index, load_tiny_tokenizer(), str(index.params["profile"]), None)
    key = member.name.split(".")[0]
    message = str(caught.value)
    assert message.startswith(f"{tar_path}: sample {key} cannot be read (")
    assert message.endswith(f"run `mvprep verify {copy}` and rebuild the shards it names")
