"""Proxies of decode efficiency that a CPU can measure (``experiments.benchmark --proxies``).

- ``step_bytes``: the bytes XLA's cost analysis says one compiled decode step reads and
  writes, against the ideal (every weight and the live KV once). The step is compiled for a
  pool whose caches hold one attention block each, so every block loop runs exactly once and
  the cost analysis (which counts a loop body once) covers the whole step.
- ``layout_copies``: instructions of that program that copy, transpose or slice a KV-sized or
  weight-sized array: what a batch-first cache layout and per-layer weights exist to avoid.
"""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fcjax.engine.decode import Layout, Pool, StopTables, _zeros_pool, decode_step
from fcjax.engine.sampling import Sampler
from fcjax.models.attention import CTX_BLOCK, OWN_BLOCK
from fcjax.models.lm import LM


@functools.partial(
    jax.jit, static_argnames=("graphdef", "sampler", "eos"), donate_argnames=("pool",)
)
def _one_step(graphdef, params, pool: Pool, stops: StopTables, limit, *, sampler, eos):
    return decode_step(nnx.merge(graphdef, params), pool, stops, limit, sampler, eos)


def one_block_layout(contexts: int, rows: int) -> Layout:
    """A pool whose context and own caches are one attention block each."""
    return Layout(contexts=contexts, rows=rows, ctx_len=CTX_BLOCK, new=OWN_BLOCK, reads=1)


def compile_step(lm: LM, layout: Layout, sampler: Sampler):
    """The compiled program of one decode step over a pool of ``layout``."""
    pool = jax.eval_shape(lambda: _zeros_pool(lm.config, layout, lm.dtype))
    vocab = lm.config.vocab_size
    stops = StopTables(
        jax.ShapeDtypeStruct((vocab,), bool),
        jax.ShapeDtypeStruct((vocab,), jnp.uint32),
        jax.ShapeDtypeStruct((vocab,), jnp.uint32),
    )
    limit = jax.ShapeDtypeStruct((), jnp.int32)
    return _one_step.lower(
        lm.graphdef, lm.state, pool, stops, limit, sampler=sampler, eos=(-1,)
    ).compile()


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
    """HLO bytes of one decode step against weights + KV, with every cache full (live)."""
    compiled = compiled or compile_step(lm, layout, sampler)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    pool = jax.eval_shape(lambda: _zeros_pool(lm.config, layout, lm.dtype))
    return StepBytes(float(cost["bytes accessed"]), _nbytes(lm.state), _nbytes(pool.cache))


_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\w+)\[([\d,]*)\]\S* (\S+?)\(")
_ITEMSIZE = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1}
_LAYOUT_OPS = ("copy", "transpose", "dynamic-slice", "slice")


def layout_copies(lm: LM, layout: Layout, compiled) -> list[str]:
    """Instructions (fused or not) that copy or transpose at least half of one layer's KV
    cache, or slice at least half of the smallest weight matrix, per decode step."""
    itemsize = jnp.dtype(lm.dtype).itemsize
    weights = [x for x in jax.tree.leaves(lm.state) if np.ndim(x) >= 2]
    smallest_weight = min(int(np.prod(x.shape)) for x in weights) * itemsize
    cfg = lm.config
    per_token = cfg.num_kv_heads * cfg.head_dim * itemsize
    layer_kv = min(
        layout.contexts * layout.ctx_len * per_token,
        layout.contexts * layout.rows * layout.new * per_token,
    )
    found = []
    for line in compiled.as_text().splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        name, dtype, dims, op = m.groups()
        size = int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
        size *= _ITEMSIZE.get(dtype, 4)
        kind = (
            None
            if "update" in name or "update" in op
            else next((w for w in _LAYOUT_OPS if w == op or w in name), None)
        )
        limit = layer_kv if kind in ("copy", "transpose") else smallest_weight
        if kind is not None and size >= limit / 2:
            found.append(f"{op} {name} {dtype}[{dims}]")
    return found
