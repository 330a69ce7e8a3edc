"""Cross-fitting of per-layer probes grouped by question, with layer choice on inner validation.

Every row's probability comes from a probe whose training rows (and standardisation
statistics) never contained that row's group. Groups (example ids) are dealt into folds
deterministically: shuffled with ``seed``, then placed largest first into the fold with the
fewest rows (GroupKFold's rule, with a seeded order). Inside each outer fold the training
groups are split again (``inner_val_frac`` of them held out) to pick the step count per
layer (early stopping) and the layer; the probes are then refit on all training groups
with those step counts (``refit=True``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fcjax.metrics.calibration import auroc, ece
from probes.model import (
    ProbeConfig,
    ProbeError,
    ProbeParams,
    Standardizer,
    TooFewLabels,
    predict_proba,
)
from probes.model import train_probes as _train_probes


def log_loss(prob: np.ndarray, y: np.ndarray) -> float:
    """Mean cross-entropy against (soft) labels, probabilities clipped to [1e-7, 1 - 1e-7]."""
    p = np.clip(np.asarray(prob, np.float64), 1e-7, 1 - 1e-7)
    y = np.asarray(y, np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def group_folds(groups: np.ndarray, folds: int, seed: int = 0) -> np.ndarray:
    """Fold id [n] per row: whole groups per fold, sizes balanced, deterministic by seed."""
    keys = np.asarray([str(g) for g in groups])
    uniq, inverse, sizes = np.unique(keys, return_inverse=True, return_counts=True)
    if len(uniq) < folds:
        raise TooFewLabels(f"need at least {folds} groups for {folds} folds, got {len(uniq)}")
    order = np.random.default_rng(seed).permutation(len(uniq))
    order = order[np.argsort(-sizes[order], kind="stable")]  # Largest first, seeded ties.
    load = np.zeros(folds, np.int64)
    group_fold = np.empty(len(uniq), np.int64)
    for g in order:
        k = int(np.argmin(load))
        group_fold[g] = k
        load[k] += sizes[g]
    return group_fold[inverse]


def _inner_split(groups: np.ndarray, rows: np.ndarray, frac: float, rng) -> tuple:
    """Splits ``rows`` into (train, val) index arrays by whole groups."""
    uniq = np.unique(groups[rows])
    if len(uniq) < 2:
        raise TooFewLabels(f"need labeled rows from at least 2 groups to fit, got {len(uniq)}")
    n_val = min(max(1, round(frac * len(uniq))), len(uniq) - 1)
    val_groups = set(rng.choice(uniq, size=n_val, replace=False).tolist())
    is_val = np.array([g in val_groups for g in groups[rows]])
    return rows[~is_val], rows[is_val]


@dataclass(frozen=True)
class FittedProbes:
    """Per-layer probes fit on some rows, plus the layer picked on inner validation."""

    params: ProbeParams
    stats: Standardizer
    layer: int  # Position in the layer axis.
    val_score: np.ndarray  # [layers] inner-validation score used for the choice.
    best_step: np.ndarray  # [layers]
    train_rows: np.ndarray  # Row indices the final params were trained on.


def _is_binary(y: np.ndarray) -> bool:
    return bool(np.all((y == 0) | (y == 1)))


def fit_with_selection(
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    rows: np.ndarray,
    *,
    inner_val_frac: float = 0.2,
    select: str = "auto",
    refit: bool = True,
    config: ProbeConfig | None = None,
    seed: int = 0,
) -> FittedProbes:
    """Fits probes on ``rows``: inner split -> early stopping + layer choice -> refit."""
    config = ProbeConfig() if config is None else config
    groups = np.asarray([str(g) for g in groups])
    rng = np.random.default_rng(seed)
    inner_train, inner_val = _inner_split(groups, rows, inner_val_frac, rng)
    fit = _train_probes(x, y, inner_train, inner_val, config=config)
    prob_val = predict_proba(fit.params, fit.stats, x[inner_val])  # [n_val, layers]
    y_val = y[inner_val]
    mode = select
    if mode == "auto":
        both = _is_binary(y_val) and 0 < y_val.sum() < len(y_val)
        mode = "auroc" if both else "logloss"
    losses = np.array([log_loss(prob_val[:, j], y_val) for j in range(prob_val.shape[1])])
    if mode == "auroc":
        score = np.array([auroc(prob_val[:, j], y_val > 0.5) for j in range(prob_val.shape[1])])
        # Highest AUROC; ties broken by lower log-loss.
        layer = int(np.lexsort((losses, -np.nan_to_num(score, nan=-1.0)))[0])
    elif mode == "logloss":
        score = losses
        layer = int(np.argmin(losses))
    else:
        raise ProbeError(f"select must be 'auto', 'auroc' or 'logloss', got {select!r}")
    if refit:
        fit = _train_probes(x, y, rows, None, config=config, stop_steps=fit.best_step)
        train_rows = rows
    else:
        train_rows = inner_train
    return FittedProbes(fit.params, fit.stats, layer, score, fit.best_step, np.sort(train_rows))


@dataclass(frozen=True)
class CrossfitResult:
    """Cross-fitted probabilities and everything needed to audit them."""

    proba: np.ndarray  # [n] from the layer chosen in the row's fold.
    proba_layers: np.ndarray  # [n, layers] cross-fitted, every layer.
    fold: np.ndarray  # [n] fold that scored each row.
    chosen_layer: np.ndarray  # [folds] layer position chosen per fold.
    train_rows: list[np.ndarray]  # Per fold: rows the scoring probe was trained on.
    layer_table: dict[str, np.ndarray] = field(default_factory=dict)


def crossfit(
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    folds: int = 5,
    seed: int = 0,
    inner_val_frac: float = 0.2,
    *,
    select: str = "auto",
    refit: bool = True,
    config: ProbeConfig | None = None,
) -> CrossfitResult:
    """Cross-fits per-layer probes on x [n, layers, d], labels y [n], groups [n].

    Rows with a NaN label are never trained on but are still scored by their fold's probe;
    the per-layer table (AUROC/ECE against ``y > 0.5``, log-loss) covers labeled rows.
    """
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.float64)
    n = x.shape[0]
    if len(y) != n or len(groups) != n:
        raise ProbeError(f"x, y and groups need the same rows: {n}, {len(y)}, {len(groups)}")
    labeled = np.isfinite(y)
    fold = group_folds(groups, folds, seed)
    proba_layers = np.full((n, x.shape[1]), np.nan)
    proba = np.full(n, np.nan)
    chosen, train_rows = [], []
    for k in range(folds):
        scored = np.flatnonzero(fold == k)
        fitted = fit_with_selection(
            x,
            y,
            groups,
            np.flatnonzero((fold != k) & labeled),
            inner_val_frac=inner_val_frac,
            select=select,
            refit=refit,
            config=config,
            seed=seed * 1000 + k + 1,
        )
        proba_layers[scored] = predict_proba(fitted.params, fitted.stats, x[scored])
        proba[scored] = proba_layers[scored, fitted.layer]
        chosen.append(fitted.layer)
        train_rows.append(fitted.train_rows)
    chosen_arr = np.asarray(chosen)
    p_lab, y_lab = proba_layers[labeled], y[labeled]
    layers = range(x.shape[1])
    table = {
        "layer_pos": np.arange(x.shape[1]),
        "auroc": np.array([auroc(p_lab[:, j], y_lab > 0.5) for j in layers]),
        "ece": np.array([ece(p_lab[:, j], y_lab > 0.5) for j in layers]),
        "log_loss": np.array([log_loss(p_lab[:, j], y_lab) for j in layers]),
        "times_chosen": np.array([(chosen_arr == j).sum() for j in layers]),
        "n_rows": np.full(x.shape[1], int(labeled.sum())),
    }
    return CrossfitResult(proba, proba_layers, fold, chosen_arr, train_rows, table)
