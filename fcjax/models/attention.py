"""Attention for the two shapes the toolkit needs.

- ``prefill_attention``: causal self-attention over a right-padded block of tokens: on GPU in
  16-bit dtypes ``jax.nn.dot_product_attention`` with cuDNN's flash kernel and sequence
  lengths; elsewhere (and as the tested reference) an XLA path chunked over queries, so a
  long trace never holds [seq, seq] scores.
- ``decode_attention``: one new token per row, rows grouped as [contexts, rows]. Every row
  attends to a prefix of its context's cache (a prompt, or a trace that many branch rows
  share), to its own cache of generated tokens, and to itself. It is cascade attention with
  an online softmax: each context block is read once for all rows of that context, the own
  blocks once per row, and the three parts merge by log-sum-exp. Blocks past the longest live
  length are never read (the block loops run to the batch's longest prefix), and scores exist
  only one block at a time.

KV caches are laid out batch-first per layer, ``[contexts, kv_heads, seq, head_dim]`` and
``[contexts, rows, kv_heads, new, head_dim]``, so no step transposes them. Grouped-query
attention reshapes queries to [.., kv_heads, groups, head_dim]; K/V are never repeated.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NEG_INF = -1e30
PREFILL_QUERY_CHUNK = 512
CTX_BLOCK = 256  # context positions per block of decode attention
OWN_BLOCK = 128  # own-cache positions per block


def block_size(length: int, preferred: int) -> int:
    """The block used over a cache of ``length`` positions (a power of two or a multiple of
    ``preferred``, as the engine's buckets are)."""
    return preferred if length % preferred == 0 else length


def _use_cudnn(q: jnp.ndarray) -> bool:
    return jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)


def prefill_attention(
    q: jnp.ndarray,  # [batch, seq, heads, head_dim]
    k: jnp.ndarray,  # [batch, seq, kv_heads, head_dim]
    v: jnp.ndarray,  # [batch, seq, kv_heads, head_dim]
    lengths: jnp.ndarray,  # [batch] valid tokens per row (right padding)
    *,
    precision=None,
) -> jnp.ndarray:
    """Causal attention, masked to each row's valid length; returns [batch, seq, heads, hd]."""
    batch, seq = q.shape[:2]
    lengths = lengths.astype(jnp.int32)
    if _use_cudnn(q):
        return jax.nn.dot_product_attention(
            q,
            k,
            v,
            is_causal=True,
            query_seq_lengths=lengths,
            key_value_seq_lengths=lengths,
            implementation="cudnn",
        )
    heads, head_dim = q.shape[2:]
    kv_heads = k.shape[2]
    q = q.reshape(batch, seq, kv_heads, heads // kv_heads, head_dim)
    key_pos = jnp.arange(seq)
    key_ok = key_pos[None, :] < lengths[:, None]  # [batch, seq]

    def attend(q_chunk, q_pos):  # q_chunk [batch, chunk, kv, groups, hd]; q_pos [chunk]
        scores = jnp.einsum("btkgh,bskh->bkgts", q_chunk, k, precision=precision)
        scores = scores * head_dim**-0.5
        mask = (key_pos[None, :] <= q_pos[:, None])[None] & key_ok[:, None, :]  # [b, t, s]
        scores = jnp.where(mask[:, None, None], scores, NEG_INF).astype(jnp.float32)
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        return jnp.einsum("bkgts,bskh->btkgh", weights, v, precision=precision)

    chunk = PREFILL_QUERY_CHUNK
    if seq <= chunk or seq % chunk:
        out = attend(q, key_pos)
    else:
        n = seq // chunk
        q_chunks = q.reshape(batch, n, chunk, *q.shape[2:]).swapaxes(0, 1)
        out = jax.lax.map(lambda a: attend(*a), (q_chunks, key_pos.reshape(n, chunk)))
        out = out.swapaxes(0, 1)
    return out.reshape(batch, seq, heads, head_dim)


def decode_attention(
    q: jnp.ndarray,  # [ctx, rows, heads, head_dim] one new token per row
    k_new: jnp.ndarray,  # [ctx, rows, kv_heads, head_dim]
    v_new: jnp.ndarray,  # [ctx, rows, kv_heads, head_dim]
    ctx_k: jnp.ndarray,  # [ctx, kv_heads, ctx_len, head_dim] shared by the ctx's rows
    ctx_v: jnp.ndarray,
    ctx_valid: jnp.ndarray,  # [ctx, rows] how many context positions each row sees
    own_k: jnp.ndarray,  # [ctx, rows, kv_heads, new, head_dim] this row's earlier tokens
    own_v: jnp.ndarray,
    own_valid: jnp.ndarray,  # [ctx, rows] how many own positions are filled
    *,
    precision=None,
) -> jnp.ndarray:
    """Returns [ctx, rows, heads, head_dim] (the value dtype)."""
    n_ctx, rows, heads, head_dim = q.shape
    kv_heads = k_new.shape[2]
    q = q.reshape(n_ctx, rows, kv_heads, heads // kv_heads, head_dim) * head_dim**-0.5
    f32 = jnp.float32

    def scores(spec, k):
        return jnp.einsum(spec, q, k, precision=precision, preferred_element_type=f32)

    # the row's own new token starts the running softmax: max m, sum l, weighted values acc
    m = scores("crkgh,crkh->crkg", k_new)
    carry = (m, jnp.ones_like(m), jnp.broadcast_to(v_new[:, :, :, None].astype(f32), q.shape))

    def merge(carry, s, values, spec):
        m, l, acc = carry
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.exp(s - m_new[..., None])
        scale = jnp.exp(m - m_new)
        pv = jnp.einsum(
            spec, p.astype(values.dtype), values, precision=precision, preferred_element_type=f32
        )
        return m_new, l * scale + jnp.sum(p, axis=-1), acc * scale[..., None] + pv

    def blocks(carry, cache_k, cache_v, valid, axis, block, s_spec, v_spec):
        n_blocks = (jnp.max(valid) + block - 1) // block

        def body(b, carry):
            kb = jax.lax.dynamic_slice_in_dim(cache_k, b * block, block, axis)
            vb = jax.lax.dynamic_slice_in_dim(cache_v, b * block, block, axis)
            s = scores(s_spec, kb)
            ok = b * block + jnp.arange(block) < valid[..., None]  # [ctx, rows, block]
            s = jnp.where(ok[:, :, None, None], s, NEG_INF)
            return merge(carry, s, vb, v_spec)

        return jax.lax.fori_loop(0, n_blocks, body, carry)

    ctx_len, new = ctx_k.shape[2], own_k.shape[3]
    carry = blocks(
        carry,
        ctx_k,
        ctx_v,
        ctx_valid,
        2,
        block_size(ctx_len, CTX_BLOCK),
        "crkgh,cksh->crkgs",
        "crkgs,cksh->crkgh",
    )
    carry = blocks(
        carry,
        own_k,
        own_v,
        own_valid,
        3,
        block_size(new, OWN_BLOCK),
        "crkgh,crksh->crkgs",
        "crkgs,crksh->crkgh",
    )
    _, l, acc = carry
    return (acc / l[..., None]).reshape(n_ctx, rows, heads, head_dim).astype(v_new.dtype)
