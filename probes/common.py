"""Definitions the probe modules share: errors, question-grouped folds and splits, log-loss.

Groups (example ids) are dealt into folds deterministically: shuffled with ``seed``, then
placed largest first into the fold with the fewest rows (GroupKFold's rule, with a seeded
order). ``inner_split`` holds out whole groups of a fold's training rows for validation.
"""

from __future__ import annotations

import numpy as np


class ProbeError(ValueError):
    """Bad probe inputs (shapes, labels, masks)."""


class TooFewLabels(ProbeError):
    """Too few labeled rows or question groups to fit (or cross-fit) a probe: a legitimate
    outcome of a small run, not a bug."""


def log_loss(prob: np.ndarray, y: np.ndarray) -> float:
    """Mean cross-entropy against (soft) labels, probabilities clipped to [1e-7, 1 - 1e-7]."""
    p = np.clip(np.asarray(prob, np.float64), 1e-7, 1 - 1e-7)
    y = np.asarray(y, np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def is_binary(y: np.ndarray) -> bool:
    """True when every label is exactly 0 or 1."""
    return bool(np.all((y == 0) | (y == 1)))


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
    return group_fold[inverse.ravel()]


def inner_split(
    groups: np.ndarray, rows: np.ndarray, frac: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Splits ``rows`` into (train, val) index arrays by whole groups, ``frac`` of the groups
    (at least one, at most all but one) held out for validation."""
    uniq = np.unique(groups[rows])
    if len(uniq) < 2:
        raise TooFewLabels(f"need labeled rows from at least 2 groups to fit, got {len(uniq)}")
    n_val = min(max(1, round(frac * len(uniq))), len(uniq) - 1)
    val_groups = set(rng.choice(uniq, size=n_val, replace=False).tolist())
    is_val = np.array([g in val_groups for g in groups[rows]])
    return rows[~is_val], rows[is_val]
