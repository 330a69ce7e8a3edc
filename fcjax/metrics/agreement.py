"""Agreement between confidence estimators on the same steps (METHOD.md section 5).

Spearman's rho and Kendall's tau-b (tie-aware) from ``scipy.stats`` over finite pairs.
``scipy.stats`` is imported on first use: it takes about a second, and every run process
imports this module (through the estimator registry) long before it reports.
"""

from __future__ import annotations

import warnings

import numpy as np

from fcjax.metrics._arrays import finite_pairs


def rankdata(values: object) -> np.ndarray:
    """Ranks 1..n of a 1-D array, ties given their average rank."""
    from scipy import stats

    return stats.rankdata(np.asarray(values, dtype=np.float64).ravel(), method="average")


def _constant(a: np.ndarray) -> bool:
    return bool(np.all(a == a[0]))


def spearman(x: object, y: object) -> float:
    """Spearman's rho (Pearson correlation of average ranks) over finite pairs.

    NaN with fewer than 2 pairs or when either side is constant.
    """
    x_arr, y_arr = finite_pairs(x, y, "spearman")
    if x_arr.size < 2 or _constant(x_arr) or _constant(y_arr):
        return float("nan")
    from scipy import stats

    return float(stats.spearmanr(x_arr, y_arr).statistic)


def kendall(x: object, y: object) -> float:
    """Kendall's tau-b over finite pairs (tie-aware).

    NaN with fewer than 2 pairs or when either side is constant.
    """
    x_arr, y_arr = finite_pairs(x, y, "kendall")
    if x_arr.size < 2 or _constant(x_arr) or _constant(y_arr):
        return float("nan")
    from scipy import stats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.kendalltau(x_arr, y_arr, variant="b").statistic)


def pairwise_agreement(columns: dict[str, object]) -> dict[str, dict[str, float]]:
    """Spearman, Kendall and n for every pair of columns, over rows where both are finite.

    Keys are "a|b" for a before b in the dict's order.
    """
    names = list(columns)
    arrays = {k: np.asarray(v, dtype=np.float64).ravel() for k, v in columns.items()}
    sizes = {k: v.size for k, v in arrays.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"pairwise_agreement: columns differ in length: {sizes}")
    out: dict[str, dict[str, float]] = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            n = int((np.isfinite(arrays[a]) & np.isfinite(arrays[b])).sum())
            out[f"{a}|{b}"] = {
                "spearman": spearman(arrays[a], arrays[b]),
                "kendall": kendall(arrays[a], arrays[b]),
                "n": n,
            }
    return out
