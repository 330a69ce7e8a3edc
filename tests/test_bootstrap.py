"""Bootstrap intervals and permutation p-values of the dataset summaries (fcjax.metrics)."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest

from fcjax.metrics import (
    auroc,
    auroc_permutation_p,
    bootstrap_intervals,
    brier,
    cmfg,
    cmfg_star,
    ece,
    match_ids,
    mfg,
    paired_differences,
)
from fcjax.metrics.bootstrap import (
    calibration_replicates,
    faithfulness_replicates,
    interval,
    interval_absent,
    resample,
)

KEYS = ("mfg", "cmfg", "cmfg_star", "ece", "brier", "auroc")


@pytest.mark.parametrize("binning", ["closed", "reference"])
def test_replicates_equal_scalar_metrics_row_by_row(binning: str) -> None:
    rng = np.random.default_rng(0)
    n = 37
    # rounded confidences: ties, values on bin edges and exactly 1.0
    c = np.round(rng.uniform(size=n), 1)
    f = rng.uniform(size=n)
    y = (rng.uniform(size=n) < c).astype(float)
    idx = resample(n, 50, rng)
    got = {
        **faithfulness_replicates(f, c, idx, binning=binning),
        **calibration_replicates(c, y, idx),
    }
    for r in range(idx.shape[0]):
        fr, cr, yr = f[idx[r]], c[idx[r]], y[idx[r]]
        want = {
            "mfg": mfg(fr),
            "cmfg": cmfg(fr, cr, binning=binning),
            "cmfg_star": cmfg_star(fr, cr),
            "ece": ece(cr, yr),
            "brier": brier(cr, yr),
            "auroc": auroc(cr, yr),
        }
        for k in KEYS:
            assert got[k][r] == pytest.approx(want[k], abs=1e-12, nan_ok=True), (k, r)


def test_auroc_replicate_nan_when_one_class() -> None:
    c, y = np.array([0.2, 0.8]), np.array([0.0, 1.0])
    out = calibration_replicates(c, y, np.array([[0, 0], [1, 1], [0, 1]]))
    assert math.isnan(out["auroc"][0]) and math.isnan(out["auroc"][1])
    assert out["auroc"][2] == 1.0


def _coverage(draw, truth: dict[str, float], sims: int = 300, n: int = 100) -> dict[str, float]:
    rng = np.random.default_rng(1)
    hits = {k: 0 for k in truth}
    for s in range(sims):
        f, c, y = draw(rng, n)
        ci = bootstrap_intervals(f, c, y, reps=400, seed=s)
        for k, v in truth.items():
            lo, hi = ci[f"{k}_ci95"]
            hits[k] += lo <= v <= hi
    return {k: h / sims for k, h in hits.items()}


def test_intervals_cover_the_true_value_about_95_percent() -> None:
    """Simulated questions with known population values: MFG = E[F] of a Beta(3, 2) (0.6),
    Brier = E[C (1 - C)] = 1/6 with C ~ U(0, 1) and correct ~ Bernoulli(C), and a binormal
    AUROC Phi(1 / sqrt 2) = 0.7602. 300 simulated data sets of 100 questions; the Monte-Carlo
    standard error of a 95% coverage is 1.3 points, so [0.90, 0.99] fails a broken interval."""

    def draw(rng, n):
        y = (rng.uniform(size=n) < 0.5).astype(float)
        score = rng.normal(size=n) + y  # binormal, separation 1
        c_auc = 1.0 / (1.0 + np.exp(-score))
        return rng.beta(3, 2, size=n), c_auc, y

    truth_auc = 0.5 * (1.0 + math.erf(1.0 / 2.0))  # Phi(1/sqrt(2))
    cov = _coverage(draw, {"mfg": 0.6, "auroc": truth_auc})
    for k, v in cov.items():
        assert 0.90 <= v <= 0.99, (k, v)

    def draw_brier(rng, n):
        c = rng.uniform(size=n)
        return rng.uniform(size=n), c, (rng.uniform(size=n) < c).astype(float)

    cov = _coverage(draw_brier, {"brier": 1.0 / 6.0})
    assert 0.90 <= cov["brier"] <= 0.99, cov


def test_intervals_hand_cases_and_determinism() -> None:
    n = 20
    f = np.full(n, 0.7)
    c = np.linspace(0.05, 0.95, n)
    y = (c > 0.5).astype(float)
    out = bootstrap_intervals(f, c, y, reps=200, seed=3)
    assert out["mfg_ci95"] == pytest.approx([0.7, 0.7])
    assert out["auroc_ci95"] == pytest.approx([1.0, 1.0])  # perfectly separated in every resample
    assert out["auroc_p"] == pytest.approx(1 / 201)  # no permutation separates them perfectly
    assert out == bootstrap_intervals(f, c, y, reps=200, seed=3)
    rng = np.random.default_rng(0)
    g = rng.uniform(size=n)
    a, b = bootstrap_intervals(g, c, y, seed=0), bootstrap_intervals(g, c, y, seed=1)
    assert a["mfg_ci95"] != b["mfg_ci95"]
    # missing values are dropped; a single class leaves AUROC without interval or p-value
    out = bootstrap_intervals(
        [0.5, np.nan, 0.2, 0.5, 0.5, 0.5, 0.5], [0.3, 0.4, np.nan, 0.3, 0.3, 0.3, 0.3], [1] * 7
    )
    assert out["mfg_ci95"] == pytest.approx([0.5, 0.5])  # the 5 complete questions
    assert out["auroc_ci95"] is None and out["auroc_p"] is None
    # fewer than 5 questions: no interval (one question would give a zero-width one)
    out = bootstrap_intervals([0.5, 0.6, 0.7, 0.8], [0.3, 0.4, 0.5, 0.6], [1, 0, 1, 0])
    assert all(out[f"{k}_ci95"] is None for k in KEYS)
    one = {"f": [0.5], "c": [0.5], "correct": [1.0]}
    res = paired_differences(one, {**one, "f": [0.3]})
    assert res["mfg"]["diff"] == pytest.approx(0.2)
    assert res["mfg"]["ci95"] is None and not res["mfg"]["excludes_zero"]


def test_interval_absent_names_why_interval_is_none() -> None:
    values = np.linspace(0.4, 0.6, 100)
    assert interval(values, n=10) == pytest.approx([0.405, 0.595], abs=1e-3)
    assert interval_absent(values, n=10) == ""
    assert interval(values, n=4) is None
    assert interval_absent(values, n=4) == "fewer than 5 questions (4)"
    half_nan = np.where(np.arange(100) < 51, np.nan, values)  # 49 of 100 defined
    assert interval(half_nan) is None
    assert interval_absent(half_nan) == "defined in 49 of 100 resamples (needs 50%)"
    assert interval(half_nan[2:]) is not None and interval_absent(half_nan[2:]) == ""  # 49/98


def test_permutation_p_is_uniform_under_the_null() -> None:
    rng = np.random.default_rng(2)
    ps = [
        auroc_permutation_p(rng.uniform(size=50), rng.integers(0, 2, 50), reps=200, seed=s)
        for s in range(200)
    ]
    assert 0.01 <= np.mean(np.array(ps) < 0.05) <= 0.10
    assert 0.4 <= np.mean(ps) <= 0.6


def test_paired_differences() -> None:
    rng = np.random.default_rng(4)
    n = 60
    f = rng.uniform(0.2, 0.7, size=n)
    c = rng.uniform(size=n)
    y = (rng.uniform(size=n) < c).astype(float)
    base = {"f": f, "c": c, "correct": y}
    same = paired_differences(base, base, reps=300)
    for k in KEYS:
        assert same[k]["diff"] == 0.0 and same[k]["ci95"] == [0.0, 0.0]
        assert not same[k]["excludes_zero"]
    # a constant shift of F moves MFG by exactly that much in every resample
    shifted = paired_differences({**base, "f": f + 0.2}, base, reps=300)
    assert shifted["mfg"]["diff"] == pytest.approx(0.2)
    assert shifted["mfg"]["ci95"] == pytest.approx([0.2, 0.2])
    assert shifted["mfg"]["excludes_zero"]
    assert shifted["mfg"]["a"] == pytest.approx(mfg(f + 0.2))
    # a small shift plus noise much larger than it: unpaired intervals would straddle 0,
    # paired ones do not (the question effect cancels)
    noisy = f + 0.02 + rng.normal(0, 0.005, n)
    paired = paired_differences({**base, "f": noisy}, base, reps=500)
    assert paired["mfg"]["excludes_zero"] and paired["mfg"]["ci95"][0] > 0
    # rows missing in either run are left out of that metric
    holes = {**base, "c": np.where(np.arange(n) < 5, np.nan, c)}
    assert paired_differences(holes, base, reps=50)["brier"]["n"] == n - 5
    with pytest.raises(ValueError, match="differ in length"):
        paired_differences(base, {**base, "f": f[:-1]})


def test_match_ids() -> None:
    ia, ib = match_ids(["q3", "q1", "q2"], ["q2", "q9", "q3"])
    assert ia.tolist() == [0, 2] and ib.tolist() == [2, 0]  # q3, q2: the first list's order


def test_bootstrap_is_fast_for_200_questions_and_5_estimators() -> None:
    rng = np.random.default_rng(5)
    f, c = rng.uniform(size=200), rng.uniform(size=200)
    y = (rng.uniform(size=200) < c).astype(float)
    t0 = time.perf_counter()
    for seed in range(5):
        bootstrap_intervals(f, c, y, reps=1000, seed=seed)
    assert time.perf_counter() - t0 < 5.0
