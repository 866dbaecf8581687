"""Shards are read unchanged by stock webdataset and by Hugging Face datasets.

One shard mixes every member set a build writes: a text-only sample (``.json`` only), an
unsliced image (``.src0.jpg``), a sliced image (``.ref0.jpg`` + ``.src0.jpg``) and a
two-image sample; an empty shard (every record rejected) sits between two others.

HF's ``webdataset`` builder, left to infer its columns, cannot read such shards (see
``mvshards.hf``); the tests pin that down, then show the two ways that work: the dataset
card ``mvshards.hf.write_dataset_card`` writes (``load_dataset(OUT)``), and explicit
``features=hf_features(...)``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image
from shard_fixtures import make_sample, write_shard

from mvshards.hf import hf_feature_list, hf_features, write_dataset_card
from mvshards.schema import SampleMeta

datasets = pytest.importorskip("datasets")

SHARDS = {
    "000000.tar": ["text", "one", "sliced", "two"],
    "000001.tar": [],  # every record of this unit rejected
    "000002.tar": ["two", "sliced", "text"],
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict[str, SampleMeta]]:
    """OUT with three shards and a dataset card; returns it and the metas by key."""
    out = tmp_path_factory.mktemp("out")
    metas: dict[str, SampleMeta] = {}
    index = 0
    for name, kinds in SHARDS.items():
        samples = []
        for kind in kinds:
            samples.append(make_sample(index, kind))
            index += 1
        index += 1  # a gap: some records were rejected
        write_shard(out / name, samples)
        metas.update({m.key: m for m, _ in samples})
    write_dataset_card(out, max_images=2, image_ext="jpg")
    return out, metas


def _urls(out: Path) -> list[str]:
    return [str(out / name) for name in SHARDS]


def _check_images(meta: SampleMeta, columns: dict[str, object]) -> None:
    """Every image column holds a PIL image at exactly its layout size, or is absent/None."""
    wanted: dict[str, tuple[int, int]] = {}
    for image in meta.images:
        wanted[image.source_member.split(".", 1)[1]] = image.layout.source_size
        if image.refine_member is not None:
            assert image.layout.refine_size is not None
            wanted[image.refine_member.split(".", 1)[1]] = image.layout.refine_size
    present = {k: v for k, v in columns.items() if k.endswith(".jpg") and v is not None}
    assert sorted(present) == sorted(wanted), meta.key
    for name, im in present.items():
        assert isinstance(im, Image.Image)
        assert im.size == wanted[name], (meta.key, name)


def test_stock_webdataset_reads_mixed_samples(dataset):
    out, metas = dataset
    pipeline = wds.WebDataset(_urls(out), shardshuffle=False).decode("pil")
    seen = []
    for sample in pipeline:
        key = sample["__key__"]
        seen.append(key)
        meta = metas[key]
        assert sample["json"] == meta.to_json()
        assert SampleMeta.from_json(sample["json"]).index_row() == meta.index_row()
        _check_images(meta, sample)
    assert seen == list(metas)


def test_webdataset_reads_an_empty_shard(dataset):
    out, _ = dataset
    pipeline = wds.WebDataset([str(out / "000001.tar")], shardshuffle=False, empty_check=False)
    assert list(pipeline) == []


def test_hf_inference_alone_rejects_mixed_member_sets(dataset, tmp_path):
    """Documents the limit of HF's own column inference (first 5 samples of the first shard).

    If a future ``datasets`` passes here, the dataset card is no longer needed for it.
    """
    out, _ = dataset
    with pytest.raises(ValueError, match="don't share the same prefix or the same types"):
        datasets.load_dataset(
            "webdataset",
            data_files={"train": _urls(out)},
            split="train",
            cache_dir=str(tmp_path / "hf"),
        )


def _check_hf_rows(ds, metas: dict[str, SampleMeta]) -> None:
    assert [row["__key__"] for row in ds] == list(metas)
    for row in ds:
        meta = metas[row["__key__"]]
        assert row["json"] == meta.to_json()
        _check_images(meta, row)


def test_hf_reads_the_folder_through_its_dataset_card(dataset, tmp_path):
    out, metas = dataset
    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert len(ds) == len(metas)
    _check_hf_rows(ds, metas)


def test_hf_card_handles_an_empty_first_shard(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    write_shard(out / "000000.tar", [])
    samples = [make_sample(i, kind) for i, kind in enumerate(["sliced", "text"], start=1)]
    write_shard(out / "000001.tar", samples)
    write_dataset_card(out, max_images=1, image_ext="jpg")
    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf"))
    _check_hf_rows(ds, {m.key: m for m, _ in samples})


def test_hf_reads_shards_with_declared_features(dataset, tmp_path):
    out, metas = dataset
    hf_features(2, "jpg")  # building features twice must give the same features
    ds = datasets.load_dataset(
        "webdataset",
        data_files={"train": _urls(out)},
        split="train",
        features=hf_features(2, "jpg"),
        cache_dir=str(tmp_path / "hf"),
    )
    _check_hf_rows(ds, metas)


def test_declared_features_name_every_schema_field():
    """The card's JSON struct must follow mvshards.schema, or HF would drop fields."""
    meta = make_sample(7, "two")[0].to_json()
    columns = hf_feature_list(1, "jpg")
    assert [c["name"] for c in columns] == ["json", "src0.jpg", "ref0.jpg", "__key__", "__url__"]
    struct = columns[0]["struct"]
    assert sorted(f["name"] for f in struct) == sorted(meta)
    image_struct = next(f for f in struct if f["name"] == "images")["list"]
    assert sorted(f["name"] for f in image_struct) == sorted(meta["images"][0])
    conversation = next(f for f in struct if f["name"] == "conversations")["list"]
    assert sorted(f["name"] for f in conversation) == sorted(meta["conversations"][0])
