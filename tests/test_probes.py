"""Tests for probes: Optax probe fitting, cross-fitting, Orbax checkpoints, the probe stage."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fcjax.store import HiddenStore, read_table, write_table_atomic
from fcjax.store.tables import TableError
from probes import (
    Probe,
    ProbeConfig,
    ProbeError,
    ProbeParams,
    Standardizer,
    TooFewLabels,
    crossfit,
    group_folds,
    load_probe,
    predict_proba,
    save_probe,
    train_probes,
)
from probes.crossfit import fit_with_selection
from probes.train import run_probe_stage

N_GROUPS, PER_GROUP, LAYERS, D, SIGNAL_LAYER = 100, 4, 4, 32, 2


def _planted(seed=0, strength=2.0):
    """400 rows in 100 groups; layer 2 carries a linear direction for the group label."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(N_GROUPS), PER_GROUP)
    y_group = rng.permutation(np.repeat([0.0, 1.0], N_GROUPS // 2))
    y = y_group[groups]
    x = rng.normal(size=(len(y), LAYERS, D)).astype(np.float32)
    direction = rng.normal(size=D)
    direction /= np.linalg.norm(direction)
    x[:, SIGNAL_LAYER] += strength * np.outer(2 * y - 1, direction).astype(np.float32)
    return x, y, groups


def _pairwise_auroc(conf, correct):
    """Independent AUROC: fraction of (positive, negative) pairs ordered right, ties 1/2."""
    conf, correct = np.asarray(conf), np.asarray(correct, bool)
    pos, neg = conf[correct][:, None], conf[~correct][None, :]
    return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


# -- model -------------------------------------------------------------------------------


def test_standardisation_uses_training_rows_only_and_ignores_other_rows():
    x, y, _ = _planted()
    train = np.arange(300)
    fit = train_probes(x, y, train, config=ProbeConfig(steps=50))
    np.testing.assert_allclose(fit.stats.mean, x[:300].mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(fit.stats.std, x[:300].std(0), rtol=1e-4)
    x_bad = x.copy()
    x_bad[300:] = 1e6
    x_bad[310] = np.nan
    y_bad = y.copy()
    y_bad[300:] = np.nan
    fit_bad = train_probes(x_bad, y_bad, train, config=ProbeConfig(steps=50))
    np.testing.assert_allclose(fit_bad.params.w, fit.params.w, rtol=1e-5, atol=1e-6)


def test_converges_to_weighted_logistic_optimum():
    """Without decay, the gradient of the balanced loss (computed in numpy) vanishes."""
    rng = np.random.default_rng(4)
    n, d = 200, 3
    x = rng.normal(size=(n, 1, d)).astype(np.float32)
    y = (rng.random(n) < 1 / (1 + np.exp(-(x[:, 0, 0] - 1.0)))).astype(np.float32)
    fit = train_probes(x, y, config=ProbeConfig(weight_decay=0.0, lr=0.05, steps=3000))
    z = (x[:, 0] - fit.stats.mean[0]) / fit.stats.std[0]
    p = 1 / (1 + np.exp(-(z @ fit.params.w[0] + fit.params.b[0])))
    a_pos, a_neg = n / (2 * y.sum()), n / (2 * (1 - y).sum())
    resid = a_pos * y * (p - 1) + a_neg * (1 - y) * p  # d loss / d logit per row.
    grad = np.concatenate([z.T @ resid, [resid.sum()]]) / n
    assert np.abs(grad).max() < 1e-3
    assert fit.params.w[0, 0] > 0.5  # The informative feature got the weight.


def test_layers_train_independently_and_predict_proba_formula():
    x, y, _ = _planted()
    config = ProbeConfig(steps=100)
    train, val = np.arange(320), np.arange(320, 400)
    fit_all = train_probes(x, y, train, val, config=config)
    fit_one = train_probes(x[:, 1:2], y, train, val, config=config)
    np.testing.assert_allclose(fit_one.params.w[0], fit_all.params.w[1], rtol=1e-4, atol=1e-6)
    assert fit_one.best_step[0] == fit_all.best_step[1]
    z = (x[:5, 3] - fit_all.stats.mean[3]) / fit_all.stats.std[3]
    manual = 1 / (1 + np.exp(-(z @ fit_all.params.w[3] + fit_all.params.b[3])))
    np.testing.assert_allclose(predict_proba(fit_all.params, fit_all.stats, x[:5], 3), manual)
    np.testing.assert_allclose(predict_proba(fit_all.params, fit_all.stats, x[:5])[:, 3], manual)


def test_bad_inputs_raise():
    x, y, _ = _planted()
    with pytest.raises(ProbeError, match="overlap"):
        train_probes(x, y, np.arange(10), np.arange(5, 20))
    with pytest.raises(ProbeError, match=r"\[0, 1\]"):
        train_probes(x, y * 2)
    with pytest.raises(ProbeError, match="layers, d"):
        train_probes(x[:, 0], y)


# -- cross-fitting -----------------------------------------------------------------------


def test_planted_signal_found_and_layer_chosen():
    x, y, groups = _planted()
    result = crossfit(x, y, groups, folds=5, seed=0)
    assert result.layer_table["auroc"][SIGNAL_LAYER] > 0.95
    assert np.all(result.chosen_layer == SIGNAL_LAYER)
    assert _pairwise_auroc(result.proba, y) > 0.95
    assert np.argmin(result.layer_table["ece"]) == SIGNAL_LAYER
    assert np.all(np.isfinite(result.proba))
    for j in range(LAYERS):  # The per-layer table against independent computations.
        p = result.proba_layers[:, j]
        expect = _pairwise_auroc(p, y)
        assert result.layer_table["auroc"][j] == pytest.approx(expect, abs=1e-12)
        bins = np.minimum((p * 10).astype(int), 9)
        gaps = [
            abs(p[bins == k].mean() - y[bins == k].mean()) * (bins == k).mean()
            for k in range(10)
            if (bins == k).any()
        ]
        assert result.layer_table["ece"][j] == pytest.approx(sum(gaps), abs=1e-12)


def test_shuffled_labels_give_chance_auroc():
    """Null bound: labels are constant within a group, so the independent units are the
    100 groups (50 positive); Mann-Whitney's null variance with n1 = n0 = 50 is
    (n1 + n0 + 1) / (12 n1 n0) (sd ~ 0.058). We allow 4 sd."""
    x, y, groups = _planted()
    rng = np.random.default_rng(11)
    y_group = rng.permutation(y.reshape(N_GROUPS, PER_GROUP)[:, 0])
    y_null = y_group[groups]
    n1 = n0 = N_GROUPS // 2
    bound = 4 * math.sqrt((n1 + n0 + 1) / (12 * n1 * n0))
    result = crossfit(x, y_null, groups, folds=5, seed=1)
    assert abs(_pairwise_auroc(result.proba, y_null) - 0.5) < bound
    assert np.all(np.abs(result.layer_table["auroc"] - 0.5) < bound)


def test_no_leakage_between_training_and_scored_groups():
    x, y, groups = _planted()
    y = y.copy()
    y[::7] = np.nan  # Unlabeled rows are scored but never trained on.
    result = crossfit(x, y, groups, folds=5, seed=0)
    assert np.all(np.isfinite(result.proba))  # Every row scored, unlabeled ones too.
    for k, rows in enumerate(result.train_rows):
        scored = set(groups[result.fold == k])
        assert scored and not scored & set(groups[rows])
        assert np.all(np.isfinite(y[rows]))
    # Each group sits in exactly one fold; folds have equal size here (20 groups of 4).
    for g in np.unique(groups):
        assert len(set(result.fold[groups == g])) == 1
    np.testing.assert_array_equal(np.bincount(result.fold), [80] * 5)
    # Behavioural check: flipping fold 0's labels cannot change what fold 0's probe scored
    # (it never trained on them), but does change the other folds' probabilities.
    in0 = result.fold == 0
    y2 = y.copy()
    y2[in0] = 1 - y2[in0]
    again = crossfit(x, y2, groups, folds=5, seed=0)
    np.testing.assert_array_equal(again.fold, result.fold)
    np.testing.assert_array_equal(again.proba_layers[in0], result.proba_layers[in0])
    assert not np.allclose(again.proba_layers[~in0], result.proba_layers[~in0])


def test_group_folds_deterministic_by_seed():
    groups = np.repeat(np.arange(30), np.arange(30) % 4 + 1)
    a, b, c = group_folds(groups, 5, 0), group_folds(groups, 5, 0), group_folds(groups, 5, 1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    sizes = np.bincount(a, minlength=5)
    assert sizes.max() - sizes.min() <= 4  # Greedy balance: within one largest group.
    with pytest.raises(TooFewLabels, match="at least 5 groups"):
        group_folds(np.arange(3), 5)


# -- checkpoints -------------------------------------------------------------------------


def test_orbax_round_trip_identical_probabilities(tmp_path):
    x, y, _ = _planted()
    fit = train_probes(x, y, np.arange(300), np.arange(300, 400), config=ProbeConfig(steps=60))
    probe = Probe(fit.params, fit.stats, 2, (3, 6, 9, 12), fold=1, label="agreement", model="m")
    save_probe(tmp_path / "ck", probe)
    back = load_probe(tmp_path / "ck")
    assert (back.layer, back.layers, back.fold, back.label, back.model) == (
        2,
        (3, 6, 9, 12),
        1,
        "agreement",
        "m",
    )
    assert back.layer_id == 9
    np.testing.assert_array_equal(back.predict_proba(x), probe.predict_proba(x))
    np.testing.assert_array_equal(back.predict_proba(x[:, 2]), probe.predict_proba(x))
    save_probe(tmp_path / "ck", Probe(fit.params, fit.stats, 0, (3, 6, 9, 12)))  # Overwrite.
    assert load_probe(tmp_path / "ck").layer == 0
    with pytest.raises(ProbeError, match=r"probe\.json"):
        load_probe(tmp_path / "missing")


# -- the probe stage end to end ----------------------------------------------------------


def _make_run(root, rng):
    """40 examples x 3-5 steps; layer 7 encodes correctness; one step lacks hidden states."""
    layers, width = [4, 7], 16
    direction = rng.normal(size=width)
    direction /= np.linalg.norm(direction)
    store = HiddenStore(root / "hidden", layers, width, "float32")
    ex_ids, correct, step_rows = [], [], []
    for e in range(40):
        eid = f"q{e}"
        ok = bool(e % 2)
        n_steps = 3 + e % 3
        states = rng.normal(size=(n_steps, 2, width)).astype(np.float32)
        states[:, 1] += 2.5 * (1 if ok else -1) * direction.astype(np.float32)
        stored = list(range(n_steps)) if e != 5 else list(range(n_steps - 1))
        store.write(eid, stored, states[: len(stored)])
        ex_ids.append(eid)
        correct.append(ok)
        step_rows += [(eid, s, float(rng.random())) for s in range(n_steps)]
    store.finalize()
    write_table_atomic(
        root / "examples.parquet",
        {"example_id": ex_ids, "correct": correct, "prompt_ids": [[1, 2]] * len(ex_ids)},
    )
    eids, steps, dec = zip(*step_rows, strict=True)
    write_table_atomic(
        root / "steps.parquet",
        {
            "example_id": list(eids),
            "step": np.array(steps, np.int64),
            "decisiveness": np.array(dec),
            "text": [f"s{s}" for s in steps],
        },
    )


def test_run_probe_stage_end_to_end(tmp_path):
    _make_run(tmp_path, np.random.default_rng(5))
    summary = run_probe_stage(tmp_path, folds=3, seed=0)
    steps = read_table(tmp_path / "steps.parquet")
    examples = read_table(tmp_path / "examples.parquet")
    conf = steps["conf_probe"]
    missing = [i for i, e in enumerate(steps["example_id"]) if e == "q5"]
    assert np.isnan(conf[missing[-1]])  # The step without hidden states has no value.
    assert np.isfinite(np.delete(conf, missing[-1])).all()
    assert "faith_probe" not in steps  # faithfulness is the metrics stage's, for every E
    assert "conf_probe" not in examples and "faith_probe" not in examples
    assert steps["text"][:2] == ["s0", "s1"]  # Other columns kept.
    assert examples["prompt_ids"][0] == [1, 2]
    # The trace confidence of the probe (its last scored step) ranks correct traces first.
    last = {}
    for i, (e, s) in enumerate(zip(steps["example_id"], steps["step"], strict=True)):
        if np.isfinite(conf[i]) and s >= last.get(e, (-1, 0))[0]:
            last[e] = (s, conf[i])
    trace_conf = np.array([last[e][1] for e in examples["example_id"]])
    assert _pairwise_auroc(trace_conf, np.asarray(examples["correct"], float)) > 0.9
    table = read_table(tmp_path / "probes" / "layers.parquet")
    np.testing.assert_array_equal(table["layer"], [4, 7])
    assert table["auroc"][1] > 0.9 > table["auroc"][0]
    assert summary["final_layer"] == 7 and summary["chosen_layers"] == [7, 7, 7]
    png = (tmp_path / "plots" / "probe_layers.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    probe = load_probe(tmp_path / "probes" / "ckpt")
    assert probe.layers == (4, 7) and probe.layer_id == 7 and probe.label == "correct"


def test_run_probe_stage_names_missing_inputs(tmp_path):
    _make_run(tmp_path, np.random.default_rng(6))
    with pytest.raises(TableError, match=r"steps\.parquet.*conf_agreement"):
        run_probe_stage(tmp_path, folds=3, label="agreement")
    write_table_atomic(tmp_path / "examples.parquet", {"example_id": ["q0"]})
    with pytest.raises(TableError, match=r"examples\.parquet.*correct"):
        run_probe_stage(tmp_path, folds=3)
    (tmp_path / "hidden" / "COMPLETE").unlink()
    with pytest.raises(ValueError, match="COMPLETE"):
        run_probe_stage(tmp_path, folds=3)


def test_probe_stage_records_too_few_labels_and_fails_on_anything_else(tmp_path):
    """Too few question groups for the folds is a result (NaN conf_probe, the reason in
    summary.json); any other error (here a store without COMPLETE) fails the stage."""
    from experiments.config import Settings
    from experiments.rundir import RunDir
    from experiments.stages import Pipeline
    from fcjax.store.hidden import HiddenStoreError
    from fcjax.store.tables import update_columns

    _make_run(tmp_path, np.random.default_rng(7))
    steps = read_table(tmp_path / "steps.parquet")
    update_columns(tmp_path / "steps.parquet", {"position": np.zeros(len(steps["step"]))})
    n = len(read_table(tmp_path / "examples.parquet")["example_id"])
    update_columns(
        tmp_path / "examples.parquet",
        {"n_steps": np.full(n, 3), "prediction": ["1"] * n, "finish_reason": ["eos"] * n},
    )
    run = RunDir(tmp_path)
    Pipeline(run, Settings(estimators=("probe",), folds=41)).run_stage("probes")
    assert "at least 41 groups for 41 folds, got 40" in run.info("probes")["not_scored"]
    assert np.isnan(read_table(tmp_path / "steps.parquet")["conf_probe"]).all()
    Pipeline(run, Settings(estimators=("probe",), folds=41)).run_stage("metrics")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "at least 41 groups" in summary["counts"]["not_scored"]["probe"]
    assert summary["estimators"]["probe"]["n_traces"] == 0

    run.invalidate_from("probes")
    (tmp_path / "hidden" / "COMPLETE").unlink()
    with pytest.raises(HiddenStoreError, match="COMPLETE"):
        Pipeline(run, Settings(estimators=("probe",), folds=2)).run_stage("probes")
    assert not run.done("probes")


def test_probe_estimator_scores_new_traces_from_a_checkpoint(tmp_path):
    """``import probes`` registers "probe"; it scores each step with the saved probe on the
    chosen layer's hidden state at the step's last token (checked against lm.hidden_states)."""
    import fcjax
    from fcjax.confidence import EstimatorContext, Trace, get_estimator
    from fcjax.text import Step

    lm = fcjax.load("random:tiny-llama")
    rng = np.random.default_rng(3)
    width, layers = lm.config.hidden_size, (0, 1, 2)
    probe = Probe(
        ProbeParams(rng.normal(size=(3, width)), rng.normal(size=3)),
        Standardizer(rng.normal(size=(3, width)), 1 + rng.random(size=(3, width))),
        layer=1,
        layers=layers,
    )
    save_probe(tmp_path / "ckpt", probe)
    prompt, output = [5, 9, 17, 4], [33, 8, 61, 90, 12, 7]
    steps = [Step(0, 0, 2, "ab", 0, 2), Step(1, 2, 6, "cdef", 2, 6)]
    trace = Trace(
        "q0", prompt, output, "abcdef", np.zeros(6), np.zeros((6, 1)), steps, None, None, "numeric"
    )
    [cols] = get_estimator("probe", checkpoint=str(tmp_path / "ckpt")).score(
        [trace], EstimatorContext(lm)
    )
    hidden = lm.hidden_states([prompt + output])[1, 0]  # layer id 1, [T, D]
    want = probe.predict_proba(hidden[[len(prompt) + 1, len(prompt) + 5]])
    np.testing.assert_allclose(cols["conf_probe"], want, rtol=1e-5, atol=1e-6)


def test_probe_outcome_stable_under_float_noise_in_hidden_states():
    """Hidden states that differ in the last bits (another CPU, another XLA build) must give
    the same probe. The README demo's probe row once moved from mean C 0.199 to 0.304 on a
    fresh clone: with 8 questions, 2 folds and one correct question, every fold trained on
    rows of one label, where the weight gradient is rounding error that AdamW turns into
    full-size steps. A demo-shaped problem with 1e-6 relative noise must keep every chosen
    layer and every probability."""
    rng = np.random.default_rng(0)
    sizes = [3, 2, 4, 3, 2, 3, 3, 3]
    groups = np.repeat([f"q{i}" for i in range(8)], sizes)
    y = (groups == "q6").astype(float)  # one correct question, like the demo
    base = rng.standard_normal((groups.size, 31, 64)).astype(np.float32) * 30
    outs, finals = [], []
    for seed in range(3):
        noise = np.random.default_rng(100 + seed).standard_normal(base.shape)
        x = (base * (1 + 1e-6 * noise)).astype(np.float32)
        outs.append(crossfit(x, y, groups, folds=2, seed=0))
        finals.append(fit_with_selection(x, y, groups, np.arange(y.size), seed=0))
    for other, final in zip(outs[1:], finals[1:], strict=True):
        assert other.chosen_layer.tolist() == outs[0].chosen_layer.tolist()
        np.testing.assert_allclose(other.proba, outs[0].proba, atol=1e-4)
        assert final.layer == finals[0].layer


def test_one_label_training_rows_train_the_bias_alone():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((12, 2, 8)).astype(np.float32)
    y = np.zeros(12)
    y[:3] = 1.0
    fit = train_probes(x, y, np.arange(3, 12))  # only label-0 rows
    assert np.all(fit.params.w == 0.0) and np.all(fit.params.b < 0)
    both = train_probes(x, y)  # both labels: the weights learn
    assert np.any(both.params.w != 0.0)
