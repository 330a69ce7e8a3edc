"""The XLA attention paths (``fcjax.models.attention``) against brute force in numpy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fcjax.engine import profile
from fcjax.models import attention

HIGHEST = jax.lax.Precision.HIGHEST


def _softmax_attend(q, keys, values):  # q [hd], keys/values [n, hd] (float64)
    s = keys @ q / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max())
    return p @ values / p.sum()


def _decode_inputs(seed, n_ctx, rows, heads, kv, hd, ctx_len, new):
    rng = np.random.default_rng(seed)
    arr = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    q = arr(n_ctx, rows, heads, hd)
    ctx_k, ctx_v = arr(n_ctx, kv, ctx_len, hd), arr(n_ctx, kv, ctx_len, hd)
    own_k, own_v = arr(n_ctx * rows, kv, new, hd), arr(n_ctx * rows, kv, new, hd)
    ctx_valid = rng.integers(0, ctx_len + 1, (n_ctx, rows))
    ctx_valid[0, 0], ctx_valid[-1, -1] = 0, ctx_len  # a row that sees no context; a full one
    own_valid = rng.integers(1, new + 1, (n_ctx, rows))
    own_valid[0, -1] = new  # a full ring
    return q, ctx_k, ctx_v, ctx_valid, own_k, own_v, own_valid


def _brute_decode(q, ctx_k, ctx_v, ctx_valid, own_k, own_v, own_valid, own_end):
    """Each row and head: softmax over its context prefix and its own newest tokens."""
    n_ctx, rows, heads, _ = q.shape
    groups, new = heads // ctx_k.shape[1], own_k.shape[2]
    out = np.zeros(q.shape)
    for c in range(n_ctx):
        for r in range(rows):
            slots = [(own_end - 1 - j) % new for j in range(own_valid[c, r])]
            for h in range(heads):
                kh, b = h // groups, c * rows + r
                keys = np.concatenate([ctx_k[c, kh, : ctx_valid[c, r]], own_k[b, kh, slots]])
                vals = np.concatenate([ctx_v[c, kh, : ctx_valid[c, r]], own_v[b, kh, slots]])
                out[c, r, h] = _softmax_attend(q[c, r, h].astype(np.float64), keys, vals)
    return out


@pytest.mark.parametrize("reads", ["live", "full"])
@pytest.mark.parametrize(
    "n_ctx, rows, heads, kv, hd, ctx_len, new, own_end",
    [
        (3, 4, 6, 2, 16, 256, 128, 5),  # branch-like: rows share a context; the ring wraps
        (5, 1, 9, 3, 8, 128, 64, 64),  # generate-like: 3 groups
    ],
)
def test_decode_attention_equals_brute_force(
    reads, n_ctx, rows, heads, kv, hd, ctx_len, new, own_end
):
    args = _decode_inputs(0, n_ctx, rows, heads, kv, hd, ctx_len, new)
    want = _brute_decode(*args, own_end)
    got = attention.decode_attention(
        *map(jnp.asarray, args), jnp.int32(own_end), precision=HIGHEST, reads=reads
    )
    np.testing.assert_allclose(np.asarray(got), want, atol=2e-5, rtol=1e-4)


def test_unknown_reads_are_refused():
    args = _decode_inputs(0, 1, 1, 2, 1, 8, 64, 64)
    with pytest.raises(ValueError, match="reads must be one of auto, live, full"):
        attention.decode_attention(*map(jnp.asarray, args), jnp.int32(0), reads="some")


def _lowered_whiles(platform: str, reads: str) -> int:
    sd = jax.ShapeDtypeStruct
    cache = lambda n, s: sd((n, 2, s, 64), jnp.bfloat16)  # noqa: E731
    args = (
        sd((4, 2, 8, 64), jnp.bfloat16), cache(4, 1024), cache(4, 1024), sd((4, 2), jnp.int32),
        cache(8, 256), cache(8, 256), sd((4, 2), jnp.int32), sd((), jnp.int32),
    )  # fmt: skip
    fn = jax.jit(lambda *a: attention.decode_attention(*a, reads=reads))
    lowered = profile.lower_for(fn, (platform,), *args)
    return profile.lowered_ops(lowered.as_text()).whiles


def test_a_gpu_program_reads_whole_caches_without_loops():
    """By default a program lowered for CUDA has no loop (on a GPU each iteration of a loop
    whose trip count is a traced value is a host round trip); one for CPU keeps the two
    block loops that read only the live blocks."""
    assert _lowered_whiles("cuda", "auto") == 0
    assert _lowered_whiles("cpu", "auto") == 2
    assert _lowered_whiles("cpu", "full") == 0
    assert _lowered_whiles("cuda", "live") == 2


def _jaxpr_shapes(jaxpr) -> list[tuple[int, ...]]:
    """Shapes of every value a jaxpr computes, in nested jaxprs too."""
    shapes = []
    for eqn in jaxpr.eqns:
        shapes += [tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")]
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    shapes += _jaxpr_shapes(inner)
    return shapes


@pytest.mark.parametrize("seq, chunk", [(20, 8), (24, 8), (20, 32)])
def test_prefill_chunks_queries_of_any_length(monkeypatch, seq, chunk):
    """Causal attention over right-padded rows equals brute force, and a sequence longer
    than one query chunk never holds [seq, seq] scores, whole chunks or not (one chunk
    does: the check could fail)."""
    monkeypatch.setattr(attention, "PREFILL_QUERY_CHUNK", chunk)
    rng = np.random.default_rng(seq)
    batch, heads, kv, hd = 2, 4, 2, 16
    q = rng.standard_normal((batch, seq, heads, hd)).astype(np.float32)
    k, v = (rng.standard_normal((batch, seq, kv, hd)).astype(np.float32) for _ in range(2))
    lengths = np.array([seq, seq - 3])

    def fn(*a):
        return attention.prefill_attention(*a, precision=HIGHEST)

    got = np.asarray(fn(*map(jnp.asarray, (q, k, v, lengths))))
    for b in range(batch):
        for t in range(lengths[b]):
            for h in range(heads):
                want = _softmax_attend(q[b, t, h], k[b, : t + 1, h // 2], v[b, : t + 1, h // 2])
                np.testing.assert_allclose(got[b, t, h], want, atol=1e-5, rtol=1e-5)
    shapes = _jaxpr_shapes(jax.make_jaxpr(fn)(q, k, v, lengths).jaxpr)
    square = [s for s in shapes if sum(d >= seq for d in s) >= 2]
    assert (square == []) == (seq > chunk), square


@pytest.mark.parametrize("path", ["live", "full", "pallas_interpret"])
def test_rows_that_attend_to_nothing_stay_finite(path):
    """A step where no row is live (every length 0) reads nothing on the live paths: the
    output is finite (no 0 / 0), so no NaN reaches the caches the next layers write."""
    from fcjax.models import attention_pallas

    q, ctx_k, ctx_v, _, own_k, own_v, _ = map(
        jnp.asarray, _decode_inputs(3, 2, 2, 4, 2, 16, 128, 64)
    )
    none = jnp.zeros((2, 2), jnp.int32)
    args = (q, ctx_k, ctx_v, none, own_k, own_v, none, jnp.int32(0))  # ring at a block start
    if path == "pallas_interpret":
        out = attention_pallas.decode_attention(*args, interpret=True)
    else:
        out = attention.decode_attention(*args, reads=path)
    assert np.isfinite(np.asarray(out)).all()
