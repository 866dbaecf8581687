"""The exact-length cache a trainer run writes, as a contract both stages read.

``mvtrain`` recounts every sample's tokens exactly once per dataset and tokenizer (see
``mvtrain.data.lengths``) and keeps the result in its output folder::

    OUT/cache/lengths-{dataset}-{tokenizer}-{profile}.json
    {"tokens": [exact length per index row, in index order],
     "slices": {key: [slices, max_patches_per_slice]}, "mismatches": N}

``dataset`` is :func:`dataset_hash` of the shards' sha256s (so a cache never applies to
another build), ``tokenizer`` the tokenizer's fingerprint. ``mvprep stats DIR --lengths
OUT/cache`` finds the caches of DIR here and suggests budgets from their exact counts.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FINGERPRINT_PARAM = "tokenizer_fingerprint"
"""The manifest ``params`` entry naming the tokenizer an exact build counted with: the
trainer skips its recount when it equals :func:`tokenizer_fingerprint` of its own."""


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """What identifies a tokenizer's counts: its vocabulary and chat template (16 hex)."""
    h = hashlib.sha256()
    h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    h.update(str(getattr(tokenizer, "chat_template", "")).encode())
    return h.hexdigest()[:16]


CACHE_DIR = "cache"
"""The cache folder inside a trainer run's output folder."""
_PREFIX = "lengths-"


def dataset_hash(shard_sha256s: Iterable[str]) -> str:
    """The 16-hex-digit name part that ties a cache to one build (its shards' hashes)."""
    return hashlib.sha256("".join(shard_sha256s).encode()).hexdigest()[:16]


def cache_path(cache_dir: Path, dataset: str, fingerprint: str, profile: str) -> Path:
    """``cache_dir/lengths-{dataset}-{fingerprint}-{profile}.json``."""
    return Path(cache_dir) / f"{_PREFIX}{dataset}-{fingerprint}-{profile}.json"


@dataclass
class LengthsCache:
    """A cache file's content."""

    tokens: np.ndarray
    """Exact tokens per index row (int64, index order)."""
    slices: dict[str, tuple[int, int]]
    mismatches: int


def read_lengths_cache(path: Path) -> LengthsCache:
    """Read a cache file (ValueError/KeyError/OSError when it is not one)."""
    saved = json.loads(Path(path).read_text())
    return LengthsCache(
        np.asarray(saved["tokens"], dtype=np.int64),
        {k: (int(a), int(b)) for k, (a, b) in saved["slices"].items()},
        int(saved["mismatches"]),
    )


def write_lengths_cache(
    path: Path, tokens: np.ndarray, slices: dict[str, tuple[int, int]], mismatches: int
) -> None:
    """Write a cache file atomically (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(
        json.dumps(
            {"tokens": np.asarray(tokens).tolist(), "slices": slices, "mismatches": mismatches},
            separators=(",", ":"),
        )
    )
    tmp.replace(path)


def find_lengths_caches(where: Path, dataset: str) -> list[Path]:
    """The caches of build ``dataset`` at ``where``: a cache file, a cache folder, or a run's
    output folder (its ``cache/``). A named file is returned as it is, whatever its name."""
    where = Path(where)
    if where.is_file():
        return [where]
    folder = where / CACHE_DIR if (where / CACHE_DIR).is_dir() else where
    return sorted(folder.glob(f"{_PREFIX}{dataset}-*.json"))


def cache_dataset(path: Path) -> str | None:
    """The ``dataset`` part of a cache file's name; None when the name is not a cache's."""
    name = Path(path).name
    if not (name.startswith(_PREFIX) and name.endswith(".json")):
        return None
    return name[len(_PREFIX) :].split("-", 1)[0]
