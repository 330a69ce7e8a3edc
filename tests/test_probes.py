"""Tests for probes: the streaming trainer's fitting, selection and cross-fitting, Orbax
checkpoints, the probe stage."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from fcjax.store import HiddenStore, read_table, write_table_atomic
from fcjax.store.tables import TableError
from probes import (
    Probe,
    ProbeError,
    ProbeParams,
    Standardizer,
    TooFewLabels,
    group_folds,
    load_probe,
    save_probe,
)
from probes.common import inner_split
from probes.sources import ArraySource
from probes.stats import layer_table
from probes.streamfit import crossfit_source, fit_select
from probes.train import run_probe_stage
from probes.trainer import TrainConfig, fit, predict_logits

N_GROUPS, PER_GROUP, LAYERS, D, SIGNAL_LAYER = 100, 4, 4, 32, 2
CONFIG = TrainConfig(epochs=100)


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


def _weights(n, rows):
    """float32 0/1 row weights [n] with ones at ``rows``."""
    w = np.zeros(n, np.float32)
    w[rows] = 1.0
    return w


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def _pairwise_auroc(conf, correct):
    """Independent AUROC: fraction of (positive, negative) pairs ordered right, ties 1/2."""
    conf, correct = np.asarray(conf), np.asarray(correct, bool)
    pos, neg = conf[correct][:, None], conf[~correct][None, :]
    return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


# -- the trainer ----------------------------------------------------------------------------


def test_standardisation_uses_training_rows_only_and_ignores_other_rows():
    x, y, _ = _planted()
    train = _weights(len(y), np.arange(300))
    config = TrainConfig(weight_decays=(1e-2,), epochs=50)
    a = fit(ArraySource(x), y, train, config=config)
    np.testing.assert_allclose(a.stats.mean, x[:300].mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a.stats.std, x[:300].std(0), rtol=1e-4)
    # rows of weight 0 share the training rows' blocks (64 rows): huge or NaN states and NaN
    # labels there change nothing
    x_bad, y_bad = x.copy(), y.copy()
    x_bad[300:] = 1e6
    x_bad[310] = np.nan
    y_bad[300:] = np.nan
    b = fit(ArraySource(x_bad), y_bad, train, config=config)
    for k in a.params:
        np.testing.assert_allclose(b.params[k], a.params[k], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(b.stats.mean, a.stats.mean, rtol=1e-6, atol=1e-7)
    x_bad[5, 1, 3] = np.nan  # in a training row: an error naming the row, not a NaN probe
    with pytest.raises(ProbeError, match="train row 5 must be finite"):
        fit(ArraySource(x_bad), y_bad, train, config=config)
    val = _weights(len(y), np.arange(300, 400))
    with pytest.raises(ProbeError, match="val row 310 must be finite"):
        fit(ArraySource(x_bad), y, _weights(len(y), np.arange(6, 300)), val, config=config)


def test_converges_to_weighted_logistic_optimum():
    """Without decay, the gradient of the balanced loss (computed in numpy) vanishes."""
    rng = np.random.default_rng(4)
    n, d = 200, 3
    x = rng.normal(size=(n, 1, d)).astype(np.float32)
    y = (rng.random(n) < 1 / (1 + np.exp(-(x[:, 0, 0] - 1.0)))).astype(np.float32)
    config = TrainConfig(weight_decays=(0.0,), lr=0.05, epochs=3000)
    result = fit(ArraySource(x), y, np.ones(n, np.float32), config=config)
    w, b = result.params["w"][0, 0], result.params["b"][0, 0]
    z = (x[:, 0] - result.stats.mean[0]) / result.stats.std[0]
    p = _sigmoid(z @ w + b)
    a_pos, a_neg = n / (2 * y.sum()), n / (2 * (1 - y).sum())
    resid = a_pos * y * (p - 1) + a_neg * (1 - y) * p  # d loss / d logit per row.
    grad = np.concatenate([z.T @ resid, [resid.sum()]]) / n
    assert np.abs(grad).max() < 1e-3
    assert w[0] > 0.5  # The informative feature got the weight.


def test_layers_and_candidates_train_independently_and_logits_formula():
    x, y, _ = _planted()
    train, val = _weights(len(y), np.arange(320)), _weights(len(y), np.arange(320, 400))
    every = fit(ArraySource(x), y, train, val, config=CONFIG)  # 3 decays x 4 layers at once
    assert every.params["w"].shape == (3, LAYERS, D)
    np.testing.assert_array_equal(every.weight_decay[:, 0], np.float32(CONFIG.weight_decays))
    one_config = TrainConfig(weight_decays=(CONFIG.weight_decays[2],), epochs=CONFIG.epochs)
    one = fit(ArraySource(x[:, 1:2]), y, train, val, config=one_config)
    np.testing.assert_allclose(one.params["w"][0, 0], every.params["w"][2, 1], rtol=1e-4, atol=1e-6)
    assert one.best_epoch[0, 0] == every.best_epoch[2, 1]
    s = predict_logits(every.params, every.stats, ArraySource(x[:5]), CONFIG)  # [5, G, L]
    z = (x[:5, 3] - every.stats.mean[3]) / every.stats.std[3]
    manual = z @ every.params["w"][1, 3] + every.params["b"][1, 3]
    np.testing.assert_allclose(s[:, 1, 3], manual, rtol=1e-5, atol=1e-5)


def test_bad_inputs_raise():
    x, y, _ = _planted()
    n = len(y)
    source, ones = ArraySource(x), np.ones(n, np.float32)
    with pytest.raises(ProbeError, match="overlap"):
        fit(source, y, _weights(n, np.arange(10)), _weights(n, np.arange(5, 20)), config=CONFIG)
    with pytest.raises(ProbeError, match=r"\[0, 1\]"):
        fit(source, y * 2, ones, config=CONFIG)
    with pytest.raises(ProbeError, match=f"shape \\({n},\\)"):
        fit(source, y[:-1], ones, config=CONFIG)
    with pytest.raises(TooFewLabels, match="no training rows"):
        fit(source, y, np.zeros(n, np.float32), config=CONFIG)
    with pytest.raises(ProbeError, match="layers, d"):
        ArraySource(x[:, 0])
    with pytest.raises(ProbeError, match="family must be one of"):
        TrainConfig(family="tree")
    with pytest.raises(ProbeError, match="weight_decays"):
        TrainConfig(weight_decays=())


def test_one_label_training_rows_train_the_bias_alone():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((12, 2, 8)).astype(np.float32)
    y = np.zeros(12)
    y[:3] = 1.0
    config = TrainConfig(epochs=400)
    only_zero = fit(ArraySource(x), y, _weights(12, np.arange(3, 12)), config=config)
    assert np.all(only_zero.params["w"] == 0.0) and np.all(only_zero.params["b"] < 0)
    both = fit(ArraySource(x), y, np.ones(12, np.float32), config=config)  # the weights learn
    assert np.any(both.params["w"] != 0.0)


# -- selection and cross-fitting ------------------------------------------------------------


def test_weight_decay_and_epochs_chosen_per_layer_on_inner_validation():
    """fit_select keeps per layer the decay with the lowest inner-validation loss and its
    epoch (brute force: one fit per decay on the same inner split), then refits on all rows."""
    x, y, groups = _planted()
    rows = np.arange(len(y))
    decays = (1e-4, 3.0)
    sel = fit_select(
        ArraySource(x), y, groups, rows, config=TrainConfig(weight_decays=decays, epochs=60), seed=3
    )
    keys = np.asarray([str(g) for g in groups])
    train, val = inner_split(keys, rows, 0.2, np.random.default_rng(3))
    assert not set(keys[train]) & set(keys[val])
    singles = [
        fit(
            ArraySource(x),
            y,
            _weights(len(y), train),
            _weights(len(y), val),
            config=TrainConfig(weight_decays=(wd,), epochs=60),
        )
        for wd in decays
    ]
    best = np.argmin([s.val_loss[0] for s in singles], axis=0)  # [L]
    assert set(best.tolist()) == {0, 1}  # the signal layer wants little decay, noise much
    np.testing.assert_array_equal(sel.weight_decay, np.float32(decays)[best])
    np.testing.assert_array_equal(
        sel.epochs, [singles[g].best_epoch[0, j] for j, g in enumerate(best)]
    )
    np.testing.assert_allclose(sel.stats.mean, x.mean(0), rtol=1e-5, atol=1e-5)  # refit: all rows
    assert sel.layer == SIGNAL_LAYER


def test_planted_signal_found_and_layer_chosen():
    x, y, groups = _planted()
    result = crossfit_source(ArraySource(x), y, groups, folds=5, seed=0, config=CONFIG)
    table = layer_table(result.proba_layers, y, groups, reps=0)
    assert table["auroc"][SIGNAL_LAYER] > 0.95
    assert np.all(result.chosen_layer == SIGNAL_LAYER)
    assert _pairwise_auroc(result.proba, y) > 0.95
    assert np.argmin(table["log_loss"]) == SIGNAL_LAYER
    assert np.all(np.isfinite(result.proba))
    np.testing.assert_array_equal(result.proba, result.proba_layers[:, SIGNAL_LAYER])
    for j in range(LAYERS):  # The per-layer table against independent computations.
        p = result.proba_layers[:, j]
        assert table["auroc"][j] == pytest.approx(_pairwise_auroc(p, y), abs=1e-12)
        bins = np.minimum((p * 10).astype(int), 9)
        gaps = [
            abs(p[bins == k].mean() - y[bins == k].mean()) * (bins == k).mean()
            for k in range(10)
            if (bins == k).any()
        ]
        assert table["ece"][j] == pytest.approx(sum(gaps), abs=1e-12)
        q = np.clip(p, 1e-7, 1 - 1e-7)
        expect = -np.mean(
            [math.log(v) if t else math.log(1 - v) for v, t in zip(q, y, strict=True)]
        )
        assert table["log_loss"][j] == pytest.approx(expect, rel=1e-12)


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
    result = crossfit_source(ArraySource(x), y_null, groups, folds=5, seed=1, config=CONFIG)
    table = layer_table(result.proba_layers, y_null, groups, reps=0)
    assert abs(_pairwise_auroc(result.proba, y_null) - 0.5) < bound
    assert np.all(np.abs(table["auroc"] - 0.5) < bound)


def test_no_leakage_between_training_and_scored_groups():
    x, y, groups = _planted()
    y = y.copy()
    y[::7] = np.nan  # Unlabeled rows are scored but never trained on.
    result = crossfit_source(ArraySource(x), y, groups, folds=5, seed=0, config=CONFIG)
    assert np.all(np.isfinite(result.proba))  # Every row scored, unlabeled ones too.
    # Each group sits in exactly one fold; folds have equal size here (20 groups of 4).
    for g in np.unique(groups):
        assert len(set(result.fold[groups == g])) == 1
    np.testing.assert_array_equal(np.bincount(result.fold), [80] * 5)
    # Flipping fold 0's labels cannot change what fold 0's probe scored (it never trained
    # on them), but does change the other folds' probabilities.
    in0 = result.fold == 0
    y2 = y.copy()
    y2[in0] = 1 - y2[in0]
    again = crossfit_source(ArraySource(x), y2, groups, folds=5, seed=0, config=CONFIG)
    np.testing.assert_array_equal(again.fold, result.fold)
    np.testing.assert_array_equal(again.proba_layers[in0], result.proba_layers[in0])
    assert not np.allclose(again.proba_layers[~in0], result.proba_layers[~in0])
    # A fold's fit reads the states of its training rows only (statistics, training, inner
    # validation): other rows' states, scaled or NaN, leave it unchanged.
    rows = np.flatnonzero(~in0 & np.isfinite(y))
    sel = fit_select(ArraySource(x), y, groups, rows, config=CONFIG, seed=1)
    x2 = x.copy()
    x2[in0] *= 1000
    x2[~in0 & np.isnan(y)] = np.nan
    sel2 = fit_select(ArraySource(x2), y, groups, rows, config=CONFIG, seed=1)
    for k in sel.params:
        np.testing.assert_allclose(sel2.params[k], sel.params[k], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sel2.stats.mean, sel.stats.mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sel2.calibration, sel.calibration, rtol=1e-6, atol=1e-7)
    assert sel2.layer == sel.layer


def test_group_folds_deterministic_by_seed():
    groups = np.repeat(np.arange(30), np.arange(30) % 4 + 1)
    a, b, c = group_folds(groups, 5, 0), group_folds(groups, 5, 0), group_folds(groups, 5, 1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    for g in np.unique(groups):  # whole groups per fold
        assert len(set(a[groups == g])) == 1
    sizes = np.bincount(a, minlength=5)
    assert sizes.max() - sizes.min() <= 4  # Greedy balance: within one largest group.
    with pytest.raises(TooFewLabels, match="at least 5 groups"):
        group_folds(np.arange(3), 5)


def test_inner_split_keeps_groups_whole_and_too_few_groups_raise():
    groups = np.repeat([f"q{i}" for i in range(10)], 3)
    rows = np.arange(30)
    train, val = inner_split(groups, rows, 0.2, np.random.default_rng(0))
    assert not set(groups[train]) & set(groups[val]) and len(set(groups[val])) == 2
    np.testing.assert_array_equal(np.sort(np.concatenate([train, val])), rows)
    _, val_one = inner_split(groups, rows, 0.001, np.random.default_rng(0))
    assert len(set(groups[val_one])) == 1  # at least one group held out
    with pytest.raises(TooFewLabels, match="at least 2 groups"):
        inner_split(groups, np.arange(3), 0.2, np.random.default_rng(0))
    x = np.random.default_rng(0).normal(size=(30, 2, 4)).astype(np.float32)
    y = np.arange(30) % 2.0
    with pytest.raises(TooFewLabels, match="at least 2 groups"):
        fit_select(ArraySource(x), y, groups, np.arange(3), config=CONFIG)


# -- checkpoints -------------------------------------------------------------------------


def test_orbax_round_trip_identical_probabilities(tmp_path):
    x, y, _ = _planted()
    n = len(y)
    config = TrainConfig(weight_decays=(1e-2,), epochs=60)
    f = fit(
        ArraySource(x),
        y,
        _weights(n, np.arange(300)),
        _weights(n, np.arange(300, 400)),
        config=config,
    )
    params = ProbeParams(f.params["w"][0], f.params["b"][0])
    probe = Probe(params, f.stats, 2, (3, 6, 9, 12), fold=1, label="agreement", model="m")
    # the deployable probe computes the trainer's forward pass
    s = predict_logits(f.params, f.stats, ArraySource(x), config)[:, 0, 2]
    np.testing.assert_allclose(probe.predict_proba(x), _sigmoid(s), rtol=1e-5, atol=1e-6)
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
    save_probe(tmp_path / "ck", Probe(params, f.stats, 0, (3, 6, 9, 12)))  # Overwrite.
    assert load_probe(tmp_path / "ck").layer == 0
    with pytest.raises(ProbeError, match=r"probe\.json"):
        load_probe(tmp_path / "missing")


def test_mlp_probe_round_trip_with_calibration(tmp_path):
    """An MLP probe with Platt calibration: the checkpoint's numpy forward pass equals the
    trainer's jitted one, and loading gives identical probabilities."""
    x, y, _ = _planted()
    config = TrainConfig.for_family("mlp", epochs=5)
    f = fit(ArraySource(x), y, np.ones(len(y), np.float32), config=config, weight_decay=[1e-2] * 4)
    cal = np.array([[0.5, 0.1], [1.0, 0.0], [2.0, -0.3], [0.7, 0.2]])
    params = {k: v[0] for k, v in f.params.items()}
    probe = Probe(params, f.stats, 1, (0, 1, 2, 3), family="mlp", calibration=cal)
    s = predict_logits(f.params, f.stats, ArraySource(x), config)[:, 0].astype(np.float64)
    want = _sigmoid(s * cal[:, 0] + cal[:, 1])
    np.testing.assert_allclose(probe.predict_proba_layers(x), want, rtol=1e-4, atol=1e-5)
    save_probe(tmp_path / "mlp", probe)
    back = load_probe(tmp_path / "mlp")
    assert back.family == "mlp"
    np.testing.assert_allclose(
        back.predict_proba_layers(x), probe.predict_proba_layers(x), rtol=1e-6
    )


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


def test_probe_stage_uses_the_runs_bootstrap_setting(tmp_path):
    """The stage's layer table takes its resamples from --bootstrap: 0 records the intervals
    as absent with the reason; with 40 questions and 200 resamples they are given."""
    from experiments.config import Settings
    from experiments.rundir import RunDir
    from experiments.stages import Pipeline
    from probes.stats import bootstrap_auroc

    _make_run(tmp_path, np.random.default_rng(8))
    run = RunDir(tmp_path)
    Pipeline(run, Settings(estimators=("probe",), folds=3, bootstrap=0)).run_stage("probes")
    assert run.info("probes")["bootstrap"] == 0
    table = read_table(tmp_path / "probes" / "layers.parquet")
    assert np.isnan(table["auroc_lo"]).all() and np.isnan(table["null_hi"]).all()
    assert set(table["auroc_ci_absent"]) == {"bootstrap off (0 resamples)"}
    assert set(table["null_band_absent"]) == {"bootstrap off (0 resamples)"}
    run.invalidate_from("probes")
    Pipeline(run, Settings(estimators=("probe",), folds=3, bootstrap=200)).run_stage("probes")
    assert run.info("probes")["bootstrap"] == 200
    table = read_table(tmp_path / "probes" / "layers.parquet")
    assert np.isfinite(table["auroc_lo"]).all() and set(table["auroc_ci_absent"]) == {""}
    # every fold chose layer 7, so conf_probe is layer 7's cross-fitted column: its AUROC on
    # 200 question resamples (same seed) gives layer 7's interval
    assert run.info("probes")["chosen_layers"] == [7, 7, 7]
    steps = read_table(tmp_path / "steps.parquet")
    conf = np.asarray(steps["conf_probe"], float)
    keep = np.isfinite(conf)
    eids = np.asarray(steps["example_id"])[keep]
    examples = read_table(tmp_path / "examples.parquet")
    correct = dict(zip(examples["example_id"], examples["correct"], strict=True))
    positive = np.array([bool(correct[e]) for e in eids])
    boot = bootstrap_auroc(conf[keep, None], positive, eids, reps=200, seed=0)[:, 0]
    lo, hi = np.percentile(boot[np.isfinite(boot)], [2.5, 97.5])
    assert (table["auroc_lo"][1], table["auroc_hi"][1]) == pytest.approx((lo, hi), abs=1e-12)


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
