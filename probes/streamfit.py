"""Probe selection, calibration and cross-fitting over a row source (see ``probes.trainer``).

``fit_select`` splits the training questions (inner split), trains every weight-decay
candidate for every layer with validation early stopping, keeps per layer the candidate with
the lowest validation loss, fits Platt calibration ``sigmoid(a * logit + c)`` per layer on
the inner-validation logits, picks the layer on inner validation (AUROC for hard labels with
both classes, else calibrated log-loss), then refits on all training questions with the
chosen weight decay and epoch count per layer. ``crossfit_source`` scores every row with the
fit of the fold that left its question out; rows with a NaN label are never trained on.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fcjax.metrics.calibration import auroc
from probes.common import ProbeError, group_folds, inner_split, is_binary, log_loss
from probes.trainer import Standardizer, TrainConfig, fit, predict_logits, select


def _sigmoid(z):
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def platt(s: np.ndarray, y: np.ndarray, iters: int = 50) -> np.ndarray:
    """Per-column Platt scaling of logits s [n, L] to labels y [n] in [0, 1]: [L, 2] (a, c)
    minimising the cross-entropy of sigmoid(a s + c) (damped Newton, 1e-6 ridge; hard
    labels use Platt's targets (N+ + 1) / (N+ + 2) and 1 / (N- + 2)), constrained to a >= 0 so
    calibration never reverses the probe's order (a <= 0 fitted: a = 0 and c the logit of the
    mean target). With one label value among the rows the logits are kept, (a, c) = (1, 0)."""
    s = np.asarray(s, np.float64)
    y = np.asarray(y, np.float64)
    identity = np.tile([1.0, 0.0], (s.shape[1], 1))
    if len(y) < 2 or y.min() == y.max():
        return identity
    if is_binary(y):
        n_pos, n_neg = y.sum(), (1 - y).sum()
        y = np.where(y > 0.5, (n_pos + 1) / (n_pos + 2), 1 / (n_neg + 2))
    out = np.zeros((s.shape[1], 2))
    for j in range(s.shape[1]):
        feats = np.stack([s[:, j], np.ones_like(s[:, j])], 1)

        def loss(theta, feats=feats):
            z = feats @ theta
            return float(np.mean(np.logaddexp(0.0, z) - y * z))

        theta = np.array([1.0, 0.0])
        current = loss(theta)
        for _ in range(iters):
            p = _sigmoid(feats @ theta)
            grad = feats.T @ (p - y) / len(y)
            hess = (feats * (p * (1 - p))[:, None]).T @ feats / len(y) + 1e-6 * np.eye(2)
            step = np.linalg.solve(hess, grad)
            t = 1.0  # backtracking: Newton from (1, 0) overshoots on far-off logits
            while t > 1e-8 and loss(theta - t * step) > current:
                t *= 0.5
            if t <= 1e-8:
                break
            theta = theta - t * step
            new = loss(theta)
            if current - new < 1e-14:
                current = new
                break
            current = new
        if theta[0] <= 0:  # the optimum with a >= 0 lies on a = 0: the mean target
            m = float(np.clip(y.mean(), 1e-6, 1 - 1e-6))
            theta = np.array([0.0, np.log(m / (1 - m))])
        out[j] = theta
    return out


def calibrate(logit: np.ndarray, calibration: np.ndarray) -> np.ndarray:
    """Probabilities [n, L] from logits [n, L] and per-layer (a, c) [L, 2]."""
    return _sigmoid(logit * calibration[:, 0] + calibration[:, 1])


@dataclass(frozen=True)
class Selected:
    """A refit probe per layer (params leaves [1, L, ...]), its calibration and choices."""

    params: dict
    stats: Standardizer
    calibration: np.ndarray  # [L, 2]
    layer: int  # position of the chosen layer
    val_score: np.ndarray  # [L]
    weight_decay: np.ndarray  # [L]
    epochs: np.ndarray  # [L]
    family: str

    def proba(self, source, config: TrainConfig, mesh=None) -> np.ndarray:
        """Calibrated probabilities [n, L] of every row of ``source``."""
        s = predict_logits(self.params, self.stats, source, config, mesh)[:, 0]
        return calibrate(s, self.calibration)


def fit_select(
    source,
    y: np.ndarray,
    groups: np.ndarray,
    rows: np.ndarray,
    *,
    config: TrainConfig,
    inner_val_frac: float = 0.2,
    seed: int = 0,
    mesh=None,
) -> Selected:
    """Fits on ``rows`` (row indices) of ``source``: see the module docstring."""
    n = source.n_rows
    groups = np.asarray([str(g) for g in groups])
    rng = np.random.default_rng(seed)
    inner_train, inner_val = inner_split(groups, rows, inner_val_frac, rng)
    w_train, w_val = np.zeros(n, np.float32), np.zeros(n, np.float32)
    w_train[inner_train], w_val[inner_val] = 1.0, 1.0
    first = fit(source, y, w_train, w_val, config=config, mesh=mesh)
    g = np.argmin(first.val_loss, axis=0)
    layers = np.arange(source.n_layers)
    epochs = first.best_epoch[g, layers]
    wd = first.weight_decay[g, layers]
    chosen = select(first.params, g)
    s_val = predict_logits(chosen, first.stats, source, config, mesh)[inner_val, 0]
    y_val = y[inner_val]
    calibration = platt(s_val, y_val)
    p_val = calibrate(s_val, calibration)
    losses = np.array([log_loss(p_val[:, j], y_val) for j in layers])
    if is_binary(y_val) and 0 < y_val.sum() < len(y_val):
        score = np.array([auroc(p_val[:, j], y_val > 0.5) for j in layers])
        layer = int(np.lexsort((losses, -np.nan_to_num(score, nan=-1.0)))[0])
    else:
        score, layer = losses, int(np.argmin(losses))
    w_all = np.zeros(n, np.float32)
    w_all[rows] = 1.0
    refit = fit(source, y, w_all, config=config, stop_epochs=epochs, weight_decay=wd, mesh=mesh)
    return Selected(refit.params, refit.stats, calibration, layer, score, wd, epochs, config.family)


@dataclass(frozen=True)
class SourceCrossfit:
    """Cross-fitted calibrated probabilities of one family."""

    proba: np.ndarray  # [n] chosen layer of the row's fold
    proba_layers: np.ndarray  # [n, L]
    fold: np.ndarray  # [n]
    chosen_layer: np.ndarray  # [folds]


def crossfit_source(
    source,
    y: np.ndarray,
    groups: np.ndarray,
    *,
    folds: int = 5,
    seed: int = 0,
    config: TrainConfig,
    inner_val_frac: float = 0.2,
    mesh=None,
) -> SourceCrossfit:
    """Cross-fits probes of ``config.family`` on every row of ``source``, grouped by question."""
    y = np.asarray(y, np.float64)
    n = source.n_rows
    if len(y) != n or len(groups) != n:
        raise ProbeError(f"source, y and groups need the same rows: {n}, {len(y)}, {len(groups)}")
    labeled = np.isfinite(y)
    fold = group_folds(groups, folds, seed)
    proba_layers = np.full((n, source.n_layers), np.nan)
    proba = np.full(n, np.nan)
    chosen = []
    for k in range(folds):
        scored = fold == k
        fitted = fit_select(
            source,
            y,
            groups,
            np.flatnonzero(~scored & labeled),
            config=config,
            inner_val_frac=inner_val_frac,
            seed=seed * 1000 + k + 1,
            mesh=mesh,
        )
        p = fitted.proba(source, config, mesh)
        proba_layers[scored] = p[scored]
        proba[scored] = p[scored, fitted.layer]
        chosen.append(fitted.layer)
    return SourceCrossfit(proba, proba_layers, fold, np.asarray(chosen))
