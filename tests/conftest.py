import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from s3_server import s3, s3_server  # noqa: E402, F401 - fixtures: a real S3 endpoint (moto)


@pytest.fixture(scope="session")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Small shards for trainer tests: 12 records (text-only, single and multi-image, bad
    ones rejected) at --max-res 448 so a CPU step stays short."""
    from pipeline_data import make_pipeline_dataset

    from mvprep.build import build
    from mvprep.options import BuildOptions

    data = make_pipeline_dataset(tmp_path_factory.mktemp("data") / "set", count=12)
    out = tmp_path_factory.mktemp("shards") / "shards"
    options = BuildOptions(data_path=data, out_dir=out, max_res=448, samples_per_shard=3)
    assert build(options, workers=1, progress=False).ok
    return out


@pytest.fixture(scope="session")
def two_rank_run(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 ranks of DeepSpeed ZeRO-2 on CPU, 6 steps, a checkpoint every 2 and a batch log
    (test_train_run's run, and the no-eval reference of test_eval)."""
    from run_helpers import TWO_RANK_ARGS, _train

    out = tmp_path_factory.mktemp("run") / "a"
    _train(shards, out, *TWO_RANK_ARGS, "--batch-log", str(out / "batches.jsonl"))
    return out


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules with a slow test run first (each module's tests stay together and in order, so
    module fixtures are built once): under ``-n 2`` the many short tests then fill in at the
    end, instead of one worker finishing a long run alone while the other idles."""
    slow = {item.module for item in items if item.get_closest_marker("slow") is not None}
    items.sort(key=lambda item: item.module not in slow)
