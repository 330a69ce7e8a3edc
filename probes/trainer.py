"""Minibatch probe training that streams rows from a source (in-memory array or TensorStore).

Families (``FAMILIES``): ``linear``, ``p = sigmoid(w . z + b)``, and ``mlp``,
``p = sigmoid(w2 . gelu(W1 z + b1) + b2)`` with ``z = (x - mean) / std`` standardised by
statistics of the training rows (one streamed pass, float64 sums). Every layer and every
weight-decay candidate trains at once in one jitted step: parameters carry leading axes
[candidates G, layers L], and the minibatch rows are sharded over the mesh's ``data`` axis
(parameters replicated), so the same program runs data-parallel on many devices.

Optimisation: AdamW (Optax's ``scale_by_adam`` plus decoupled decay ``wd[g, l]`` on the
weights, none on biases) over ``epochs`` passes; each pass deals the rows' chunk blocks
(``block`` rows, the store's chunk size) into minibatches of ``batch_size`` rows in a seeded
order (``batch_size=0``: one full batch per epoch). Loss: cross-entropy against labels in
[0, 1] (soft labels are regression targets), class-balanced with weights from all training
rows when ``balanced``. Early stopping: with validation rows every (candidate, layer) keeps
its parameters from the epoch with the lowest validation loss; without them the epoch
``stop_epochs[l]`` (how a refit reuses the epochs chosen on validation). Training rows that
carry one label value train the biases alone. Only rows of weight > 0 enter the statistics and
the loss (a non-finite state there raises ProbeError; in any other row it is ignored). With
``batch_size > 0`` only the blocks of one minibatch (and the next, prefetched) are in memory
at a time; a full batch (``batch_size=0``) is read once and kept for all epochs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fcjax.engine import mesh as mesh_lib
from probes.common import ProbeError, TooFewLabels

FAMILIES = ("linear", "mlp")
WEIGHTS = ("w", "w1", "w2")  # decayed leaves (biases are not)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings of one probe family's training (``for_family`` gives the defaults)."""

    family: str = "linear"
    weight_decays: tuple[float, ...] = (1e-3, 1e-2, 1e-1)
    lr: float = 0.02
    epochs: int = 400
    batch_size: int = 0  # rows per step; 0: all training rows in one step
    block: int = 64  # rows read together
    hidden: int = 32  # MLP width
    balanced: bool = True  # class-balanced loss (hard labels)
    seed: int = 0

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ProbeError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.epochs < 1 or self.block < 1 or self.batch_size < 0 or self.hidden < 1:
            raise ProbeError(f"bad TrainConfig {self}")
        if not self.weight_decays:
            raise ProbeError("TrainConfig.weight_decays: give at least one value")

    @classmethod
    def for_family(cls, family: str, **kw) -> TrainConfig:
        if family == "mlp":
            kw = {"lr": 1e-2, "epochs": 100, "hidden": 16, **kw}
        return cls(family=family, **kw)


class Standardizer(NamedTuple):
    """Per-layer feature statistics of the training rows: mean, std [L, d]."""

    mean: np.ndarray
    std: np.ndarray


class Fit(NamedTuple):
    """Result of ``fit``: params (leaves [G, L, ...]), stats, and per (candidate, layer) the
    kept epoch (1-based), its validation loss (NaN without validation) and weight decay."""

    params: dict
    stats: Standardizer
    best_epoch: np.ndarray
    val_loss: np.ndarray
    weight_decay: np.ndarray


# --- reading ------------------------------------------------------------------------------


def blocks(weights: np.ndarray, block: int) -> list[tuple[int, int]]:
    """Consecutive row ranges of ``block`` rows holding at least one row of weight > 0."""
    n = len(weights)
    out = []
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        if np.any(weights[lo:hi] > 0):
            out.append((lo, hi))
    return out


def batches(
    weights: np.ndarray, config: TrainConfig, epoch: int | None
) -> list[list[tuple[int, int]]]:
    """The epoch's minibatches as lists of row ranges (``epoch=None``: in row order)."""
    bl = blocks(weights, config.block)
    if epoch is not None and config.batch_size:
        order = np.random.default_rng([config.seed, epoch]).permutation(len(bl))
        bl = [bl[i] for i in order]
    per = max(1, config.batch_size // config.block) if config.batch_size else max(len(bl), 1)
    return [bl[i : i + per] for i in range(0, len(bl), per)]


def stream(source, plan: Sequence[Sequence[tuple[int, int]]]) -> Iterator[tuple]:
    """Yields (row indices, float32 rows) per minibatch, reading the next one ahead."""
    handle = source.start(plan[0]) if plan else None
    for i, ranges in enumerate(plan):
        ahead = source.start(plan[i + 1]) if i + 1 < len(plan) else None
        x = source.finish(handle)
        yield np.concatenate([np.arange(lo, hi) for lo, hi in ranges]), x
        handle = ahead


def weighted_rows(x: np.ndarray, idx: np.ndarray, weights: np.ndarray, name: str) -> np.ndarray:
    """Rows ``x`` (source rows ``idx``) with the rows of weight 0 zeroed, so a non-finite state
    outside the fit's rows cannot reach its sums; a non-finite state in a row of weight > 0
    raises ProbeError naming the row."""
    on = weights[idx] > 0
    finite = np.isfinite(x.sum(axis=(1, 2), dtype=np.float64))  # float64: no overflow
    if np.any(on & ~finite):
        row = int(idx[np.flatnonzero(on & ~finite)[0]])
        raise ProbeError(f"features of {name} row {row} must be finite")
    if not on.all():
        if not (x.flags.owndata and x.flags.writeable):  # sources hand out fresh blocks
            x = x.copy()
        x[~on] = 0.0  # in place: no second minibatch-sized array
    return x


def feature_stats(source, weights: np.ndarray, config: TrainConfig) -> Standardizer:
    """Weighted per-layer mean and std over rows with weight > 0 (float64 sums)."""
    s1 = np.zeros((source.n_layers, source.width))
    s2 = np.zeros_like(s1)
    count = 0.0
    for idx, x in stream(source, batches(weights, config, None)):
        x = weighted_rows(x, idx, weights, "train")
        for lo in range(0, len(idx), 1024):  # float64 copies of 1024 rows at a time
            w = weights[idx[lo : lo + 1024]].astype(np.float64)
            x64 = x[lo : lo + 1024].astype(np.float64)
            s1 += np.einsum("n,nld->ld", w, x64)
            s2 += np.einsum("n,nld->ld", w, x64 * x64)
            count += w.sum()
    count = max(count, 1.0)
    mean = s1 / count
    std = np.sqrt(np.maximum(s2 / count - mean * mean, 0.0))
    std = np.where(std < 1e-6, 1.0, std)
    return Standardizer(mean.astype(np.float32), std.astype(np.float32))


# --- the model ------------------------------------------------------------------------------


def init_params(config: TrainConfig, g: int, layers: int, d: int) -> dict:
    if config.family == "linear":
        return {"w": np.zeros((g, layers, d), np.float32), "b": np.zeros((g, layers), np.float32)}
    k1, k2 = jax.random.split(jax.random.key(config.seed))
    h = config.hidden
    w1 = jax.random.normal(k1, (layers, d, h), jnp.float32) / np.sqrt(d)
    w2 = jax.random.normal(k2, (layers, h), jnp.float32) / np.sqrt(h)
    return {
        "w1": np.broadcast_to(np.asarray(w1), (g, layers, d, h)).copy(),
        "b1": np.zeros((g, layers, h), np.float32),
        "w2": np.broadcast_to(np.asarray(w2), (g, layers, h)).copy(),
        "b2": np.zeros((g, layers), np.float32),
    }


def logits(params: dict, z, xp=jnp):
    """z [B, L, d] -> logits [B, G, L] (``xp``: jax.numpy or numpy)."""
    if "w" in params:
        return xp.einsum("bld,gld->bgl", z, params["w"]) + params["b"][None]
    pre = xp.einsum("bld,gldh->bglh", z, params["w1"]) + params["b1"][None]
    if xp is jnp:
        act = jax.nn.gelu(pre)
    else:  # the tanh approximation, as jax.nn.gelu's default
        act = 0.5 * pre * (1 + np.tanh(np.sqrt(2 / np.pi) * (pre + 0.044715 * pre**3)))
    return xp.einsum("bglh,glh->bgl", act, params["w2"]) + params["b2"][None]


def _row_losses(params, x, y, w, mean, std, a_pos, a_neg):
    z = (x - mean) / std
    s = logits(params, z)
    yy = y[:, None, None]
    per_row = a_pos * yy * jax.nn.softplus(-s) + a_neg * (1.0 - yy) * jax.nn.softplus(s)
    return jnp.einsum("b,bgl->gl", w, per_row)  # weighted sums [G, L]


_ADAM = optax.scale_by_adam()


@jax.jit
def _step(params, opt_state, x, y, w, mean, std, a_pos, a_neg, wd, lr, freeze):
    total = jnp.maximum(w.sum(), 1.0)
    grads = jax.grad(lambda p: _row_losses(p, x, y, w, mean, std, a_pos, a_neg).sum() / total)(
        params
    )
    grads = {k: jnp.where(freeze & (k in WEIGHTS), 0.0, g) for k, g in grads.items()}
    updates, opt_state = _ADAM.update(grads, opt_state, params)
    new = {}
    for k, p in params.items():
        u = updates[k]
        if k in WEIGHTS:
            u = u + wd.reshape(wd.shape + (1,) * (p.ndim - 2)) * p
        new[k] = p - lr * u
    return new, opt_state


_eval_losses = jax.jit(_row_losses)


@jax.jit
def _keep(mask, new, old):
    """Per (candidate, layer): the new parameters where ``mask`` [G, L], else the old."""
    pick = lambda a, b: jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 2)), a, b)  # noqa: E731
    return jax.tree.map(pick, new, old)


@jax.jit
def _forward(params, x, mean, std):
    return logits(params, (x - mean) / std)


def _class_weights(y: np.ndarray, weights: np.ndarray, balanced: bool) -> tuple[float, float]:
    if not balanced:
        return 1.0, 1.0
    total = weights.sum()
    pos = max(float((weights * y).sum()), 1e-6)
    neg = max(float((weights * (1 - y)).sum()), 1e-6)
    return total / (2 * pos), total / (2 * neg)


def default_mesh():
    """The engine's data-parallel mesh over this process's devices on accelerators; one
    device on CPU and in multi-process runs. Training reduces across the data axis: CPU
    "devices" share the same cores (XLA's in-process all-reduce over 8 forced devices on 2
    cores stalled until XLA aborted), and in a multi-process run the probe stage runs on
    process 0 alone, so a reduction must not wait for the other processes."""
    if jax.default_backend() == "cpu" or jax.process_count() > 1:
        return mesh_lib.make_mesh(devices=jax.local_devices()[:1])
    return mesh_lib.default_mesh()


class _Feeder:
    """Pads minibatches to one shape and shards them over the mesh's data axis."""

    def __init__(self, config: TrainConfig, n_rows: int, mesh):
        self.mesh = mesh or default_mesh()
        n_data = mesh_lib.data_size(self.mesh)
        per = -(-config.batch_size // config.block) * config.block if config.batch_size else n_rows
        self.rows = -(-per // n_data) * n_data

    def __call__(self, x, *cols):
        pad = self.rows - x.shape[0]
        if pad < 0:
            raise ProbeError(f"minibatch of {x.shape[0]} rows exceeds {self.rows}")
        x = np.pad(x, ((0, pad), (0, 0), (0, 0)))
        cols = [np.pad(np.asarray(c, np.float32), (0, pad)) for c in cols]
        put = lambda a: mesh_lib.put(a, self.mesh, 0)  # noqa: E731
        return (put(x), *[put(c) for c in cols])


def _check(y, weights, name):
    on = weights > 0
    if not np.all(np.isfinite(y[on])) or np.any((y[on] < 0) | (y[on] > 1)):
        raise ProbeError(f"labels of {name} rows must be finite and in [0, 1]")


def fit(
    source,
    y: np.ndarray,
    train_w: np.ndarray,
    val_w: np.ndarray | None = None,
    *,
    config: TrainConfig,
    stop_epochs: np.ndarray | None = None,
    weight_decay: np.ndarray | None = None,
    mesh=None,
) -> Fit:
    """Trains probes for every layer of ``source`` on rows with ``train_w > 0``.

    Without ``weight_decay`` every value of ``config.weight_decays`` is a candidate (G of
    them); with it (one value per layer) G = 1. ``y`` [n] holds the labels (ignored where
    both weights are 0)."""
    n, layers, d = source.n_rows, source.n_layers, source.width
    y = np.asarray(y, np.float64)
    train_w = np.asarray(train_w, np.float32)
    val_w = np.zeros(n, np.float32) if val_w is None else np.asarray(val_w, np.float32)
    if y.shape != (n,) or train_w.shape != (n,) or val_w.shape != (n,):
        raise ProbeError(f"y, train_w and val_w must have shape ({n},)")
    if np.any((train_w > 0) & (val_w > 0)):
        raise ProbeError("train and val rows overlap")
    if train_w.sum() == 0:
        raise TooFewLabels("no training rows")
    _check(y, train_w, "train")
    _check(y, val_w, "val")
    y = np.where((train_w + val_w) > 0, y, 0.0)
    if weight_decay is None:
        wd = np.repeat(np.asarray(config.weight_decays, np.float32)[:, None], layers, axis=1)
    else:
        wd = np.asarray(weight_decay, np.float32).reshape(1, layers)
    g = wd.shape[0]
    has_val = bool(val_w.sum() > 0)
    stop = np.full(layers, config.epochs) if stop_epochs is None else np.asarray(stop_epochs)
    stop = np.broadcast_to(stop, (g, layers))

    stats = feature_stats(source, train_w, config)
    on = train_w > 0
    freeze = bool(y[on].max() == y[on].min())
    a_pos, a_neg = _class_weights(y, train_w, config.balanced)
    v_pos, v_neg = _class_weights(y, val_w, config.balanced)
    feed = _Feeder(config, n, mesh)
    rep = lambda a: mesh_lib.put(a, feed.mesh, None)  # noqa: E731
    mean, std = rep(stats.mean), rep(stats.std)
    params = jax.tree.map(rep, init_params(config, g, layers, d))
    opt_state = _ADAM.init(params)
    best = params
    best_val = np.full((g, layers), np.inf)
    best_epoch = np.zeros((g, layers), np.int64)
    wd_dev, lr = rep(wd), np.float32(config.lr)

    def placed(weights, epoch, name):
        for idx, x in stream(source, batches(weights, config, epoch)):
            yield feed(weighted_rows(x, idx, weights, name), y[idx], weights[idx])

    # a full batch (batch_size=0) is the same every epoch: read and place it once
    cached = None if config.batch_size else list(placed(train_w, None, "train"))
    val_batches = list(placed(val_w, None, "val")) if has_val and not config.batch_size else None
    for epoch in range(config.epochs):
        for xs, ys, ws in cached if cached is not None else placed(train_w, epoch, "train"):
            params, opt_state = _step(
                params, opt_state, xs, ys, ws, mean, std, a_pos, a_neg, wd_dev, lr, freeze
            )
        if has_val:
            sums = np.zeros((g, layers))
            val_feed = val_batches if val_batches is not None else placed(val_w, None, "val")
            for xs, ys, ws in val_feed:
                sums += np.asarray(_eval_losses(params, xs, ys, ws, mean, std, v_pos, v_neg))
            val = sums / val_w.sum()
            better = val < best_val
            best_val = np.where(better, val, best_val)
        else:
            better = stop == epoch + 1
        best_epoch = np.where(better, epoch + 1, best_epoch)
        if better.any():
            best = _keep(jnp.asarray(better), params, best)
    return Fit(
        {k: np.asarray(v) for k, v in best.items()},
        stats,
        best_epoch,
        best_val if has_val else np.full((g, layers), np.nan),
        wd,
    )


def predict_logits(
    params: dict, stats: Standardizer, source, config: TrainConfig, mesh=None
) -> np.ndarray:
    """Logits [n, G, L] of every row of ``source`` (streamed in minibatches)."""
    n = source.n_rows
    plan = batches(np.ones(n, np.float32), config, None)
    feed = _Feeder(config, n, mesh)
    rep = lambda a: mesh_lib.put(a, feed.mesh, None)  # noqa: E731
    p = jax.tree.map(rep, params)
    mean, std = rep(stats.mean), rep(stats.std)
    g, layers = next(iter(params.values())).shape[:2]
    out = np.empty((n, g, layers), np.float32)
    for idx, x in stream(source, plan):
        (xs,) = feed(x)
        out[idx] = np.asarray(_forward(p, xs, mean, std))[: len(idx)]
    return out


def select(params: dict, g: np.ndarray) -> dict:
    """Keeps candidate ``g[l]`` for every layer l: leaves [G, L, ...] -> [1, L, ...]."""
    layers = np.arange(len(g))
    return {k: v[g, layers][None] for k, v in params.items()}
