"""Multi-node as users launch it: ``torchrun --nnodes 2 --nproc-per-node 1 --rdzv-backend c10d
--rdzv-endpoint HOST:PORT -m mvtrain.cli run ...`` on each node -- here two "nodes" on this
machine (:mod:`elastic_runs`) -- trains (both ranks in step, one set of weights, every sample
of the epoch once) and resumes (a one-process run's checkpoint, continued on the two nodes).
"""

from __future__ import annotations

import json
from pathlib import Path

import elastic_runs
import pytest
from elastic_runs import GROUP, all_keys, trained
from run_helpers import _digests, _losses

pytest.importorskip("deepspeed")
pytestmark = [pytest.mark.slow, GROUP]

two_node_run = elastic_runs.two_node_run
one_rank_run = elastic_runs.one_rank_run
one_rank_on_two_nodes = elastic_runs.one_rank_on_two_nodes


def _clean(logs: list[str]) -> None:
    """No node printed a traceback or an error."""
    for text in logs:
        assert "Traceback" not in text and "error:" not in text, text[-3000:]


def test_two_torchrun_nodes_train(shards: Path, two_node_run: tuple[Path, list[str]]) -> None:
    out, logs = two_node_run
    _clean(logs)
    run = json.loads((out / "run.json").read_text())
    assert (run["world_size"], run["engine"]) == (2, "deepspeed")
    assert sorted(_losses(out)) == [1, 2]
    assert len(_digests(out)) == 1 and len(list(out.glob("params-rank*.sha256"))) == 2
    ranks = {json.loads(x)["rank"] for x in (out / "batches.jsonl").read_text().splitlines()}
    assert ranks == {0, 1}
    assert trained(out) == all_keys(shards)
    assert sum("loss first / last" in t for t in logs) == 1, "rank 0 alone prints the summary"


def test_two_torchrun_nodes_resume(one_rank_on_two_nodes: tuple[Path, list[str]]) -> None:
    out, logs = one_rank_on_two_nodes
    _clean(logs)
    run = json.loads((out / "run.json").read_text())
    assert run["world_size"] == 2
    assert sorted(_losses(out)) == [1, 2]
    assert len(_digests(out)) == 1 and len(list(out.glob("params-rank*.sha256"))) == 2
    assert sorted((out / "checkpoints" / "step-000002").glob("rank-*.pt")) == [
        out / "checkpoints" / "step-000002" / f"rank-{r}.pt" for r in (0, 1)
    ]
