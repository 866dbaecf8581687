"""Sizes in bytes, and the one percentile rule, shared by mvprep and mvtrain.

Sizes: :data:`GiB` and :data:`MiB` are binary. :func:`parse_bytes` reads what a user types
for ``--gpu-mem`` or ``--memory-budget``: a number and a unit, case insensitive.
``KiB``/``MiB``/``GiB``/``TiB`` (or ``Ki``...``Ti``) are binary; ``kB``/``MB``/``GB``/``TB``
are decimal, and so is a bare prefix: ``80G`` = ``80GB`` = 80 * 10**9 bytes; ``B`` is bytes.
Text without a unit is refused (``--gpu-mem 80`` is not 80 bytes); an ``int`` from code is
a byte count.

Percentiles are by nearest rank (numpy ``method="inverted_cdf"``): ``pQ`` is the smallest
value that at least Q% of the items do not exceed, always a value that occurs, so a budget
that holds the p99 sample is one that 99% of the samples fit in alone.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

MiB = 1 << 20
GiB = 1 << 30

_PREFIXES = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
_PREFIXES.update({"KI": 1 << 10, "MI": 1 << 20, "GI": 1 << 30, "TI": 1 << 40})


def parse_bytes(text: str | int) -> int:
    """Bytes of ``"80GiB"``, ``"24GB"``, ``"80G"``, ``"81920MiB"``, ``"1000000B"`` or an int
    (a byte count; units in the module doc); ValueError (one line) for anything else,
    including text with no unit."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9.]+)\s*(([KMGT]i?)?B?)\s*", str(text), re.IGNORECASE)
    try:
        number = float(match.group(1)) if match else None
    except ValueError:
        number = None
    if match is None or number is None:
        raise ValueError(
            f"{text!r} is not a memory size: use e.g. 80GiB, 24GB (or 24G), 81920MiB or 1000000B"
        )
    if not match.group(2):
        raise ValueError(_no_unit_message(match.group(1), number))
    return int(number * _PREFIXES[(match.group(3) or "").upper()])


def _no_unit_message(digits: str, number: float) -> str:
    """The one-line refusal of a size typed without a unit, with its readings spelled out."""
    mib = number * 1024
    mib_text = str(int(mib)) if mib == int(mib) else f"{mib:g}"
    return (
        f"{digits} has no unit: write {digits}GiB, {digits}GB or {mib_text}MiB "
        f"({digits}B for bytes)"
    )


def nearest_rank(values: Sequence[float] | np.ndarray, q: float | Sequence[float]) -> Any:
    """The ``q``-th percentile(s) of ``values`` by nearest rank (module doc)."""
    return np.percentile(np.asarray(values), q, method="inverted_cdf")


def p99(values: Sequence[int] | np.ndarray) -> int:
    """The nearest-rank 99th percentile of integer ``values``."""
    return int(nearest_rank(values, 99))
