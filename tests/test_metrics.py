"""Faithfulness summaries, calibration, estimator agreement and trajectories.

Expected values are hand computed (arithmetic in comments) or come from an independent
brute-force computation in the test.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from fcjax.metrics import (
    auroc,
    brier,
    cmfg,
    cmfg_star,
    ece,
    kendall,
    mfg,
    pairwise_agreement,
    prr,
    rankdata,
    spearman,
    step_faithfulness,
    trajectory_bins,
)

NAN = float("nan")

# ----------------------------------------------------------------------------- faithfulness


def test_step_faithfulness_and_mfg() -> None:
    # 1 - |1 - 0.5| = 0.5; 1 - |0.2 - 0.2| = 1; missing D or C -> NaN.
    f = step_faithfulness([1.0, 0.2, NAN, 0.3], [0.5, 0.2, 0.3, np.inf])
    np.testing.assert_allclose(f[:2], [0.5, 1.0])
    assert np.isnan(f[2]) and np.isnan(f[3])
    # MFG drops the NaNs: (0.5 + 1.0) / 2.
    assert mfg(f) == pytest.approx(0.75)
    assert math.isnan(mfg([NAN]))
    assert math.isnan(mfg([]))


def test_cmfg_hand_case_and_closed_last_bin() -> None:
    f = [0.2, 0.4, 0.9, 1.0]
    c = [0.05, 0.08, 0.95, 1.0]
    # bin 0: (0.2 + 0.4) / 2 = 0.3; bin 9 holds 0.95 AND 1.0 (closed): (0.9 + 1.0) / 2 = 0.95;
    # 8 empty bins count 0.5 each = 4.0.  (0.3 + 0.95 + 4.0) / 10 = 0.525.
    # (Leaving c == 1.0 out, as the reference code does, would give 0.52.)
    assert cmfg(f, c) == pytest.approx(0.525)
    # Confidence exactly 0 goes to the first bin: (1.0 + 9 * 0.5) / 10 = 0.55.
    assert cmfg([1.0], [0.0]) == pytest.approx(0.55)
    # NaN pairs are dropped before binning.
    assert cmfg([*f, NAN, 0.0], [*c, 0.5, NAN]) == pytest.approx(0.525)
    assert math.isnan(cmfg([], []))
    assert math.isnan(cmfg([NAN], [0.5]))


def test_cmfg_star_hand_case() -> None:
    c = [0.9, 0.1, 0.4, 0.2, 0.8]
    f = [0.5, 1.0, 1.0, 0.0, 0.5]
    # Sorted c: 0.1 0.2 0.4 | 0.8 0.9 (sizes 3, 2: larger bin first).
    # bin 0: f 1, 0, 1 -> 2/3; lower = 0.1, upper = (0.4 + 0.8) / 2 = 0.6, width 0.5.
    # bin 1: f 0.5, 0.5 -> 0.5; lower = 0.6, upper = 0.9, width 0.3.
    # (0.5 * 2/3 + 0.3 * 0.5) / 0.8 = (1/3 + 0.15) / 0.8 = 0.6041666...
    value, table = cmfg_star(f, c, bins=2, return_bins=True)
    assert value == pytest.approx((0.5 * 2 / 3 + 0.3 * 0.5) / 0.8)
    np.testing.assert_allclose(table["lower"], [0.1, 0.6])
    np.testing.assert_allclose(table["upper"], [0.6, 0.9])
    np.testing.assert_allclose(table["width"], [0.5, 0.3])
    np.testing.assert_allclose(table["mean_f"], [2 / 3, 0.5])
    np.testing.assert_array_equal(table["count"], [3, 2])
    # NaN / inf pairs are dropped first.
    assert cmfg_star([*f, NAN, 1.0], [*c, 0.3, NAN], bins=2) == pytest.approx(value)


def test_cmfg_star_fewer_traces_than_bins() -> None:
    # n = 3 < 10 bins -> 3 bins of one trace each.
    # widths: [0.2, 0.35] = 0.15, [0.35, 0.55] = 0.2, [0.55, 0.6] = 0.05.
    # (0.15 * 1 + 0.2 * 0 + 0.05 * 0.5) / 0.4 = 0.175 / 0.4 = 0.4375.
    assert cmfg_star([1.0, 0.0, 0.5], [0.2, 0.5, 0.6]) == pytest.approx(0.4375)
    # A single trace: width 0 -> plain mean = its F.
    assert cmfg_star([0.3], [0.7]) == pytest.approx(0.3)
    assert math.isnan(cmfg_star([], []))


def test_cmfg_star_all_equal_confidence_is_plain_mean_of_bins() -> None:
    # All widths 0. Sizes for n = 5, 3 bins: 2, 2, 1 -> bins f [1, 0], [0, 0], [1]
    # -> means 0.5, 0, 1 -> plain mean 0.5 (the mean over traces would be 0.4).
    assert cmfg_star([1.0, 0.0, 0.0, 0.0, 1.0], [0.7] * 5, bins=3) == pytest.approx(0.5)


def test_cmfg_star_bin_sizes_and_contiguous_edges() -> None:
    rng = np.random.default_rng(0)
    c = rng.uniform(size=23)
    _, table = cmfg_star(rng.uniform(size=23), c, return_bins=True)
    # 23 = 3 * 3 + 7 * 2, larger bins first.
    np.testing.assert_array_equal(table["count"], [3, 3, 3, 2, 2, 2, 2, 2, 2, 2])
    np.testing.assert_allclose(table["upper"][:-1], table["lower"][1:])
    assert table["lower"][0] == c.min() and table["upper"][-1] == c.max()


def test_sanity_always_decisive_on_uniform_confidence() -> None:
    # D = 1 -> F = 1 - |1 - c| = c. On the symmetric grid c_i = (i + 0.5) / n with n a
    # multiple of 10, equal-count bins mirror each other under c -> 1 - c (same widths,
    # bin means summing to 1 pairwise), so cMFG* is exactly 0.5.
    for n in (10, 100, 1000):
        c = (np.arange(n) + 0.5) / n
        f = step_faithfulness(np.ones(n), c)
        assert cmfg_star(f, c) == pytest.approx(0.5, abs=1e-12)
        # Equal-width bins: bin means are centres 0.05 ... 0.95 -> mean 0.5 too.
        assert cmfg(f, c) == pytest.approx(0.5, abs=1e-12)
    # Random uniform confidence, n = 100000: each bin mean of c is within a few
    # standard errors (0.029 / sqrt(10000) = 3e-4) of the bin centre and the widths are
    # within ~1e-3 of 0.1, so cMFG* is 0.5 to well within 0.005.
    c = np.random.default_rng(1).uniform(size=100_000)
    assert cmfg_star(c, c) == pytest.approx(0.5, abs=0.005)


def test_sanity_perfect_faithfulness() -> None:
    rng = np.random.default_rng(2)
    c = rng.uniform(size=500)
    f = step_faithfulness(c, c)  # D = C -> F = 1
    assert cmfg_star(f, c) == pytest.approx(1.0)
    assert cmfg(f, c) == pytest.approx(1.0)
    assert mfg(f) == pytest.approx(1.0)


def test_faithfulness_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        cmfg_star([0.5], [1.5])
    with pytest.raises(ValueError, match="shape"):
        cmfg([0.5, 0.5], [0.5])
    with pytest.raises(ValueError, match="bins"):
        cmfg([0.5], [0.5], bins=0)


# ----------------------------------------------------------------------------- calibration


def test_ece_hand_case() -> None:
    conf = [0.1, 0.15, 0.9, 1.0, NAN]
    correct = [0, 1, 1, 1, 1]
    # bin 1: conf mean 0.125, accuracy 0.5 -> |0.375| * 2/4 = 0.1875.
    # bin 9 (closed, holds 1.0): conf mean 0.95, accuracy 1 -> 0.05 * 2/4 = 0.025.
    assert ece(conf, correct) == pytest.approx(0.2125)
    assert ece([1.0, 0.0], [True, False]) == pytest.approx(0.0)


def test_brier_hand_case() -> None:
    # ((0.8 - 1)^2 + (0.3 - 0)^2) / 2 = (0.04 + 0.09) / 2.
    assert brier([0.8, 0.3], [1, 0]) == pytest.approx(0.065)


def _auroc_brute(conf: np.ndarray, correct: np.ndarray) -> float:
    pos, neg = conf[correct == 1], conf[correct == 0]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


def test_auroc_hand_and_brute_force() -> None:
    # Pairs (pos, neg): (0.9, 0.5) 1, (0.9, 0.1) 1, (0.5, 0.5) 0.5, (0.5, 0.1) 1 -> 3.5 / 4.
    assert auroc([0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0]) == pytest.approx(0.875)
    rng = np.random.default_rng(3)
    for _ in range(5):
        conf = rng.integers(0, 6, size=40) / 5.0  # many ties
        correct = rng.integers(0, 2, size=40)
        assert auroc(conf, correct) == pytest.approx(_auroc_brute(conf, correct))
    assert math.isnan(auroc([0.2, 0.9], [1, 1]))


def _rejection_auc_brute(conf: np.ndarray, correct: np.ndarray) -> float:
    """Mean over all orderings of tied confidences of the rejection-curve AUC."""
    n = len(conf)
    values = np.unique(conf)
    groups = [np.flatnonzero(conf == v) for v in values]
    aucs = []
    for perms in itertools.product(*(itertools.permutations(g) for g in groups)):
        order = [i for p in perms for i in p]  # least confident first
        errors = 1 - correct[order]
        remaining = [errors[k:].sum() / n for k in range(n + 1)]
        aucs.append(np.mean(remaining))
    return float(np.mean(aucs))


def test_prr_hand_cases() -> None:
    # n = 2, one error: curve (1/2, 0, 0) -> 1/6; random (1/2, 1/4, 0) -> 1/4; oracle 1/6.
    assert prr([0.9, 0.1], [1, 0]) == pytest.approx(1.0)
    # Reversed: curve (1/2, 1/2, 0) -> 1/3; (1/4 - 1/3) / (1/4 - 1/6) = -1.
    assert prr([0.1, 0.9], [1, 0]) == pytest.approx(-1.0)
    # conf 0.9 0.8 0.3 0.2, correct 1 0 1 0 (E = 2, n = 4): rejecting 0.2, 0.3, 0.8, 0.9
    # leaves errors 2, 1, 1, 0, 0 -> AUC 4/4/5 = 0.2; random 2, 1.5, 1, 0.5, 0 -> 0.25;
    # oracle 2, 1, 0, 0, 0 -> 0.15.  PRR = 0.05 / 0.1 = 0.5.
    assert prr([0.9, 0.8, 0.3, 0.2], [1, 0, 1, 0]) == pytest.approx(0.5)
    # All tied -> rejection is random -> 0.
    assert prr([0.5] * 6, [1, 0, 1, 1, 0, 0]) == pytest.approx(0.0)
    assert math.isnan(prr([0.1, 0.9], [1, 1]))
    assert math.isnan(prr([0.1, 0.9], [0, 0]))


def test_prr_ties_match_average_over_orderings() -> None:
    rng = np.random.default_rng(4)
    for _ in range(4):
        conf = rng.integers(0, 3, size=7) / 2.0
        correct = rng.integers(0, 2, size=7)
        if correct.sum() in (0, 7):
            continue
        n, e = len(conf), int((1 - correct).sum())
        auc = _rejection_auc_brute(conf, correct)
        auc_random = np.mean([e * (n - k) / n / n for k in range(n + 1)])
        auc_oracle = np.mean([max(e - k, 0) / n for k in range(n + 1)])
        expected = (auc_random - auc) / (auc_random - auc_oracle)
        assert prr(conf, correct) == pytest.approx(expected)


def test_calibration_bad_input() -> None:
    with pytest.raises(ValueError, match="0/1"):
        brier([0.5], [2])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ece([-0.1], [1])


# ----------------------------------------------------------------------------- agreement


def test_rankdata_average_ties() -> None:
    np.testing.assert_allclose(rankdata([10, 20, 20, 5]), [2, 3.5, 3.5, 1])


def test_known_values_with_ties() -> None:
    # scipy documentation examples (scipy.stats.spearmanr / kendalltau).
    assert spearman([1, 2, 3, 4, 5], [5, 6, 7, 8, 7]) == pytest.approx(0.8207826816681233)
    assert kendall([12, 2, 1, 12, 2], [1, 4, 7, 1, 0]) == pytest.approx(-0.47140452079103173)
    # Hand: x = 1 2 3, y = 1 3 2: pairs (12) +, (13) +, (23) - -> tau = 1/3;
    # ranks d = 0, -1, 1 -> rho = 1 - 6 * 2 / (3 * 8) = 0.5.
    assert kendall([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    assert spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)


def _kendall_brute(x: np.ndarray, y: np.ndarray) -> float:
    i, j = np.triu_indices(len(x), k=1)
    sx, sy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    return float((sx * sy).sum() / np.sqrt((sx != 0).sum() * (sy != 0).sum()))


def _spearman_brute(x: np.ndarray, y: np.ndarray) -> float:
    def ranks(v: np.ndarray) -> np.ndarray:
        less = (v[None, :] < v[:, None]).sum(1)
        equal = (v[None, :] == v[:, None]).sum(1)
        return 1 + less + (equal - 1) / 2

    return float(np.corrcoef(ranks(x), ranks(y))[0, 1])


@pytest.mark.parametrize("n", [2, 3, 10, 37, 64, 65, 2000])
def test_kendall_spearman_brute_force(n: int) -> None:
    rng = np.random.default_rng(n)
    x = rng.integers(0, 5, size=n).astype(float)
    y = x + rng.integers(-3, 4, size=n)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        x[0], y[-1] = x[0] + 1, y[-1] + 1
    assert kendall(x, y) == pytest.approx(_kendall_brute(x, y))
    assert spearman(x, y) == pytest.approx(_spearman_brute(x, y))
    # No ties: continuous values.
    u, v = rng.normal(size=n), rng.normal(size=n)
    assert kendall(u, v) == pytest.approx(_kendall_brute(u, v))
    assert kendall(u, -u) == pytest.approx(-1.0)


def test_agreement_nan_and_degenerate() -> None:
    assert math.isnan(kendall([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman([1.0], [2.0]))
    # NaN rows dropped: the rest is perfectly concordant.
    assert kendall([1, 2, NAN, 3], [1, 2, 0, 3]) == pytest.approx(1.0)


def test_pairwise_agreement() -> None:
    a = [0.1, 0.2, 0.3, 0.4, NAN]
    b = [0.4, 0.3, 0.2, 0.1, 0.5]
    c = [0.1, 0.3, 0.2, NAN, NAN]
    out = pairwise_agreement({"a": a, "b": b, "c": c})
    assert list(out) == ["a|b", "a|c", "b|c"]
    assert out["a|b"]["n"] == 4 and out["a|c"]["n"] == 3 and out["b|c"]["n"] == 3
    assert out["a|b"]["spearman"] == pytest.approx(-1.0)
    assert out["a|b"]["kendall"] == pytest.approx(-1.0)
    # a|c over rows 0..2: x = 1 2 3, y = 1 3 2 (hand case above).
    assert out["a|c"]["kendall"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="length"):
        pairwise_agreement({"a": [1, 2], "b": [1]})


# ----------------------------------------------------------------------------- trajectory


def test_trajectory_bins() -> None:
    position = [0.0, 0.1, 0.5, 0.96, 1.0, NAN]
    values = {"d": [1.0, 2.0, 3.0, NAN, 5.0, 9.0], "c": [0.5, 0.5, 0.5, 0.5, 0.5, 0.5]}
    out = trajectory_bins(position, values, bins=20)
    # Bins: 0.0 -> 0, 0.1 -> 2, 0.5 -> 10, 0.96 -> 19, 1.0 -> 19 (closed); NaN position out.
    expected_count = np.zeros(20, dtype=int)
    expected_count[[0, 2, 10]] = 1
    expected_count[19] = 2
    np.testing.assert_array_equal(out["count"], expected_count)
    d = out["mean"]["d"]
    assert d[0] == 1.0 and d[2] == 2.0 and d[10] == 3.0
    assert d[19] == 5.0  # the NaN value at 0.96 is ignored
    assert out["n"]["d"][19] == 1 and out["n"]["c"][19] == 2
    assert np.isnan(d[1]) and np.isnan(d[18])
    np.testing.assert_allclose(out["edges"], np.linspace(0, 1, 21))
    with pytest.raises(ValueError, match="position"):
        trajectory_bins([1.5], {"d": [1.0]})
    with pytest.raises(ValueError, match="'d'"):
        trajectory_bins([0.5], {"d": [1.0, 2.0]})


def test_summarize_by_hand() -> None:
    """Two traces: e1 steps C=(0.2, 0.8), D=(0.5, 1.0), correct; e2 C=(NaN, 0.6), D=(0, NaN),
    wrong. Trace C by the last rule: 0.8, 0.6; trace F: 0.75 (mean of 0.7, 0.8), NaN."""
    import json

    from fcjax.metrics import summarize, trace_columns

    steps = {
        "example_id": ["e1", "e1", "e2", "e2"],
        "position": np.array([0.0, 1.0, 0.0, 1.0]),
        "decisiveness": np.array([0.5, 1.0, 0.0, NAN]),
        "conf_x": np.array([0.2, 0.8, NAN, 0.6]),
    }
    examples = {
        "example_id": ["e1", "e2"],
        "correct": np.array([True, False]),
        "n_steps": np.array([2, 2]),
        "prediction": ["3", None],
        "finish_reason": ["eos", "length"],
    }
    step_cols, ex_cols = trace_columns(steps, examples, {"x": "last"})
    np.testing.assert_allclose(step_cols["faith_x"], [0.7, 0.8, NAN, NAN])
    np.testing.assert_allclose(ex_cols["conf_x"], [0.8, 0.6])
    np.testing.assert_allclose(ex_cols["faith_x"], [0.75, NAN])
    s = summarize(steps, examples, {"x": "last"}, not_scored={"probe": "too few labels"})
    text = json.dumps(s)  # plain JSON values (no numpy), as summary.json holds them
    assert json.dumps(json.loads(text)) == text
    m = s["estimators"]["x"]
    assert (m["n_traces"], m["n_steps_scored"]) == (1, 3)
    assert m["mfg"] == pytest.approx(0.75)
    assert m["ece"] == pytest.approx((abs(1 - 0.8) + abs(0 - 0.6)) / 2)
    assert m["brier"] == pytest.approx((0.2**2 + 0.6**2) / 2)
    assert m["auroc"] == pytest.approx(1.0)
    assert m["mean_conf"] == pytest.approx(0.7)
    assert s["accuracy"] == pytest.approx(0.5) and s["n_examples"] == 2
    assert s["counts"] == {
        "no_steps": 0,
        "no_answer": 1,
        "unscorable": 0,
        "truncated": 1,
        "steps": 4,
        "decisiveness_missing": 1,
        "not_scored": {"probe": "too few labels"},
    }
    assert s["agreement"]["decisiveness|x"]["n"] == 2
    with pytest.raises(ValueError, match="conf_y"):
        summarize(steps, examples, {"y": "mean"})
    # an unscorable trace is left out of every estimator figure and counted; intervals, the
    # binning, extra counts and the protocol are passed through
    s = summarize(
        steps,
        {**examples, "scorable": np.array([True, False])},
        {"x": "last"},
        binning="reference",
        bootstrap=20,
        seed=3,
        counts={"decisiveness_judge": "lexicon"},
        protocol="paper",
    )
    m = s["estimators"]["x"]
    assert m["ece"] == pytest.approx(abs(1 - 0.8)) and m["mean_conf"] == pytest.approx(0.8)
    assert m["auroc"] is None  # one scorable trace, one class
    assert m["cmfg"] == pytest.approx((0.75 + 9 * 0.5) / 10)
    assert m["mfg_ci95"] is None  # fewer questions than an interval needs
    assert "auroc_p" in m and s["protocol"] == "paper"
    assert s["counts"]["unscorable"] == 1 and s["counts"]["decisiveness_judge"] == "lexicon"


def test_cmfg_reference_binning_hand_cases() -> None:
    # c == 1.0: fcjax's closed last bin counts it, the published digitize binning drops it
    f, c = [0.2, 0.9], [0.05, 1.0]
    assert cmfg(f, c) == pytest.approx((0.2 + 0.9 + 8 * 0.5) / 10)
    assert cmfg(f, c, binning="reference") == pytest.approx((0.2 + 9 * 0.5) / 10)
    # c exactly 0.3: floor(0.3 * 10) = 3, but the float edge linspace(0, 1, 11)[3] is
    # 0.30000000000000004 > 0.3, so digitize puts it in bin 2; with a 0.25 trace in bin 2
    # the two binnings average differently
    f, c = [0.0, 1.0], [0.25, 0.3]
    assert cmfg(f, c) == pytest.approx((0.0 + 1.0 + 8 * 0.5) / 10)
    assert cmfg(f, c, binning="reference") == pytest.approx((0.5 + 9 * 0.5) / 10)
    # an edge that is exact in floating point (0.5) lands in the same bin either way
    assert cmfg([0.1], [0.5], binning="reference") == pytest.approx(cmfg([0.1], [0.5]))
    with pytest.raises(ValueError, match="binning"):
        cmfg([0.1], [0.5], binning="open")
