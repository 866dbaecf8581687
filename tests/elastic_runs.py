"""The runs test_elastic_resume and test_multinode share: one epoch of the ``shards`` fixture
(12 samples) trained two ways, each checkpointed after every step, and resumes of copies of
them stopped after step 1 with other settings.

* ``two_node_run``: two ``torchrun`` "nodes" on this machine (``--nnodes 2 --nproc-per-node
  1``, c10d rendezvous on a free port), DeepSpeed ZeRO-2, ``--grad-accum 1``: 2 steps.
* ``one_rank_run``: one process, ``--grad-accum 2``: 2 steps.
* ``one_rank_on_two_nodes``: ``one_rank_run`` stopped after step 1, resumed on two torchrun
  nodes with ``--grad-accum 2``: the rest of the epoch is one step there.

Every resume here plans the rest of the epoch into ONE optimizer step (a large enough
``--grad-accum``), so its weights must equal the uninterrupted run's after its last step (the
same samples in the last step: the loss is the window's token-loss sum over its label count,
however the samples are batched) within fp32 rounding -- an independent check that the
optimizer state (Adam moments, step count) was re-partitioned right.

A test module binds the fixtures by name (``two_node_run = elastic_runs.two_node_run``) and
marks its tests ``xdist_group("elastic_runs")``: pytest keeps a fixture bound in two modules
twice, so each run is made once per process (:func:`_once`) and one worker runs them all.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from run_helpers import MVTRAIN, PATCHES, TOKENS, _env

from mvtrain.distributed import free_port

GROUP = pytest.mark.xdist_group("elastic_runs")
EPOCH = ("--epochs", "1", "--save-every", "1", "--no-export")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _args(out: Path, shards: Path, *extra: str) -> list[str]:
    args = ["--shards", str(shards), "--model", "tiny", "--output", str(out)]
    args += ["--token-budget", str(TOKENS), "--patch-budget", str(PATCHES), "--lr", "3e-3"]
    args += ["--no-progress", "--batch-log", str(out / "batches.jsonl"), *EPOCH]
    # the last of repeated options wins (click): extra may override the budgets
    return args + list(extra)


def train(out: Path, shards: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    """``mvtrain run`` in one process (``--nproc-per-node`` in ``extra`` launches more)."""
    cmd = [*MVTRAIN, *_args(out, shards, *extra)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env())
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]
    return proc


def train_on_two_nodes(out: Path, shards: Path, *extra: str) -> list[str]:
    """``mvtrain run`` as two torchrun nodes of one process each would run it, both on this
    machine (c10d rendezvous on a free port); each node's output. When one node fails the
    other is ended (its rank would wait in a collective for the run's timeout)."""
    port = free_port()
    node = [*TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d"]
    node += ["--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "mvkit-test"]
    node += ["-m", "mvtrain.cli", "run", *_args(out, shards, *extra)]
    logs = [out.parent / f"{out.name}.node{i}.log" for i in range(2)]
    nodes = []
    for log in logs:
        with open(log, "w") as handle:
            nodes.append(
                subprocess.Popen(node, stdout=handle, stderr=subprocess.STDOUT, env=_env())
            )
    deadline = time.monotonic() + 600
    while any(n.poll() is None for n in nodes) and time.monotonic() < deadline:
        if any(n.poll() not in (None, 0) for n in nodes):
            for n in nodes:
                if n.poll() is None:
                    n.terminate()
            break
        time.sleep(0.2)
    for n in nodes:
        if n.poll() is None:
            n.kill()
        n.wait()
    said = [log.read_text() for log in logs]
    for n, text in zip(nodes, said, strict=True):
        assert n.returncode == 0, text[-6000:]
    return said


def stopped_copy(run: Path, dest: Path, step: int) -> Path:
    """``run`` as it would be had it been killed right after checkpoint ``step``: later
    checkpoints, logs and the end-of-run digests gone."""
    shutil.copytree(run, dest)
    for child in (dest / "checkpoints").glob("step-*"):
        if int(child.name.split("-")[1]) > step:
            shutil.rmtree(child)
    for digest in dest.glob("params-rank*.sha256"):
        digest.unlink()
    for name, key in (("batches.jsonl", "step"), ("metrics.jsonl", "step")):
        lines = (dest / name).read_text().splitlines()
        first = 0 if name == "batches.jsonl" else 1  # the batch log counts steps from 0
        kept = [x for x in lines if json.loads(x)[key] < step + first]
        (dest / name).write_text("".join(x + "\n" for x in kept))
    return dest


def trained(out: Path) -> Counter[str]:
    """How often each sample was trained, from the batch log (fillers left out)."""
    lines = [json.loads(x) for x in (out / "batches.jsonl").read_text().splitlines()]
    return Counter(k for b in lines if b["weight"] > 0 for k in b["keys"])


def all_keys(shards: Path) -> Counter[str]:
    from mvshards.index import load_index

    return Counter(str(k) for k in load_index(shards).keys)


def weights(out: Path, step: int) -> dict[str, Any]:
    """The module weights of DeepSpeed checkpoint ``step`` in ``out``."""
    import torch

    path = out / "checkpoints" / f"step-{step:06d}" / "mp_rank_00_model_states.pt"
    return torch.load(path, map_location="cpu", weights_only=False)["module"]


def max_difference(a: dict[str, Any], b: dict[str, Any]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def events(out: Path) -> list[dict[str, Any]]:
    path = out / "events.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


_RUNS: dict[str, Any] = {}
"""Each shared run, made once per test process (both modules' fixtures read it)."""


def _once(name: str, make: Callable[[], Any]) -> Any:
    if name not in _RUNS:
        _RUNS[name] = make()
    return _RUNS[name]


@pytest.fixture(scope="session")
def two_node_run(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """The two-node run and each node's output."""

    def make() -> tuple[Path, list[str]]:
        out = tmp_path_factory.mktemp("two_nodes") / "run"
        return out, train_on_two_nodes(out, shards)

    return _once("two_node_run", make)


@pytest.fixture(scope="session")
def one_rank_run(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    def make() -> Path:
        out = tmp_path_factory.mktemp("one_rank") / "run"
        train(out, shards, "--grad-accum", "2")
        return out

    return _once("one_rank_run", make)


@pytest.fixture(scope="session")
def one_rank_on_two_nodes(
    shards: Path, one_rank_run: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[str]]:
    """``one_rank_run`` stopped after step 1, resumed on two torchrun nodes."""

    def make() -> tuple[Path, list[str]]:
        out = stopped_copy(one_rank_run, tmp_path_factory.mktemp("one_to_two") / "run", 1)
        return out, train_on_two_nodes(out, shards, "--grad-accum", "2", "--resume")

    return _once("one_rank_on_two_nodes", make)
