"""Hugging Face ``datasets`` support: declared features, so HF reads mixed samples.

HF's ``webdataset`` builder infers its columns from the first 5 samples of the first shard
and then (``datasets`` 5.x, ``packaged_modules/webdataset/webdataset.py``):

* raises "The TAR archives of the dataset should be in WebDataset format, but the files in
  the archive don't share the same prefix or the same types." when those 5 samples do not
  all have the same members (a text-only sample next to an image sample, say);
* silently drops a member of a later sample whose column the first 5 did not have (a
  ``ref0.jpg`` after five unsliced samples is lost);
* types the JSON column from those 5 samples, so a field that was always null or empty
  there (``images`` of text-only samples, ``image_id``) fails the cast later ("Couldn't
  cast array of type struct<...> to null").

Declaring the features avoids all three: inference is skipped, a missing member becomes
None, and the JSON is parsed into a fixed struct. :func:`write_dataset_card` writes
``OUT/README.md`` whose YAML header declares them, so ``load_dataset(str(OUT))`` reads a
build with no arguments; :func:`hf_features` gives the same features for
``load_dataset("webdataset", data_files=..., features=hf_features(n, "jpg"))``.

Pure stdlib except :func:`hf_features`, which imports ``datasets``.
"""

from __future__ import annotations

import json
from typing import Any

from mvshards.storage import Location, location
from mvshards.tario import write_atomic

CARD_FILE = "README.md"

_SIZE: dict[str, Any] = {"list": "int64"}
_IMAGE_FIELDS: list[tuple[str, Any]] = [
    ("path", "string"),
    ("sha256", "string"),
    ("original_size", _SIZE),
    ("source_size", _SIZE),
    ("grid", _SIZE),
    ("refine_size", _SIZE),
    ("slice_sizes", {"list": _SIZE}),
    ("tgt_sizes", {"list": _SIZE}),
    ("num_patches", "int64"),
    ("image_id", "int64"),
    ("num_image_tokens", "int64"),
    ("source_member", "string"),
    ("refine_member", "string"),
]
"""The fields of :meth:`mvshards.schema.ImageEntry.to_json`, with their Arrow types."""

_SAMPLE_FIELDS: list[tuple[str, Any]] = [
    ("schema_version", "int64"),
    ("key", "string"),
    ("id", "string"),
    ("conversations", [("role", "string"), ("content", "string")]),
    ("image_names", {"list": "string"}),
    ("images", _IMAGE_FIELDS),
    ("num_images", "int64"),
    ("num_patches", "int64"),
    ("num_image_tokens", "int64"),
    ("num_text_tokens", "int64"),
    ("num_tokens", "int64"),
    ("token_count_exact", "bool"),
]
"""The fields of :meth:`mvshards.schema.SampleMeta.to_json`; a list of pairs under a field
name means a list of structs, ``{"list": T}`` a list of ``T``."""


def _field(name: str, spec: Any) -> dict[str, Any]:
    if isinstance(spec, str):
        return {"name": name, "dtype": spec}
    if isinstance(spec, dict):
        return {"name": name, **spec}
    return {"name": name, "list": [_field(n, s) for n, s in spec]}


def hf_feature_list(max_images: int, image_ext: str) -> list[dict[str, Any]]:
    """The features in the dataset-card (YAML) form of ``datasets``.

    Columns: ``json`` (the sample metadata struct), ``src{i}.{ext}`` and ``ref{i}.{ext}``
    images for ``i < max_images``, ``__key__`` and ``__url__``.
    """
    columns = [{"name": "json", "struct": [_field(n, s) for n, s in _SAMPLE_FIELDS]}]
    for i in range(max_images):
        columns.append({"name": f"src{i}.{image_ext}", "dtype": "image"})
        columns.append({"name": f"ref{i}.{image_ext}", "dtype": "image"})
    columns.append({"name": "__key__", "dtype": "string"})
    columns.append({"name": "__url__", "dtype": "string"})
    # A deep copy: the nested specs are shared module constants, and ``datasets`` consumes
    # the lists it parses in place.
    return json.loads(json.dumps(columns))


def hf_features(max_images: int, image_ext: str) -> Any:
    """``datasets.Features`` for ``load_dataset("webdataset", ..., features=...)``."""
    import datasets

    # The same path a dataset card's YAML takes inside ``datasets``.
    return datasets.Features._from_yaml_list(hf_feature_list(max_images, image_ext))


def dataset_card(max_images: int, image_ext: str) -> str:
    """``README.md`` text whose YAML header (written as JSON, a YAML subset) declares the
    shards as the ``train`` split with fixed features."""
    header = {
        "configs": [
            {"config_name": "default", "data_files": [{"split": "train", "path": "*.tar"}]}
        ],
        "dataset_info": {"features": hf_feature_list(max_images, image_ext)},
    }
    return (
        "---\n"
        + json.dumps(header, indent=1)
        + "\n---\n\n"
        + "# mvkit shards\n\n"
        + "WebDataset shards written by `mvprep build` (see `manifest.json`). Read them with\n"
        + "`webdataset.WebDataset(urls).decode('pil')`, or with Hugging Face datasets:\n"
        + "`datasets.load_dataset('<this folder>', split='train')`.\n"
    )


def write_dataset_card(out: Location | str, max_images: int, image_ext: str) -> None:
    """Atomically write ``OUT/README.md`` (call with the build's largest image count)."""
    write_atomic(location(out) / CARD_FILE, dataset_card(max_images, image_ext).encode("utf-8"))
