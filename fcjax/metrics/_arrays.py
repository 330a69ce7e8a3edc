"""Input handling shared by the metrics: paired finite values, unit-interval checks, bins."""

from __future__ import annotations

import numpy as np


def finite_pairs(
    x: object, y: object, fn: str, names: tuple[str, str] = ("x", "y")
) -> tuple[np.ndarray, np.ndarray]:
    """Two equally long float64 vectors with every pair holding a NaN/inf dropped (missing)."""
    x_arr = np.asarray(x, dtype=np.float64).ravel()
    y_arr = np.asarray(y, dtype=np.float64).ravel()
    if x_arr.shape != y_arr.shape:
        raise ValueError(
            f"{fn}: {names[0]} has {x_arr.size} values but {names[1]} has {y_arr.size} "
            f"(shape mismatch)"
        )
    keep = np.isfinite(x_arr) & np.isfinite(y_arr)
    return x_arr[keep], y_arr[keep]


def check_confidence(c: np.ndarray, fn: str) -> np.ndarray:
    bad = np.flatnonzero((c < 0.0) | (c > 1.0))
    if bad.size:
        raise ValueError(f"{fn}: confidence must lie in [0, 1]; got {c[bad[0]]!r}")
    return c


def bin_index(values: np.ndarray, bins: int) -> np.ndarray:
    """Equal-width bins [k/bins, (k+1)/bins) of [0, 1], the last one closed at 1.0."""
    return np.minimum(np.floor(values * bins).astype(np.int64), bins - 1)
