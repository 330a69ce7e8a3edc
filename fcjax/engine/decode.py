"""The jitted prefill and decode loop shared by ``generate`` and ``branch``.

Rows are laid out as [contexts, rows_per_context]. ``generate`` has one row per prompt
(``[prompts, 1]``); ``branch`` has one context (the trace) and cuts x k rows that all read it.
Each row sees ``ctx_valid`` positions of its context and then its own generated tokens, whose
K/V live in a small per-row cache of ``max_new`` slots. Nothing leaves the device per token:
the loop runs ``lax.while_loop`` chunks of many steps and the host looks in only between
chunks (to apply stop strings and report progress).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from fcjax.engine.sampling import Sampler, logprob_stats, sample


class DecodeState(NamedTuple):
    t: jnp.ndarray  # [] next own-cache slot to fill
    logits: jnp.ndarray  # [ctx, rows, vocab] float32 for the token about to be sampled
    own_k: jnp.ndarray  # [layers, ctx, rows, max_new, kv_heads, head_dim]
    own_v: jnp.ndarray
    tokens: jnp.ndarray  # [ctx, rows, max_new] int32
    chosen: jnp.ndarray  # [ctx, rows, max_new] float32 log-probability of each token
    top_lp: jnp.ndarray  # [ctx, rows, max_new, k] float32
    top_ids: jnp.ndarray  # [ctx, rows, max_new, k] int32
    n_gen: jnp.ndarray  # [ctx, rows] tokens generated (an EOS included)
    done: jnp.ndarray  # [ctx, rows] bool
    keys: jnp.ndarray  # [ctx, rows, 2] per-row base keys


@functools.partial(jax.jit, static_argnums=0)
def prefill_context(graphdef, state, tokens, lengths, read_pos):
    """Prefills contexts [ctx, seq] and returns their K/V plus the logits at ``read_pos``
    [ctx, rows] (the last position each row has seen), which seed the first sampled token."""
    model = nnx.merge(graphdef, state)
    out = model.prefill(tokens, lengths)
    h = jnp.take_along_axis(out.normed, read_pos[..., None], axis=1)
    return out.k, out.v, model.unembed(h)


def init_state(config, ctx_k, first_logits, keys, active, max_new: int, k: int) -> DecodeState:
    n_ctx, rows = first_logits.shape[:2]
    layers, kv, hd = config.num_layers, config.num_kv_heads, config.head_dim
    own_shape = (layers, n_ctx, rows, max_new, kv, hd)
    return DecodeState(
        t=jnp.zeros((), jnp.int32),
        logits=first_logits,
        own_k=jnp.zeros(own_shape, ctx_k.dtype),
        own_v=jnp.zeros(own_shape, ctx_k.dtype),
        tokens=jnp.zeros((n_ctx, rows, max_new), jnp.int32),
        chosen=jnp.zeros((n_ctx, rows, max_new), jnp.float32),
        top_lp=jnp.zeros((n_ctx, rows, max_new, k), jnp.float32),
        top_ids=jnp.zeros((n_ctx, rows, max_new, k), jnp.int32),
        n_gen=jnp.zeros((n_ctx, rows), jnp.int32),
        done=~active,
        keys=keys,
    )


def _write(buf: jnp.ndarray, value: jnp.ndarray, t, axis: int) -> jnp.ndarray:
    return jax.lax.dynamic_update_index_in_dim(buf, value.astype(buf.dtype), t, axis)


@functools.partial(
    jax.jit, static_argnames=("graphdef", "sampler", "eos", "window"), donate_argnames=("st",)
)
def decode_chunk(
    graphdef,
    params,
    ctx_k,
    ctx_v,
    ctx_valid,
    limit,
    st: DecodeState,
    steps,
    *,
    sampler: Sampler,
    eos: tuple[int, ...],
    window: int | None = None,
) -> DecodeState:
    """Samples up to ``steps`` more tokens (at most ``limit`` in all) for unfinished rows.

    Attention reads only the first ``window`` own-cache slots (static; the chunk never goes
    past it), so early steps of a long generation do not read the whole own cache: the host
    grows the window in powers of two, one compiled program per window.
    """
    model = nnx.merge(graphdef, params)
    n_ctx, rows, max_new = st.tokens.shape
    window = max_new if window is None else min(window, max_new)
    eos_ids = jnp.asarray(eos if eos else (-1,), jnp.int32)
    stop_t = jnp.minimum(st.t + steps, jnp.minimum(jnp.minimum(limit, max_new), window))

    def cond(s: DecodeState):
        return (s.t < stop_t) & ~jnp.all(s.done)

    def body(s: DecodeState) -> DecodeState:
        t = s.t
        flat_logits = s.logits.reshape(n_ctx * rows, -1)
        step_keys = jax.vmap(jax.random.fold_in, (0, None))(s.keys.reshape(-1, 2), t)
        tok = sample(flat_logits, step_keys, sampler)
        chosen, top_lp, top_ids = logprob_stats(flat_logits, tok, sampler.logprobs)
        active = ~s.done
        tok = jnp.where(active, tok.reshape(n_ctx, rows), 0)
        finished = active & (jnp.isin(tok, eos_ids) | (t + 1 >= limit))
        own_k, own_v = s.own_k[:, :, :, :window], s.own_v[:, :, :, :window]
        out = model.decode(tok, ctx_valid + t, ctx_k, ctx_v, ctx_valid, own_k, own_v, t)
        return DecodeState(
            t=t + 1,
            logits=model.unembed(out.normed),
            own_k=_write(s.own_k, out.k, t, axis=3),
            own_v=_write(s.own_v, out.v, t, axis=3),
            tokens=_write(s.tokens, tok, t, axis=2),
            chosen=_write(s.chosen, chosen.reshape(n_ctx, rows), t, axis=2),
            top_lp=_write(s.top_lp, top_lp.reshape(n_ctx, rows, -1), t, axis=2),
            top_ids=_write(s.top_ids, top_ids.reshape(n_ctx, rows, -1), t, axis=2),
            n_gen=s.n_gen + active.astype(jnp.int32),
            done=s.done | finished,
            keys=s.keys,
        )

    return jax.lax.while_loop(cond, body, st)
