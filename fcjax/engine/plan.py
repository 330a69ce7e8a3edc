"""Memory plan of a decode run: bytes per device and per host for a model, a mesh and a slot
pool, and the largest pools that fit a device (``python -m experiments.plan``).

Weights, the KV pool and the pool's per-row state are counted exactly: the arrays' shapes
(``jax.eval_shape``) placed by the same rules the engine places them by
(``fcjax.engine.mesh.param_specs`` / ``pool_spec``). Transient buffers are estimates of the
largest live set of each program, per device:

- decode step: the residual stream (float32), q/k/v and the attention state of one layer,
  the MLP's hidden columns, the logits [rows, vocab] (float32) and the sampler's full-vocabulary
  temporaries (one float32 copy of the logits, plus the top-k shortlist);
- prefill: one group of contexts (about ``PREFILL_TOKENS`` positions) through one layer with
  the XLA attention's [query chunk, keys] scores (cuDNN's flash attention on GPU keeps less).

``compiled_step_memory`` compiles the decode step for a mesh (abstract weights, nothing is
allocated) and returns XLA's ``memory_analysis``: the test checks the formulas against it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fcjax.engine import mesh as mesh_lib
from fcjax.engine.decode import Layout, zeros_pool
from fcjax.engine.generate import PREFILL_TOKENS
from fcjax.engine.sampling import SHORTLIST
from fcjax.models.attention import PREFILL_QUERY_CHUNK, block_size
from fcjax.models.config import ConfigError, ModelConfig, from_hf_config
from fcjax.models.presets import PRESETS
from fcjax.models.sharding import DATA, MODEL, config_sizes, resolve

GB = 1e9
DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32"}


class PlanError(ValueError):
    """A model, mesh or pool the planner cannot plan (named in the message)."""


def model_config(spec: str) -> ModelConfig:
    """A preset name (``qwen2-7b`` or ``random:qwen2-7b``), an HF ``config.json`` or a
    directory holding one."""
    name = spec.removeprefix("random:")
    if name in PRESETS:
        return PRESETS[name]
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise PlanError(
            f"--model {spec!r}: not a preset ({', '.join(PRESETS)}), a config.json or a "
            f"directory with one"
        )
    try:
        return from_hf_config(json.loads(path.read_text()), name=path.parent.name)
    except (json.JSONDecodeError, ConfigError, KeyError) as e:
        raise PlanError(f"{path}: {type(e).__name__}: {e}") from None


def _nbytes(shape, dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * jnp.dtype(dtype).itemsize


def weight_bytes(config: ModelConfig, dtype, mesh_shape) -> tuple[int, int]:
    """(per device, total) bytes of the weights."""
    return _weight_bytes(config, jnp.dtype(dtype), tuple(sorted(mesh_shape.items())))


@functools.lru_cache(maxsize=32)
def _weight_bytes(config: ModelConfig, dtype, mesh: tuple) -> tuple[int, int]:
    from fcjax.models.decoder import shaped

    mesh_shape = dict(mesh)

    _, state = nnx.split(shaped(config, dtype))
    specs = mesh_lib.param_specs(state, mesh_shape)
    leaves = jax.tree.leaves(state)
    local = [mesh_lib.local_shape(x.shape, s, mesh_shape) for x, s in zip(
        leaves, jax.tree.leaves(specs, is_leaf=mesh_lib._is_spec), strict=True)]  # fmt: skip
    per_device = sum(_nbytes(shape, x.dtype) for shape, x in zip(local, leaves, strict=True))
    return per_device, sum(_nbytes(x.shape, x.dtype) for x in leaves)


def pool_bytes(config: ModelConfig, layout: Layout, dtype, mesh_shape, row_axis: int):
    """(KV caches, the rest of the pool) per device. Every layer's caches have the same
    shapes, so one layer's pool is traced and its caches counted ``num_layers`` times."""
    one = dataclasses.replace(config, num_layers=1)
    shapes = jax.eval_shape(lambda: zeros_pool(one, layout, dtype))
    kv = rest = 0
    for path, x in jax.tree_util.tree_leaves_with_path(shapes):
        spec = mesh_lib.pool_spec(config, mesh_shape, row_axis, path, x.ndim)
        n = _nbytes(mesh_lib.local_shape(x.shape, spec, mesh_shape), x.dtype)
        if any(getattr(p, "name", None) == "cache" for p in path):
            kv += n * config.num_layers
        else:
            rest += n
    return kv, rest


@dataclasses.dataclass(frozen=True)
class Plan:
    """Bytes per device (host: per process) of one decode run."""

    model: str
    mesh: dict
    layout: Layout
    dtype: str
    attention_split: bool  # heads and the KV pool split over ``model``
    weights: int
    kv_pool: int
    pool_state: int  # the pool's per-row state (hidden states, keys, counters)
    decode_activations: int
    prefill_activations: int
    logits: int
    sampler: int
    host: int  # one host copy of the weights (the load's working set)
    weights_total: int

    @property
    def transient(self) -> int:
        """The larger program's live temporaries (decode step or prefill)."""
        return max(self.decode_activations + self.logits + self.sampler, self.prefill_activations)

    @property
    def total(self) -> int:
        return self.weights + self.kv_pool + self.pool_state + self.transient

    @property
    def arguments(self) -> int:
        """What a compiled decode step takes as arguments per device: weights and pool."""
        return self.weights + self.kv_pool + self.pool_state


def _divide(n: int, by: int) -> int:
    return -(-n // by)


def plan(
    config: ModelConfig,
    mesh_shape,
    rows: int,
    context: int,
    new: int = 1024,
    rows_per_context: int = 1,
    dtype="bfloat16",
) -> Plan:
    """The memory plan of a pool of ``rows`` row slots (``rows_per_context`` per context
    slot) whose contexts hold ``context`` positions and rows ``new`` own positions, on a
    mesh of ``mesh_shape`` (``{"data": D, "model": M}``)."""
    d, m = mesh_shape.get(DATA, 1), mesh_shape.get(MODEL, 1)
    if rows < 1 or context < 1 or new < 1 or rows_per_context < 1:
        raise PlanError("rows, context, new and rows_per_context must be >= 1")
    if rows % rows_per_context:
        raise PlanError(f"rows ({rows}) must be a multiple of rows_per_context")
    contexts = rows // rows_per_context
    layout = Layout(contexts, rows_per_context, context, new, 1)
    row_axis = 0 if contexts % d == 0 else 1
    if row_axis == 1 and rows_per_context % d:
        raise PlanError(f"neither contexts ({contexts}) nor rows per context divide data={d}")
    dtype = jnp.dtype(DTYPES.get(str(dtype), dtype))
    size = dtype.itemsize
    rules = resolve(config_sizes(config), {DATA: d, MODEL: m})
    split = {k: (m if v == MODEL else 1) for k, v in rules.items()}
    heads, kv = (
        _divide(config.num_heads, split["heads"]),
        _divide(config.num_kv_heads, split["kv_heads"]),
    )
    mlp, vocab = _divide(config.intermediate_size, split["mlp"]), config.vocab_size
    emb, hd = config.hidden_size, config.head_dim
    weights, weights_total = weight_bytes(config, dtype, {DATA: d, MODEL: m})
    kv_pool, pool_state = pool_bytes(config, layout, dtype, {DATA: d, MODEL: m}, row_axis)

    r = _divide(rows, d)  # rows a device decodes
    blk = max(block_size(context), block_size(new))
    decode = r * (
        3 * emb * 4  # residual (float32), its normed copy, the layer's output
        + (heads + 2 * kv) * hd * size  # q, k, v
        + 2 * heads * hd * 4  # attention state (float32) and output
        + heads * (blk + 2) * 4  # one block of scores, max and sum
        + 3 * mlp * size  # gate, up, their product
    )
    logits = r * _divide(vocab, split["vocab"]) * 4
    sampler = r * (vocab * 4 + SHORTLIST * 8)

    group = max(1, min(contexts, PREFILL_TOKENS // context))
    group = 1 << (group.bit_length() - 1)
    seqs = group // d if group % d == 0 else group
    pos = seqs * context
    chunk = PREFILL_QUERY_CHUNK if context > PREFILL_QUERY_CHUNK else context
    prefill = (
        pos * 3 * emb * 4
        + pos * (heads + 4 * kv) * hd * size  # q, k, v and the cache-layout k, v
        + 2 * seqs * heads * chunk * context * 4  # scores and their softmax (XLA path)
        + pos * 3 * mlp * size
        + pos * emb * size
    )
    return Plan(
        model=config.name,
        mesh={DATA: d, MODEL: m},
        layout=layout,
        dtype=dtype.name,
        attention_split=rules["kv_heads"] is not None,
        weights=weights,
        kv_pool=kv_pool,
        pool_state=pool_state,
        decode_activations=decode,
        prefill_activations=prefill,
        logits=logits,
        sampler=sampler,
        host=weights_total,
        weights_total=weights_total,
    )


def largest_rows(
    config, mesh_shape, context, memory, new=1024, rows_per_context=1, dtype="bfloat16"
):
    """The most row slots (a multiple of data x rows_per_context) whose plan fits
    ``memory`` bytes per device; 0 when none does."""
    step = mesh_shape.get(DATA, 1) * rows_per_context

    def fits(n: int) -> bool:
        p = plan(config, mesh_shape, n * step, context, new, rows_per_context, dtype)
        return p.total <= memory

    if not fits(1):
        return 0
    hi = 1
    while fits(hi * 2):
        hi *= 2
    lo, hi = hi, hi * 2  # fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * step


def compiled_step_memory(config, layout: Layout, dtype, mesh, sampler, row_axis: int = 0):
    """XLA's ``memory_analysis`` of the engine's decode chunk (two steps: one is unrolled into
    a program the SPMD partitioner rejects on CPU) compiled for
    ``mesh``, weights and pool placed as the engine places them (abstract: nothing is
    allocated)."""
    from fcjax.engine.decode import STOP_DTYPES, Refill, StopTables, decode_chunk, pool_shardings
    from fcjax.engine.profile import abstract_lm

    lm = abstract_lm(config, dtype)

    def placed(shapes, shardings):
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
        )

    weights = placed(lm.state, mesh_lib.param_shardings(lm.state, mesh))
    shapes = jax.eval_shape(lambda: zeros_pool(config, layout, dtype))
    pool = placed(shapes, pool_shardings(config, layout, dtype, mesh, row_axis))
    rep = mesh_lib.replicated(mesh)
    rows = jax.sharding.NamedSharding(mesh, mesh_lib.pool_spec(config, mesh.shape, row_axis, (), 2))
    c, r = layout.contexts, layout.rows
    refill = Refill(
        *(jax.ShapeDtypeStruct((c, r), t, sharding=rows) for t in (bool, jnp.int32, jnp.int32)),
        jax.ShapeDtypeStruct((c, r, 3), jnp.uint32, sharding=rows),
    )
    vocab = config.vocab_size
    stops = StopTables(*(jax.ShapeDtypeStruct((vocab,), t, sharding=rep) for t in STOP_DTYPES))
    limit = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
    seed = jax.ShapeDtypeStruct((), jnp.uint32, sharding=rep)
    with mesh_lib.active(mesh):
        traced = decode_chunk.trace(
            lm.graphdef, weights, pool, refill, stops, limit, seed,
            sampler=sampler, steps=2,
        )  # fmt: skip
        return traced.lower().compile().memory_analysis()
