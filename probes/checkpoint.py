"""Orbax checkpoints of a trained probe: arrays via StandardCheckpointer, metadata as JSON.

A checkpoint directory holds ``arrays/`` (Orbax: the family's parameters for every stored
layer, ``mean``, ``std`` and, when fitted, the Platt ``calibration`` [layers, 2]) and
``probe.json`` (family, chosen layer, layer ids, hidden width, features, fold, label kind,
model name, format version). ``probe.json`` is written after the arrays, so its presence
marks a whole checkpoint. Format 1 (linear, uncalibrated) checkpoints still load. The
directory is a local path or a URL (``fcjax.store.fs``; Orbax reaches gs:// through etils).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from fcjax.store.fs import Location, PathLike, location
from fcjax.store.tables import write_json_atomic
from probes.common import ProbeError
from probes.trainer import Standardizer, logits

FORMAT_VERSION = 2
PARAMS = {"linear": ("w", "b"), "mlp": ("w1", "b1", "w2", "b2")}


class ProbeParams(NamedTuple):
    """A linear probe's per-layer weights: w [layers, d], b [layers]."""

    w: np.ndarray
    b: np.ndarray


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


@dataclass(frozen=True)
class Probe:
    """A deployable probe: per-layer params and statistics, one layer chosen.

    ``params`` is a ``ProbeParams`` (linear) or a dict of the family's leaves with a leading
    layer axis; ``calibration`` (a, c) per layer maps a logit s to sigmoid(a s + c)."""

    params: ProbeParams | dict
    stats: Standardizer
    layer: int  # Position of the chosen layer in ``layers``.
    layers: tuple[int, ...]  # Model layer ids along the layer axis.
    fold: int = -1  # -1: trained on all rows.
    label: str = "correct"
    model: str = ""
    family: str = "linear"
    calibration: np.ndarray | None = None
    features: str = "end"

    @property
    def layer_id(self) -> int:
        """The model layer id of the chosen layer."""
        return self.layers[self.layer]

    @property
    def width(self) -> int:
        return int(np.shape(self.stats.mean)[-1])

    def arrays(self) -> dict[str, np.ndarray]:
        p = self.params
        leaves = {"w": p.w, "b": p.b} if isinstance(p, ProbeParams) else dict(p)
        return {k: np.asarray(v, np.float64) for k, v in leaves.items()}

    def predict_proba_layers(self, x: np.ndarray, layers: Sequence[int] | None = None):
        """P(label) [n, len(layers)] from x [n, len(layers), d] (default: all layers)."""
        pos = list(range(len(self.layers))) if layers is None else list(layers)
        x = np.asarray(x, np.float64)
        if x.ndim != 3 or x.shape[1:] != (len(pos), self.width):
            raise ProbeError(f"x must be [n, {len(pos)}, {self.width}], got {x.shape}")
        mean = np.asarray(self.stats.mean, np.float64)[pos]
        std = np.asarray(self.stats.std, np.float64)[pos]
        params = {k: v[pos][None] for k, v in self.arrays().items()}
        s = logits(params, (x - mean) / std, xp=np)[:, 0]
        if self.calibration is not None:
            cal = np.asarray(self.calibration, np.float64)[pos]
            s = s * cal[:, 0] + cal[:, 1]
        return _sigmoid(s)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """P(label) [n] from x [n, layers, d] (all stored layers) or [n, d] (chosen layer)."""
        x = np.asarray(x)
        if x.ndim == 3:
            if x.shape[1] != len(self.layers):
                raise ProbeError(f"x must be [n, {len(self.layers)}, {self.width}], got {x.shape}")
            x = x[:, self.layer]
        if x.ndim != 2:
            raise ProbeError(f"x must be [n, {self.width}] for one layer, got {x.shape}")
        return self.predict_proba_layers(x[:, None], [self.layer])[:, 0]

    def check_compatible(
        self, *, model: str, layers: Sequence[int], width: int, where: str
    ) -> None:
        """Raises ProbeError naming the mismatch between this probe and a run's states."""
        if self.model and model and self.model != model:
            raise ProbeError(f"{where}: probe trained on model {self.model!r}, run uses {model!r}")
        if self.width != width:
            raise ProbeError(f"{where}: probe hidden size {self.width}, run's states have {width}")
        missing = [v for v in self.layers if v not in tuple(layers)]
        if missing:
            raise ProbeError(
                f"{where}: probe layers {list(self.layers)} ({len(self.layers)}) but the run "
                f"stores {list(layers)} ({len(layers)}); missing {missing}"
            )


def _checkpointer() -> ocp.StandardCheckpointer:
    """A checkpointer of this process alone: a probe is saved and read by one process, so
    in a multi-process run orbax must not wait for the others."""
    me = jax.process_index()
    return ocp.StandardCheckpointer(
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me}
        )
    )


def save_probe(path: PathLike | Location, probe: Probe) -> Location:
    """Writes ``probe`` to the directory ``path`` (replacing an earlier checkpoint)."""
    path = location(path).absolute()
    path.check_backend()
    path.mkdir()
    meta_path = path / "probe.json"
    meta_path.unlink()  # The checkpoint is incomplete until the new metadata lands.
    arrays = {k: v.astype(np.float32) for k, v in probe.arrays().items()}
    if set(arrays) != set(PARAMS[probe.family]):
        raise ProbeError(f"probe family {probe.family!r} needs {PARAMS[probe.family]}")
    arrays["mean"] = np.asarray(probe.stats.mean, np.float32)
    arrays["std"] = np.asarray(probe.stats.std, np.float32)
    if probe.calibration is not None:
        arrays["calibration"] = np.asarray(probe.calibration, np.float32)
    checkpointer = _checkpointer()
    checkpointer.save((path / "arrays").epath, arrays, force=True)
    checkpointer.wait_until_finished()
    checkpointer.close()
    meta = {
        "format_version": FORMAT_VERSION,
        "family": probe.family,
        "layer": int(probe.layer),
        "layers": [int(v) for v in probe.layers],
        "width": probe.width,
        "features": probe.features,
        "fold": int(probe.fold),
        "label": probe.label,
        "model": probe.model,
    }
    write_json_atomic(meta_path, meta)
    return path


def load_probe(path: PathLike | Location) -> Probe:
    """Reads a checkpoint written by ``save_probe``; names the missing piece otherwise."""
    path = location(path).absolute()
    meta_path = path / "probe.json"
    if not meta_path.exists():
        raise ProbeError(f"{meta_path}: missing; {path} is not a complete probe checkpoint")
    meta = json.loads(meta_path.read_text())
    version = meta.get("format_version")
    if version not in (1, FORMAT_VERSION):
        raise ProbeError(f"{meta_path}: unsupported format_version {version}")
    checkpointer = _checkpointer()
    restored = checkpointer.restore((path / "arrays").epath)
    arrays = {k: np.asarray(v) for k, v in restored.items()}
    checkpointer.close()
    family = meta.get("family", "linear")
    if family not in PARAMS:
        raise ProbeError(f"{meta_path}: unknown probe family {family!r}")
    if family == "linear":
        params: ProbeParams | dict = ProbeParams(arrays["w"], arrays["b"])
    else:
        params = {k: arrays[k] for k in PARAMS[family]}
    return Probe(
        params=params,
        stats=Standardizer(arrays["mean"], arrays["std"]),
        layer=meta["layer"],
        layers=tuple(meta["layers"]),
        fold=meta["fold"],
        label=meta["label"],
        model=meta["model"],
        family=family,
        calibration=arrays.get("calibration"),
        features=meta.get("features", "end"),
    )
