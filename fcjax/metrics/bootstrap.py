"""Uncertainty of the dataset summaries: a bootstrap over questions and a permutation test.

Every summary (MFG, cMFG, cMFG*, ECE, Brier, AUROC) is recomputed on ``reps`` resamples of the
questions, drawn with replacement from one seeded generator, all resamples at once (numpy
arrays of shape [reps, n], no Python loop over resamples). Intervals are percentile
intervals. The faithfulness summaries resample the questions with a finite trace F and C, the
calibration summaries those with a finite C, the same subsets the point values use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fcjax.metrics._arrays import bin_index, check_confidence, cmfg_bin_index

FAITHFULNESS = ("mfg", "cmfg", "cmfg_star")
CALIBRATION = ("ece", "brier", "auroc")
METRICS = FAITHFULNESS + CALIBRATION
# resamples for a 95% interval unless told otherwise (experiments.run --bootstrap, the probe
# stage's layer table, experiments.report)
REPS = 1000
# an interval needs at least this share of resamples with a defined value (AUROC needs both
# classes in the resample)
MIN_DEFINED = 0.5
# and at least this many questions: resamples of fewer are too few to spread (one question
# gives a zero-width interval that would "exclude 0" for any difference)
MIN_QUESTIONS = 5


def resample(n: int, reps: int, rng: np.random.Generator) -> np.ndarray:
    """int64 [reps, n]: question indices drawn with replacement."""
    if reps < 1:
        raise ValueError(f"resample: reps must be >= 1, got {reps}")
    return rng.integers(0, n, size=(reps, n)) if n else np.zeros((reps, 0), np.int64)


def _rows(idx: np.ndarray) -> np.ndarray:
    return np.arange(idx.shape[0])[:, None]


def _binned_sums(index: np.ndarray, weights: Sequence[np.ndarray], bins: int):
    """Per-row bincounts of [R, m] bin indices (-1 = no bin): counts and weighted sums."""
    reps = index.shape[0]
    keep = index >= 0
    flat = (_rows(index) * bins + index)[keep]
    size = reps * bins
    counts = np.bincount(flat, minlength=size).reshape(reps, bins)
    sums = [np.bincount(flat, weights=w[keep], minlength=size).reshape(reps, bins) for w in weights]
    return counts, sums


def faithfulness_replicates(
    f: object, c: object, idx: np.ndarray, bins: int = 10, binning: str = "closed"
) -> dict[str, np.ndarray]:
    """MFG, cMFG and cMFG* of every resample: {name: float64 [R]}.

    ``f`` (trace faithfulness) and ``c`` (trace confidence in [0, 1]) are finite 1-D arrays;
    row r of ``idx`` [R, m] picks the resample's questions. Row r equals ``mfg(f[idx[r]])``,
    ``cmfg(f[idx[r]], c[idx[r]], bins, binning)`` and ``cmfg_star(f[idx[r]], c[idx[r]], bins)``.
    """
    f_arr, c_arr = np.asarray(f, np.float64), np.asarray(c, np.float64)
    check_confidence(c_arr, "faithfulness_replicates")
    reps, m = idx.shape
    if m == 0:
        return {k: np.full(reps, np.nan) for k in FAITHFULNESS}
    fs = f_arr[idx]
    out = {"mfg": fs.mean(axis=1)}

    counts, (totals,) = _binned_sums(cmfg_bin_index(c_arr, bins, binning)[idx], [fs], bins)
    out["cmfg"] = np.where(counts > 0, totals / np.maximum(counts, 1), 0.5).mean(axis=1)

    cs = c_arr[idx]
    order = np.argsort(cs, axis=1, kind="stable")
    cs, fs = np.take_along_axis(cs, order, 1), np.take_along_axis(fs, order, 1)
    n_bins = min(bins, m)
    sizes = np.full(n_bins, m // n_bins, np.int64)
    sizes[: m % n_bins] += 1
    stops = np.cumsum(sizes)
    starts = stops - sizes
    cum = np.concatenate([np.zeros((reps, 1)), np.cumsum(fs, axis=1)], axis=1)
    mean_f = (cum[:, stops] - cum[:, starts]) / sizes
    bin_min, bin_max = cs[:, starts], cs[:, stops - 1]
    lower, upper = bin_min.copy(), bin_max.copy()
    lower[:, 1:] = upper[:, :-1] = (bin_max[:, :-1] + bin_min[:, 1:]) / 2.0
    width = upper - lower
    total = width.sum(axis=1)
    weighted = (width * mean_f).sum(axis=1) / np.where(total > 0, total, 1.0)
    out["cmfg_star"] = np.where(total > 0, weighted, mean_f.mean(axis=1))
    return out


def _row_ranks(values: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Average ranks (1..m, ties averaged) of values[idx] within each row of idx."""
    codes = np.unique(values, return_inverse=True)[1].ravel().astype(np.int64)
    n_codes = int(codes.max()) + 1 if codes.size else 1
    m = idx.shape[1]
    keys = _rows(idx) * n_codes + codes[idx]
    ordered = np.sort(keys, axis=None)
    left = np.searchsorted(ordered, keys, side="left")
    right = np.searchsorted(ordered, keys, side="right")
    return (left + right + 1) / 2.0 - _rows(idx) * m


def _auroc_rows(ranks: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUROC of each row from within-row ranks and 0/1 labels; NaN for one class."""
    n_pos = labels.sum(axis=1)
    n_neg = labels.shape[1] - n_pos
    u = (ranks * labels).sum(axis=1) - n_pos * (n_pos + 1) / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)


def calibration_replicates(
    c: object, correct: object, idx: np.ndarray, bins: int = 10
) -> dict[str, np.ndarray]:
    """ECE, Brier and AUROC of every resample: {name: float64 [R]} (``c`` in [0, 1] and 0/1
    ``correct`` finite 1-D arrays; row r equals the scalar metric on ``[idx[r]]``)."""
    c_arr, y_arr = np.asarray(c, np.float64), np.asarray(correct, np.float64)
    check_confidence(c_arr, "calibration_replicates")
    reps, m = idx.shape
    if m == 0:
        return {k: np.full(reps, np.nan) for k in CALIBRATION}
    cs, ys = c_arr[idx], y_arr[idx]
    out = {"brier": ((cs - ys) ** 2).mean(axis=1)}
    _, (conf_sum, acc_sum) = _binned_sums(bin_index(c_arr, bins)[idx], [cs, ys], bins)
    out["ece"] = np.abs(acc_sum - conf_sum).sum(axis=1) / m
    out["auroc"] = _auroc_rows(_row_ranks(c_arr, idx), ys)
    return out


def interval(values: np.ndarray, level: float = 0.95, n: int | None = None) -> list[float] | None:
    """Percentile interval [lo, hi] of the defined replicates; None when fewer than half of
    them are defined (e.g. AUROC when most resamples hold one class) or when the resamples
    come from fewer than ``MIN_QUESTIONS`` questions (``n``)."""
    values = np.asarray(values, np.float64)
    if interval_absent(values, n):
        return None
    ok = values[np.isfinite(values)]
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(ok, [tail, 100.0 - tail])
    return [float(lo), float(hi)]


def interval_absent(values: np.ndarray, n: int | None = None) -> str:
    """Why ``interval(values, n=n)`` is None, in words; "" when it is not."""
    values = np.asarray(values, np.float64)
    if n is not None and n < MIN_QUESTIONS:
        return f"fewer than {MIN_QUESTIONS} questions ({n})"
    defined = int(np.isfinite(values).sum())
    if defined == 0 or defined < MIN_DEFINED * values.size:
        return f"defined in {defined} of {values.size} resamples (needs {MIN_DEFINED:.0%})"
    return ""


def auroc_permutation_p(
    c: object, correct: object, reps: int = REPS, seed: int = 0
) -> float | None:
    """Two-sided permutation p-value of AUROC against 0.5: correctness labels permuted across
    questions ``reps`` times, p = (1 + #{|AUROC_perm - 0.5| >= |AUROC - 0.5|}) / (1 + reps).
    None when the finite pairs hold one class only."""
    c_arr, y_arr = _finite(c, correct)
    n = c_arr.size
    if n == 0 or y_arr.min() == y_arr.max():
        return None
    identity = np.arange(n)[None, :]
    ranks = _row_ranks(c_arr, identity)
    observed = _auroc_rows(ranks, y_arr[None, :])[0]
    rng = np.random.default_rng([seed, 2])
    perms = np.argsort(rng.random((reps, n)), axis=1)
    null = _auroc_rows(ranks, y_arr[perms])
    extreme = np.abs(null - 0.5) >= np.abs(observed - 0.5) - 1e-12
    return float((1 + extreme.sum()) / (1 + reps))


def _finite(*columns: object) -> list[np.ndarray]:
    arrays = [np.asarray(x, np.float64).ravel() for x in columns]
    keep = np.logical_and.reduce([np.isfinite(a) for a in arrays])
    return [a[keep] for a in arrays]


def bootstrap_intervals(
    f: object,
    c: object,
    correct: object,
    reps: int = REPS,
    seed: int = 0,
    bins: int = 10,
    binning: str = "closed",
) -> dict[str, list[float] | float | None]:
    """``<metric>_ci95`` for every metric of one estimator, plus ``auroc_p``.

    ``f``, ``c``, ``correct``: per-question trace faithfulness, confidence in [0, 1] and 0/1
    correctness (NaN = missing). Deterministic in ``seed``.
    """
    f_arr = np.asarray(f, np.float64).ravel()
    c_arr = np.asarray(c, np.float64).ravel()
    y_arr = np.asarray(correct, np.float64).ravel()
    ff, cf = _finite(f_arr, c_arr)
    cc, yc = _finite(c_arr, y_arr)
    reps_f = faithfulness_replicates(
        ff, cf, resample(ff.size, reps, np.random.default_rng([seed, 0])), bins, binning
    )
    reps_c = calibration_replicates(
        cc, yc, resample(cc.size, reps, np.random.default_rng([seed, 1])), bins
    )
    out: dict[str, list[float] | float | None] = {
        f"{k}_ci95": interval(v, n=ff.size) for k, v in reps_f.items()
    }
    out.update({f"{k}_ci95": interval(v, n=cc.size) for k, v in reps_c.items()})
    out["auroc_p"] = auroc_permutation_p(cc, yc, reps, seed)
    return out


def match_ids(ids_a: Sequence[str], ids_b: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Positions in ``ids_a`` and ``ids_b`` of the ids both hold, in ``ids_a``'s order.

    The order matters: cMFG* cuts traces sorted by confidence into equal-count bins, and
    traces of tied confidence (sampling confidence takes at most 2K + 1 values) stay in the order
    given, so a run scored in its own example order gives its own summary's value."""
    pos_b = {str(x): i for i, x in enumerate(ids_b)}
    pairs = [(i, pos_b[str(x)]) for i, x in enumerate(ids_a) if str(x) in pos_b]
    return (
        np.array([i for i, _ in pairs], np.int64),
        np.array([j for _, j in pairs], np.int64),
    )


def paired_differences(
    a: Mapping[str, object],
    b: Mapping[str, object],
    reps: int = REPS,
    seed: int = 0,
    bins: int = 10,
    binning: str = "closed",
) -> dict[str, dict]:
    """A - B for every metric on the same questions, with paired-bootstrap intervals.

    ``a`` and ``b`` map "f", "c", "correct" to per-question arrays aligned on the same
    questions (see ``match_ids``). Each resample draws one set of questions and scores both
    runs on it, so question difficulty cancels out of the difference. Faithfulness metrics use
    questions where F and C are finite in both runs, calibration metrics those where C is.
    Returns {metric: {"a", "b", "diff", "ci95", "n", "excludes_zero"}}; ``ci95`` is None with
    fewer than ``MIN_QUESTIONS`` shared questions.
    """
    cols = {}
    for run in (a, b):
        for key in ("f", "c", "correct"):
            cols.setdefault(key, []).append(np.asarray(run[key], np.float64).ravel())
    sizes = {x.size for v in cols.values() for x in v}
    if len(sizes) > 1:
        raise ValueError(f"paired_differences: columns differ in length ({sorted(sizes)})")
    (fa, fb), (ca, cb), (ya, yb) = cols["f"], cols["c"], cols["correct"]
    fa, ca_f, fb, cb_f = _finite(fa, ca, fb, cb)
    ca_c, ya, cb_c, yb = _finite(ca, ya, cb, yb)
    groups = (
        (FAITHFULNESS, fa.size, 0, lambda f, c, i: faithfulness_replicates(f, c, i, bins, binning)),
        (CALIBRATION, ca_c.size, 1, lambda c, y, i: calibration_replicates(c, y, i, bins)),
    )
    data = {0: ((fa, ca_f), (fb, cb_f)), 1: ((ca_c, ya), (cb_c, yb))}
    out: dict[str, dict] = {}
    for names, n, g, fn in groups:
        idx = resample(n, reps, np.random.default_rng([seed, 3 + g]))
        whole = np.arange(n)[None, :]
        (xa, za), (xb, zb) = data[g]
        point_a, point_b = fn(xa, za, whole), fn(xb, zb, whole)
        rep_a, rep_b = fn(xa, za, idx), fn(xb, zb, idx)
        for k in names:
            ci = interval(rep_a[k] - rep_b[k], n=n)
            out[k] = {
                "a": _scalar(point_a[k]),
                "b": _scalar(point_b[k]),
                "diff": _scalar(point_a[k] - point_b[k]),
                "ci95": ci,
                "n": int(n),
                "excludes_zero": bool(ci is not None and (ci[0] > 0 or ci[1] < 0)),
            }
    return out


def _scalar(x: np.ndarray) -> float | None:
    v = float(np.asarray(x).ravel()[0])
    return v if np.isfinite(v) else None
