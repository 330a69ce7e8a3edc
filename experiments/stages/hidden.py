"""Stage ``hidden``: the probe features of every step, in a HiddenStore: the step-end
states (``hidden/``) or their means over each step's tokens (``hidden_mean/``).

With one process, one store; with several, process 0 pre-sizes one array and each process
fills its own chunk-aligned row range (kept across a rerun with the same split)."""

from __future__ import annotations

import json

from experiments.rundir import Progress
from experiments.stages.context import PROBE, Context
from fcjax.confidence.step_features import capture_positions, pool_steps
from fcjax.confidence.trace import Trace
from fcjax.store.fs import Location
from fcjax.store.hidden import HiddenReader, HiddenStore
from fcjax.store.tables import write_json_atomic
from probes.train import FEATURES

# the multi-process store's row split (hidden/plan.json) and rows per chunk
PLAN = "plan.json"
HIDDEN_CHUNK = 64


def layers(ctx: Context) -> list[int]:
    return list(ctx.s.layers) or list(range(ctx.lm.config.num_layers + 1))


def root(ctx: Context) -> Location:
    """The store of ``--probe_features``: ``hidden/`` or ``hidden_mean/``."""
    return ctx.run.path / FEATURES[ctx.s.probe_features]


def work(ctx: Context) -> int:
    """Captures this process's traces into the store."""
    if PROBE not in ctx.s.estimators:
        return 0
    where, lays = root(ctx), layers(ctx)
    width, dtype = ctx.lm.config.hidden_size, ctx.s.hidden_dtype
    traces = [t for t in ctx.traces() if t.n_steps > 0]
    if ctx.procs.count == 1:
        if (where / PLAN).exists():  # left by a multi-process run: another layout
            where.rmtree()
        store = HiddenStore(where, layers=lays, width=width, dtype=dtype)
        n = capture_into(ctx, store, traces)
        store.finalize()
        return n
    # the split covers every trace (not only the pending ones), so a rerun with the same
    # processes finds the same row ranges and keeps what they hold
    shares = ctx.procs.split("hidden", [len(t.prompt_ids) + len(t.output_ids) for t in traces])
    rows = [sum(traces[i].n_steps for i in share) for share in shares]
    offsets = [0]
    for n in rows[:-1]:  # chunk-aligned ranges, one chunk at least, so none coincide
        offsets.append(offsets[-1] + max(-(-n // HIDDEN_CHUNK), 1) * HIDDEN_CHUNK)
    plan = {"layers": lays, "width": width, "offsets": offsets, "rows": rows}
    if ctx.procs.main:
        old = json.loads((where / PLAN).read_text()) if (where / PLAN).exists() else None
        if old != plan or not (where / "states").exists():
            HiddenStore.create_shared(
                where, lays, width, offsets[-1] + rows[-1], dtype, chunk_rows=HIDDEN_CHUNK
            )
            write_json_atomic(where / PLAN, plan)
    ctx.procs.barrier("hidden:created")
    me, ends = ctx.procs.index, [*offsets[1:], offsets[-1] + rows[-1]]
    store = HiddenStore(
        where,
        layers=lays,
        width=width,
        dtype=dtype,
        chunk_rows=HIDDEN_CHUNK,
        row_offset=offsets[me],
        num_rows=ends[me] - offsets[me],
    )
    n = capture_into(ctx, store, [traces[i] for i in shares[me]])
    store.finalize()
    return n


def capture_into(ctx: Context, store: HiddenStore, traces: list[Trace]) -> int:
    """Captures the traces ``store`` lacks, a batched forward per chunk of traces."""
    from fcjax.engine.capture import capture

    lays, features = layers(ctx), ctx.s.probe_features
    todo = [t for t in traces if (t.example_id, t.n_steps - 1) not in store]
    progress = Progress("hidden", len(todo), "traces")
    size = max(1, min(ctx.s.batch_size, 16))
    for start in range(0, len(todo), size):
        chunk = todo[start : start + size]
        where = [capture_positions(t, features) for t in chunk]
        caps = capture(ctx.lm, [t.prompt_ids + t.output_ids for t in chunk], where, lays)
        for tr, cap in zip(chunk, caps, strict=True):
            store.write(
                tr.example_id, list(range(tr.n_steps)), pool_steps(tr, cap.states, features)
            )
        progress.update(len(chunk))
    return len(todo)


def merge(ctx: Context) -> dict:
    if PROBE not in ctx.s.estimators:
        return {"skipped": "probe estimator not requested"}
    if ctx.procs.count == 1:
        rows = len(HiddenReader(root(ctx)))
    else:
        rows = HiddenStore.finalize_shared(root(ctx), ctx.procs.count)
    return {
        "rows": rows,
        "layers": layers(ctx),
        "dtype": ctx.s.hidden_dtype,
        "features": ctx.s.probe_features,
    }
