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


BINNINGS = ("closed", "reference")


def cmfg_bin_index(values: np.ndarray, bins: int, binning: str = "closed") -> np.ndarray:
    """Confidence bin of each value for cMFG; -1 where a value falls in no bin.

    "closed" (fcjax's default): ``bin_index``, the last bin closed at 1.0.
    "reference" (the published code): ``np.digitize`` on the float edges
    ``np.linspace(0, 1, bins + 1)``, so 1.0 falls in no bin and a value on an edge goes where
    the rounded float edge puts it (0.3 < linspace(0, 1, 11)[3] = 0.30000000000000004 lies in
    bin 2, where floor(0.3 * 10) = 3).
    """
    if binning == "closed":
        return bin_index(values, bins)
    if binning == "reference":
        index = np.digitize(values, np.linspace(0.0, 1.0, bins + 1)) - 1
        return np.where((index >= 0) & (index < bins), index, -1)
    raise ValueError(f"cmfg binning must be one of {BINNINGS}, got {binning!r}")
