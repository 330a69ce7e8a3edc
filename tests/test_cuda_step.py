"""The engine's decode step as a GPU would run it, checked on CPU: a bf16 model of
qwen2-1.5b's widths, vocabulary and heads (weights never allocated) lowered for CUDA, both
attention paths, generate 32x1 and branch 8x16 with caches of 2k positions, greedy and T=0.8
top-p 0.95. Its depth is 3 layers, not 28 (see ``CONFIG``).

On a GPU every iteration of a ``while`` loop sends its predicate to the host and blocks (and
breaks CUDA-graph capture), and XLA's GPU TopK handles k <= 16 only: a larger k sorts the
whole vocabulary. The two checks are separate tests (the loop count is the attention's and
the step's; the TopK one is the sampler's), checked on one lowering of each case."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import pytest

from fcjax.engine import profile
from fcjax.engine.sampling import Sampler
from fcjax.models.presets import PRESETS

# qwen2-1.5b's widths, vocabulary, heads and dtype, at 3 of its 28 layers: the decoder's
# layers are a Python loop of identical layers, so each adds the same ops to the step and
# lowering time grows with depth (~18 s at 28 layers, ~2 s at 3). Loops, TopKs and sorts
# counted are those of one layer times the depth plus the step's own: a loop in every layer
# shows as >= 3 while loops, over the limit of 2, as it would at 28; the sampler's TopK and
# sorts do not depend on depth at all.
CONFIG = dataclasses.replace(PRESETS["qwen2-1.5b"], num_layers=3)
LAYOUTS = {"generate": (32, 1), "branch": (8, 16)}
SAMPLERS = {"greedy": Sampler(0.0, 1.0, 0, 5), "top_p": Sampler(0.8, 0.95, 0, 5)}
CASES = [
    (attn, layout, sampler)
    for attn in ("xla", "pallas")
    for layout in LAYOUTS
    for sampler in SAMPLERS
]


@functools.cache  # one abstract model per attention path, for all its cases
def _lm(attn: str):
    return profile.abstract_lm(CONFIG, jnp.bfloat16).with_decode_attention(attn)


@functools.cache  # both tests check the same lowering of a case
def _ops(attn: str, layout: str, sampler: str) -> profile.LoweredOps:
    lm = _lm(attn)
    pool = profile.cache_layout(*LAYOUTS[layout], positions=2048, new=2048)
    return profile.cuda_step_ops(lm, pool, SAMPLERS[sampler])


@pytest.mark.parametrize("attn, layout, sampler", CASES)
def test_cuda_decode_step_has_at_most_two_while_loops(attn, layout, sampler):
    assert _ops(attn, layout, sampler).whiles <= 2


@pytest.mark.parametrize("attn, layout, sampler", CASES)
def test_cuda_decode_step_has_no_top_k_over_16_nor_vocabulary_sort(attn, layout, sampler):
    """Needs the accelerator sampler (issue 25): fails while the shortlist is top_k(256)."""
    ops = _ops(attn, layout, sampler)
    assert all(k <= 16 for k in ops.top_k), ops.top_k
    assert not [s for s in ops.sorts if s[-1] >= CONFIG.vocab_size], ops.sorts


def test_lowered_ops_counts_loops_top_k_and_sorts():
    """The counter could fail: a loop with a traced trip count, a scan, top_k(20) and a
    sort of a row are all seen."""

    def fn(x, n):
        x = jax.lax.fori_loop(0, n, lambda i, c: c * 1.5, x)
        x = jax.lax.scan(lambda c, _: (c + 1, None), x, None, length=3)[0]
        return jax.lax.top_k(x, 20)[0], jnp.sort(x, axis=-1)

    sd = jax.ShapeDtypeStruct
    args = sd((4, 1000), jnp.float32), sd((), jnp.int32)
    ops = profile.lowered_ops(profile.lower_for(jax.jit(fn), ("cuda",), *args).as_text())
    assert ops == profile.LoweredOps(whiles=2, top_k=(20,), sorts=((4, 1000),))


def test_cuda_lowering_names_a_target_gpu():
    """From jax 0.11 Pallas's Triton lowering reads the GPU it lowers for from the abstract
    mesh's device (``jax._src.pallas.triton.gpu_info.get_device_kind``); without a GPU that
    must be set while tracing and lowering: what ``lower_for`` does for CUDA, and only for
    it."""
    from jax.extend.core import Primitive
    from jax.interpreters import mlir

    seen = []
    probe = Primitive("fcjax_lowering_probe")
    probe.def_abstract_eval(lambda x: x)

    def lower(ctx, x):
        seen.append(jax.sharding.get_abstract_mesh().abstract_device)
        return [x]

    mlir.register_lowering(probe, lower)
    x = jax.ShapeDtypeStruct((4,), jnp.float32)
    profile.lower_for(jax.jit(probe.bind), ("cuda",), x)
    profile.lower_for(jax.jit(probe.bind), ("cpu",), x)
    assert seen[0] == profile.GPU_TARGET and seen[0].platform == "cuda"
    assert "H200" in seen[0].device_kind
    assert seen[1] is None
    assert jax.sharding.get_abstract_mesh().abstract_device is None  # restored after
