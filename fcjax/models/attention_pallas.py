"""Decode attention as Pallas (Triton) kernels for GPU, behind ``decode_attention``'s
signature; ``fcjax.models.attention.decode_attention`` (XLA) is the tested reference.

The XLA path reads to the batch's longest row (or, on GPU, the whole cache). Here each
program reads only what its rows attend to, in tiles of ``KEY_BLOCK`` keys:

- context part, one program per (context, kv head, tile of the context's query rows, split
  of the sequence): the split's tiles up to the longest row *of that context*, read once for
  all its rows;
- own part, one program per (row, kv head, split): the split's share of the tiles of the
  row's own window of the ring.

The sequence splits (flash-decoding) keep the GPU busy when there are few rows: each program
returns its online-softmax state (max, sum, weighted values) and all the states merge by
log-sum-exp. The tile loops are software-pipelined (``STAGES``). ``interpret=True`` runs the
same kernels on any backend (the tests do, on CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from fcjax.models.attention import KEY_BLOCK, NEG_INF  # KEY_BLOCK: a power of two (Triton)

MIN_ROWS = 16  # query rows per program: tensor-core dots need at least 16
PROGRAMS = 264  # sequence splits until a part has about this many programs (2 per SM, H200)
STAGES = 3  # pipeline stages of the tile loops (K and V tiles in flight)


def _pow2(n: int) -> int:
    return max(MIN_ROWS, 1 << (max(n, 1) - 1).bit_length())


def _tile(length: int) -> int:
    """Keys per tile of a cache of ``length`` positions (whole tiles of a power of two)."""
    tile = min(KEY_BLOCK, length)
    if length % tile or tile & (tile - 1):
        raise ValueError(
            f"the Pallas decode attention needs cache lengths that are multiples of "
            f"{KEY_BLOCK} or powers of two below it, got {length}"
        )
    return tile


def splits(programs: int, tiles: int) -> int:
    """Sequence splits of a part with ``programs`` programs per split over ``tiles`` tiles:
    a power of two dividing ``tiles``, doubled while the part has under ``PROGRAMS``."""
    n = 1
    while programs * n < PROGRAMS and tiles % (2 * n) == 0:
        n *= 2
    return n


def _online_block(carry, q, k, v, ok, upcast):
    """One block of the online softmax: q [m, hd], k and v [blk, hd], ok [m, blk].
    ``upcast``: 16-bit operands go to float32 first (the CPU interpreter has no bf16 dot
    into float32; a product of two bf16 values is exact in float32, so only the summation
    order differs from the GPU's)."""
    m, l, acc = carry
    exact = q.dtype == jnp.float32  # no TF32 for float32 models (parity with the reference)
    if upcast:
        q, k, v = (x.astype(jnp.float32) for x in (q, k, v))
    s = plgpu.dot(q, k, trans_b=True, allow_tf32=not exact).astype(jnp.float32)
    s = jnp.where(ok, s, NEG_INF)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    p = jnp.exp(s - m_new[:, None])
    scale = jnp.exp(m - m_new)
    pv = plgpu.dot(p.astype(v.dtype), v, allow_tf32=not exact).astype(jnp.float32)
    return m_new, l * scale + jnp.sum(p, axis=-1), acc * scale[:, None] + pv


def _init(rows: int, head_dim: int):
    return (
        jnp.full((rows,), NEG_INF, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
        jnp.zeros((rows, head_dim), jnp.float32),
    )


def _store(refs, carry):
    for ref, x in zip(refs, carry, strict=True):
        ref[...] = x


def _context_kernel(valid_ref, q_ref, k_ref, v_ref, m_ref, l_ref, o_ref, *, block, upcast):
    """Rows of one context tile, one split of the sequence: positions [0, valid) of the
    context, in the split's tiles up to the tile's longest row."""
    q = q_ref[...]
    valid = valid_ref[...]  # [rows]
    rows, head_dim = q.shape
    per = k_ref.shape[0] // block // pl.num_programs(3)  # tiles per split
    first = pl.program_id(3) * per

    def body(i, carry):
        at = pl.ds(pl.multiple_of(i * block, block), block)
        pos = i * block + jnp.arange(block)
        ok = pos[None, :] < valid[:, None]
        return _online_block(carry, q, k_ref[at, :], v_ref[at, :], ok, upcast)

    last = jnp.minimum(first + per, pl.cdiv(jnp.max(valid), block))
    _store((m_ref, l_ref, o_ref), jax.lax.fori_loop(first, last, body, _init(rows, head_dim)))


def _own_kernel(valid_ref, end_ref, q_ref, k_ref, v_ref, m_ref, l_ref, o_ref, *, block, upcast):
    """One row's own ring, one split: its share of the tiles that hold the row's ``valid``
    newest tokens (the slots just before ``end``), in window order."""
    q = q_ref[...]
    rows, head_dim = q.shape
    valid, end = valid_ref[()], end_ref[()]
    size = k_ref.shape[0]
    total = size // block
    per = total // pl.num_programs(2)
    first = pl.program_id(2) * per
    start = (end - valid + size) % size

    def body(i, carry):
        b = (start // block + i) % total
        at = pl.ds(pl.multiple_of(b * block, block), block)
        pos = b * block + jnp.arange(block)
        ok = jnp.broadcast_to(((end - 1 - pos + size) % size < valid)[None, :], (rows, block))
        return _online_block(carry, q, k_ref[at, :], v_ref[at, :], ok, upcast)

    n = jnp.minimum(pl.cdiv(start % block + valid, block), total)
    last = jnp.minimum(first + per, n)
    _store((m_ref, l_ref, o_ref), jax.lax.fori_loop(first, last, body, _init(rows, head_dim)))


def _state_shapes(lead: tuple[int, ...], rows: int, head_dim: int):
    f32 = jnp.float32
    return (
        jax.ShapeDtypeStruct((*lead, rows), f32),
        jax.ShapeDtypeStruct((*lead, rows), f32),
        jax.ShapeDtypeStruct((*lead, rows, head_dim), f32),
    )


def _params(interpret: bool):
    return None if interpret else plgpu.CompilerParams(num_warps=4, num_stages=STAGES)


def _context_part(q, k, v, valid, *, block_rows, interpret):
    """q [ctx, kv, M, hd] (M a multiple of block_rows), k/v [ctx, kv, S, hd], valid [ctx, M];
    returns the states [ctx, kv, splits, M(, hd)]."""
    n_ctx, kv, rows, hd = q.shape
    seq = k.shape[2]
    block = _tile(seq)
    n_split = splits(n_ctx * kv * (rows // block_rows), seq // block)
    state = lambda c, h, t, s: (c, h, s, t)  # noqa: E731
    return pl.pallas_call(
        functools.partial(_context_kernel, block=block, upcast=interpret),
        grid=(n_ctx, kv, rows // block_rows, n_split),
        in_specs=[
            pl.BlockSpec((None, block_rows), lambda c, h, t, s: (c, t)),
            pl.BlockSpec((None, None, block_rows, hd), lambda c, h, t, s: (c, h, t, 0)),
            pl.BlockSpec((None, None, seq, hd), lambda c, h, t, s: (c, h, 0, 0)),
            pl.BlockSpec((None, None, seq, hd), lambda c, h, t, s: (c, h, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, block_rows), state),
            pl.BlockSpec((None, None, None, block_rows), state),
            pl.BlockSpec((None, None, None, block_rows, hd), lambda c, h, t, s: (c, h, s, t, 0)),
        ],
        out_shape=_state_shapes((n_ctx, kv, n_split), rows, hd),
        compiler_params=_params(interpret),
        interpret=interpret,
    )(valid, q, k, v)


def _own_part(q, k, v, valid, end, *, interpret):
    """q [rows, kv, G, hd], k/v [rows, kv, new, hd], valid [rows], end [] (ring slot);
    returns the states [rows, kv, splits, G(, hd)]."""
    n_rows, kv, groups, hd = q.shape
    new = k.shape[2]
    block = _tile(new)
    n_split = splits(n_rows * kv, new // block)
    return pl.pallas_call(
        functools.partial(_own_kernel, block=block, upcast=interpret),
        grid=(n_rows, kv, n_split),
        in_specs=[
            pl.BlockSpec((None,), lambda b, h, s: (b,)),  # scalar refs, as Triton loads them
            pl.BlockSpec((), lambda b, h, s: ()),
            pl.BlockSpec((None, None, groups, hd), lambda b, h, s: (b, h, 0, 0)),
            pl.BlockSpec((None, None, new, hd), lambda b, h, s: (b, h, 0, 0)),
            pl.BlockSpec((None, None, new, hd), lambda b, h, s: (b, h, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, groups), lambda b, h, s: (b, h, s, 0)),
            pl.BlockSpec((None, None, None, groups), lambda b, h, s: (b, h, s, 0)),
            pl.BlockSpec((None, None, None, groups, hd), lambda b, h, s: (b, h, s, 0, 0)),
        ],
        out_shape=_state_shapes((n_rows, kv, n_split), groups, hd),
        compiler_params=_params(interpret),
        interpret=interpret,
    )(valid, jnp.asarray(end, jnp.int32), q, k, v)


def decode_attention(
    q: jnp.ndarray,  # [ctx, rows, heads, head_dim]
    ctx_k: jnp.ndarray,  # [ctx, kv_heads, ctx_len, head_dim]
    ctx_v: jnp.ndarray,
    ctx_valid: jnp.ndarray,  # [ctx, rows]
    own_k: jnp.ndarray,  # [ctx * rows, kv_heads, new, head_dim]
    own_v: jnp.ndarray,
    own_valid: jnp.ndarray,  # [ctx, rows] (>= 1)
    own_end: jnp.ndarray,  # []
    *,
    interpret: bool = False,
) -> jnp.ndarray:
    """``fcjax.models.attention.decode_attention`` with Pallas kernels; returns
    [ctx, rows, heads, head_dim] (the value dtype)."""
    n_ctx, rows, heads, hd = q.shape
    kv = ctx_k.shape[1]
    groups = heads // kv
    if not interpret and (hd & (hd - 1) or hd < 16):
        raise ValueError(
            f"the Pallas decode attention needs a power-of-two head_dim >= 16 (Triton "
            f"blocks), got {hd}: use decode_attention='xla' for this model"
        )
    q = (q.reshape(n_ctx, rows, kv, groups, hd) * hd**-0.5).astype(ctx_k.dtype)
    i32 = jnp.int32

    # context part: the query rows of a context (rows x groups of one kv head) in tiles
    m_rows = rows * groups
    tile = min(_pow2(m_rows), 64)
    padded = -(-m_rows // tile) * tile
    qc = q.transpose(0, 2, 1, 3, 4).reshape(n_ctx, kv, m_rows, hd)
    qc = jnp.pad(qc, ((0, 0), (0, 0), (0, padded - m_rows), (0, 0)))
    valid = jnp.repeat(ctx_valid.astype(i32), groups, axis=1)
    valid = jnp.pad(valid, ((0, 0), (0, padded - m_rows)))
    mc, lc, ac = _context_part(qc, ctx_k, ctx_v, valid, block_rows=tile, interpret=interpret)

    def by_row(x):  # [ctx, kv, S, M(, hd)] -> [ctx * rows, kv, S, groups(, hd)]
        n_split, tail = x.shape[2], x.shape[4:]
        x = x[:, :, :, :m_rows].reshape(n_ctx, kv, n_split, rows, groups, *tail)
        return jnp.moveaxis(x, 3, 1).reshape(n_ctx * rows, kv, n_split, groups, *tail)

    context = tuple(map(by_row, (mc, lc, ac)))

    # own part: one row's groups (padded to a tile) against its ring
    gp = _pow2(groups)
    qo = q.reshape(n_ctx * rows, kv, groups, hd)
    qo = jnp.pad(qo, ((0, 0), (0, 0), (0, gp - groups), (0, 0)))
    mo, lo, ao = _own_part(
        qo, own_k, own_v, own_valid.reshape(-1).astype(i32), own_end.astype(i32),
        interpret=interpret,
    )  # fmt: skip
    own = (mo[..., :groups], lo[..., :groups], ao[..., :groups, :])

    # every split of both parts, merged by log-sum-exp over the split axis
    m, l, acc = (jnp.concatenate(x, axis=2) for x in zip(context, own, strict=True))
    top = jnp.max(m, axis=2, keepdims=True)
    w = jnp.exp(m - top)
    total = jnp.maximum(jnp.sum(l * w, axis=2), jnp.finfo(jnp.float32).tiny)  # 0: none read
    out = jnp.sum(acc * w[..., None], axis=2) / total[..., None]
    return out.reshape(n_ctx, rows, heads, hd).astype(own_v.dtype)
