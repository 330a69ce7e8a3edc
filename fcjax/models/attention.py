"""Attention for the two shapes the toolkit needs.

- ``prefill_attention``: causal self-attention over a right-padded block of tokens: on GPU in
  16-bit dtypes ``jax.nn.dot_product_attention`` with cuDNN's flash kernel and sequence
  lengths; elsewhere (and as the tested reference) an XLA path over chunks of queries, the
  sequence padded to whole chunks, so a long trace never holds [seq, seq] scores.
- ``decode_attention``: one new token per row, rows grouped as [contexts, rows]. Every row
  attends to a prefix of its context's cache (a prompt, or a trace that many branch rows
  share) and to its own cache of generated tokens (itself included). It is cascade attention
  with an online softmax: each context block is read once for all rows of that context, the
  own blocks once per row, and the parts merge by log-sum-exp. Two ways to read the caches
  (``reads``): ``live`` loops over blocks up to the batch's longest live length (trip counts
  are traced values: free on CPU, but on GPU every iteration sends its predicate to the host);
  ``full`` reads every position once, masked, with static shapes and no loop. By default
  (``auto``) a program lowered for a GPU reads ``full`` and any other reads ``live``.

- ``extend_attention``: several new tokens per row at once (teacher forcing after a cut):
  each row's tokens attend to a prefix of its context's cache and causally to each other.

KV caches are laid out batch-first per layer, ``[contexts, kv_heads, seq, head_dim]`` and
``[contexts * rows, kv_heads, new, head_dim]``, so no step transposes them. Grouped-query
attention groups the queries by KV head, batch axes first ([.., kv_heads, queries x groups,
head_dim]: one batched product per KV head); K/V are never repeated.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

NEG_INF = -1e30
PREFILL_QUERY_CHUNK = 512
BLOCKS = 8  # a decode cache is read in about this many blocks ...
MIN_BLOCK = 64  # ... of at least this many positions
KEY_BLOCK = 64  # keys per tile of the Pallas kernels (a power of two: Triton)
READS = ("auto", "live", "full")


def dot(spec: str, a: jnp.ndarray, b: jnp.ndarray, *, precision=None, dtype=None) -> jnp.ndarray:
    """``jnp.einsum(spec, a, b)`` accumulated in float32, returned in ``dtype`` (default:
    the operands' promoted dtype, as ``jnp.einsum``): a product's usual rounding, in the form
    matrix units run natively for bfloat16 (AMX, tensor cores). XLA:CPU runs a bfloat16
    product with float32 output about six times as fast as one with bfloat16 output
    (4096 x 576 x 1536 on AMX: 262 vs 43 GFLOP/s); for float32 it is ``jnp.einsum``."""
    out = jnp.einsum(spec, a, b, precision=precision, preferred_element_type=jnp.float32)
    return out.astype(dtype or jnp.result_type(a, b))


def block_size(length: int) -> int:
    """Positions per block of the ``live`` decode attention over a cache of ``length``
    positions (the engine's buckets: powers of two, then multiples of 1024): small enough
    that a short prefix in a long cache reads little past its end, large enough to keep
    loops short."""
    block = max(MIN_BLOCK, length // BLOCKS)
    return block if length % block == 0 else length


# prefill through cuDNN's fused attention on a GPU in half precision (``disable_cudnn_prefill``
# turns it off for the process, e.g. after a failed smoke test)
_CUDNN_PREFILL = {"enabled": True}


def disable_cudnn_prefill() -> None:
    """Prefill with the XLA attention from now on, in this process."""
    _CUDNN_PREFILL["enabled"] = False


def _use_cudnn(q: jnp.ndarray) -> bool:
    return (
        _CUDNN_PREFILL["enabled"]
        and jax.default_backend() == "gpu"
        and q.dtype in (jnp.bfloat16, jnp.float16)
    )


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
    groups = heads // kv_heads
    q = q.reshape(batch, seq, kv_heads, groups, head_dim)
    # batch axes (row, KV head) first, a chunk's groups x queries one axis: one batched
    # matrix product per (row, KV head); on XLA:CPU this attention takes about 64% of the
    # time it took with the KV head between other axes (8 x 512 tokens, SmolLM2's heads)
    k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)  # [batch, kv, seq, hd]
    key_pos = jnp.arange(seq)
    key_ok = key_pos[None, :] < lengths[:, None]  # [batch, seq]

    def attend(q_chunk, q_pos):  # q_chunk [batch, chunk, kv, groups, hd]; q_pos [chunk]
        t = q_chunk.shape[1]
        qm = q_chunk.transpose(0, 2, 3, 1, 4).reshape(batch, kv_heads, groups * t, head_dim)
        scores = dot("bkmh,bksh->bkms", qm, k, precision=precision)
        scores = scores.reshape(batch, kv_heads, groups, t, seq) * head_dim**-0.5
        mask = (key_pos[None, :] <= q_pos[:, None])[None] & key_ok[:, None, :]  # [b, t, s]
        scores = jnp.where(mask[:, None, None], scores, NEG_INF).astype(jnp.float32)
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        weights = weights.reshape(batch, kv_heads, groups * t, seq)
        out = dot("bkms,bksh->bkmh", weights, v, precision=precision)
        return out.reshape(batch, kv_heads, groups, t, head_dim).transpose(0, 3, 1, 2, 4)

    chunk = PREFILL_QUERY_CHUNK
    if seq <= chunk:
        out = attend(q, key_pos)
    else:  # queries padded to whole chunks (the padding's rows are dropped)
        n = -(-seq // chunk)
        q = jnp.pad(q, ((0, 0), (0, n * chunk - seq)) + ((0, 0),) * 3)
        q_chunks = q.reshape(batch, n, chunk, *q.shape[2:]).swapaxes(0, 1)
        q_pos = jnp.arange(n * chunk).reshape(n, chunk)
        out = jax.lax.map(lambda a: attend(*a), (q_chunks, q_pos))
        out = out.swapaxes(0, 1).reshape(batch, n * chunk, *q.shape[2:])[:, :seq]
    return out.reshape(batch, seq, heads, head_dim)


def decode_attention(
    q: jnp.ndarray,  # [ctx, rows, heads, head_dim] one new token per row
    ctx_k: jnp.ndarray,  # [ctx, kv_heads, ctx_len, head_dim] shared by the ctx's rows
    ctx_v: jnp.ndarray,
    ctx_valid: jnp.ndarray,  # [ctx, rows] how many context positions each row sees
    own_k: jnp.ndarray,  # [ctx * rows, kv_heads, new, head_dim] the rows' tokens, new included
    own_v: jnp.ndarray,
    own_valid: jnp.ndarray,  # [ctx, rows] how many own tokens the row has (>= 1)
    own_end: jnp.ndarray,  # [] ring slot after the newest token (mod new)
    *,
    precision=None,
    reads: str = "auto",
) -> jnp.ndarray:
    """Returns [ctx, rows, heads, head_dim] (the value dtype).

    The own cache is a ring every row writes at the same slot each step (the caller writes
    the new token first), so a row's ``own_valid`` tokens are the slots just before
    ``own_end`` (mod ``new``). ``reads`` (``READS``): ``live`` reads the blocks of the
    longest row's window only, ``full`` every block; ``auto`` chooses by the platform the
    program is lowered for.
    """
    args = (q, ctx_k, ctx_v, ctx_valid, own_k, own_v, own_valid, own_end)
    if reads == "auto":
        path = functools.partial(decode_attention, precision=precision)
        full, live = (functools.partial(path, reads=r) for r in ("full", "live"))
        return jax.lax.platform_dependent(*args, cuda=full, rocm=full, default=live)
    if reads not in READS:
        raise ValueError(f"reads must be one of {', '.join(READS)}, got {reads!r}")
    live = reads == "live"
    n_ctx, rows, heads, head_dim = q.shape
    kv_heads = ctx_k.shape[1]
    groups = heads // kv_heads
    q = q.reshape(n_ctx, rows, kv_heads, groups, head_dim) * head_dim**-0.5
    f32 = jnp.float32

    def merge(carry, s, values, spec):
        m, l, acc = carry
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        p = jnp.exp(s - m_new[..., None])
        scale = jnp.exp(m - m_new)
        pv = jnp.einsum(
            spec, p.astype(values.dtype), values, precision=precision, preferred_element_type=f32
        )
        return m_new, l * scale + jnp.sum(p, axis=-1), acc * scale[..., None] + pv

    def blocks(carry, q, cache_k, cache_v, block, first, n_blocks, mask, specs):
        """Merges blocks first, first + 1, ... (mod the cache's blocks) of a cache whose
        positions are its axis -2; ``mask(s, positions)`` keeps each query's positions of
        the block's scores s. ``live``: ``n_blocks`` of them; else the whole cache at once."""
        size = cache_k.shape[-2]
        if not live:
            block, first, n_blocks = size, 0, 1
        total = size // block

        def body(i, carry):
            start = (first + i) % total * block
            kb = jax.lax.dynamic_slice_in_dim(cache_k, start, block, cache_k.ndim - 2)
            vb = jax.lax.dynamic_slice_in_dim(cache_v, start, block, cache_v.ndim - 2)
            s = jnp.einsum(specs[0], q, kb, precision=precision, preferred_element_type=f32)
            return merge(carry, mask(s, start + jnp.arange(block)), vb, specs[1])

        if not live:
            return body(0, carry)
        return jax.lax.fori_loop(0, jnp.minimum(n_blocks, total), body, carry)

    # the running softmax (max m, sum l, weighted values acc) over the context: positions
    # [0, ctx_valid) of the row's context, in blocks up to the longest row's. A context's
    # rows and query groups are one axis (m = rows x groups) behind the batch axes (context,
    # KV head), so every block is one batched matrix product per (context, KV head): XLA:CPU
    # runs that product about twice as fast as one with the rows between the batch axes
    qc = q.transpose(0, 2, 1, 3, 4).reshape(n_ctx, kv_heads, rows * groups, head_dim)

    def ctx_mask(s, pos):  # s [c, k, rows x groups, block]
        ok = pos < ctx_valid[..., None]  # [c, rows, block]
        s = s.reshape(n_ctx, kv_heads, rows, groups, -1)
        return jnp.where(ok[:, None, :, None], s, NEG_INF).reshape((*qc.shape[:-1], -1))

    m = jnp.full(qc.shape[:-1], NEG_INF, f32)
    carry = (m, jnp.zeros_like(m), jnp.zeros(qc.shape, f32))
    ctx_len, new = ctx_k.shape[2], own_k.shape[2]
    blk = block_size(ctx_len)
    carry = blocks(
        carry, qc, ctx_k, ctx_v, blk, 0, (jnp.max(ctx_valid) + blk - 1) // blk, ctx_mask,
        ("ckmh,cksh->ckms", "ckms,cksh->ckmh"),
    )  # fmt: skip
    # then over the own ring, rows flattened (batch axes: row, KV head): the window of the
    # longest row ends at own_end
    flat = n_ctx * rows

    def per_row(x):  # [c, k, rows x groups, ...] -> [c x rows, k, groups, ...]
        x = x.reshape(n_ctx, kv_heads, rows, groups, *x.shape[3:])
        return jnp.moveaxis(x, 2, 1).reshape(flat, kv_heads, groups, *x.shape[4:])

    carry = tuple(map(per_row, carry))
    own_valid = own_valid.reshape(flat)
    blk = block_size(new)
    longest = jnp.max(own_valid)
    start = (own_end - longest) % new

    def own_mask(s, pos):  # s [c x rows, k, groups, block]
        ok = (own_end - 1 - pos) % new < own_valid[..., None]
        return jnp.where(ok[:, None, None], s, NEG_INF)

    carry = blocks(
        carry, q.reshape(flat, kv_heads, groups, head_dim), own_k, own_v, blk, start // blk,
        (start % blk + longest + blk - 1) // blk, own_mask,
        ("bkgh,bksh->bkgs", "bkgs,bksh->bkgh"),
    )  # fmt: skip
    _, l, acc = carry  # l = 0 only where nothing was read (no live row): zeros, not 0 / 0
    out = acc / jnp.maximum(l, jnp.finfo(f32).tiny)[..., None]
    return out.reshape(n_ctx, rows, heads, head_dim).astype(own_v.dtype)


def extend_attention(
    q: jnp.ndarray,  # [ctx, rows, new, heads, head_dim] the rows' new tokens
    ctx_k: jnp.ndarray,  # [ctx, kv_heads, ctx_len, head_dim] shared by the ctx's rows
    ctx_v: jnp.ndarray,
    ctx_valid: jnp.ndarray,  # [ctx, rows] how many context positions each row sees
    k: jnp.ndarray,  # [ctx, rows, new, kv_heads, head_dim] the new tokens' own K/V
    v: jnp.ndarray,
    *,
    precision=None,
) -> jnp.ndarray:
    """Returns [ctx, rows, new, heads, head_dim] (the value dtype): token j of a row attends
    to context positions [0, ctx_valid) and to the row's new tokens 0..j, one softmax over
    both. Scores are [.., new, ctx_len]: meant for a few new tokens per row."""
    n_ctx, rows, new, heads, head_dim = q.shape
    kv_heads, ctx_len = ctx_k.shape[1], ctx_k.shape[2]
    q = q.reshape(n_ctx, rows, new, kv_heads, heads // kv_heads, head_dim) * head_dim**-0.5
    f32 = jnp.float32
    s_ctx = jnp.einsum(
        "crnkgh,cksh->crkgns", q, ctx_k, precision=precision, preferred_element_type=f32
    )
    seen = jnp.arange(ctx_len) < ctx_valid[..., None]  # [ctx, rows, ctx_len]
    s_ctx = jnp.where(seen[:, :, None, None, None, :], s_ctx, NEG_INF)
    s_own = jnp.einsum(
        "crnkgh,crmkh->crkgnm", q, k, precision=precision, preferred_element_type=f32
    )
    causal = jnp.arange(new)[:, None] >= jnp.arange(new)[None, :]  # [new, new]
    s_own = jnp.where(causal, s_own, NEG_INF)
    weights = jax.nn.softmax(jnp.concatenate([s_ctx, s_own], axis=-1), axis=-1).astype(v.dtype)
    out = dot("crkgns,cksh->crnkgh", weights[..., :ctx_len], ctx_v, precision=precision) + dot(
        "crkgnm,crmkh->crnkgh", weights[..., ctx_len:], v, precision=precision
    )
    return out.reshape(n_ctx, rows, new, heads, head_dim).astype(v.dtype)
