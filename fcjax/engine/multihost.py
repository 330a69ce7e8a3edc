"""Multi-host runs: every process decodes its own share of the examples on its local
devices, then the results are gathered to every process.

Sampling needs no communication between hosts per token, so each host runs the same jitted
programs independently on a data-parallel mesh over ``jax.local_devices()``; only the
finished rows cross hosts (one all-gather). Row keys come from example ids, so the outputs
equal a single-process run whatever the number of processes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import jax
import numpy as np

from fcjax.engine.generate import Generation, generate
from fcjax.engine.sampling import SamplingParams


def initialize(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """``jax.distributed.initialize`` (arguments from the cluster environment when omitted);
    on CPU it selects gloo collectives so the final gather works there too."""
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)


def my_share(n: int) -> list[int]:
    """Indices of the items this process handles (round robin over processes)."""
    return list(range(jax.process_index(), n, jax.process_count()))


def allgather_json(payload) -> list:
    """Gathers one JSON-serialisable object from every process (in process order)."""
    if jax.process_count() == 1:
        return [payload]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(payload).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([data.size], np.int64))
    padded = np.zeros(int(np.max(sizes)), np.uint8)
    padded[: data.size] = data
    gathered = multihost_utils.process_allgather(padded)
    return [
        json.loads(bytes(row[: int(s)]).decode())
        for row, s in zip(gathered.reshape(-1, padded.size), np.ravel(sizes), strict=True)
    ]


def _to_json(g: Generation) -> dict:
    return {
        "text": g.text,
        "ids": g.token_ids,
        "lp": g.token_logprobs.tolist(),
        "top": g.top_logprobs.tolist(),
        "top_ids": g.top_ids.tolist(),
        "finish": g.finish_reason,
        "prompt": g.prompt_ids,
    }


def _from_json(d: dict) -> Generation:
    k = len(d["top"][0]) if d["top"] else 0
    return Generation(
        d["text"],
        d["ids"],
        np.asarray(d["lp"], np.float32),
        np.asarray(d["top"], np.float32).reshape(-1, k),
        np.asarray(d["top_ids"], np.int32).reshape(-1, k),
        d["finish"],
        d["prompt"],
    )


def generate_sharded(
    lm, prompts: Sequence, params: SamplingParams, keys: Sequence, **kwargs
) -> list[Generation]:
    """``generate`` split over processes by example; every process gets all results."""
    mine = my_share(len(prompts))
    local = (
        generate(lm, [prompts[i] for i in mine], params, keys=[keys[i] for i in mine], **kwargs)
        if mine
        else []
    )
    gathered = allgather_json([[i, _to_json(g)] for i, g in zip(mine, local, strict=True)])
    out: list[Generation | None] = [None] * len(prompts)
    for part in gathered:
        for i, d in part:
            out[i] = _from_json(d)
    return out  # type: ignore[return-value]
