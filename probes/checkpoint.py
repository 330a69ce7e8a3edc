"""Orbax checkpoints of a trained probe: arrays via StandardCheckpointer, metadata as JSON.

A checkpoint directory holds ``arrays/`` (Orbax: w, b, mean, std for every stored layer)
and ``probe.json`` (chosen layer, layer ids, fold, label kind, model name, format
version). ``probe.json`` is written after the arrays, so its presence marks a whole
checkpoint.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from fcjax.store.tables import write_json_atomic
from probes.model import ProbeError, ProbeParams, Standardizer, predict_proba

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Probe:
    """A deployable probe: per-layer params and statistics, one layer chosen."""

    params: ProbeParams
    stats: Standardizer
    layer: int  # Position of the chosen layer in ``layers``.
    layers: tuple[int, ...]  # Model layer ids along the layer axis.
    fold: int = -1  # -1: trained on all rows.
    label: str = "correct"
    model: str = ""

    @property
    def layer_id(self) -> int:
        """The model layer id of the chosen layer."""
        return self.layers[self.layer]

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """P(label) [n] from x [n, layers, d] (all stored layers) or [n, d] (chosen layer)."""
        return predict_proba(self.params, self.stats, x, layer=self.layer)


def _checkpointer() -> ocp.StandardCheckpointer:
    """A checkpointer of this process alone: a probe is saved and read by one process, so
    in a multi-process run orbax must not wait for the others."""
    me = jax.process_index()
    return ocp.StandardCheckpointer(
        multiprocessing_options=ocp.options.MultiprocessingOptions(
            primary_host=me, active_processes={me}
        )
    )


def save_probe(path: str | os.PathLike, probe: Probe) -> Path:
    """Writes ``probe`` to the directory ``path`` (replacing an earlier checkpoint)."""
    path = Path(path).absolute()
    path.mkdir(parents=True, exist_ok=True)
    meta_path = path / "probe.json"
    if meta_path.exists():
        meta_path.unlink()  # The checkpoint is incomplete until the new metadata lands.
    arrays = {
        "w": np.asarray(probe.params.w, np.float32),
        "b": np.asarray(probe.params.b, np.float32),
        "mean": np.asarray(probe.stats.mean, np.float32),
        "std": np.asarray(probe.stats.std, np.float32),
    }
    checkpointer = _checkpointer()
    checkpointer.save(path / "arrays", arrays, force=True)
    checkpointer.wait_until_finished()
    checkpointer.close()
    meta = {
        "format_version": FORMAT_VERSION,
        "layer": int(probe.layer),
        "layers": [int(v) for v in probe.layers],
        "fold": int(probe.fold),
        "label": probe.label,
        "model": probe.model,
    }
    write_json_atomic(meta_path, meta)
    return path


def load_probe(path: str | os.PathLike) -> Probe:
    """Reads a checkpoint written by ``save_probe``; names the missing piece otherwise."""
    path = Path(path).absolute()
    meta_path = path / "probe.json"
    if not meta_path.exists():
        raise ProbeError(f"{meta_path}: missing; {path} is not a complete probe checkpoint")
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ProbeError(f"{meta_path}: unsupported format_version {meta.get('format_version')}")
    checkpointer = _checkpointer()
    arrays = checkpointer.restore(path / "arrays")
    checkpointer.close()
    return Probe(
        params=ProbeParams(np.asarray(arrays["w"]), np.asarray(arrays["b"])),
        stats=Standardizer(np.asarray(arrays["mean"]), np.asarray(arrays["std"])),
        layer=meta["layer"],
        layers=tuple(meta["layers"]),
        fold=meta["fold"],
        label=meta["label"],
        model=meta["model"],
    )
