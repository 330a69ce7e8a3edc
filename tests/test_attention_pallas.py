"""The Pallas decode-attention kernels (interpreted on CPU) against the XLA reference path."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_models import build_tiny

import fcjax
from fcjax.engine import profile
from fcjax.models import attention, attention_pallas


def _inputs(seed, n_ctx, rows, heads, kv, hd, ctx_len, new, dtype=jnp.float32):
    rng = np.random.default_rng(seed)

    def arr(*shape):
        return jnp.asarray(rng.standard_normal(shape), dtype)

    q = arr(n_ctx, rows, heads, hd)
    ctx_k, ctx_v = arr(n_ctx, kv, ctx_len, hd), arr(n_ctx, kv, ctx_len, hd)
    own_k, own_v = arr(n_ctx * rows, kv, new, hd), arr(n_ctx * rows, kv, new, hd)
    ctx_valid = rng.integers(0, ctx_len + 1, (n_ctx, rows))
    ctx_valid[0, 0], ctx_valid[-1, -1] = 0, ctx_len  # a row that sees no context; a full one
    own_valid = rng.integers(1, new + 1, (n_ctx, rows))
    own_valid[0, -1] = new  # a full ring
    return q, ctx_k, ctx_v, jnp.asarray(ctx_valid), own_k, own_v, jnp.asarray(own_valid)


@pytest.mark.parametrize(
    "n_ctx, rows, heads, kv, hd, ctx_len, new, own_end",
    [
        (3, 4, 6, 2, 64, 128, 64, 5),  # branch-like: rows share a context; the ring wraps
        (5, 1, 9, 3, 32, 256, 128, 128),  # generate-like: 3 groups (not a power of two)
        (2, 24, 4, 1, 16, 64, 32, 17),  # more query rows than one tile (24 x 4 > 64)
        (1, 2, 4, 2, 16, 512, 512, 100),  # 8 sequence splits of each part; the window wraps
    ],
)
def test_kernels_equal_the_xla_path(n_ctx, rows, heads, kv, hd, ctx_len, new, own_end):
    args = _inputs(0, n_ctx, rows, heads, kv, hd, ctx_len, new)
    end = jnp.int32(own_end)
    ref = attention.decode_attention(*args, end, precision=jax.lax.Precision.HIGHEST)
    got = attention_pallas.decode_attention(*args, end, interpret=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-6, rtol=1e-5)


def test_sequence_splits():
    """Few programs split the sequence (a power of two dividing the tiles) until a part has
    about ``PROGRAMS``; many do not split it."""
    assert attention_pallas.splits(2, 8) == 8  # a 512-position cache of 64-key tiles
    assert attention_pallas.splits(4, 64) == 64
    assert attention_pallas.splits(64, 12) == 4  # 8 does not divide 12 tiles
    assert attention_pallas.splits(100, 64) == 4  # 400 programs >= PROGRAMS
    assert attention_pallas.splits(attention_pallas.PROGRAMS, 64) == 1


def test_a_cache_length_the_tiles_cannot_cover_is_refused():
    args = _inputs(0, 1, 1, 2, 1, 16, 96, 64)  # 96 context positions: 1.5 tiles
    with pytest.raises(ValueError, match="multiples of 64 or powers of two below it, got 96"):
        attention_pallas.decode_attention(*args, jnp.int32(0), interpret=True)


def test_kernels_in_bfloat16():
    args = _inputs(1, 3, 2, 8, 2, 64, 128, 64, jnp.bfloat16)
    end = jnp.int32(40)
    # the reference in float32 on the same bf16-rounded values (XLA:CPU has no bf16 dot
    # into float32 for some of these shapes)
    up = [x.astype(jnp.float32) if x.dtype == jnp.bfloat16 else x for x in args]
    ref = attention.decode_attention(*up, end, precision=jax.lax.Precision.HIGHEST)
    kernels = jax.jit(lambda *a: attention_pallas.decode_attention(*a, interpret=True))
    got = kernels(*args, end).astype(jnp.float32)
    assert got.dtype == ref.dtype
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=3e-2)


def test_each_context_and_row_reads_only_its_own_blocks():
    """NaN in every cache block a context's rows (or a row's own window) do not attend to
    does not reach the output: the kernels stop at each context's longest row and read only
    the blocks of each row's window (the XLA path reads to the batch's longest)."""
    block = attention_pallas.KEY_BLOCK
    size = 8 * block  # context and ring positions
    q, ctx_k, ctx_v, _, own_k, own_v, _ = _inputs(2, 2, 2, 4, 2, 32, size, size)
    ctx_valid = jnp.asarray([[10, 30], [1, 100]])  # context 0 needs its first blocks only
    own_valid, end = np.asarray([[3, 64], [1, 30]]), 20
    args = (q, ctx_k, ctx_v, ctx_valid, own_k, own_v, jnp.asarray(own_valid), jnp.int32(end))
    ref = attention.decode_attention(*args, precision=jax.lax.Precision.HIGHEST)

    ctx_blocks = -(-np.asarray(ctx_valid).max(axis=1) // block)  # blocks each context needs
    ctx_ok = np.arange(size)[None, :] // block < ctx_blocks[:, None]
    own_ok = np.zeros((4, size), bool)
    for row, n in enumerate(own_valid.reshape(-1)):
        for b in set((end - 1 - np.arange(n)) % size // block):
            own_ok[row, b * block : (b + 1) * block] = True
    assert not ctx_ok.all() and not own_ok.all()

    def poison(x, ok):
        return jnp.where(jnp.asarray(ok)[:, None, :, None], x, jnp.nan)

    got = attention_pallas.decode_attention(
        q, poison(ctx_k, ctx_ok), poison(ctx_v, ctx_ok), ctx_valid,
        poison(own_k, own_ok), poison(own_v, own_ok), *args[6:], interpret=True,
    )  # fmt: skip
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=2e-6, rtol=1e-5)


def test_the_engine_decodes_the_same_with_the_kernels(tmp_path):
    """Greedy generate and sampled branch_many give the same tokens through the interpreted
    kernels as through the XLA path (float32)."""
    lm = fcjax.load(build_tiny("qwen2-bias", tmp_path, seed=3))
    lm = dataclasses.replace(lm, config=dataclasses.replace(lm.config, eos_token_ids=()))
    kernels = lm.with_decode_attention("pallas_interpret")
    assert kernels.graphdef != lm.graphdef and kernels.state is lm.state
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    greedy = fcjax.SamplingParams(temperature=0.0, max_new_tokens=12)
    a, b = fcjax.generate(lm, prompts, greedy), fcjax.generate(kernels, prompts, greedy)
    for x, y in zip(a, b, strict=True):
        assert x.token_ids == y.token_ids
        np.testing.assert_allclose(x.token_logprobs, y.token_logprobs, atol=1e-5)
    sampled = fcjax.SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=6, seed=1)
    traces = [(prompts[0] + list(range(40, 60)), [4, 20]), (prompts[1], [2, 3])]
    a = fcjax.branch_many(lm, traces, 2, sampled, keys=["x", "y"])
    b = fcjax.branch_many(kernels, traces, 2, sampled, keys=["x", "y"])
    assert [[[g.token_ids for g in c] for c in t] for t in a] == [
        [[g.token_ids for g in c] for c in t] for t in b
    ]
    with pytest.raises(ValueError, match="decode_attention must be one of"):
        lm.with_decode_attention("cuda")


@pytest.mark.parametrize(
    "shape, dtype",
    [
        ((4, 1, 12, 2, 128, 1024, 256), jnp.bfloat16),  # qwen2-1.5b generate
        ((8, 64, 12, 2, 128, 3072, 256), jnp.bfloat16),  # branching: 64 rows per trace
        ((2, 3, 9, 3, 64, 128, 64), jnp.float32),  # SmolLM2's heads, float32 (no TF32)
    ],
)
def test_kernels_lower_to_triton_for_cuda(shape, dtype):
    """Without a GPU: both kernels pass Pallas's Triton lowering for CUDA (the shapes, ops
    and block sizes Triton accepts); compiling the Triton IR to PTX needs the GPU."""
    n_ctx, rows, heads, kv, hd, ctx_len, new = shape
    sd = jax.ShapeDtypeStruct
    cache = lambda n, s: sd((n, kv, s, hd), dtype)  # noqa: E731
    args = (
        sd((n_ctx, rows, heads, hd), dtype), cache(n_ctx, ctx_len), cache(n_ctx, ctx_len),
        sd((n_ctx, rows), jnp.int32), cache(n_ctx * rows, new), cache(n_ctx * rows, new),
        sd((n_ctx, rows), jnp.int32), sd((), jnp.int32),
    )  # fmt: skip
    lowered = profile.lower_for(jax.jit(attention_pallas.decode_attention), ("cuda",), *args)
    assert lowered.as_text().count("__gpu$xla.gpu.triton") == 2


def test_a_head_dim_triton_cannot_tile_is_refused():
    sd = jax.ShapeDtypeStruct
    cache = sd((1, 2, 32, 24), jnp.bfloat16)
    lens = sd((1, 1), jnp.int32)
    args = (sd((1, 1, 4, 24), jnp.bfloat16), cache, cache, lens, cache, cache, lens)
    with pytest.raises(ValueError, match="power-of-two head_dim >= 16"):
        jax.jit(attention_pallas.decode_attention).trace(*args, sd((), jnp.int32))


def test_a_whole_decode_step_with_the_kernels_lowers_for_cuda():
    """The engine's decode step of a qwen2-1.5b-shaped bf16 model (weights never allocated)
    with ``decode_attention='pallas'`` lowers for CUDA: two kernels per layer inside the
    step, with top-p sampling."""
    from fcjax.engine.sampling import Sampler
    from fcjax.models.presets import PRESETS

    config = PRESETS["qwen2-1.5b"]
    lm = profile.abstract_lm(config, jnp.bfloat16).with_decode_attention("pallas")
    layout = profile.one_block_layout(8, 4)
    lowered = profile.lower_step(lm, layout, Sampler(0.6, 0.95, 0, 5), platforms=("cuda",))
    text = lowered.as_text()
    assert text.count("__gpu$xla.gpu.triton") == 2 * config.num_layers
