"""Faithfulness of expressed confidence and its dataset summaries (METHOD.md section 5).

Step faithfulness F = 1 - |D - C|; a trace's F is the mean over its valid steps. MFG is the
mean trace F; cMFG and cMFG* average F within confidence bins so that a dataset dominated by
one confidence level does not dominate the score.
"""

from __future__ import annotations

import numpy as np

from fcjax.metrics._arrays import check_confidence, cmfg_bin_index, finite_pairs


def _vector(name: str, values: object) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {array.shape}")
    return array


def _paired(f: object, c: object, fn: str) -> tuple[np.ndarray, np.ndarray]:
    """Finite (f, c) pairs with c checked to lie in [0, 1]."""
    _vector(f"{fn}: f", f), _vector(f"{fn}: c", c)
    f_arr, c_arr = finite_pairs(f, c, fn, ("f", "c"))
    return f_arr, check_confidence(c_arr, fn)


def step_faithfulness(d: object, c: object) -> np.ndarray:
    """F = 1 - |D - C| elementwise; NaN where either value is missing (NaN/inf)."""
    d_arr, c_arr = np.asarray(d, dtype=np.float64), np.asarray(c, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        f = 1.0 - np.abs(d_arr - c_arr)
    return np.where(np.isfinite(d_arr) & np.isfinite(c_arr), f, np.nan)


def mfg(f: object) -> float:
    """Mean faithfulness over traces, non-finite values dropped; NaN when none are left."""
    f_arr = _vector("mfg: f", f)
    f_arr = f_arr[np.isfinite(f_arr)]
    return float(f_arr.mean()) if f_arr.size else float("nan")


def cmfg(f: object, c: object, bins: int = 10, binning: str = "closed") -> float:
    """Confidence-binned MFG: mean over `bins` equal-width confidence bins of the bin's mean F.

    With binning="closed" (default) bins are [k/bins, (k+1)/bins) with the LAST BIN CLOSED at
    1.0, so confidence exactly 1.0 is counted. binning="reference" reproduces the published
    code (``np.digitize`` on float edges): c == 1.0 falls in no bin and is left out, and a c on
    an edge goes where the rounded float edge puts it (see ``cmfg_bin_index``). An empty bin
    counts as 0.5. Pairs with a non-finite f or c are dropped first; NaN when none are left.
    """
    if bins < 1:
        raise ValueError(f"cmfg: bins must be >= 1, got {bins}")
    f_arr, c_arr = _paired(f, c, "cmfg")
    if f_arr.size == 0:
        return float("nan")
    index = cmfg_bin_index(c_arr, bins, binning)
    keep = index >= 0
    totals = np.bincount(index[keep], weights=f_arr[keep], minlength=bins)
    counts = np.bincount(index[keep], minlength=bins)
    means = np.where(counts > 0, totals / np.maximum(counts, 1), 0.5)
    return float(means.mean())


def cmfg_star(
    f: object, c: object, bins: int = 10, return_bins: bool = False
) -> float | tuple[float, dict[str, np.ndarray]]:
    """Equal-count, width-weighted cMFG (the headline summary).

    Traces sorted by confidence are cut into min(bins, n) bins whose sizes differ by at most
    one, larger bins first. Bin j spans [lower_j, upper_j]: lower is the bin's minimum for the
    first bin, else the midpoint of the previous bin's maximum and this bin's minimum; upper
    is the bin's maximum for the last bin, else the midpoint of this bin's maximum and the
    next bin's minimum. cMFG* = sum_j w_j fbar_j / sum_j w_j with w_j = upper_j - lower_j
    (the plain mean of fbar_j when every width is 0). Non-finite pairs are dropped first;
    NaN when none are left. With `return_bins`, also returns the per-bin lower, upper, width,
    mean_f and count arrays.
    """
    if bins < 1:
        raise ValueError(f"cmfg_star: bins must be >= 1, got {bins}")
    f_arr, c_arr = _paired(f, c, "cmfg_star")
    n = f_arr.size
    if n == 0:
        value = float("nan")
        empty = np.zeros(0)
        table = {k: empty for k in ("lower", "upper", "width", "mean_f", "count")}
        return (value, table) if return_bins else value
    order = np.argsort(c_arr, kind="stable")
    c_sorted, f_sorted = c_arr[order], f_arr[order]
    n_bins = min(bins, n)
    sizes = np.full(n_bins, n // n_bins, dtype=np.int64)
    sizes[: n % n_bins] += 1
    stops = np.cumsum(sizes)
    starts = stops - sizes
    bin_min = c_sorted[starts]
    bin_max = c_sorted[stops - 1]
    mean_f = np.array([f_sorted[a:b].mean() for a, b in zip(starts, stops, strict=True)])
    lower = bin_min.copy()
    lower[1:] = (bin_max[:-1] + bin_min[1:]) / 2.0
    upper = bin_max.copy()
    upper[:-1] = (bin_max[:-1] + bin_min[1:]) / 2.0
    width = upper - lower
    total = width.sum()
    value = float((width * mean_f).sum() / total) if total > 0 else float(mean_f.mean())
    if return_bins:
        table = {"lower": lower, "upper": upper, "width": width, "mean_f": mean_f, "count": sizes}
        return value, table
    return value
