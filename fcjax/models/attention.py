"""Attention kernels for the two shapes the toolkit needs.

- ``prefill_attention``: causal self-attention over a right-padded block of tokens,
  chunked over queries so a long trace never materialises [seq, seq] scores at once.
- ``decode_attention``: one new token per row attending to a shared *context* cache (a
  prompt, or a whole trace shared by many branch rows), to the row's *own* cache of tokens
  it generated, and to itself. Rows are grouped as [contexts, rows_per_context], so a trace
  that many branches read is stored once.

Grouped-query attention reshapes queries to [.., kv_heads, groups, head_dim]; K/V are never
repeated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30
PREFILL_QUERY_CHUNK = 512


def _softmax(scores: jnp.ndarray) -> jnp.ndarray:
    scores = scores.astype(jnp.float32)
    scores = scores - jnp.max(scores, axis=-1, keepdims=True)
    weights = jnp.exp(scores)
    return weights / jnp.sum(weights, axis=-1, keepdims=True)


def prefill_attention(
    q: jnp.ndarray,  # [batch, seq, heads, head_dim]
    k: jnp.ndarray,  # [batch, seq, kv_heads, head_dim]
    v: jnp.ndarray,  # [batch, seq, kv_heads, head_dim]
    lengths: jnp.ndarray,  # [batch] valid tokens per row (right padding)
    *,
    precision=None,
) -> jnp.ndarray:
    """Causal attention, masked to each row's valid length; returns [batch, seq, heads, hd]."""
    batch, seq, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    scale = head_dim**-0.5
    q = q.reshape(batch, seq, kv_heads, groups, head_dim)
    key_pos = jnp.arange(seq)
    key_ok = key_pos[None, :] < lengths[:, None]  # [batch, seq]

    def attend(q_chunk, q_pos):
        # q_chunk [batch, chunk, kv, g, hd]; q_pos [chunk]
        scores = jnp.einsum("btkgh,bskh->bkgts", q_chunk, k, precision=precision) * scale
        mask = (key_pos[None, :] <= q_pos[:, None])[None] & key_ok[:, None, :]  # [b, t, s]
        scores = jnp.where(mask[:, None, None], scores, NEG_INF)
        weights = _softmax(scores).astype(v.dtype)
        return jnp.einsum("bkgts,bskh->btkgh", weights, v, precision=precision)

    chunk = PREFILL_QUERY_CHUNK
    if seq <= chunk or seq % chunk:
        out = attend(q, key_pos)
    else:
        n = seq // chunk
        q_chunks = q.reshape(batch, n, chunk, kv_heads, groups, head_dim).swapaxes(0, 1)
        pos_chunks = key_pos.reshape(n, chunk)
        out = jax.lax.map(lambda a: attend(*a), (q_chunks, pos_chunks))
        out = out.swapaxes(0, 1).reshape(batch, seq, kv_heads, groups, head_dim)
    return out.reshape(batch, seq, heads, head_dim)


def decode_attention(
    q: jnp.ndarray,  # [ctx, rows, heads, head_dim] one new token per row
    k_new: jnp.ndarray,  # [ctx, rows, kv_heads, head_dim]
    v_new: jnp.ndarray,  # [ctx, rows, kv_heads, head_dim]
    ctx_k: jnp.ndarray,  # [ctx, ctx_len, kv_heads, head_dim] shared by the ctx's rows
    ctx_v: jnp.ndarray,
    ctx_valid: jnp.ndarray,  # [ctx, rows] how many context positions each row sees
    own_k: jnp.ndarray,  # [ctx, rows, new, kv_heads, head_dim] this row's earlier tokens
    own_v: jnp.ndarray,
    own_valid: jnp.ndarray,  # [] or [ctx, rows]: how many own positions are filled
    *,
    precision=None,
) -> jnp.ndarray:
    """Returns [ctx, rows, heads, head_dim]."""
    n_ctx, rows, heads, head_dim = q.shape
    kv_heads = k_new.shape[2]
    groups = heads // kv_heads
    scale = head_dim**-0.5
    q = q.reshape(n_ctx, rows, kv_heads, groups, head_dim)

    s_ctx = jnp.einsum("brkgh,bskh->brkgs", q, ctx_k, precision=precision) * scale
    ctx_ok = jnp.arange(ctx_k.shape[1])[None, None, :] < ctx_valid[..., None]  # [b, r, s]
    s_ctx = jnp.where(ctx_ok[:, :, None, None], s_ctx, NEG_INF)

    s_own = jnp.einsum("brkgh,brnkh->brkgn", q, own_k, precision=precision) * scale
    own_valid = jnp.broadcast_to(own_valid, (n_ctx, rows))
    own_ok = jnp.arange(own_k.shape[2])[None, None, :] < own_valid[..., None]
    s_own = jnp.where(own_ok[:, :, None, None], s_own, NEG_INF)

    s_self = jnp.einsum("brkgh,brkh->brkg", q, k_new, precision=precision)[..., None] * scale

    weights = _softmax(jnp.concatenate([s_ctx, s_own, s_self], axis=-1)).astype(v_new.dtype)
    n_c, n_o = ctx_k.shape[1], own_k.shape[2]
    w_ctx, w_own, w_self = weights[..., :n_c], weights[..., n_c : n_c + n_o], weights[..., -1]
    out = jnp.einsum("brkgs,bskh->brkgh", w_ctx, ctx_v, precision=precision)
    out += jnp.einsum("brkgn,brnkh->brkgh", w_own, own_v, precision=precision)
    out += w_self[..., None] * v_new[:, :, :, None, :]
    return out.reshape(n_ctx, rows, heads, head_dim)
