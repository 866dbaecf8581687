"""One 2.6-family batch as ``mvtrain run`` builds it, against the official fine-tuning code.

Ours: ``mvprep build --profile minicpmv-2.6 --max-res 1344`` (the library
:func:`mvprep.build.build`; with ``--tokenizer`` for the default JPEG shards, so the planner's
exact token counts are checked too) writes shards; each sample is read back from
its shard and loaded by :func:`mvtrain.data.sample.load_sample` (uint8 pixels), the samples are
collated by :meth:`mvtrain.model.adapters.Remote26Adapter.host_batch` (from
:func:`adapter_for`, as the session picks it) and made the model's inputs by
:func:`mvtrain.model.pixel_input.model_inputs`, as the step does on its device.

Official: the same source image files and conversations through ``preprocess`` (``llm_type
"qwen"``, ``batch_vision``), the ``SupervisedDataset`` item dict and ``data_collator`` of
``finetune/dataset.py`` (copied in ``official_collate.py``, provenance there), with
``max_slice_nums = 9`` (what ``--max-res 1344`` means), the slicing by
``MiniCPMVImageProcessor.slice_image`` of the reference ``image_processing_minicpmv.py``
(loaded by file path from ``../shared/reference/minicpmv-2.6``) and the official transform
(``ToTensor`` + ``Normalize(0.5, 0.5)``, reimplemented without torchvision).

The tokenizer is the real ``MiniCPMVTokenizerFast`` over the tiny vocabulary (as in
``test_remote26_labels.py``). Compared: ``input_ids``, ``position_ids``, ``attention_mask``,
``labels`` (label rule ``"official"``, the 2.6 default), ``image_bound`` and ``tgt_sizes``
exactly; ``pixel_values`` per (sub)image in shape exactly and in value within
:data:`PIXEL_BOUNDS` grey levels, for shards stored as JPEG q95 (the default) and as PNG. Our
pixels were resized once by mvprep (OpenCV area / antialiased bicubic) and stored; the
official path resizes the original with PIL bicubic: values differ by rounding, never in
layout (a swapped slice exceeds the bounds many times over).

Padding: the official collator pads ``input_ids`` with 0, ours with the tokenizer's pad id.
The 2.6 ``MiniCPMV.forward`` never reads ``attention_mask`` and every row is right-padded, so
(causal attention, labels ``-100`` there) the padded tokens reach no real position's logits
or loss: the test compares ``input_ids`` exactly where the mask is set and checks the padding
of each side separately.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import cv2
import pytest
import torch
from imagegen import make_photo
from official_collate import data_collator, dataset_item, official_transform, preprocess
from PIL import Image
from remote26_fixtures import REFERENCE_26, build_remote_tokenizer, require_reference

from mvshards.profiles import get_profile
from mvshards.schema import SampleMeta
from mvshards.tario import iter_shard
from mvtrain.data.sample import load_sample
from mvtrain.data.tokenize import IGNORE_INDEX
from mvtrain.model.adapters import Remote26Adapter, adapter_for
from mvtrain.model.pixel_input import PixelPack, model_inputs

pytestmark = pytest.mark.slow

PROFILE = "minicpmv-2.6"
MAX_RES = 1344
SLICE_CONFIG = {"max_slice_nums": 9, "scale_resolution": 448, "patch_size": 14}
"""The official ``slice_config`` matching ``--max-res 1344`` (``floor((1344 / 448) ** 2)``)."""

PIXEL_BOUNDS = {"jpeg": (64.0, 3.0), "png": (10.0, 0.8)}
"""Per shard image format (``--format``): bounds on the largest absolute difference of one
pixel value, and on the mean absolute difference over each (sub)image, in grey levels (0-255,
after de-normalisation ``(x * 0.5 + 0.5) * 255``). Measured on these images:

* ``jpeg`` (the default, q95): max 61 (19 on the PNG-sourced image), per-view means 1.42-2.70.
  The stored JPEG dominates: it keeps a 4:2:0 input's chroma subsampling (as
  ``mvprep.imaging`` documents), which costs up to ~60 grey levels at sharp colour edges of
  the synthetic photos (4:4:4 for the PNG input: max 19).
* ``png`` (lossless, so the resizes alone: mvprep's OpenCV area / antialiased bicubic against
  PIL's bicubic of the original): max 9, per-view means 0.36-0.69.
"""

IMAGES = {
    "sliced.jpg": (1600, 1000),  # grid 4x2 at max_slice_nums 9: source + 8 slices
    "small.png": (400, 300),  # not sliced: upscaled to one 518x392 view
    "multi_a.jpg": (300, 200),  # not sliced (no image id in the official finetune form)
    "multi_b.jpg": (900, 1300),  # sliced 2x3 (the only sliced image: image id 0)
}

RECORDS: list[dict[str, Any]] = [
    {
        "id": "sliced",
        "image": "sliced.jpg",
        "conversations": [
            {"role": "user", "content": "<image>\nDescribe the picture."},
            {"role": "assistant", "content": "A field of colour with a few shapes."},
        ],
    },
    {
        "id": "unsliced",
        "image": "small.png",
        "conversations": [  # no <image>: the span and a newline are prepended
            {"role": "user", "content": "What is shown?"},
            {"role": "assistant", "content": "Shapes."},
            {"role": "user", "content": "How many?"},
            {"role": "assistant", "content": "About twenty."},
        ],
    },
    {
        "id": "multi",
        "image": {"<image_00>": "multi_a.jpg", "<image_01>": "multi_b.jpg"},
        "conversations": [
            {"role": "user", "content": "Compare <image_00> with <image_01>."},
            {"role": "assistant", "content": "The second one is taller."},
        ],
    },
    {
        "id": "text",
        "conversations": [
            {"role": "user", "content": "No image here, just text."},
            {"role": "assistant", "content": "Fine."},
        ],
    },
]

BATCHES = {"images": ["sliced", "unsliced", "multi"], "text_only": ["text", "unsliced"]}
"""Two micro-batches: three image samples (sliced, unsliced, multi-image), and a text-only
sample next to an image sample (``[]`` entries in ``tgt_sizes``/``image_bound``)."""


def _load_image_processor() -> Any:
    """``MiniCPMVImageProcessor`` from the reference ``image_processing_minicpmv.py``, loaded by
    file path; its import-time ``AutoImageProcessor.register`` is undone afterwards. (It imports
    only names our transformers still has: no :mod:`mvtrain.model.remote_compat` fix needed.)"""
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING

    extra = getattr(IMAGE_PROCESSOR_MAPPING, "_extra_content", None)
    before = dict(extra) if isinstance(extra, dict) else None
    name = "mvkit_reference26_image_processing_minicpmv"
    spec = importlib.util.spec_from_file_location(
        name, REFERENCE_26 / "image_processing_minicpmv.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    finally:
        if before is not None and isinstance(extra, dict):
            for key in set(extra) - set(before):
                del extra[key]
    return module.MiniCPMVImageProcessor(
        max_slice_nums=SLICE_CONFIG["max_slice_nums"],
        scale_resolution=SLICE_CONFIG["scale_resolution"],
        patch_size=SLICE_CONFIG["patch_size"],
    )


def _write_dataset(root: Path) -> Path:
    # make_photo runs OpenCV in this process, and the build forks its workers: one OpenCV
    # thread, as mvprep.imaging sets (a forked child can block on a pool thread it lacks).
    cv2.setNumThreads(1)
    root.mkdir(parents=True, exist_ok=True)
    for seed, (name, (w, h)) in enumerate(IMAGES.items()):
        image = Image.fromarray(make_photo(w, h, seed=seed))
        image.save(root / name, **({"quality": 90} if name.endswith(".jpg") else {}))
    path = root / "data.json"
    path.write_text(json.dumps(RECORDS), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The records' files, the tokenizer folder and a cache of the official batches (the loaded
    tokenizer and the official image processor are added by the first :func:`setup`, after
    its build has forked)."""
    require_reference()
    tmp = tmp_path_factory.mktemp("remote26_batch")
    tok_dir = build_remote_tokenizer(tmp / "tok")
    shutil.copyfile(
        REFERENCE_26 / "tokenization_minicpmv_fast.py", tok_dir / "tokenization_minicpmv_fast.py"
    )
    data = _write_dataset(tmp / "data")
    return {"tmp": tmp, "tok_dir": tok_dir, "data": data, "official": {}}


@pytest.fixture(scope="module", params=sorted(PIXEL_BOUNDS))
def setup(request: pytest.FixtureRequest, source: dict[str, Any]) -> dict[str, Any]:
    """Shards built from the records with ``--format`` ``request.param`` (samples by record
    id), with everything of :func:`source`."""
    from transformers import AutoTokenizer

    from mvprep.build import build
    from mvprep.options import BuildOptions

    fmt = request.param
    out = source["tmp"] / f"shards-{fmt}"
    options = BuildOptions(
        data_path=source["data"],
        out_dir=out,
        profile=PROFILE,
        max_res=MAX_RES,
        image_format=fmt,
        # token counts do not depend on the image format: counted (exactly) once
        tokenizer=str(source["tok_dir"]) if fmt == "jpeg" else None,
        samples_per_shard=2,
    )
    result = build(options, workers=1, progress=False)  # forks: before any tokenizer use here
    assert result.ok, result
    if "tok" not in source:
        source["tok"] = AutoTokenizer.from_pretrained(
            str(source["tok_dir"]), trust_remote_code=True
        )
        source["proc"] = _load_image_processor()
    stored: dict[str, tuple[SampleMeta, dict[str, bytes]]] = {}
    for shard in sorted(out.glob("*.tar")):
        for _key, members in iter_shard(shard):
            meta = SampleMeta.from_json(json.loads(members["json"]))
            stored[meta.id] = (meta, members)
    assert sorted(stored) == sorted(r["id"] for r in RECORDS)
    return {**source, "format": fmt, "stored": stored, "ours": {}}


def ours_batch(setup: dict[str, Any], ids: list[str]) -> dict[str, Any]:
    """What ``mvtrain run`` feeds the model: ``load_sample`` per stored sample, the 2.6
    adapter's ``host_batch``, then ``model_inputs`` (a fresh copy each call: tests may alter
    it)."""
    cache = setup["ours"]
    if tuple(ids) not in cache:
        tok = setup["tok"]
        samples = []
        for rid in ids:
            meta, members = setup["stored"][rid]
            loaded = load_sample(meta, members, tok, PROFILE)
            # The planner's token count (mvprep counted with this tokenizer) is what collates.
            counted = meta.num_text_tokens + meta.num_image_tokens
            assert counted == len(loaded.tokenized) or not meta.token_count_exact
            assert meta.token_count_exact == (setup["format"] == "jpeg")
            samples.append(loaded)
        adapter = adapter_for(PROFILE, tok)
        assert isinstance(adapter, Remote26Adapter)
        host = adapter.host_batch(samples)
        assert isinstance(host["pixel_values"], PixelPack)
        assert host["pixel_values"].rows.dtype == torch.uint8
        cache[tuple(ids)] = model_inputs(host, "cpu")
    return copy.deepcopy(cache[tuple(ids)])


def official_batch(setup: dict[str, Any], ids: list[str]) -> dict[str, Any]:
    """``data_collator`` over ``SupervisedDataset`` items of the same records (cached: it does
    not depend on our build).

    ``__getitem__`` opens ``Image.open(path).convert("RGB")`` per image; it needs an
    ``"image"`` key, so a text-only record goes to ``preprocess`` with no images (what the
    collator gets for it: empty ``pixel_values``, ``tgt_sizes`` and ``image_bound``).
    """
    cache = setup["official"]
    if tuple(ids) not in cache:
        records = {r["id"]: r for r in RECORDS}
        items = []
        for rid in ids:
            record = records[rid]
            image = record.get("image", {})
            names = {"<image>": image} if isinstance(image, str) else image
            images_dict = {
                name: Image.open(setup["data"].parent / path).convert("RGB")
                for name, path in names.items()
            }
            ret = preprocess(
                images_dict,
                record["conversations"],
                setup["tok"],
                official_transform,
                query_nums=64,
                slice_config=dict(SLICE_CONFIG),
                llm_type="qwen",
                patch_size=14,
                batch_vision=True,
                max_length=2048,
                slice_image=setup["proc"].slice_image,
            )
            items.append(dataset_item(ret))
        cache[tuple(ids)] = data_collator(items, max_length=2048)
    return cache[tuple(ids)]


def compare_structure(ours: dict[str, Any], official: dict[str, Any], pad_id: int) -> None:
    """Every field but the pixel values exactly; the pixel tensors' shapes exactly."""
    assert set(ours) == set(official)
    mask = official["attention_mask"]
    assert mask.dtype == torch.bool
    assert torch.equal(ours["attention_mask"], mask)
    assert ours["input_ids"].shape == official["input_ids"].shape
    assert torch.equal(ours["input_ids"][mask], official["input_ids"][mask].long())
    assert (ours["input_ids"][~mask] == pad_id).all()  # ours: the pad id
    assert (official["input_ids"][~mask] == 0).all()  # official: padding_value=0
    assert ours["position_ids"].dtype == official["position_ids"].dtype == torch.long
    assert torch.equal(ours["position_ids"], official["position_ids"])
    assert ours["labels"].shape == official["labels"].shape
    assert torch.equal(ours["labels"], official["labels"].long())
    assert (ours["labels"] != IGNORE_INDEX).any()
    n = len(official["input_ids"])
    assert len(ours["image_bound"]) == len(ours["tgt_sizes"]) == len(ours["pixel_values"]) == n
    for i in range(n):
        for field in ("image_bound", "tgt_sizes"):
            a, b = ours[field][i], official[field][i]
            if isinstance(b, list):  # no images: both sides send []
                assert a == b == [], (field, i, a, b)
                continue
            assert isinstance(a, torch.Tensor), (field, i, a)
            assert a.dtype == b.dtype, (field, i, a.dtype, b.dtype)
            assert torch.equal(a, b), (field, i, a.tolist(), b.tolist())
        assert [p.shape for p in ours["pixel_values"][i]] == [
            p.shape for p in official["pixel_values"][i]
        ]


def pixel_differences(ours: dict[str, Any], official: dict[str, Any]) -> list[tuple[float, float]]:
    """Per (sub)image of the batch, in order: ``(max, mean)`` absolute difference of its
    values in grey levels (normalised values back to 0-255: ``(x * 0.5 + 0.5) * 255``)."""
    out = []
    for row_a, row_b in zip(ours["pixel_values"], official["pixel_values"], strict=True):
        for a, b in zip(row_a, row_b, strict=True):
            diff = (a - b).abs() * 127.5
            out.append((float(diff.max()), float(diff.mean())))
    return out


@pytest.mark.parametrize("batch", sorted(BATCHES))
def test_batch_equals_official_collate(setup: dict[str, Any], batch: str) -> None:
    ids = BATCHES[batch]
    ours = ours_batch(setup, ids)
    official = official_batch(setup, ids)
    compare_structure(ours, official, setup["tok"].pad_token_id)
    assert all(p.dtype == torch.float32 for row in ours["pixel_values"] for p in row)
    max_bound, mean_bound = PIXEL_BOUNDS[setup["format"]]
    diffs = pixel_differences(ours, official)
    assert diffs
    assert max(d[0] for d in diffs) <= max_bound, diffs
    assert max(d[1] for d in diffs) <= mean_bound, diffs


def test_batch_covers_sliced_unsliced_and_image_ids(setup: dict[str, Any]) -> None:
    """The image batch has what it claims: a 4x2-sliced image, an unsliced one, and a
    multi-image sample whose only sliced image carries ``<image_id>0</image_id>``."""
    ours = ours_batch(setup, BATCHES["images"])
    assert [t.tolist() for t in ours["tgt_sizes"][:2]] == [[[25, 40]] + [[36, 29]] * 8, [[28, 37]]]
    assert [t.shape[0] for t in ours["tgt_sizes"]] == [1 + 8, 1, 1 + (1 + 6)]
    assert get_profile(PROFILE).family.label_rule == "official"  # what load_sample applied
    tok = setup["tok"]
    special = ("assistant", "<image_id>", "</image_id>", "<unk>", "<|im_end|>", "<slice>")
    assert len({tok.convert_tokens_to_ids(t) for t in special}) == len(special)
    text = tok.decode(ours["input_ids"][2][ours["attention_mask"][2]])
    assert text.count("<image_id>") == 1 and "<image_id>0</image_id>" in text


def test_comparison_catches_wrong_bounds_labels_and_pixels(setup: dict[str, Any]) -> None:
    """The comparison fails on an off-by-one ``image_bound``, a dropped label and two swapped
    slices (same shapes: only the pixel values tell), so the equalities are not vacuous."""
    ids = BATCHES["images"]
    official = official_batch(setup, ids)
    pad = setup["tok"].pad_token_id
    max_bound, mean_bound = PIXEL_BOUNDS[setup["format"]]

    shifted = ours_batch(setup, ids)
    shifted["image_bound"][0] = shifted["image_bound"][0] + 1
    with pytest.raises(AssertionError):
        compare_structure(shifted, official, pad)

    relabelled = ours_batch(setup, ids)
    row = relabelled["labels"][1]
    row[(row != IGNORE_INDEX).nonzero()[-1]] = IGNORE_INDEX
    with pytest.raises(AssertionError):
        compare_structure(relabelled, official, pad)

    swapped = ours_batch(setup, ids)
    slices = swapped["pixel_values"][0]
    slices[1], slices[2] = slices[2], slices[1]
    compare_structure(swapped, official, pad)
    diffs = pixel_differences(swapped, official)
    assert max(d[1] for d in diffs) > mean_bound and max(d[0] for d in diffs) > max_bound
