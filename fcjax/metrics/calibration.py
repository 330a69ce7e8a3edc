"""Calibration of a confidence estimator against answer correctness (METHOD.md section 5).

All functions take confidences in [0, 1] and 0/1 correctness, drop pairs where either is
missing (NaN), and return NaN when nothing (or, for ranking metrics, only one class) is left.
"""

from __future__ import annotations

import numpy as np

from fcjax.metrics._arrays import bin_index, check_confidence, finite_pairs
from fcjax.metrics.agreement import rankdata


def _pairs(conf: object, correct: object, fn: str) -> tuple[np.ndarray, np.ndarray]:
    c, y = finite_pairs(conf, correct, fn, ("conf", "correct"))
    check_confidence(c, fn)
    if np.any((y != 0.0) & (y != 1.0)):
        raise ValueError(f"{fn}: correct must be 0/1 (or bool); got {y[(y != 0) & (y != 1)][0]!r}")
    return c, y


def ece(conf: object, correct: object, bins: int = 10) -> float:
    """Expected calibration error: sum_b (n_b / n) |accuracy_b - mean confidence_b|.

    Equal-width bins [k/bins, (k+1)/bins), the last bin closed at 1.0.
    """
    if bins < 1:
        raise ValueError(f"ece: bins must be >= 1, got {bins}")
    c, y = _pairs(conf, correct, "ece")
    if c.size == 0:
        return float("nan")
    index = bin_index(c, bins)
    conf_sum = np.bincount(index, weights=c, minlength=bins)
    acc_sum = np.bincount(index, weights=y, minlength=bins)
    return float(np.abs(acc_sum - conf_sum).sum() / c.size)


def reliability_bins(conf: object, correct: object, bins: int = 10) -> dict[str, np.ndarray]:
    """The bins ``ece`` sums over: per bin its ``count``, ``accuracy`` and ``mean_conf``
    (NaN in an empty bin), and the ``edges``; missing pairs dropped, as ``ece`` drops them."""
    if bins < 1:
        raise ValueError(f"reliability_bins: bins must be >= 1, got {bins}")
    c, y = _pairs(conf, correct, "reliability_bins")
    index = bin_index(c, bins)
    count = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {
            "edges": np.linspace(0, 1, bins + 1),
            "count": count,
            "accuracy": np.bincount(index, weights=y, minlength=bins) / count,
            "mean_conf": np.bincount(index, weights=c, minlength=bins) / count,
        }


def brier(conf: object, correct: object) -> float:
    """Brier score: mean squared difference between confidence and correctness."""
    c, y = _pairs(conf, correct, "brier")
    return float(np.mean((c - y) ** 2)) if c.size else float("nan")


def auroc(conf: object, correct: object) -> float:
    """Area under the ROC curve of confidence separating correct from wrong answers.

    Rank-based (Mann-Whitney U with average ranks), so a tie between a correct and a wrong
    answer counts one half. NaN when either class is absent.
    """
    c, y = _pairs(conf, correct, "auroc")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(c)
    u = ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _rejection_auc(removed_errors: np.ndarray, n_errors: int, n: int) -> float:
    """Mean over k = 0..n rejections of the remaining error count / n."""
    return float(np.mean((n_errors - removed_errors) / n))


def prr(conf: object, correct: object) -> float:
    """Prediction rejection ratio (Malinin et al.): how much of the oracle's gain a
    confidence-based rejection achieves over random rejection.

    Reject k = 0..n answers, least confident first; the curve is e(k) = (errors among the
    n - k kept) / n (rejected answers count as handled). AUC = mean of e(k) over k = 0..n.
    Random rejection gives e(k) = E (n - k) / n^2, the oracle (errors first) max(E - k, 0)/n.
    PRR = (AUC_random - AUC_conf) / (AUC_random - AUC_oracle): 1 for a perfect ordering,
    0 for random, negative when worse. Ties in confidence are rejected in expectation (errors
    removed linearly across the tie group). NaN when all answers are correct or all wrong.
    """
    c, y = _pairs(conf, correct, "prr")
    n = c.size
    errors = 1.0 - y
    n_errors = int(errors.sum())
    if n == 0 or n_errors == 0 or n_errors == n:
        return float("nan")
    order = np.argsort(c, kind="stable")
    c_sorted, e_sorted = c[order], errors[order]
    # Cumulative errors removed at tie-group boundaries; linear within a group.
    boundary = np.concatenate([np.flatnonzero(c_sorted[1:] != c_sorted[:-1]) + 1, [n]])
    cum_errors = np.concatenate([[0.0], np.cumsum(e_sorted)[boundary - 1]])
    cum_count = np.concatenate([[0], boundary]).astype(np.float64)
    k = np.arange(n + 1, dtype=np.float64)
    removed = np.interp(k, cum_count, cum_errors)
    auc_conf = _rejection_auc(removed, n_errors, n)
    auc_random = _rejection_auc(n_errors * k / n, n_errors, n)
    auc_oracle = _rejection_auc(np.minimum(k, n_errors), n_errors, n)
    return float((auc_random - auc_conf) / (auc_random - auc_oracle))
