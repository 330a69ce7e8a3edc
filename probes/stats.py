"""Per-layer statistics of cross-fitted probe scores, with the question as the unit.

``bootstrap_auroc``: AUROC of every layer on ``reps`` resamples of the questions (drawn
with replacement; a question drawn m times weighs its rows m times), for 95% percentile
intervals. ``null_auroc``: AUROC of every layer with the labels permuted across questions
(each question takes the label sequence of another, cycled to its own number of rows), the
scores held fixed: the spread a score with no relation to the label shows on these
questions; its 2.5/97.5 percentiles are the null band.
"""

from __future__ import annotations

import numpy as np

from fcjax.metrics.bootstrap import REPS, interval, interval_absent
from fcjax.metrics.calibration import auroc, ece
from probes.common import log_loss


def _group_codes(groups) -> tuple[np.ndarray, int]:
    codes = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)[1]
    return codes.ravel(), int(codes.max()) + 1 if len(codes) else 0


def weighted_auroc(scores: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC of one score vector [n] under row weights [R, n]: sum over (pos, neg) pairs of
    w_i w_j ([s_i > s_j] + [s_i == s_j] / 2) / (W_pos W_neg); NaN for one class."""
    order = np.argsort(scores, kind="stable")
    s, pos = scores[order], positive[order].astype(np.float64)
    w = weights[:, order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    wp = np.add.reduceat(w * pos, starts, axis=1)
    wn = np.add.reduceat(w * (1 - pos), starts, axis=1)
    below = np.cumsum(wn, axis=1) - wn
    num = (wp * (below + 0.5 * wn)).sum(axis=1)
    den = wp.sum(axis=1) * wn.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / den, np.nan)


def bootstrap_auroc(scores, positive, groups, reps: int = REPS, seed: int = 0) -> np.ndarray:
    """[reps, L] AUROC per layer of scores [n, L] on question resamples."""
    codes, q = _group_codes(groups)
    rng = np.random.default_rng([seed, 11])
    draws = rng.integers(0, q, size=(reps, q))
    counts = np.zeros((reps, q))
    np.add.at(counts, (np.arange(reps)[:, None], draws), 1.0)
    weights = counts[:, codes]
    return np.stack(
        [weighted_auroc(scores[:, j], positive, weights) for j in range(scores.shape[1])], 1
    )


def permuted_labels(labels, groups, reps: int = REPS, seed: int = 0) -> np.ndarray:
    """[reps, n] labels permuted across questions: question q takes the rows of question
    pi(q), cycled to q's row count."""
    labels = np.asarray(labels, np.float64)
    codes, q = _group_codes(groups)
    members = [np.flatnonzero(codes == k) for k in range(q)]
    rng = np.random.default_rng([seed, 12])
    out = np.empty((reps, len(labels)))
    for r in range(reps):
        perm = rng.permutation(q)
        for k in range(q):
            src = members[perm[k]]
            out[r, members[k]] = labels[src[np.arange(len(members[k])) % len(src)]]
    return out


def null_auroc(scores, labels, groups, reps: int = REPS, seed: int = 0) -> np.ndarray:
    """[reps, L] AUROC per layer of fixed scores [n, L] against labels (> 0.5 positive)
    permuted across questions."""
    perm = permuted_labels(labels, groups, reps, seed) > 0.5
    out = np.empty((reps, scores.shape[1]))
    for j in range(scores.shape[1]):
        order = np.argsort(scores[:, j], kind="stable")
        s = scores[order, j]
        starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
        sizes = np.diff(np.r_[starts, len(s)])
        # average ranks (1-based, ties averaged), then Mann-Whitney per permutation
        rank_sorted = np.repeat(starts + (sizes + 1) / 2.0, sizes)
        ranks = np.empty_like(rank_sorted)
        ranks[order] = rank_sorted
        n_pos = perm.sum(1)
        n_neg = perm.shape[1] - n_pos
        u = perm @ ranks - n_pos * (n_pos + 1) / 2.0
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, j] = np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)
    return out


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from fcjax.metrics.agreement import spearman

    return float(spearman(a, b))


def layer_table(
    proba: np.ndarray, y: np.ndarray, groups, *, reps: int = REPS, seed: int = 0
) -> dict[str, np.ndarray]:
    """Per-layer AUROC (label > 0.5) with its bootstrap interval and null band, ECE,
    log-loss, and for the label as a continuous target Spearman and MAE; rows with a
    finite label only. An interval or band that cannot be given (``reps=0``, too few
    questions, AUROC undefined in most resamples) is NaN with its reason in
    ``auroc_ci_absent`` / ``null_band_absent`` ("" where it is given)."""
    on = np.isfinite(y)
    p, yy = proba[on], y[on]
    g = np.asarray([str(v) for v in groups])[on]
    layers = range(p.shape[1])
    positive = yy > 0.5
    table = {
        "auroc": np.array([auroc(p[:, j], positive) for j in layers]),
        "ece": np.array([ece(p[:, j], positive) for j in layers]),
        "log_loss": np.array([log_loss(p[:, j], yy) for j in layers]),
        "spearman": np.array([_spearman(p[:, j], yy) for j in layers]),
        "mae": np.array([float(np.mean(np.abs(p[:, j] - yy))) for j in layers]),
        "n_rows": np.full(p.shape[1], int(on.sum())),
        "n_questions": np.full(p.shape[1], len(set(g.tolist()))),
    }
    nq = len(set(g.tolist()))
    if reps > 0 and p.shape[0]:
        boot = bootstrap_auroc(p, positive, g, reps, seed)
        null = null_auroc(p, yy, g, reps, seed)
        ci_why = [interval_absent(boot[:, j], n=nq) for j in layers]
        band_why = [interval_absent(null[:, j], n=nq) for j in layers]
        ci = [interval(boot[:, j], n=nq) or [np.nan, np.nan] for j in layers]
        band = [interval(null[:, j], n=nq) or [np.nan, np.nan] for j in layers]
    else:
        why = "bootstrap off (0 resamples)" if reps <= 0 else "no labeled rows"
        ci_why = band_why = [why for _ in layers]
        ci = band = [[np.nan, np.nan] for _ in layers]
    table["auroc_lo"], table["auroc_hi"] = (np.array(v) for v in zip(*ci, strict=True))
    table["null_lo"], table["null_hi"] = (np.array(v) for v in zip(*band, strict=True))
    table["auroc_ci_absent"] = np.array(ci_why, dtype=str)
    table["null_band_absent"] = np.array(band_why, dtype=str)
    return table
