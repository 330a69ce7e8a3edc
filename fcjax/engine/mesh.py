"""Device mesh and placement rules.

The default is a data-parallel mesh over every visible device (``data`` axis): rows are
sharded, parameters replicated. ``make_mesh("data:4,model:2")`` adds a ``model`` axis over
which attention heads and MLP columns are split (tensor parallelism for large models).
"""

from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


class MeshError(ValueError):
    """A mesh spec that does not fit the visible devices."""


def make_mesh(spec: str | None = None, devices=None) -> Mesh:
    """Builds a mesh from ``"data:8"``, ``"data:4,model:2"`` or None (all devices on data).

    Devices default to this process's local devices: hosts decode independently (see
    ``fcjax.engine.multihost``)."""
    devices = list(devices if devices is not None else jax.local_devices())
    n = len(devices)
    if not spec:
        return Mesh(np.array(devices).reshape(n, 1), ("data", "model"))
    sizes = {"data": 1, "model": 1}
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(data|model)\s*:\s*(-?\d+)\s*", part)
        if not m:
            raise MeshError(f"bad mesh spec {spec!r}: expected e.g. 'data:8' or 'data:4,model:2'")
        sizes[m.group(1)] = int(m.group(2))
    if sizes["data"] == -1:
        sizes["data"] = n // max(sizes["model"], 1)
    if sizes["data"] < 1 or sizes["model"] < 1 or sizes["data"] * sizes["model"] != n:
        raise MeshError(
            f"mesh {spec!r} needs {sizes['data'] * sizes['model']} devices, but {n} are visible"
        )
    return Mesh(np.array(devices).reshape(sizes["data"], sizes["model"]), ("data", "model"))


_DEFAULT: dict = {}


def default_mesh() -> Mesh:
    """The mesh engine calls use when none is passed (``set_default_mesh`` changes it)."""
    if "user" in _DEFAULT:
        return _DEFAULT["user"]
    n = len(jax.local_devices())
    if n not in _DEFAULT:
        _DEFAULT[n] = make_mesh()
    return _DEFAULT[n]


def set_default_mesh(mesh: Mesh | None) -> None:
    if mesh is None:
        _DEFAULT.pop("user", None)
    else:
        _DEFAULT["user"] = mesh


def data_size(mesh: Mesh) -> int:
    return mesh.shape["data"]


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put(x, mesh: Mesh, axis: int | None):
    """Places x on the mesh, sharded over ``data`` along ``axis`` (None: replicated)."""
    spec = [None] * np.ndim(x)
    if axis is not None:
        spec[axis] = "data"
    return jax.device_put(x, NamedSharding(mesh, P(*spec)))


# Parameter placement for tensor parallelism: path suffix -> axis split over ``model``
# (axes of one layer's parameter: q [embed, heads, hd], o [heads, hd, embed], ...).
_MODEL_AXIS = {
    ("attn", "q"): 1,
    ("attn", "k"): 1,
    ("attn", "v"): 1,
    ("attn", "o"): 0,
    ("attn", "q_bias"): 0,
    ("attn", "k_bias"): 0,
    ("attn", "v_bias"): 0,
    ("mlp", "gate"): 1,
    ("mlp", "up"): 1,
    ("mlp", "down"): 0,
}


def param_spec(path: tuple, shape: tuple[int, ...], model_size: int) -> P:
    spec = [None] * len(shape)
    axis = _MODEL_AXIS.get(tuple(str(p) for p in path[-2:]))
    if axis is not None and model_size > 1 and shape[axis] % model_size == 0:
        spec[axis] = "model"
    return P(*spec)


def replicate(state, mesh: Mesh):
    """Places parameters: replicated over ``data``, split over ``model`` where it divides."""
    key = (id(state), mesh)
    cached = _PLACED.get(key)
    if cached is not None and cached[0] is state:
        return cached[1]
    model_size = mesh.shape["model"]

    def place(path, x):
        names = tuple(getattr(p, "key", getattr(p, "name", p)) for p in path)
        names = tuple(n for n in names if n != "value")
        return jax.device_put(x, NamedSharding(mesh, param_spec(names, x.shape, model_size)))

    placed = jax.tree_util.tree_map_with_path(place, state)
    _PLACED.clear()
    _PLACED[key] = (state, placed)
    return placed


_PLACED: dict = {}
