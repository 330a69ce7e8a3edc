"""Hidden-state capture in a second prefill pass over prompt + trace, batched and sharded.

Decoding stays lean (no hidden rows leave the loop); afterwards one causal forward over the
finished sequence yields what the estimators read: the last decoder layer's output (before
the final norm) for every token, for RCC, and every layer's hidden state at chosen positions
(step ends), for probes, without materialising [layers, tokens, width].
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from fcjax.engine import mesh as mesh_lib
from fcjax.engine.generate import bucket, row_bucket
from fcjax.models.lm import LM, XLA_OPTIONS


@dataclasses.dataclass
class Capture:
    last_hidden: np.ndarray  # [tokens, embed] float32, last layer before the final norm
    states: np.ndarray  # [positions, len(layers), embed] float32 (HF hidden_states indices)
    layers: tuple[int, ...]


@functools.partial(jax.jit, static_argnums=0, compiler_options=XLA_OPTIONS)
def _capture(graphdef, state, tokens, lengths, positions):
    model = nnx.merge(graphdef, state)
    out = model.prefill(tokens, lengths, capture_positions=positions, return_kv=False)
    return out.last_hidden, out.captured


def capture(
    lm: LM,
    sequences: Sequence[Sequence[int]],
    positions: Sequence[Sequence[int]],
    layers: Sequence[int] | None = None,
    *,
    mesh=None,
    batch_size: int = 8,
) -> list[Capture]:
    """Forwards of ``batch_size`` sequences at a time (similar lengths together, rows
    sharded over the mesh's ``data`` axis); ``layers`` index hidden_states (0 = embeddings,
    L = after the final norm); default: all L + 1. Results come back in input order."""
    n_layers = lm.config.num_layers
    layers = tuple(range(n_layers + 1)) if layers is None else tuple(int(x) for x in layers)
    for layer in layers:
        if not 0 <= layer <= n_layers:
            raise ValueError(f"layer {layer} outside 0..{n_layers}")
    if batch_size < 1:
        raise ValueError(f"capture: batch_size must be >= 1, got {batch_size}")
    seqs = [[int(t) for t in seq] for seq in sequences]
    pos = [[int(p) for p in ps] for ps in positions]
    if len(seqs) != len(pos):
        raise ValueError(f"capture: {len(seqs)} sequences but {len(pos)} position lists")
    for seq, ps in zip(seqs, pos, strict=True):
        if any(not 0 <= p < len(seq) for p in ps):
            raise ValueError(f"capture positions must lie in 0..{len(seq) - 1}")
    mesh = mesh or mesh_lib.default_mesh()
    params = mesh_lib.replicate(lm.state, mesh)
    n_data = mesh_lib.data_size(mesh)
    pick = np.asarray(layers)
    out: list[Capture | None] = [None] * len(seqs)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for start in range(0, len(order), batch_size):
        members = order[start : start + batch_size]
        rows = row_bucket(len(members), n_data)
        tokens = np.zeros((rows, bucket(max(len(seqs[i]) for i in members))), np.int32)
        lengths = np.ones((rows,), np.int32)
        width = bucket(max(max(len(pos[i]) for i in members), 1), minimum=8)
        where = np.zeros((rows, width), np.int32)
        for row, i in enumerate(members):
            tokens[row, : len(seqs[i])] = seqs[i]
            lengths[row] = len(seqs[i])
            where[row, : len(pos[i])] = pos[i]
        put = lambda x: mesh_lib.put(x, mesh, 0)  # noqa: E731
        with mesh_lib.active(mesh):
            last, captured = jax.device_get(
                _capture(lm.graphdef, params, put(tokens), put(lengths), put(where))
            )
        for row, i in enumerate(members):
            states = np.asarray(captured[pick, row, : len(pos[i])], np.float32)
            out[i] = Capture(
                np.asarray(last[row, : len(seqs[i])], np.float32),
                states.transpose(1, 0, 2),
                layers,
            )
    return out  # type: ignore[return-value]
