"""Device mesh and placement by the logical axis rules (``fcjax.models.sharding``).

The default is a data-parallel mesh over every visible device (``data`` axis): rows are
sharded, parameters replicated. ``make_mesh("data:4,model:2")`` adds a ``model`` axis over
which attention heads, MLP columns, the vocabulary and the KV pool's heads are split (tensor
parallelism for large models). Meshes follow the device topology (``jax.make_mesh``: on a
TPU slice the ``model`` axis lies along the fastest interconnect).
"""

from __future__ import annotations

import re

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fcjax.models import sharding as rules_lib
from fcjax.models.sharding import DATA, MODEL


class MeshError(ValueError):
    """A mesh spec that does not fit the visible devices."""


def mesh_sizes(spec: str) -> dict[str, int]:
    """{"data": D, "model": M} of a spec such as ``"data:8"`` or ``"data:4,model:2"`` (an
    axis left out is 1; D may be -1: the rest of the devices)."""
    sizes = {DATA: 1, MODEL: 1}
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(data|model)\s*:\s*(-?\d+)\s*", part)
        if not m:
            raise MeshError(f"bad mesh spec {spec!r}: expected e.g. 'data:8' or 'data:4,model:2'")
        sizes[m.group(1)] = int(m.group(2))
    return sizes


def parse_mesh(spec: str | None, n: int) -> tuple[int, int]:
    """(data, model) sizes of a spec (``mesh_sizes``; None: all ``n`` devices on data) for
    ``n`` devices."""
    if not spec:
        return n, 1
    sizes = mesh_sizes(spec)
    if sizes[DATA] == -1:
        sizes[DATA] = n // max(sizes[MODEL], 1)
    if sizes[DATA] < 1 or sizes[MODEL] < 1 or sizes[DATA] * sizes[MODEL] != n:
        raise MeshError(
            f"mesh {spec!r} needs {sizes[DATA] * sizes[MODEL]} devices, but {n} are visible"
        )
    return sizes[DATA], sizes[MODEL]


def make_mesh(spec: str | None = None, devices=None) -> Mesh:
    """Builds a mesh from ``"data:8"``, ``"data:4,model:2"`` or None (all devices on data),
    laid out along the devices' topology (``jax.make_mesh``), both axes ``Auto``.

    Devices default to this process's local devices: hosts decode independently (see
    ``fcjax.engine.multihost``)."""
    devices = list(devices if devices is not None else jax.local_devices())
    shape = parse_mesh(spec, len(devices))
    auto = (AxisType.Auto, AxisType.Auto)
    try:
        return jax.make_mesh(shape, (DATA, MODEL), axis_types=auto, devices=devices)
    except (ValueError, NotImplementedError, AssertionError):
        # a subset of a slice's devices that the topology-aware layout cannot tile
        return Mesh(np.array(devices).reshape(shape), (DATA, MODEL), axis_types=auto)


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


def active(mesh: Mesh):
    """Context in which jitted engine calls trace on ``mesh`` (the decoder's activation
    constraints and the Pallas kernels' ``shard_map`` read it)."""
    return jax.set_mesh(mesh)


def data_size(mesh: Mesh) -> int:
    return mesh.shape[DATA]


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def put(x, mesh: Mesh, axis: int | None):
    """Places x on the mesh, sharded over ``data`` along ``axis`` (None: replicated)."""
    spec = [None] * np.ndim(x)
    if axis is not None:
        spec[axis] = DATA
    return jax.device_put(x, NamedSharding(mesh, P(*spec)))


def param_specs(state, mesh_shape):
    """PartitionSpecs of a decoder state (or its shapes) by the logical axis rules, for a
    mesh of this shape (``{"data": D, "model": M}``)."""
    leaves = jax.tree_util.tree_leaves_with_path(state)
    sizes: dict[str, int] = {}
    for path, x in leaves:
        for name, dim in zip(
            rules_lib.param_axes(rules_lib.path_names(path)), x.shape, strict=True
        ):
            sizes[name] = dim
    rules = rules_lib.resolve(sizes, mesh_shape)

    def one(path, x):
        return rules_lib.spec(rules_lib.param_axes(rules_lib.path_names(path)), rules)

    return jax.tree_util.tree_map_with_path(one, state)


def param_shardings(state, mesh: Mesh):
    """NamedShardings of a decoder state by the logical axis rules."""
    specs = param_specs(state, mesh.shape)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)


def _is_spec(x) -> bool:
    return isinstance(x, P)


def replicate(state, mesh: Mesh):
    """Places parameters: replicated over ``data``, split over ``model`` by the rules."""
    key = (id(state), mesh)
    cached = _PLACED.get(key)
    if cached is not None and cached[0] is state:
        return cached[1]
    placed = jax.device_put(state, param_shardings(state, mesh))
    _PLACED.clear()
    _PLACED[key] = (state, placed)
    return placed


_PLACED: dict = {}

# logical axes of the slot pool's arrays (``fcjax.engine.decode.Pool``); "rows" is the
# axis the engine splits over ``data`` (contexts, or each context's row slots)
_POOL_AXES = {
    "ctx_k": ("contexts", "kv_heads", "seq", "head_dim"),
    "ctx_v": ("contexts", "kv_heads", "seq", "head_dim"),
    "own_k": ("batch", "kv_heads", "seq", "head_dim"),  # [contexts * rows, ...]
    "own_v": ("batch", "kv_heads", "seq", "head_dim"),
    "ctx_h": ("contexts", None, "embed"),
}


def pool_spec(config, mesh_shape, row_axis: int, path, ndim: int) -> P:
    """PartitionSpec of one slot-pool array: ``data`` over contexts (``row_axis`` 0) or over
    the row slots of each context (1); the caches' KV heads over ``model`` (``RULES``)."""
    rules = rules_lib.resolve(rules_lib.config_sizes(config), mesh_shape)
    names = [getattr(p, "name", None) for p in path]
    field = next((n for n in names if n in _POOL_AXES), None)
    if ndim == 0:
        return P()
    if field is None:  # per-row state [contexts, rows, ...]
        axes = [None] * ndim
        axes[row_axis] = rules["batch"]
        return P(*axes)
    logical = dict(rules, contexts=rules["batch"] if row_axis == 0 else None)
    return rules_lib.spec(_POOL_AXES[field], logical)


def pool_sharding(config, mesh: Mesh, row_axis: int, path, x) -> NamedSharding:
    """``pool_spec`` on ``mesh``."""
    return NamedSharding(mesh, pool_spec(config, mesh.shape, row_axis, path, x.ndim))


def local_shape(shape: tuple[int, ...], spec: P, mesh_shape) -> tuple[int, ...]:
    """The per-device block of an array of ``shape`` placed by ``spec``."""
    out = []
    for i, dim in enumerate(shape):
        axes = spec[i] if i < len(spec) else None
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        n = int(np.prod([mesh_shape[a] for a in axes])) if axes else 1
        out.append(-(-dim // n))
    return tuple(out)
