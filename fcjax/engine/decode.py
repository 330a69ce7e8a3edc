"""The device side of the engine: a slot pool, prefill into it, and fixed-length decode
chunks.

The pool has ``contexts x rows`` row slots. A context slot holds one shared prefix (a prompt
for ``generate``; a whole trace that many branch rows read, for ``branch``); each of its row
slots holds one continuation being sampled, which sees the first ``ctx_valid`` positions of
its context and then its own tokens. Between chunks the host refills finished row slots (and
context slots whose rows are all done) from its queue (``fcjax.engine.generate``), so a
batch never waits for its longest row.

Per layer the caches are batch-first, ``ctx_k [contexts, kv_heads, ctx_len, head_dim]`` and
``own_k [contexts * rows, kv_heads, new, head_dim]`` (a ring), donated and written in place. A chunk
runs a fixed number of steps (no data-dependent loop); rows that finish stop writing but keep
their slot until the host refills it. Every row's random stream is folded from its own key
and its own token index, so a token does not depend on the slot, the chunk or the batch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from fcjax.engine.mesh import pool_sharding
from fcjax.engine.sampling import Sampler, row_keys, sample_step
from fcjax.models.decoder import KVCache
from fcjax.models.lm import XLA_OPTIONS


@dataclasses.dataclass(frozen=True)
class Layout:
    """Static shape of a slot pool (one compiled program per layout)."""

    contexts: int
    rows: int  # row slots per context
    ctx_len: int  # context positions per context slot
    new: int  # own-cache positions per row (>= max_new_tokens)
    reads: int  # positions per context whose hidden state seeds a row's first token


class Pool(NamedTuple):
    """Device state of the slot pool."""

    cache: KVCache
    ctx_h: jnp.ndarray  # [contexts, reads, embed] final-norm hidden at the read positions
    normed: jnp.ndarray  # [contexts, rows, embed] final-norm hidden that predicts the next token
    n_own: jnp.ndarray  # [contexts, rows] tokens the row has generated (own-cache fill)
    ctx_valid: jnp.ndarray  # [contexts, rows]
    done: jnp.ndarray  # [contexts, rows] bool
    keys: jnp.ndarray  # [contexts, rows, 2] per-row base keys
    tail: jnp.ndarray  # [contexts, rows] uint32 stop-string prefixes the last token ends with
    t: jnp.ndarray  # [] steps run: every row writes own-cache ring slot t % new


class Refill(NamedTuple):
    """Row slots to (re)start at the next chunk, [contexts, rows] each."""

    start: jnp.ndarray  # bool: this slot starts a new row
    read: jnp.ndarray  # int32: index into the context's read positions (its first token)
    ctx_valid: jnp.ndarray  # int32
    ident: jnp.ndarray  # [contexts, rows, IDENT_WORDS] uint32 (``sampling.row_ident``)


class StopTables(NamedTuple):
    """Token-level end detection (``fcjax.engine.stops``): the token is an end-of-sequence
    id (``eos``), or it contains a stop string, or the previous token ends with a stop's
    first j characters (bit j of ``tail``) and this one starts with its remaining characters
    (bit j of ``head``). Data, not constants: every EOS set and stop list shares a program."""

    eos: jnp.ndarray  # [vocab] bool
    contains: jnp.ndarray  # [vocab] bool
    head: jnp.ndarray  # [vocab] uint32
    tail: jnp.ndarray  # [vocab] uint32


STOP_DTYPES = StopTables(bool, bool, jnp.uint32, jnp.uint32)  # each table's dtype


class ChunkOut(NamedTuple):
    """What the host reads back after a chunk (small: no caches, no logits)."""

    tokens: jnp.ndarray  # [contexts, rows, steps] int32
    chosen: jnp.ndarray  # [contexts, rows, steps] float32
    top_lp: jnp.ndarray  # [contexts, rows, steps, k] float32
    top_ids: jnp.ndarray  # [contexts, rows, steps, k] int32
    emitted: jnp.ndarray  # [contexts, rows, steps] bool: the row produced this token
    done: jnp.ndarray  # [contexts, rows] bool after the chunk
    stopped: jnp.ndarray  # [contexts, rows] bool: finished on a stop string


def zeros_pool(config, layout: Layout, dtype) -> Pool:
    c, r = layout.contexts, layout.rows
    kv, hd = config.num_kv_heads, config.head_dim
    layers = range(config.num_layers)
    ctx = tuple(jnp.zeros((c, kv, layout.ctx_len, hd), dtype) for _ in layers)
    ctx_v = tuple(jnp.zeros((c, kv, layout.ctx_len, hd), dtype) for _ in layers)
    own = tuple(jnp.zeros((c * r, kv, layout.new, hd), dtype) for _ in layers)
    own_v = tuple(jnp.zeros((c * r, kv, layout.new, hd), dtype) for _ in layers)
    return Pool(
        cache=KVCache(ctx, ctx_v, own, own_v),
        ctx_h=jnp.zeros((c, layout.reads, config.hidden_size), dtype),
        normed=jnp.zeros((c, r, config.hidden_size), dtype),
        n_own=jnp.zeros((c, r), jnp.int32),
        ctx_valid=jnp.ones((c, r), jnp.int32),
        done=jnp.ones((c, r), bool),
        keys=jnp.zeros((c, r, 2), jnp.uint32),
        tail=jnp.zeros((c, r), jnp.uint32),
        t=jnp.zeros((), jnp.int32),
    )


def pool_shardings(config, layout: Layout, dtype, mesh, row_axis: int):
    """Shardings of a pool: the ``data`` mesh axis over contexts (``row_axis`` 0) or over the
    row slots of each context (1, when a few long contexts carry many rows each); the
    caches' KV heads over ``model`` (``fcjax.engine.mesh.pool_sharding``)."""
    shapes = jax.eval_shape(lambda: zeros_pool(config, layout, dtype))
    return jax.tree_util.tree_map_with_path(
        lambda path, x: pool_sharding(config, mesh, row_axis, path, x), shapes
    )


@functools.lru_cache(maxsize=16)
def _pool_factory(config, layout: Layout, dtype, mesh, row_axis: int):
    shardings = pool_shardings(config, layout, dtype, mesh, row_axis)
    return jax.jit(lambda: zeros_pool(config, layout, dtype), out_shardings=shardings)


def init_pool(config, layout: Layout, dtype, mesh, row_axis: int) -> Pool:
    """A zeroed pool created on the devices, already sharded."""
    return _pool_factory(config, layout, jnp.dtype(dtype), mesh, row_axis)()


@functools.partial(
    jax.jit, static_argnums=0, donate_argnames=("pool",), compiler_options=XLA_OPTIONS
)
def prefill_into(graphdef, params, pool: Pool, tokens, lengths, read_pos, slots) -> Pool:
    """Prefills contexts ``tokens`` [n, width] (right padded to ``lengths``; ``width`` at
    most the pool's ``ctx_len``, the cache past it zeroed) into the context slots ``slots``
    [n] (an out-of-range slot drops its row: padding), keeping the final-norm hidden state at
    ``read_pos`` [n, reads]."""
    model = nnx.merge(graphdef, params)
    out = model.prefill(tokens, lengths)
    h = jnp.take_along_axis(out.normed, read_pos[..., None], axis=1).astype(pool.ctx_h.dtype)

    def put(buf, value):  # value [n, kv_heads, width, hd] or [n, reads, D]
        pad = [(0, b - v) for b, v in zip(buf.shape[1:], value.shape[1:], strict=True)]
        value = jnp.pad(value.astype(buf.dtype), [(0, 0), *pad])
        return buf.at[slots].set(value, mode="drop")

    cache = pool.cache._replace(
        ctx_k=tuple(map(put, pool.cache.ctx_k, out.k)),
        ctx_v=tuple(map(put, pool.cache.ctx_v, out.v)),
    )
    return pool._replace(cache=cache, ctx_h=put(pool.ctx_h, h))


def decode_step(model, pool: Pool, stops: StopTables, limit, sampler: Sampler):
    """Samples one token for every unfinished row and advances it; returns the new pool and
    the step's (token, chosen, top_lp, top_ids, emitted, stopped)."""
    n_ctx, rows = pool.n_own.shape
    logits = model.unembed(pool.normed).reshape(n_ctx * rows, -1)  # never stored
    active = ~pool.done
    step_keys = jax.vmap(jax.random.fold_in)(pool.keys.reshape(-1, 2), pool.n_own.reshape(-1))
    tok, chosen, top_lp, top_ids = sample_step(logits, step_keys, sampler)
    tok = jnp.where(active, tok.reshape(n_ctx, rows), 0)
    stopped = active & (stops.contains[tok] | ((pool.tail & stops.head[tok]) != 0))
    n_own = pool.n_own + active.astype(jnp.int32)
    finished = active & (stops.eos[tok] | stopped | (n_own >= limit))
    slot = pool.t % pool.cache.own_k[0].shape[2]
    # finished rows attend to nothing but their new token, so reads that stop at the longest
    # live prefix (the XLA path off GPU, the Pallas kernels) skip idle slots' stale lengths
    live_ctx, live_own = jnp.where(active, pool.ctx_valid, 0), jnp.where(active, pool.n_own, 0)
    out = model.decode(tok, pool.ctx_valid + pool.n_own, pool.cache, live_ctx, live_own, slot)
    cache = pool.cache._replace(own_k=out.own_k, own_v=out.own_v)
    new = pool._replace(
        cache=cache,
        normed=out.normed.astype(pool.normed.dtype),
        n_own=n_own,
        done=pool.done | finished,
        tail=jnp.where(active, stops.tail[tok], pool.tail),
        t=pool.t + 1,
    )
    k = top_lp.shape[-1]
    step = (
        tok,
        chosen.reshape(n_ctx, rows),
        top_lp.reshape(n_ctx, rows, k),
        top_ids.reshape(n_ctx, rows, k),
        active,
        stopped,
    )
    return new, step


def _apply_refill(pool: Pool, refill: Refill, seed) -> Pool:
    start = refill.start
    ident = refill.ident.reshape(-1, refill.ident.shape[-1])
    keys = row_keys(seed, ident).reshape(pool.keys.shape)
    first = jnp.take_along_axis(pool.ctx_h, refill.read[..., None], axis=1)  # [ctx, rows, D]
    return pool._replace(
        normed=jnp.where(start[..., None], first, pool.normed),
        n_own=jnp.where(start, 0, pool.n_own),
        ctx_valid=jnp.where(start, refill.ctx_valid, pool.ctx_valid),
        done=jnp.where(start, False, pool.done),
        keys=jnp.where(start[..., None], keys, pool.keys),
        tail=jnp.where(start, jnp.uint32(0), pool.tail),
    )


def _take_slots(pool: Pool, slots) -> Pool:
    rows = pool.n_own.shape[1]
    flat = (slots[:, None] * rows + jnp.arange(rows)).reshape(-1)  # the own caches' rows

    def take(path, x):
        if not x.ndim:  # the step counter
            return x
        own = any(getattr(k, "name", None) in ("own_k", "own_v") for k in path)
        return x[flat if own else slots]

    return jax.tree_util.tree_map_with_path(take, pool)


@functools.lru_cache(maxsize=16)
def _shrinker(config, layout: Layout, dtype, mesh, row_axis: int):
    shardings = pool_shardings(config, layout, dtype, mesh, row_axis)
    return jax.jit(_take_slots, out_shardings=shardings)


def shrink_pool(config, layout: Layout, dtype, mesh, row_axis: int, pool: Pool, slots) -> Pool:
    """The pool of context slots ``slots`` (int32 [m], distinct) only, in that order, with
    their caches and row state, placed as a pool of ``layout`` (m contexts): once the queue
    has drained, the engine moves the live rows into a narrower pool (one copy) rather than
    compute the finished ones every step."""
    return _shrinker(config, layout, jnp.dtype(dtype), mesh, row_axis)(pool, slots)


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "steps"),
    donate_argnames=("pool",),
    compiler_options=XLA_OPTIONS,
)
def decode_chunk(
    graphdef,
    params,
    pool: Pool,
    refill: Refill,
    stops: StopTables,
    limit,
    seed,
    *,
    sampler,
    steps: int,
) -> tuple[Pool, ChunkOut]:
    """Starts the refilled rows (their keys from ``seed`` and each row's ident), then runs
    ``steps`` decode steps (rows stop at EOS, a stop string or ``limit`` tokens: ``stops``)."""
    model = nnx.merge(graphdef, params)
    pool = _apply_refill(pool, refill, seed)

    def body(pool, _):
        return decode_step(model, pool, stops, limit, sampler)

    pool, outs = jax.lax.scan(body, pool, None, length=steps)
    tok, chosen, top_lp, top_ids, emitted, stopped = outs

    def steps_last(x):  # [steps, c, r, ...] -> [c, r, steps, ...]
        return jnp.moveaxis(x, 0, 2)

    out = ChunkOut(
        tokens=steps_last(tok),
        chosen=steps_last(chosen).astype(jnp.float32),
        top_lp=steps_last(top_lp),
        top_ids=steps_last(top_ids),
        emitted=steps_last(emitted),
        done=pool.done,
        stopped=jnp.any(stopped, axis=0),
    )
    return pool, out
