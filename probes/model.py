"""Per-layer logistic-regression probes trained with Optax, all layers in one jitted program.

A probe for layer l is ``p = sigmoid(w_l . (x_l - mean_l) / std_l + b_l)``. Features are
standardised with statistics of the training rows only (no information from validation or
scored rows). Training is full-batch AdamW (decoupled weight decay on ``w``, none on
``b``) for a fixed number of steps inside ``lax.scan``, vmapped over layers. Early
stopping: with validation rows, every layer keeps its parameters at the step with the
lowest validation loss (restore-best early stopping); without them it keeps the
parameters at a given step per layer (``stop_steps``), which is how a refit on all
training rows reuses the step counts chosen on validation. Training rows that all carry one
label value train the bias alone (w stays 0): nothing separates them, and the weight
gradient would be rounding error.

Labels may be soft (in [0, 1]); the loss is the cross-entropy against them. With
``class_weight="balanced"`` the positive and negative terms are weighted by
``n / (2 * sum(y))`` and ``n / (2 * sum(1 - y))`` (sklearn's rule for hard labels).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


class ProbeError(ValueError):
    """Bad probe inputs (shapes, labels, masks)."""


class TooFewLabels(ProbeError):
    """Too few labeled rows or question groups to fit (or cross-fit) a probe: a legitimate
    outcome of a small run, not a bug."""


class ProbeParams(NamedTuple):
    """Per-layer weights: w [layers, d], b [layers]."""

    w: np.ndarray
    b: np.ndarray


class Standardizer(NamedTuple):
    """Per-layer feature statistics from the training rows: mean, std [layers, d]."""

    mean: np.ndarray
    std: np.ndarray


class ProbeFit(NamedTuple):
    """Result of ``train_probes``."""

    params: ProbeParams
    stats: Standardizer
    best_step: np.ndarray  # [layers] int, the step whose parameters were kept.
    val_loss: np.ndarray  # [layers] validation loss there (NaN without validation rows).


@dataclass(frozen=True)
class ProbeConfig:
    """Optimisation settings shared by every probe fit."""

    weight_decay: float = 1e-2
    lr: float = 0.02
    steps: int = 400
    class_weight: str | None = "balanced"


def _weighted_bce(logits, y, weights, balanced: bool):
    """Mean (class-balanced) cross-entropy over rows with weight 1; logits/y/weights [n]."""
    total = jnp.maximum(weights.sum(), 1.0)
    if balanced:
        pos = jnp.maximum((weights * y).sum(), 1e-6)
        neg = jnp.maximum((weights * (1.0 - y)).sum(), 1e-6)
        a_pos, a_neg = total / (2.0 * pos), total / (2.0 * neg)
    else:
        a_pos = a_neg = 1.0
    per_row = a_pos * y * jax.nn.softplus(-logits) + a_neg * (1.0 - y) * jax.nn.softplus(logits)
    return (weights * per_row).sum() / total


def _standardize_stats(x, train_w):
    """Masked per-layer mean/std over training rows; x [n, L, d], train_w [n]."""
    count = jnp.maximum(train_w.sum(), 1.0)
    mean = jnp.einsum("n,nld->ld", train_w, x) / count
    var = jnp.einsum("n,nld->ld", train_w, (x - mean) ** 2) / count
    std = jnp.sqrt(var)
    return mean, jnp.where(std < 1e-6, 1.0, std)


def _fit_impl(x, y, train_w, val_w, stop_steps, lr, weight_decay, *, steps, balanced, has_val):
    mean, std = _standardize_stats(x, train_w)
    z = (x - mean) / std  # [n, L, d]
    on = train_w > 0
    one_label = jnp.max(jnp.where(on, y, -jnp.inf)) == jnp.min(jnp.where(on, y, jnp.inf))
    d = x.shape[-1]
    optimizer = optax.adamw(lr, weight_decay=weight_decay, mask={"w": True, "b": False})

    def fit_layer(z_l, stop):  # z_l [n, d]
        def loss(params, weights):
            return _weighted_bce(z_l @ params["w"] + params["b"], y, weights, balanced)

        params = {"w": jnp.zeros((d,), x.dtype), "b": jnp.zeros((), x.dtype)}
        carry0 = (params, optimizer.init(params), params, jnp.array(jnp.inf, x.dtype), jnp.int32(0))

        def body(carry, t):
            params, opt_state, best, best_val, best_step = carry
            grads = jax.grad(loss)(params, train_w)
            # one label value among the training rows: the weight gradient is the mean of
            # standardised features, zero up to rounding, and AdamW's scale-free step would
            # turn that rounding into full-size updates (a probe that changes with the last
            # bits of the hidden states); only the bias can learn the label then
            grads = {"w": jnp.where(one_label, 0.0, grads["w"]), "b": grads["b"]}
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            if has_val:
                val = loss(params, val_w)
                better = val < best_val
            else:
                val = jnp.array(jnp.nan, x.dtype)
                better = t + 1 == stop
            best = jax.tree.map(lambda new, old: jnp.where(better, new, old), params, best)
            best_val = jnp.where(better, val, best_val)
            best_step = jnp.where(better, t + 1, best_step)
            return (params, opt_state, best, best_val, best_step), None

        (_, _, best, best_val, best_step), _ = jax.lax.scan(body, carry0, jnp.arange(steps))
        return best["w"], best["b"], best_step, best_val

    w, b, best_step, best_val = jax.vmap(fit_layer, in_axes=(1, 0))(z, stop_steps)
    return w, b, mean, std, best_step, best_val


_fit = jax.jit(_fit_impl, static_argnames=("steps", "balanced", "has_val"))


def _as_weights(sel, n: int, name: str) -> np.ndarray:
    """Bool mask or integer indices -> float32 0/1 weights [n]."""
    if sel is None:
        return np.zeros(n, np.float32)
    sel = np.asarray(sel)
    if sel.dtype == bool:
        if sel.shape != (n,):
            raise ProbeError(f"{name}: boolean mask has shape {sel.shape}, expected ({n},)")
        return sel.astype(np.float32)
    if not np.issubdtype(sel.dtype, np.integer):
        raise ProbeError(f"{name}: expected a boolean mask or integer indices, got {sel.dtype}")
    if sel.size and (sel.min() < 0 or sel.max() >= n):
        raise ProbeError(f"{name}: indices out of range [0, {n})")
    weights = np.zeros(n, np.float32)
    weights[sel] = 1.0
    return weights


def train_probes(
    x: np.ndarray,
    y: np.ndarray,
    train: np.ndarray | None = None,
    val: np.ndarray | None = None,
    *,
    config: ProbeConfig = ProbeConfig(),
    stop_steps: np.ndarray | None = None,
) -> ProbeFit:
    """Trains one logistic probe per layer on x [n, layers, d] with labels y [n] in [0, 1].

    ``train``/``val`` are boolean masks or integer row indices (``train`` defaults to all
    rows). With validation rows each layer keeps its best-validation-loss step; otherwise
    the step ``stop_steps[layer]`` (default: the last one).
    """
    x = np.asarray(x, np.float32)
    y = np.asarray(y, np.float32)
    if x.ndim != 3:
        raise ProbeError(f"x must be [n, layers, d], got shape {x.shape}")
    n, num_layers, _ = x.shape
    if y.shape != (n,):
        raise ProbeError(f"y must have shape ({n},), got {y.shape}")
    train_w = np.ones(n, np.float32) if train is None else _as_weights(train, n, "train")
    val_w = _as_weights(val, n, "val")
    if np.any((train_w > 0) & (val_w > 0)):
        raise ProbeError("train and val rows overlap")
    used = (train_w + val_w) > 0
    if not np.all(np.isfinite(y[used])) or np.any((y[used] < 0) | (y[used] > 1)):
        raise ProbeError("labels of train/val rows must be finite and in [0, 1]")
    if not np.all(np.isfinite(x[used])):
        raise ProbeError("features of train/val rows must be finite")
    if train_w.sum() == 0:
        raise TooFewLabels("no training rows")
    if config.class_weight not in ("balanced", None):
        raise ProbeError(f"class_weight must be 'balanced' or None, got {config.class_weight!r}")
    if stop_steps is None:
        stop_steps = np.full(num_layers, config.steps, np.int32)
    stop_steps = np.broadcast_to(np.asarray(stop_steps, np.int32), (num_layers,))
    # Rows outside train/val carry no weight; zero them so NaNs there cannot propagate.
    x_used = np.where(used[:, None, None], x, 0.0)
    y_used = np.where(used, y, 0.0)
    w, b, mean, std, best_step, best_val = _fit(
        x_used,
        y_used,
        train_w,
        val_w,
        stop_steps,
        np.float32(config.lr),
        np.float32(config.weight_decay),
        steps=int(config.steps),
        balanced=config.class_weight == "balanced",
        has_val=bool(val_w.sum() > 0),
    )
    val_loss = np.asarray(best_val, np.float64)
    if val_w.sum() == 0:
        val_loss = np.full(num_layers, np.nan)
    return ProbeFit(
        ProbeParams(np.asarray(w), np.asarray(b)),
        Standardizer(np.asarray(mean), np.asarray(std)),
        np.asarray(best_step),
        val_loss,
    )


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def predict_proba(
    params: ProbeParams, stats: Standardizer, x: np.ndarray, layer: int | None = None
) -> np.ndarray:
    """Probabilities from x [n, layers, d]: [n, layers], or [n] for one layer position.

    With ``layer`` given, x may also be that layer's features alone, [n, d].
    """
    x = np.asarray(x, np.float64)
    w, b = np.asarray(params.w, np.float64), np.asarray(params.b, np.float64)
    mean, std = np.asarray(stats.mean, np.float64), np.asarray(stats.std, np.float64)
    if layer is None:
        if x.ndim != 3 or x.shape[1:] != w.shape:
            raise ProbeError(f"x must be [n, {w.shape[0]}, {w.shape[1]}], got {x.shape}")
        z = np.einsum("nld,ld->nl", (x - mean) / std, w) + b
        return _sigmoid(z)
    if x.ndim == 3:
        x = x[:, layer]
    if x.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ProbeError(f"x must be [n, {w.shape[1]}] for one layer, got {x.shape}")
    z = ((x - mean[layer]) / std[layer]) @ w[layer] + b[layer]
    return _sigmoid(z)
