"""Shared fixtures of the trainer's model-side tests (test_tokenize, test_pixels,
test_adapters): the tiny tokenizer and model, and the pipeline set built per profile.

The fixtures are module-scoped: a test module binds them by name (``tok_dir =
train_fixtures.tok_dir``) and gets its own instances, as when the tests shared one file.
The tiny model is not shared across modules because tests change its gradients.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pipeline_data import make_pipeline_dataset

from mvprep.build import build
from mvprep.options import BuildOptions
from mvshards.schema import SampleMeta
from mvshards.tario import iter_shard
from mvshards.tiny_tokenizer import build_tiny_tokenizer
from mvtrain.data.loader import make_micro_batch
from mvtrain.data.sample import LoadedSample, load_sample
from mvtrain.data.tokenize import IGNORE_INDEX
from mvtrain.model.tiny import build_tiny_model

PROFILES = ("minicpmv-4.6", "minicpmv-4.6-4x", "minicpmv-2.6")
MAX_SLICE_NUMS = 4  # --max-res 896

Loaded = list[tuple[SampleMeta, dict[str, bytes], LoadedSample]]


class _Loaded(dict):
    """Profile -> loaded samples of the pipeline set built for it, built on first use.

    Lazy, so a test-distribution worker builds only the profiles its tests need; a short
    repr, because hypothesis prints the fixture arguments of a failing example.
    """

    def __init__(self, dataset: Path, tok_dir: Path, tok: Any, root: Path) -> None:
        super().__init__()
        self.dataset, self.tok_dir, self.tok, self.root = dataset, tok_dir, tok, root

    def __missing__(self, profile: str) -> Loaded:
        out = self.root / profile
        options = BuildOptions(
            data_path=self.dataset,
            out_dir=out,
            profile=profile,
            tokenizer=str(self.tok_dir),
            max_res=896,
            samples_per_shard=6,
        )
        assert build(options, workers=1, progress=False).ok
        rows = []
        for shard in sorted(out.glob("*.tar")):
            for _, members in iter_shard(shard):
                meta = SampleMeta.from_json(json.loads(members["json"]))
                rows.append((meta, members, load_sample(meta, members, self.tok, profile)))
        self[profile] = rows
        return rows

    def __repr__(self) -> str:
        return f"<loaded samples of {sorted(self)}>"


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Any:
    """One intra-op thread: with more threads than free cores (``pytest -n 2`` on 2 cores)
    torch's thread barriers make these tiny ops ~50x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tiny(tok_dir: Path) -> tuple[Any, Any]:
    return build_tiny_model(seed=0, tokenizer_dir=tok_dir)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pipeline_dataset(tmp_path_factory.mktemp("data") / "set", count=12)


@pytest.fixture(scope="module")
def loaded(
    dataset: Path, tok_dir: Path, tiny: tuple[Any, Any], tmp_path_factory: pytest.TempPathFactory
) -> _Loaded:
    """The pipeline set built per profile with exact counts from the tiny tokenizer."""
    return _Loaded(dataset, tok_dir, tiny[1], tmp_path_factory.mktemp("built"))


def _with_images(rows: Loaded) -> list[LoadedSample]:
    return [s for meta, _, s in rows if meta.images]


def _text_only(rows: Loaded) -> list[LoadedSample]:
    return [s for meta, _, s in rows if not meta.images]


def alone_loss(model: torch.nn.Module, adapter: Any, sample: Any) -> tuple[float, int]:
    """One sample's token-loss sum and label count from a plain forward of it alone and
    ``F.cross_entropy`` (no mvtrain loss code)."""
    batch = make_micro_batch(0, [sample], 1.0, adapter)
    inputs = dict(batch.inputs)
    if inputs["pixel_values"] is None:
        inputs = adapter.with_dummy_image(model, inputs)
    with torch.no_grad():
        logits = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            pixel_values=inputs["pixel_values"],
            target_sizes=inputs["target_sizes"],
            use_cache=False,
        ).logits
    labels = inputs["labels"][:, 1:]
    total = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).double(),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return float(total), int((labels != IGNORE_INDEX).sum())
