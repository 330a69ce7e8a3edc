"""Probe research at scale: streaming training, families, targets, calibration, statistics,
transfer across runs and checkpoint compatibility (synthetic arrays, tiny sizes)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from child_env import child_env
from scipy.optimize import minimize
from scipy.stats import spearmanr

from fcjax.metrics.calibration import auroc, ece
from fcjax.store import HiddenStore, read_table, write_table_atomic
from fcjax.store.hidden import HiddenReader
from probes import ProbeError, load_probe
from probes.sources import ArraySource, ConcatSource, StoreSource
from probes.stats import bootstrap_auroc, null_auroc, permuted_labels, weighted_auroc
from probes.streamfit import calibrate, crossfit_source, fit_select, platt
from probes.train import run_probe_stage, transfer
from probes.trainer import TrainConfig, fit, predict_logits

Q, PER, L, D = 40, 3, 2, 8


def _pairwise_auroc(conf, positive):
    conf, positive = np.asarray(conf), np.asarray(positive, bool)
    pos, neg = conf[positive][:, None], conf[~positive][None, :]
    return float(np.mean((pos > neg) + 0.5 * (pos == neg)))


def _planted(target: str, seed: int = 0, shuffle: bool = False):
    """Q questions x PER rows; layer 1 carries the target through a fixed direction."""
    rng = np.random.default_rng(seed)
    groups = np.repeat([f"q{i}" for i in range(Q)], PER)
    direction = rng.normal(size=D)
    direction /= np.linalg.norm(direction)
    x = rng.normal(size=(Q * PER, L, D)).astype(np.float32)
    if target == "correct":  # one label per question
        y = np.repeat(rng.permutation(np.repeat([0.0, 1.0], Q // 2)), PER)
        x[:, 1] += (2.0 * np.outer(2 * y - 1, direction)).astype(np.float32)
    else:  # a per-step value in [0, 1]: a logistic function of the direction
        t = rng.normal(size=Q * PER) * 2.0
        x[:, 1] += np.outer(t, direction).astype(np.float32)
        y = 1.0 / (1.0 + np.exp(-t))
        if target == "agreement":
            y = np.round(y * 4) / 4  # K = 4 continuations
    if shuffle:
        y = permuted_labels(y, groups, reps=1, seed=seed + 7)[0]
    return x, y, groups


# -- streaming equals in-memory -------------------------------------------------------------


def _store(root, x, groups, dtype="float32", chunk_rows=16):
    store = HiddenStore(root, list(range(x.shape[1])), x.shape[2], dtype, chunk_rows=chunk_rows)
    steps = {}
    for i, g in enumerate(groups):
        steps[g] = steps.get(g, -1) + 1
        store.write(g, [steps[g]], x[i : i + 1])
    store.finalize()
    return HiddenReader(root)


@pytest.mark.parametrize("family", ["linear", "mlp"])
def test_streaming_from_tensorstore_equals_in_memory(tmp_path, family):
    """Same minibatches, same folds, same seed: the store-streamed probes equal the
    in-memory ones within 1e-5, for the trainer's parameters and the cross-fitted scores."""
    x, y, groups = _planted("correct")
    reader = _store(tmp_path / "h", x, groups)
    stream = StoreSource(reader)
    memory = ArraySource(x)
    config = TrainConfig.for_family(family, epochs=6, batch_size=32, block=16)
    train = np.zeros(len(y), np.float32)
    train[:80] = 1
    val = 1 - train
    a = fit(memory, y, train, val, config=config)
    b = fit(stream, y, train, val, config=config)
    for k in a.params:
        np.testing.assert_allclose(a.params[k], b.params[k], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(a.best_epoch, b.best_epoch)
    ca = crossfit_source(memory, y, groups, folds=2, config=config)
    cb = crossfit_source(stream, y, groups, folds=2, config=config)
    np.testing.assert_allclose(ca.proba_layers, cb.proba_layers, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(ca.chosen_layer, cb.chosen_layer)
    # a block-wise minibatch plan actually ran: more than one step per epoch
    assert config.batch_size < 80


def test_sources_read_the_same_rows_in_any_grouping(tmp_path):
    x, _, groups = _planted("correct")
    reader = _store(tmp_path / "h", x, groups, chunk_rows=16)
    stream = StoreSource(reader, layers=[1])
    got = stream.finish(stream.start([(5, 21), (100, 120)]))
    np.testing.assert_array_equal(got, np.concatenate([x[5:21, 1:], x[100:120, 1:]]))
    both = ConcatSource([ArraySource(x[:50]), ArraySource(x[50:])])
    np.testing.assert_array_equal(both.finish(both.start([(40, 60)])), x[40:60])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_store_keeps_the_probe_auroc(tmp_path, dtype):
    x, y, groups = _planted("correct", seed=3)
    config = TrainConfig(epochs=30)
    full = crossfit_source(ArraySource(x), y, groups, folds=2, config=config)
    low = crossfit_source(
        StoreSource(_store(tmp_path / dtype, x, groups, dtype)), y, groups, folds=2, config=config
    )
    a = auroc(full.proba_layers[:, 1], y > 0.5)
    assert abs(auroc(low.proba_layers[:, 1], y > 0.5) - a) < 0.02


# -- families x targets: planted found, shuffled not ---------------------------------------


@pytest.mark.parametrize("family", ["linear", "mlp"])
@pytest.mark.parametrize("target", ["correct", "agreement", "c_samp"])
def test_planted_signal_found_and_shuffled_not(family, target):
    config = TrainConfig.for_family(family, epochs=60, balanced=target != "c_samp")
    for shuffle in (False, True):
        x, y, groups = _planted(target, seed=1, shuffle=shuffle)
        res = crossfit_source(ArraySource(x), y, groups, folds=2, config=config)
        p = res.proba_layers[:, 1]
        if target == "correct":
            score = auroc(p, y > 0.5)
            # shuffled: nothing above chance (cross-fitting on a fixed class balance can push
            # a no-signal AUROC below 0.5, so only the upper side is asserted)
            assert (score > 0.9) if not shuffle else score < 0.6
        else:
            rho = spearmanr(p, y).statistic
            assert (rho > 0.7) if not shuffle else rho < 0.3
        if not shuffle:
            assert list(res.chosen_layer) == [1, 1]


def test_soft_label_regression_recovers_a_planted_linear_c():
    """C = sigmoid(a . x + b): the unweighted cross-entropy probe recovers C on held-out
    questions (Spearman, MAE)."""
    rng = np.random.default_rng(4)
    n = 200
    x = rng.normal(size=(n, 1, D)).astype(np.float32)
    a = rng.normal(size=D)
    c = 1 / (1 + np.exp(-(x[:, 0] @ a + 0.3)))
    groups = np.arange(n).astype(str)
    res = crossfit_source(
        ArraySource(x), c, groups, folds=2, config=TrainConfig(epochs=300, balanced=False)
    )
    p = res.proba_layers[:, 0]
    assert spearmanr(p, c).statistic > 0.97
    assert np.mean(np.abs(p - c)) < 0.05


# -- calibration ------------------------------------------------------------------------------


def test_platt_matches_scipy_and_lowers_ece_on_planted_miscalibration():
    rng = np.random.default_rng(5)
    n = 4000
    true = rng.normal(size=n)
    y = (rng.random(n) < 1 / (1 + np.exp(-true))).astype(float)
    s = 3.0 * true + 2.0  # overconfident and shifted logits
    fit_rows, test_rows = np.arange(n // 2), np.arange(n // 2, n)
    cal = platt(s[fit_rows, None], y[fit_rows])
    # independent reference: scipy on the same objective (Platt's targets)
    yy = y[fit_rows]
    t = np.where(yy > 0.5, (yy.sum() + 1) / (yy.sum() + 2), 1 / ((1 - yy).sum() + 2))

    def nll(theta):
        z = theta[0] * s[fit_rows] + theta[1]
        return np.sum(np.logaddexp(0, z) - t * z)

    ref = minimize(nll, [1.0, 0.0], method="BFGS").x
    np.testing.assert_allclose(cal[0], ref, atol=1e-4)
    np.testing.assert_allclose(cal[0], [1 / 3, -2 / 3], atol=0.1)
    raw = 1 / (1 + np.exp(-s[test_rows]))
    calibrated = calibrate(s[test_rows, None], cal)[:, 0]
    assert ece(calibrated, y[test_rows]) < 0.03 < 0.1 < ece(raw, y[test_rows])


def test_crossfit_probe_is_calibrated_on_imbalanced_labels():
    """Class-balanced training shifts raw probabilities on 20% positives; the inner-split
    Platt step brings the cross-fitted ECE down against the uncalibrated logits."""
    rng = np.random.default_rng(6)
    n = 600
    groups = np.arange(n).astype(str)
    y = (rng.random(n) < 0.2).astype(float)
    x = rng.normal(size=(n, 1, D)).astype(np.float32)
    x[:, 0, 0] += 1.0 * y
    config = TrainConfig(epochs=100)
    res = crossfit_source(ArraySource(x), y, groups, folds=2, config=config)
    w = np.ones(n, np.float32)
    raw_fit = fit(ArraySource(x), y, w, config=config, weight_decay=np.array([1e-2]))
    raw = 1 / (1 + np.exp(-predict_logits(raw_fit.params, raw_fit.stats, ArraySource(x), config)))
    calibrated, uncalibrated = ece(res.proba_layers[:, 0], y), ece(raw[:, 0, 0], y)
    assert uncalibrated > 0.15 and calibrated < 0.5 * uncalibrated


# -- statistics ---------------------------------------------------------------------------


def test_weighted_and_bootstrap_auroc_match_brute_force():
    rng = np.random.default_rng(7)
    s = np.round(rng.normal(size=30), 1)  # ties
    pos = rng.random(30) < 0.4
    w = rng.integers(0, 3, size=(4, 30)).astype(float)
    for r in range(4):
        rows = np.repeat(np.arange(30), w[r].astype(int))
        assert weighted_auroc(s, pos, w[r : r + 1])[0] == pytest.approx(
            _pairwise_auroc(s[rows], pos[rows])
        )
    groups = np.repeat(np.arange(10), 3)
    boot = bootstrap_auroc(s[:, None], pos, groups, reps=50, seed=1)
    assert boot.shape == (50, 1) and np.isfinite(boot).mean() > 0.9
    assert np.nanstd(boot) > 0


def test_null_permutes_whole_questions_and_matches_brute_force():
    groups = np.repeat(["a", "b", "c", "d"], [2, 3, 1, 2])
    labels = np.array([0, 1, 1, 1, 0, 0, 1, 1], float)
    perm = permuted_labels(labels, groups, reps=20, seed=0)
    for row in perm:  # each question's labels are another question's, cycled
        pieces = [row[groups == g] for g in "abcd"]
        sources = [labels[groups == g] for g in "abcd"]
        for piece in pieces:
            assert any(
                np.array_equal(piece, src[np.arange(len(piece)) % len(src)]) for src in sources
            )
    scores = np.random.default_rng(1).normal(size=(8, 2))
    null = null_auroc(scores, labels, groups, reps=20, seed=0)
    for r in range(20):
        if 0 < perm[r].sum() < 8:
            assert null[r, 0] == pytest.approx(_pairwise_auroc(scores[:, 0], perm[r] > 0.5))


# -- runs: stage, transfer, checkpoints -------------------------------------------------------


def _make_run(root, seed, *, width=D, layers=(3, 5), model="m", n_q=30, csamp=True):
    """n_q questions x 3 steps; layer 5 encodes correctness (and C_samp tracks it)."""
    rng = np.random.default_rng(seed)
    direction = np.random.default_rng(99).normal(size=width)
    direction /= np.linalg.norm(direction)
    store = HiddenStore(root / "hidden", list(layers), width, "float32", chunk_rows=16)
    ex, ok, rows = [], [], []
    for q in range(n_q):
        good = q % 2 == 1
        states = rng.normal(size=(3, len(layers), width)).astype(np.float32)
        states[:, -1] += (2.0 if good else -2.0) * direction.astype(np.float32)
        store.write(f"q{q}", [0, 1, 2], states)
        ex.append(f"q{q}")
        ok.append(good)
        rows += [(f"q{q}", s, 0.8 if good else 0.2) for s in range(3)]
    store.finalize()
    write_table_atomic(root / "examples.parquet", {"example_id": ex, "correct": ok})
    cols = {"example_id": [r[0] for r in rows], "step": np.array([r[1] for r in rows])}
    if csamp:
        cols["conf_sampling"] = np.array([r[2] for r in rows])
    write_table_atomic(root / "steps.parquet", cols)
    (root / "config.json").write_text(json.dumps({"model": model}))
    return root


def test_probe_stage_writes_both_families_with_intervals_and_null_band(tmp_path):
    run = _make_run(tmp_path / "r", 1)
    out = run_probe_stage(run, folds=2, families=("linear", "mlp"), epochs=30, reps=100)
    table = read_table(run / "probes" / "layers.parquet")
    assert list(table["family"]) == ["linear", "linear", "mlp", "mlp"]
    for col in ("auroc_lo", "auroc_hi", "null_lo", "null_hi", "spearman", "mae"):
        assert np.isfinite(table[col]).all(), col
    assert set(table["auroc_ci_absent"]) == set(table["null_band_absent"]) == {""}
    assert out["bootstrap"] == 100
    signal = np.asarray(table["layer"]) == 5
    assert (np.asarray(table["auroc_lo"])[signal] > np.asarray(table["null_hi"])[signal]).all()
    assert (np.asarray(table["auroc_lo"]) <= np.asarray(table["auroc"])).all()
    assert out["by_family"]["mlp"]["final_layer"] == 5
    assert load_probe(run / "probes" / "ckpt_mlp").family == "mlp"
    assert np.isfinite(read_table(run / "steps.parquet")["conf_probe"]).all()
    from experiments.report_figures import probe_layer_panel

    panel = probe_layer_panel(run / "probes" / "layers.parquet").svg()
    assert "linear probe by layer" in panel and panel.count("layer 5: auroc") == 1
    assert "null band" in panel and "; 95% interval " in panel
    soft = run_probe_stage(run, folds=2, label="c_samp", epochs=30, reps=0)
    table = read_table(run / "probes" / "layers.parquet")  # reps=0: no interval, a reason
    for col in ("auroc_lo", "auroc_hi", "null_lo", "null_hi"):
        assert np.isnan(table[col]).all(), col
    for col in ("auroc_ci_absent", "null_band_absent"):
        assert set(table[col]) == {"bootstrap off (0 resamples)"}, col
    panel = probe_layer_panel(run / "probes" / "layers.parquet").svg()  # the report says why
    assert "no 95% interval: bootstrap off (0 resamples)" in panel
    # C_samp takes two values here (0.2, 0.8): a rank correlation near its ceiling, and
    # probabilities near the values themselves
    assert soft["by_family"]["linear"]["spearman"] > 0.7
    assert soft["by_family"]["linear"]["mae"] < 0.15


def test_transfer_between_two_runs_and_checkpoint_in_another_runs_stage(tmp_path):
    a, b = _make_run(tmp_path / "a", 2), _make_run(tmp_path / "b", 3, n_q=20)
    summary = transfer([a], [b], tmp_path / "t", epochs=30, reps=50)
    table = read_table(tmp_path / "t" / "transfer.parquet")
    assert list(table["layer"]) == [3, 5]
    assert table["auroc"][1] > 0.9 > table["auroc"][0]
    assert summary["results"][f"linear|{b}"]["final_layer"] == 5
    assert (tmp_path / "t" / "transfer.png").read_bytes()[:4] == b"\x89PNG"
    applied = run_probe_stage(b, checkpoint=tmp_path / "t" / "ckpt_linear", reps=50)
    assert applied["auroc_by_layer"][5] == pytest.approx(float(table["auroc"][1]))
    conf = read_table(b / "steps.parquet")["conf_probe"]
    assert _pairwise_auroc(conf, np.repeat(np.arange(20) % 2 == 1, 3)) > 0.9
    # two training runs: rows of both
    both = transfer([a, b], [b], tmp_path / "t2", epochs=30, reps=0)
    assert both["results"][f"linear|{b}"]["auroc_final_layer"] > 0.9


def test_checkpoint_mismatch_errors_name_the_difference(tmp_path):
    a = _make_run(tmp_path / "a", 2)
    run_probe_stage(a, folds=2, epochs=10, reps=0)
    ckpt = a / "probes" / "ckpt"
    other_model = _make_run(tmp_path / "m", 3, model="other")
    with pytest.raises(ProbeError, match=r"model 'm'.*'other'"):
        run_probe_stage(other_model, checkpoint=ckpt, reps=0)
    wide = _make_run(tmp_path / "w", 3, width=D + 2)
    with pytest.raises(ProbeError, match=f"hidden size {D}.*{D + 2}"):
        run_probe_stage(wide, checkpoint=ckpt, reps=0)
    fewer = _make_run(tmp_path / "l", 3, layers=(5, 7))
    with pytest.raises(ProbeError, match=r"layers \[3, 5\].*missing \[3\]"):
        run_probe_stage(fewer, checkpoint=ckpt, reps=0)
    with pytest.raises(ProbeError, match="layers"):
        transfer([a], [fewer], tmp_path / "t", epochs=5, reps=0)


def test_streaming_pipeline_stable_under_float_noise_in_hidden_states():
    """The README demo's shape (8 questions, one correct, 2 folds): 1e-6 relative noise in
    the states keeps every chosen layer and probability (weight decay, epoch and layer
    choices included), and the final probe's layer and weight decays. With one correct
    question every fold trains on rows of one label, where the weight gradient is rounding
    error that AdamW would turn into full-size steps (the demo's probe row once moved from
    mean C 0.199 to 0.304 on a fresh clone)."""
    rng = np.random.default_rng(0)
    sizes = [3, 2, 4, 3, 2, 3, 3, 3]
    groups = np.repeat([f"q{i}" for i in range(8)], sizes)
    y = (groups == "q6").astype(float)
    base = rng.standard_normal((groups.size, 31, 64)).astype(np.float32) * 30
    outs, finals = [], []
    config = TrainConfig(epochs=100)
    for seed in range(3):
        noise = np.random.default_rng(100 + seed).standard_normal(base.shape)
        x = (base * (1 + 1e-6 * noise)).astype(np.float32)
        outs.append(crossfit_source(ArraySource(x), y, groups, folds=2, config=config))
        finals.append(fit_select(ArraySource(x), y, groups, np.arange(y.size), config=config))
    for other, final in zip(outs[1:], finals[1:], strict=True):
        assert other.chosen_layer.tolist() == outs[0].chosen_layer.tolist()
        np.testing.assert_allclose(other.proba, outs[0].proba, atol=1e-4)
        assert final.layer == finals[0].layer  # the final probe's layer too
        np.testing.assert_array_equal(final.weight_decay, finals[0].weight_decay)


_SHARDED = """
import sys, numpy as np
sys.path.insert(0, {tests!r})
from test_probe_research import _planted
from fcjax.engine.mesh import make_mesh
from probes.sources import ArraySource
from probes.trainer import TrainConfig, fit
x, y, groups = _planted("correct")
mesh = make_mesh("data:4")
w = np.ones(len(y), np.float32)
f = fit(ArraySource(x), y, w, config=TrainConfig(epochs=4, batch_size=32, block=16), mesh=mesh)
np.save({out!r}, f.params["w"])
"""


@pytest.mark.slow
def test_batch_sharded_over_four_devices_matches_one(tmp_path):
    """The minibatch rows sharded over a 4-device data mesh give the 1-device parameters."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "w.npy"
    code = _SHARDED.format(tests=str(Path(__file__).parent), out=str(out))
    root = str(Path(__file__).parents[1])
    path = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])
    env = child_env(devices=4)
    env["PYTHONPATH"] = path
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    x, y, _ = _planted("correct")
    w = np.ones(len(y), np.float32)
    one = fit(ArraySource(x), y, w, config=TrainConfig(epochs=4, batch_size=32, block=16))
    np.testing.assert_allclose(np.load(out), one.params["w"], atol=1e-5, rtol=0)
