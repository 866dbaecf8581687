"""Shared helpers of the ``mvprep.imaging`` tests: the read -> probe -> decode path and PSNR."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from mvprep.imaging import decode_rgb, probe_image, read_image_bytes


def load(path: Path, min_size: tuple[int, int] = (1 << 30, 1 << 30), **kw) -> np.ndarray:
    """read -> probe -> decode, full size unless min_size allows a reduced JPEG decode."""
    data = read_image_bytes(path)
    return decode_rgb(data, probe_image(data, **kw), min_size)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)
