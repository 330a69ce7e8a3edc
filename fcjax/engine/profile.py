"""Proxies of decode efficiency that a CPU can measure (``experiments.benchmark --proxies``).

- ``step_bytes``: the bytes XLA's cost analysis says one compiled decode step reads and
  writes, against the ideal (every weight and the live KV once). The step is compiled for a
  pool whose caches hold one attention block each, so every block loop runs exactly once and
  the cost analysis (which counts a loop body once) covers the whole step.
- ``layout_copies``: instructions of that program that copy, transpose or slice a KV-sized or
  weight-sized array: what a batch-first cache layout and per-layer weights exist to avoid.
- ``CompileCounter``: XLA programs compiled during a call.
- ``long_tailed``: row-step utilisation and context padding of continuous batching on a
  geometric length mix, against the same generations in fixed batches.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fcjax.engine.decode import Layout, Pool, StopTables, decode_step, zeros_pool
from fcjax.engine.generate import EngineStats, generate
from fcjax.engine.sampling import Sampler, SamplingParams
from fcjax.models.attention import MIN_BLOCK
from fcjax.models.lm import LM


@functools.partial(
    jax.jit, static_argnames=("graphdef", "sampler", "eos"), donate_argnames=("pool",)
)
def _one_step(graphdef, params, pool: Pool, stops: StopTables, limit, *, sampler, eos):
    return decode_step(nnx.merge(graphdef, params), pool, stops, limit, sampler, eos)


def one_block_layout(contexts: int, rows: int) -> Layout:
    """A pool whose context and own caches are one attention block each."""
    return Layout(contexts=contexts, rows=rows, ctx_len=MIN_BLOCK, new=MIN_BLOCK, reads=1)


def abstract_lm(config, dtype=jnp.float32) -> LM:
    """An LM of ``config``'s shape whose weights are shapes only (for compiling, not running:
    a large model's step can be analysed without allocating it)."""
    from fcjax.models.decoder import Decoder

    model = nnx.eval_shape(lambda: Decoder(config, dtype=dtype))
    return LM.from_decoder(model, name=f"abstract:{config.name}", source="abstract")


def compile_step(lm: LM, layout: Layout, sampler: Sampler):
    """The compiled program of one decode step over a pool of ``layout``."""
    return lower_step(lm, layout, sampler).compile()


def lower_step(lm: LM, layout: Layout, sampler: Sampler, platforms: tuple[str, ...] = ()):
    """One decode step over a pool of ``layout``, lowered (for ``platforms``, e.g.
    ``("cuda",)``, which needs no such device; default: this backend)."""
    pool = jax.eval_shape(lambda: zeros_pool(lm.config, layout, lm.dtype))
    vocab = lm.config.vocab_size
    stops = StopTables(
        jax.ShapeDtypeStruct((vocab,), bool),
        jax.ShapeDtypeStruct((vocab,), jnp.uint32),
        jax.ShapeDtypeStruct((vocab,), jnp.uint32),
    )
    limit = jax.ShapeDtypeStruct((), jnp.int32)
    traced = _one_step.trace(lm.graphdef, lm.state, pool, stops, limit, sampler=sampler, eos=(-1,))
    return traced.lower(lowering_platforms=platforms) if platforms else traced.lower()


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@dataclasses.dataclass
class StepBytes:
    hlo: float  # bytes accessed, from XLA's cost analysis
    weights: int
    kv: int

    @property
    def ideal(self) -> int:
        return self.weights + self.kv

    @property
    def ratio(self) -> float:
        return self.hlo / self.ideal


def step_bytes(lm: LM, layout: Layout, sampler: Sampler, compiled=None) -> StepBytes:
    """HLO bytes of one decode step against weights + KV, with every cache full (live).

    XLA's cost analysis counts a gather fusion (the token embedding lookup) as reading its
    whole table; it is counted here as reading the rows it gathers."""
    compiled = compiled or compile_step(lm, layout, sampler)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    pool = jax.eval_shape(lambda: zeros_pool(lm.config, layout, lm.dtype))
    hlo = float(cost["bytes accessed"]) - gather_overcount(compiled.as_text())
    return StepBytes(hlo, _nbytes(lm.state), _nbytes(pool.cache))


def _shape_bytes(dtype: str, dims: str) -> int:
    return int(np.prod([int(d) for d in dims.split(",") if d] or [1])) * _ITEMSIZE.get(dtype, 4)


def gather_overcount(text: str) -> float:
    """Bytes XLA's cost analysis counts that the program does not move: a fusion that
    gathers rows from one of its parameters (the token embedding) is counted as reading the
    whole table; it reads the gathered rows only."""
    shape = r"(\w+)\[([\d,]*)\]"
    gathers: dict[str, tuple[dict, list]] = {}  # fused computation -> (params, gathers)
    current = None
    for line in text.splitlines():
        head = re.match(r"^%(\S+) \(", line)
        if head:
            current = head.group(1)
            gathers[current] = (dict(re.findall(r"([\w.\-]+): (\w+\[[\d,]*\])", line)), [])
            continue
        m = re.match(r"^\s*(?:ROOT )?%\S+ = " + shape + r"\S* gather\(%(\S+?)[,)]", line)
        if current and m:
            gathers[current][1].append((m.group(3), _shape_bytes(m.group(1), m.group(2))))
    over = 0.0
    for line in text.splitlines():
        m = re.match(r"^\s*(?:ROOT )?%\S+ = \S+ fusion\(.*calls=%([\w.\-]+)", line)
        if m and m.group(1) in gathers:
            params, found = gathers[m.group(1)]
            over += sum(
                max(_param_bytes(params, operand) - out, 0)
                for operand, out in found
                if operand in params
            )
    return over


def _param_bytes(params: dict[str, str], name: str) -> int:
    m = re.match(r"(\w+)\[([\d,]*)\]", params.get(name, ""))
    return _shape_bytes(*m.groups()) if m else 0


_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\w+)\[([\d,]*)\]\S* (\S+?)\(")
_ITEMSIZE = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1}
_LAYOUT_OPS = ("copy", "transpose", "dynamic-slice", "slice")


def _dims(shape) -> tuple[int, ...]:
    """A shape up to axis order and unit axes (what a copy, transpose or bitcast keeps)."""
    return tuple(sorted(int(d) for d in shape if int(d) != 1))


def layout_copies(lm: LM, layout: Layout, compiled) -> list[str]:
    """Instructions (fused or not) that copy or transpose an array shaped like one layer's
    KV cache, or slice one shaped like a weight tensor, in a decode step."""
    pool = jax.eval_shape(lambda: zeros_pool(lm.config, layout, lm.dtype))
    kv_shapes = {_dims(x.shape) for x in jax.tree.leaves(pool.cache)}
    weight_shapes = {_dims(np.shape(x)) for x in jax.tree.leaves(lm.state) if np.ndim(x) > 1}
    found = []
    for line in compiled.as_text().splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        name, dtype, dims, op = m.groups()
        if "update" in name or "update" in op:
            continue  # in-place writes
        kind = next((w for w in _LAYOUT_OPS if w == op or w in name), None)
        shapes = kv_shapes if kind in ("copy", "transpose") else weight_shapes
        if kind is not None and _dims(d for d in dims.split(",") if d) in shapes:
            found.append(f"{op} {name} {dtype}[{dims}]")
    return found


BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """Counts XLA backend compilations while active (``with CompileCounter() as c: ...``)."""

    def __init__(self):
        self.count = 0

    def _listen(self, event: str, duration: float, **kwargs) -> None:
        del duration, kwargs
        if event == BACKEND_COMPILE:
            self.count += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)


@dataclasses.dataclass
class Workload:
    """What the engine did on a long-tailed batch of generations."""

    stats: EngineStats
    lengths: list[int]
    slots: int

    @property
    def static_utilisation(self) -> float:
        """Useful row-steps had the same generations run in fixed batches of ``slots``
        prompts (in prompt-length order, as the engine queues them), each batch until its
        longest row: what a batch without refilling computes."""
        computed = sum(
            self.slots * max(self.lengths[i : i + self.slots])
            for i in range(0, len(self.lengths), self.slots)
        )
        return sum(self.lengths) / computed


def long_tailed(lm: LM, prompts: int, slots: int, mean: int, limit: int, seed: int = 0):
    """Samples ``prompts`` random prompts (8-200 tokens) at temperature 1 with one EOS token
    chosen so a row ends with probability ~1/``mean`` per token (a geometric length mix, cut
    at ``limit``), ``slots`` rows decoding together. Meant for random-weight models, whose
    next-token distributions are near uniform."""

    vocab = lm.config.vocab_size
    rng = np.random.default_rng(seed)
    n_eos = max(1, round(vocab / mean))
    eos = tuple(int(t) for t in rng.choice(vocab, n_eos, replace=False))
    config = dataclasses.replace(lm.config, eos_token_ids=eos)
    lm = dataclasses.replace(lm, config=config, tokenizer=None)
    ids = [rng.integers(0, vocab, int(rng.integers(8, 201))).tolist() for _ in range(prompts)]
    params = SamplingParams(temperature=1.0, max_new_tokens=limit, seed=seed)
    stats = EngineStats()
    gens = generate(lm, ids, params, batch_size=slots, stats=stats)
    by_length = sorted(range(prompts), key=lambda i: len(ids[i]))
    lengths = [len(gens[i].token_ids) + (gens[i].finish_reason == "eos") for i in by_length]
    return Workload(stats, lengths, slots)
