"""Logical axes of the decoder's arrays and the one table that maps them onto a device mesh.

Every weight, cache and activation axis has a logical name (``vocab``, ``embed``, ``heads``,
``kv_heads``, ``head_dim``, ``mlp``, ``batch``, ``seq``); ``RULES`` says which mesh axis each
is split over: rows over ``data``; attention heads, MLP columns and the vocabulary over
``model`` (Megatron-style tensor parallelism: the residual stream stays whole on every model
shard, the o and down projections end in an all-reduce). Weight placement, the KV pool's
placement (``fcjax.engine.mesh``), the decoder's activation constraints and the Pallas
kernels' ``shard_map`` all read this table, so they cannot disagree.

A logical axis is split only where it divides the mesh axis. Query and KV heads are split
together: when ``kv_heads`` is not a multiple of the ``model`` axis, attention (its weights
and the KV pool) is replicated over ``model`` and only the MLP and vocabulary are split
(``resolve`` says which; ``fcjax.engine.plan`` reports it).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import jax
from jax.sharding import PartitionSpec as P

DATA, MODEL = "data", "model"

RULES: dict[str, str | None] = {
    "batch": DATA,  # contexts or row slots
    "vocab": MODEL,
    "heads": MODEL,
    "kv_heads": MODEL,
    "mlp": MODEL,
    "embed": None,
    "head_dim": None,
    "seq": None,
}

# logical axes of each parameter, by the last names of its path in the decoder's state
_ATTN = {
    "q": ("embed", "heads", "head_dim"),
    "k": ("embed", "kv_heads", "head_dim"),
    "v": ("embed", "kv_heads", "head_dim"),
    "o": ("heads", "head_dim", "embed"),
    "q_bias": ("heads", "head_dim"),
    "k_bias": ("kv_heads", "head_dim"),
    "v_bias": ("kv_heads", "head_dim"),
    "o_bias": ("embed",),
}
_MLP = {"gate": ("embed", "mlp"), "up": ("embed", "mlp"), "down": ("mlp", "embed")}
_TOP = {"embed": ("vocab", "embed"), "lm_head": ("embed", "vocab")}
_NORMS = {"q_norm": ("head_dim",), "k_norm": ("head_dim",)}  # other norms: ("embed",)


class ShardingError(ValueError):
    """An array the rules do not cover."""


def param_axes(names: tuple[str, ...]) -> tuple[str, ...]:
    """Logical axes of the decoder parameter at path ``names`` (e.g. blocks/0/attn/q)."""
    last = names[-1]
    parent = names[-2] if len(names) > 1 else ""
    if parent == "attn" and last in _ATTN:
        return _ATTN[last]
    if parent == "mlp" and last in _MLP:
        return _MLP[last]
    if len(names) == 1 and last in _TOP:
        return _TOP[last]
    if last == "scale":
        return _NORMS.get(parent, ("embed",))
    raise ShardingError(f"no logical axes for the parameter {'/'.join(names)}")


def path_names(path) -> tuple[str, ...]:
    """A pytree key path as plain names (nnx's trailing ``value`` dropped)."""
    names = tuple(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)
    return tuple(n for n in names if n != "value")


def config_sizes(config) -> dict[str, int]:
    """Sizes of the split logical axes of a ``ModelConfig``."""
    return {
        "vocab": config.vocab_size,
        "heads": config.num_heads,
        "kv_heads": config.num_kv_heads,
        "mlp": config.intermediate_size,
    }


def resolve(sizes: Mapping[str, int], mesh_shape: Mapping[str, int]) -> dict[str, str | None]:
    """``RULES`` for arrays of these logical sizes on a mesh of this shape: a logical axis
    maps to its mesh axis only where that axis has more than one device and divides it;
    ``heads`` follows ``kv_heads`` (a query head stays with its KV head)."""
    out: dict[str, str | None] = {}
    for logical, axis in RULES.items():
        n = mesh_shape.get(axis, 1) if axis else 1
        size = sizes.get("kv_heads" if logical == "heads" else logical)
        split = n > 1 and (logical == "batch" or (size is not None and size % n == 0))
        out[logical] = axis if split else None
    return out


def attention_split(config, mesh_shape: Mapping[str, int]) -> bool:
    """Whether attention heads (and the KV pool) are split over ``model`` on this mesh."""
    return resolve(config_sizes(config), mesh_shape)["kv_heads"] is not None


def spec(axes: tuple[str | None, ...], rules: Mapping[str, str | None]) -> P:
    """The PartitionSpec of an array with these logical axes (None: not split)."""
    return P(*(rules.get(a) if a else None for a in axes))


def _context_mesh():
    """The mesh set by ``jax.set_mesh`` around the current trace (None: none, or 1 device)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or MODEL not in mesh.axis_names or mesh.size == 1:
        return None
    return mesh


@functools.lru_cache(maxsize=64)
def _rules(config, mesh_shape: tuple) -> dict[str, str | None]:
    return resolve(config_sizes(config), dict(mesh_shape))


def constrain(x, axes: tuple[str | None, ...], config):
    """``with_sharding_constraint`` on x's trailing axes (logical names; the leading ones
    are rows), when a mesh with a ``model`` axis is set."""
    mesh = _context_mesh()
    if mesh is None or mesh.shape[MODEL] == 1:
        return x
    rules = _rules(config, tuple(mesh.shape.items()))
    # rows are split over ``data`` along contexts or row slots (the engine's choice), so
    # they stay unconstrained there; without a data axis they are whole on every device
    rows = P.UNCONSTRAINED if mesh.shape.get(DATA, 1) > 1 else None
    lead = (rows,) * (x.ndim - len(axes))
    return jax.lax.with_sharding_constraint(x, P(*lead, *spec(axes, rules)))


def shard_decode(attend: Callable, config, q, ctx_k, ctx_v, ctx_valid, own_k, own_v, *rest):
    """``attend`` (a decode attention with ``fcjax.models.attention.decode_attention``'s
    arguments) under ``shard_map`` over the context mesh: each device runs it on its rows
    (``data``: contexts when they divide it, else the rows of a single context) and its KV
    heads (``model``, when they are split). Without such a mesh: ``attend`` itself.

    With several contexts that do not divide ``data`` (the engine then splits each context's
    rows, while the own caches' flat [contexts * rows] axis splits in contiguous chunks) the
    rows are not split here: XLA gathers them (correct, slower)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or not {DATA, MODEL} <= set(mesh.axis_names):
        return attend(q, ctx_k, ctx_v, ctx_valid, own_k, own_v, *rest)
    n_ctx, rows = ctx_valid.shape
    n_data = mesh.shape[DATA]
    by_ctx = DATA if n_data > 1 and n_ctx % n_data == 0 else None
    by_row = DATA if n_data > 1 and not by_ctx and n_ctx == 1 and rows % n_data == 0 else None
    flat = by_ctx or by_row
    heads = MODEL if attention_split(config, mesh.shape) else None
    rows_spec = P(by_ctx, by_row)
    fn = jax.shard_map(
        attend,
        mesh=mesh,
        in_specs=(
            P(by_ctx, by_row, heads, None),  # q [ctx, rows, heads, hd]
            P(by_ctx, heads, None, None),  # ctx_k [ctx, kv, len, hd]
            P(by_ctx, heads, None, None),
            rows_spec,  # ctx_valid [ctx, rows]
            P(flat, heads, None, None),  # own_k [ctx * rows, kv, new, hd]
            P(flat, heads, None, None),
            rows_spec,  # own_valid
            P(),  # own_end
        ),
        out_specs=P(by_ctx, by_row, heads, None),
        check_vma=False,
    )
    return fn(q, ctx_k, ctx_v, ctx_valid, own_k, own_v, *rest)
