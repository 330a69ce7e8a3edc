"""Decode-efficiency proxies (``fcjax.engine.profile``), measured on compiled programs and
engine counters; the speed itself lives in ``python -m experiments.benchmark``."""

import dataclasses
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fcjax
from fcjax.engine import profile
from fcjax.engine.decode import zeros_pool
from fcjax.engine.generate import CHUNK, EngineStats
from fcjax.engine.sampling import Sampler
from fcjax.models.presets import PRESETS

GREEDY = Sampler(0.0, 1.0, 0, 5)
NUCLEUS = Sampler(0.8, 0.95, 0, 5)


@pytest.fixture(scope="module")
def tiny():
    return fcjax.load("random:tiny-llama")


def test_decode_step_reads_about_the_ideal_bytes():
    """One decode step of a qwen2-1.5b-shaped model (compiled, never allocated) moves at most
    1.3x weights + KV: no cache or weight copies, scores never through memory at cache size."""
    lm = profile.abstract_lm(PRESETS["qwen2-1.5b"])
    for (contexts, rows), sampler in (((32, 1), GREEDY), ((8, 4), NUCLEUS)):
        layout = profile.one_block_layout(contexts, rows)
        compiled = profile.compile_step(lm, layout, sampler)
        b = profile.step_bytes(lm, layout, sampler, compiled)
        assert b.weights > 6e9 and b.kv > 1e8
        assert b.ratio <= 1.3, (contexts, rows, b)
        assert profile.layout_copies(lm, layout, compiled) == []


def test_layout_copy_detector_flags_a_transposed_cache(tiny):
    """The check above could fail: a program that transposes a KV cache is flagged."""
    layout = profile.one_block_layout(4, 2)
    pool = jax.eval_shape(lambda: zeros_pool(tiny.config, layout, tiny.dtype))
    cache = pool.cache.own_k[0]
    compiled = jax.jit(lambda x: jnp.swapaxes(x, 1, 2) * 2.0).lower(cache).compile()
    assert profile.layout_copies(tiny, layout, compiled) != []


def test_gather_counts_the_rows_it_reads():
    """XLA's cost analysis counts an embedding lookup as reading the whole table; the
    correction leaves the rows gathered (and leaves a real full read counted)."""
    table = jax.ShapeDtypeStruct((4096, 256), jnp.float32)
    ids = jax.ShapeDtypeStruct((8,), jnp.int32)

    def corrected(fn):
        compiled = jax.jit(fn).lower(table, ids).compile()
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        return cost["bytes accessed"] - profile.gather_overcount(compiled.as_text())

    nbytes = 4096 * 256 * 4
    assert corrected(lambda e, i: jnp.take(e, i, axis=0) * 2) < 0.05 * nbytes
    assert corrected(lambda e, i: jnp.take(e, i, axis=0) * 2 + e.sum()) >= nbytes


def _bytes(fn, *args) -> tuple[float, float, int]:
    """(XLA's cost analysis, the same with every loop iteration, loops not scaled)."""
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = float((cost[0] if isinstance(cost, list) else cost)["bytes accessed"])
    extra, unscaled = profile.loop_bytes(compiled.as_text())
    return cost, cost + extra, unscaled


def test_loop_bytes_count_every_iteration():
    """A loop of known trip count moves what its unrolled program moves (XLA's cost
    analysis counts the body once); nested loops multiply; a loop body that slices a big
    operand counts the slices; a loop whose count is traced is reported, not scaled."""
    sd = jax.ShapeDtypeStruct
    x, w = sd((64, 256), jnp.float32), sd((256, 256), jnp.float32)

    def loop(n, unroll=False):
        return lambda x, w: jax.lax.fori_loop(0, n, lambda i, c: jnp.tanh(c @ w), x, unroll=unroll)

    once, scaled, unscaled = _bytes(loop(8), x, w)
    unrolled, same, _ = _bytes(loop(8, True), x, w)
    assert unrolled == same and unscaled == 0
    assert scaled == pytest.approx(unrolled, rel=0.1) and once < unrolled / 4
    nested = lambda x, w: jax.lax.fori_loop(0, 4, lambda j, c: loop(8)(c, w), x)  # noqa: E731
    assert _bytes(nested, x, w)[1] == pytest.approx(4 * unrolled, rel=0.1)
    big = sd((1024, 256), jnp.float32)

    def slices(x, big):
        body = lambda i, c: c + jax.lax.dynamic_slice_in_dim(big, i * 64, 64)  # noqa: E731
        return jax.lax.fori_loop(0, 16, body, x)

    _, scaled, _ = _bytes(slices, x, big)
    assert scaled < 4 * 1024 * 256 * 4  # 16 x (slice + carry in and out) + one read of big
    traced = lambda x, w, n: jax.lax.fori_loop(0, n, lambda i, c: jnp.tanh(c @ w), x)  # noqa: E731
    once_traced, scaled, unscaled = _bytes(traced, x, w, sd((), jnp.int32))
    assert unscaled == 1 and scaled == once_traced


def test_cpu_upcasts_are_the_16_bit_weights_converted(tiny):
    """XLA:CPU converts a bf16 weight to float32 for its dot (6 bytes an element); a float32
    program has no such convert."""
    sd = jax.ShapeDtypeStruct
    w = next(x for x in jax.tree.leaves(tiny.state) if np.ndim(x) == 2)  # a weight shape
    for dtype, want in ((jnp.bfloat16, 6 * w.size), (jnp.float32, 0)):
        x, wt = sd((8, w.shape[0]), dtype), sd(w.shape, dtype)
        compiled = jax.jit(lambda a, b: a @ b).lower(x, wt).compile()
        assert profile.cpu_upcasts(tiny, compiled) == want, dtype


def test_a_bfloat16_model_converts_no_weight_to_float32():
    """The decoder's products take bf16 operands and accumulate in float32 (``dot``): XLA:CPU
    reads the 16-bit weights as they are, where a bf16-out product first converts each weight
    to float32 (SmolLM2's prefill of 4 x 64 tokens: 478 MB of converts). Prefill and a
    decode step, generate and branch layouts."""
    lm = profile.abstract_lm(PRESETS["tiny-llama"], jnp.bfloat16)
    sd = jax.ShapeDtypeStruct
    prefill = jax.jit(lambda state, t, n: nnx.merge(lm.graphdef, state).prefill(t, n).normed)
    tokens, lengths = sd((4, 64), jnp.int32), sd((4,), jnp.int32)
    compiled = [prefill.lower(lm.state, tokens, lengths).compile()]
    compiled += [
        profile.compile_step(lm, profile.one_block_layout(c, r), NUCLEUS)
        for c, r in ((4, 1), (2, 4))
    ]
    assert [profile.cpu_upcasts(lm, c) for c in compiled] == [0, 0, 0]


def test_programs_per_call_and_no_implicit_transfers(tiny):
    params = fcjax.SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=20, seed=4)
    prompts = [list(range(1, n)) for n in (70, 90, 100)]  # a bucket no other test uses
    with profile.CompileCounter() as first:
        fcjax.generate(tiny, prompts, params)
    stats = EngineStats()
    with profile.CompileCounter() as second, jax.transfer_guard("disallow"):
        other = [list(range(2, n)) for n in (66, 80, 112)]  # the longest in the same eighth
        fcjax.generate(tiny, other, dataclasses.replace(params, max_new_tokens=30), stats=stats)
    assert first.count <= 3
    assert second.count == 0
    assert stats.host_reads == stats.chunks > 0


def _refill_schedule(lengths: list[int], slots: int, chunk: int, widths=()) -> int:
    """Row-steps computed by the engine's schedule, simulated: chunks of ``chunk`` steps;
    a free slot takes the next row of the queue at a chunk boundary; a row of L tokens holds
    its slot ceil(L / chunk) chunks plus one (the host learns it finished when it reads the
    chunk back, after dispatching the next one). Once the queue is empty (and no row starts)
    and the rows still held fit one of the narrower ``widths``, the host reads the chunk in
    flight back first, then shrinks the pool to the smallest width that holds the rows still
    running (no chunk follows if none is)."""
    queue, busy, t, computed, width = list(lengths), [0] * slots, 0, 0, slots
    narrower = [w for w in widths if w < slots]
    while queue or any(b > t for b in busy):
        started = False
        for j in range(slots):
            if busy[j] <= t and queue:
                busy[j] = t + -(-queue.pop(0) // chunk) + 1
                started = True
        if not queue and not started and any(w >= sum(b > t for b in busy) for w in narrower):
            running = sum(b - 1 > t for b in busy)  # known once the chunk in flight is read
            if not running:
                break
            width = min(w for w in narrower if w >= running)
            narrower = [w for w in narrower if w < width]
        computed += width * chunk
        t += 1
    return computed


def test_continuous_batching_beats_fixed_batches_on_long_tails(tiny, monkeypatch):
    generate_lib = importlib.import_module("fcjax.engine.generate")  # the module

    monkeypatch.setattr(generate_lib, "COMPACT_FROM", 16)  # 16 slots compact (a cost choice)
    work = profile.long_tailed(tiny, prompts=96, slots=16, mean=60, limit=150, seed=1)
    s = work.stats
    assert s.useful_row_steps == sum(work.lengths)
    assert max(work.lengths) > 2.5 * np.median(work.lengths)  # a long tail indeed
    # no row-step beyond what refilling at chunk boundaries and compacting the tail compute
    widths = generate_lib.shrink_widths(16)
    assert s.row_steps == _refill_schedule(work.lengths, 16, CHUNK, widths)
    assert s.row_steps < _refill_schedule(work.lengths, 16, CHUNK)  # the tail shrank
    assert s.row_utilisation > work.static_utilisation + 0.3
    assert 0 <= s.ctx_padding < 0.6
    assert 0 <= s.ctx_padding_ragged < s.ctx_padding  # each context read to its own longest


def test_device_kernels_sums_each_programs_ops_from_a_profiler_trace():
    """``device_kernels`` reads back a ``jax.profiler`` trace: the ops of the two programs
    called are found under their own names, a program called three times has at least three
    launches, and the listed ops sum to no more than the total (on CPU, ops of several
    threads can overlap, so the total is not bounded by the wall time)."""

    def twice(x):
        return jnp.tanh(x @ x)

    def plus(x):
        return jnp.sum(x * 3.0)

    f, g = jax.jit(twice), jax.jit(plus)
    x = jnp.ones((256, 256), jnp.float32)
    jax.block_until_ready((f(x), g(x)))

    def calls():
        for _ in range(3):
            jax.block_until_ready(f(x))
        jax.block_until_ready(g(x))

    total, kernels = profile.device_kernels(calls, top=50)
    programs = {k.program for k in kernels}
    assert {"jit_twice", "jit_plus"} <= programs
    assert sum(k.launches for k in kernels if k.program == "jit_twice") >= 3
    assert all(k.ms >= 0 for k in kernels)
    assert 0 < sum(k.ms for k in kernels) <= total + 1e-9
