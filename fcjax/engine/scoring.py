"""Teacher-forced log-probabilities of continuations given prefixes.

``score_continuations`` runs one jitted prefill over a right-padded batch of
prefix + continuation sequences and gathers, on device, only the log-probabilities of the
continuation tokens: logits are formed only at the positions that predict them
([batch, cont, vocab], never [batch, seq, vocab]) and only [batch, cont] floats reach the
host. Shapes are bucketed (sequence length, continuation length, rows) so a run compiles a
bounded number of programs.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fcjax.engine import mesh as mesh_lib
from fcjax.engine.generate import bucket
from fcjax.models.lm import LM


@functools.partial(jax.jit, static_argnums=0)
def _continuation_logprobs(graphdef, state, tokens, lengths, positions, targets):
    """tokens [B, S] right padded, lengths [B], positions/targets [B, C] -> logp [B, C]."""
    model = nnx.merge(graphdef, state)
    normed = model.prefill(tokens, lengths, return_kv=False).normed  # [B, S, D]
    h = jnp.take_along_axis(normed, positions[..., None], axis=1)  # [B, C, D]
    logp = jax.nn.log_softmax(model.unembed(h), axis=-1)  # [B, C, V]
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def _rows_bucket(n: int, batch_size: int) -> int:
    """Rows padded to a power of two (at most batch_size) to bound recompilation."""
    return min(1 << (n - 1).bit_length(), batch_size)


def score_continuations(
    lm: LM,
    prefixes: Sequence[Sequence[int]],
    continuations: Sequence[Sequence[int]],
    batch_size: int = 8,
    *,
    mesh=None,
) -> list[np.ndarray]:
    """Per pair, float32 [len(continuation)]: log p(cont[j] | prefix + cont[:j]) at
    temperature 1. Prefixes must be non-empty; an empty continuation gives an empty array.
    Pairs are grouped by length (fewer padded tokens) and returned in the input order."""
    if len(prefixes) != len(continuations):
        raise ValueError(
            f"score_continuations: {len(prefixes)} prefixes for {len(continuations)} continuations"
        )
    if batch_size < 1:
        raise ValueError(f"score_continuations: batch_size must be >= 1, got {batch_size}")
    pre = [[int(t) for t in p] for p in prefixes]
    cont = [[int(t) for t in c] for c in continuations]
    for i, p in enumerate(pre):
        if not p:
            raise ValueError(f"score_continuations: prefix {i} is empty")
    vocab = lm.config.vocab_size
    for i, seq in enumerate(pre + cont):
        bad = [t for t in seq if not 0 <= t < vocab]
        if bad:
            which = f"prefix {i}" if i < len(pre) else f"continuation {i - len(pre)}"
            raise ValueError(
                f"score_continuations: {which} has token ids outside 0..{vocab - 1}: {bad[:5]}"
            )
    out: list[np.ndarray] = [np.zeros(0, np.float32) for _ in pre]
    todo = sorted((i for i in range(len(pre)) if cont[i]), key=lambda i: len(pre[i]) + len(cont[i]))
    mesh = mesh or mesh_lib.default_mesh()
    params = mesh_lib.replicate(lm.state, mesh)
    for start in range(0, len(todo), batch_size):
        rows = todo[start : start + batch_size]
        n_rows = _rows_bucket(len(rows), batch_size)
        seq = bucket(max(len(pre[i]) + len(cont[i]) for i in rows))
        width = bucket(max(len(cont[i]) for i in rows), minimum=8)
        tokens = np.zeros((n_rows, seq), np.int32)
        lengths = np.ones((n_rows,), np.int32)
        positions = np.zeros((n_rows, width), np.int32)
        targets = np.zeros((n_rows, width), np.int32)
        for r, i in enumerate(rows):
            full = pre[i] + cont[i]
            tokens[r, : len(full)] = full
            lengths[r] = len(full)
            m = len(cont[i])
            # the logits at position len(prefix) + j - 1 predict continuation token j
            positions[r, :m] = np.arange(len(pre[i]) - 1, len(pre[i]) - 1 + m)
            targets[r, :m] = cont[i]
        logp = np.asarray(
            _continuation_logprobs(
                lm.graphdef,
                params,
                jnp.asarray(tokens),
                jnp.asarray(lengths),
                jnp.asarray(positions),
                jnp.asarray(targets),
            )
        )
        for r, i in enumerate(rows):
            out[i] = logp[r, : len(cont[i])].astype(np.float32)
    return out
