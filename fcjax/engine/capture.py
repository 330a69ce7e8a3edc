"""Hidden-state capture in a second prefill pass over prompt + trace.

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
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fcjax.engine import mesh as mesh_lib
from fcjax.engine.generate import bucket
from fcjax.models.lm import LM


@dataclasses.dataclass
class Capture:
    last_hidden: np.ndarray  # [tokens, embed] float32, last layer before the final norm
    states: np.ndarray  # [positions, len(layers), embed] float32 (HF hidden_states indices)
    layers: tuple[int, ...]


@functools.partial(jax.jit, static_argnums=0)
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
) -> list[Capture]:
    """One forward per sequence batch; ``layers`` index hidden_states (0 = embeddings,
    L = after the final norm); default: all L + 1."""
    n_layers = lm.config.num_layers
    layers = tuple(range(n_layers + 1)) if layers is None else tuple(int(x) for x in layers)
    for layer in layers:
        if not 0 <= layer <= n_layers:
            raise ValueError(f"layer {layer} outside 0..{n_layers}")
    mesh = mesh or mesh_lib.default_mesh()
    params = mesh_lib.replicate(lm.state, mesh)
    out = []
    for seq, pos in zip(sequences, positions, strict=True):
        seq = [int(t) for t in seq]
        pos = [int(p) for p in pos]
        if any(not 0 <= p < len(seq) for p in pos):
            raise ValueError(f"capture positions must lie in 0..{len(seq) - 1}")
        tokens = np.zeros((1, bucket(len(seq))), np.int32)
        tokens[0, : len(seq)] = seq
        pos_arr = np.zeros((1, bucket(max(len(pos), 1), minimum=8)), np.int32)
        pos_arr[0, : len(pos)] = pos
        last, captured = _capture(
            lm.graphdef, params, jnp.asarray(tokens), jnp.asarray([len(seq)]), jnp.asarray(pos_arr)
        )
        captured = np.asarray(captured[jnp.asarray(layers), 0, : len(pos)], np.float32)
        out.append(
            Capture(
                np.asarray(last[0, : len(seq)], np.float32), captured.transpose(1, 0, 2), layers
            )
        )
    return out
