"""Teacher-forced log-probabilities of continuations given prefixes.

``force`` / ``force_many`` turn a given output (e.g. a trace from another engine) into the
``Generation`` that ``fcjax.generate`` would have returned had it sampled those tokens:
chosen-token and top-k log-probabilities at temperature 1, from one prefill per trace, the
vocabulary projected a block of positions at a time.

``score_continuations`` runs one jitted prefill over a right-padded batch of prefix +
continuation sequences and gathers, on device, only the log-probabilities of the
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
from fcjax.engine.generate import Generation, bucket
from fcjax.models.lm import LM


@functools.partial(jax.jit, static_argnums=0)
def _continuation_logprobs(graphdef, state, tokens, lengths, positions, targets):
    """tokens [B, S] right padded, lengths [B], positions/targets [B, C] -> logp [B, C]."""
    model = nnx.merge(graphdef, state)
    normed = model.prefill(tokens, lengths, return_kv=False).normed  # [B, S, D]
    h = jnp.take_along_axis(normed, positions[..., None], axis=1)  # [B, C, D]
    logp = jax.nn.log_softmax(model.unembed(h), axis=-1)  # [B, C, V]
    return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnums=(0, 6, 7))
def _forced(graphdef, state, tokens, lengths, positions, targets, top_k, block):
    """tokens [B, S] right padded, positions/targets [B, C] (C a multiple of block) ->
    chosen logp [B, C], top-k logp [B, C, k], top-k ids [B, C, k]; logits are formed for
    ``block`` positions at a time ([B, block, V], never [B, C, V])."""
    model = nnx.merge(graphdef, state)
    normed = model.prefill(tokens, lengths, return_kv=False).normed  # [B, S, D]
    h = jnp.take_along_axis(normed, positions[..., None], axis=1)  # [B, C, D]
    b, c, d = h.shape
    h = h.reshape(b, c // block, block, d).swapaxes(0, 1)  # [n, B, block, D]
    t = targets.reshape(b, c // block, block).swapaxes(0, 1)  # [n, B, block]

    def one(args):
        hb, tb = args
        logits = model.unembed(hb)  # [B, block, V] float32
        top, ids = jax.lax.top_k(logits, top_k)  # descending, lower id first on ties
        norm = jax.nn.logsumexp(logits, axis=-1)  # [B, block]
        chosen = jnp.take_along_axis(logits, tb[..., None], axis=-1)[..., 0] - norm
        return chosen, top - norm[..., None], ids

    chosen, top, ids = jax.lax.map(one, (h, t))
    unblock = lambda x: x.swapaxes(0, 1).reshape(b, c, *x.shape[3:])  # noqa: E731
    return unblock(chosen), unblock(top), unblock(ids)


FORCE_BLOCK = 128  # positions whose logits are formed together


def force_many(
    lm: LM,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    top_k: int = 5,
    batch_size: int = 8,
    *,
    texts: Sequence[str | None] | None = None,
    finish_reasons: Sequence[str] | None = None,
    mesh=None,
) -> list[Generation]:
    """One ``Generation`` per (prompt_ids, output_ids) pair, teacher-forced: token_logprobs
    [T] = log p(out[j] | prompt + out[:j]) and top_logprobs / top_ids [T, top_k] of the same
    distributions, at temperature 1 (as ``fcjax.generate`` records them). ``texts`` default
    to the decode of the output ids; ``finish_reasons`` to "unknown". Prompts must be
    non-empty; an empty output gives empty arrays."""
    n = len(pairs)
    texts = list(texts) if texts is not None else [None] * n
    finish = list(finish_reasons) if finish_reasons is not None else ["unknown"] * n
    if len(texts) != n or len(finish) != n:
        raise ValueError(f"force_many: {n} pairs, {len(texts)} texts, {len(finish)} reasons")
    if top_k < 1 or batch_size < 1:
        raise ValueError(f"force_many: top_k and batch_size must be >= 1 ({top_k}, {batch_size})")
    pre = [[int(t) for t in p] for p, _ in pairs]
    out_ids = [[int(t) for t in o] for _, o in pairs]
    vocab = lm.config.vocab_size
    for i, (p, o) in enumerate(zip(pre, out_ids, strict=True)):
        if not p:
            raise ValueError(f"force_many: prompt {i} is empty")
        bad = [t for t in p + o if not 0 <= t < vocab]
        if bad:
            raise ValueError(
                f"force_many: pair {i} has token ids outside 0..{vocab - 1}: {bad[:5]}"
            )
    k = min(top_k, vocab)
    chosen = [np.zeros(0, np.float32) for _ in pre]
    top = [np.zeros((0, k), np.float32) for _ in pre]
    top_ids = [np.zeros((0, k), np.int32) for _ in pre]
    for rows, width, params, batch in _forced_batches(lm, pre, out_ids, batch_size, mesh):
        block = min(width, FORCE_BLOCK)  # both powers of two up to 1024, then multiples
        got = jax.device_get(_forced(lm.graphdef, params, *batch, k, block))
        for r, i in enumerate(rows):
            m = len(out_ids[i])
            chosen[i] = np.asarray(got[0][r, :m], np.float32)
            top[i] = np.asarray(got[1][r, :m], np.float32)
            top_ids[i] = np.asarray(got[2][r, :m], np.int32)
    gens = []
    for i in range(n):
        text = texts[i]
        if text is None:
            text = (
                lm.tokenizer.decode(out_ids[i], skip_special_tokens=False) if lm.tokenizer else ""
            )
        gens.append(Generation(text, out_ids[i], chosen[i], top[i], top_ids[i], finish[i], pre[i]))
    return gens


def force(
    lm: LM,
    prompt_ids: Sequence[int],
    output_ids: Sequence[int],
    top_k: int = 5,
    *,
    text: str | None = None,
    finish_reason: str = "unknown",
    mesh=None,
) -> Generation:
    """``force_many`` for one trace: the ``Generation`` of ``output_ids`` after the prompt."""
    return force_many(
        lm,
        [(prompt_ids, output_ids)],
        top_k,
        1,
        texts=[text],
        finish_reasons=[finish_reason],
        mesh=mesh,
    )[0]


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
    for rows, _, params, batch in _forced_batches(lm, pre, cont, batch_size, mesh):
        logp = np.asarray(_continuation_logprobs(lm.graphdef, params, *batch))
        for r, i in enumerate(rows):
            out[i] = logp[r, : len(cont[i])].astype(np.float32)
    return out


def _forced_batches(lm: LM, pre, cont, batch_size: int, mesh):
    """The teacher-forced batches of the pairs with a non-empty continuation, grouped by
    length (fewer padded tokens): per batch (rows, width, replicated params, (tokens,
    lengths, positions, targets) on device), shapes bucketed as the module says."""
    todo = sorted((i for i in range(len(pre)) if cont[i]), key=lambda i: len(pre[i]) + len(cont[i]))
    mesh = mesh or mesh_lib.default_mesh()
    params = mesh_lib.replicate(lm.state, mesh)
    for start in range(0, len(todo), batch_size):
        rows = todo[start : start + batch_size]
        n_rows = _rows_bucket(len(rows), batch_size)
        seq = bucket(max(len(pre[i]) + len(cont[i]) for i in rows))
        width = bucket(max(len(cont[i]) for i in rows), minimum=8)
        batch = _forced_batch(pre, cont, rows, n_rows, seq, width)
        yield rows, width, params, tuple(jnp.asarray(a) for a in batch)


def _forced_batch(pre, cont, rows, n_rows: int, seq: int, width: int):
    """One teacher-forced batch: tokens [n_rows, seq] (prefix + continuation), lengths, and
    per continuation token the position whose logits predict it (len(prefix) + j - 1) and
    the token itself ([n_rows, width]); padding rows hold one token."""
    tokens = np.zeros((n_rows, seq), np.int32)
    lengths = np.ones((n_rows,), np.int32)
    positions = np.zeros((n_rows, width), np.int32)
    targets = np.zeros((n_rows, width), np.int32)
    for r, i in enumerate(rows):
        full = pre[i] + cont[i]
        tokens[r, : len(full)] = full
        lengths[r] = len(full)
        m = len(cont[i])
        positions[r, :m] = np.arange(len(pre[i]) - 1, len(pre[i]) - 1 + m)
        targets[r, :m] = cont[i]
    return tokens, lengths, positions, targets
