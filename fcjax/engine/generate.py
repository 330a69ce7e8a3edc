"""``generate`` (one trace per prompt) and ``branch`` (many continuations from every cut of a
trace, all reading one shared copy of the trace's KV cache), both served by one continuously
batched loop.

The work is a queue of *contexts* (a prompt, or a trace) each with its *rows* (one
continuation per prompt; cuts x k per trace). The device keeps a pool of context slots x row
slots (``fcjax.engine.decode``); the host fills free slots from the queue, dispatches a
fixed-length decode chunk, and reads back the previous chunk's tokens while the next one runs,
so no batch waits for its longest row and no step waits for the host. A call compiles three
programs: the pool, a prefill into it and the decode chunk, and (``COMPACT_FROM`` context
slots or more, not split over ``data``) once the queue has drained and the live rows fit a
narrower width (``shrink_widths``), a copy of them into a narrower pool and that pool's
decode chunk (``fcjax.engine.scheduler``). Shapes are bucketed: the caches by powers of two
(``bucket``), a prefill by eighths of its cache (``prefill_width``) and by the power of two of
the contexts it admits, so a later call with other lengths in the same buckets compiles none
(a refill admitting a number of contexts not met before compiles one more prefill).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence

import jax
import numpy as np

from fcjax.engine import mesh as mesh_lib
from fcjax.engine.decode import (
    Layout,
    Refill,
    decode_chunk,
    init_pool,
    prefill_into,
    shrink_pool,
)
from fcjax.engine.sampling import IDENT_WORDS, SamplingParams, row_ident
from fcjax.engine.scheduler import Chunk, Context, Row, Scheduler
from fcjax.engine.stops import stop_tables
from fcjax.keys import stable_key
from fcjax.models.attention import KEY_BLOCK, block_size
from fcjax.models.lm import LM

log = logging.getLogger("fcjax")

CHUNK = 8  # decode steps per dispatched chunk (rows are refilled between chunks)
# pools of at least this many context slots shrink once drained (slots not split over
# ``data``). Below it a decode step is bound by reading the weights, so dropping finished
# rows saves little, and each narrower width compiles a decode chunk (~10 s for SmolLM2's 30
# layers on a 2-core CPU: the demo's 8-slot generate compiled two, 40 s with the CPU
# shared) and a small copy
COMPACT_FROM = 32
# the widths a drained pool shrinks to, in eighths of its slots. A SmolLM2 chunk on this
# 2-core CPU costs about 330 + 21 ms per context slot (4 to 32 slots, in a 32-prompt chat
# call), so the 3/4 and 3/8 steps cut that long-tailed call by 6% against halves and
# quarters alone (37.3 -> 35.0 s); a 1/8 step saved nothing measurable
SHRINK_EIGHTHS = (6, 4, 3, 2)
PREFILL_TOKENS = 4096  # contexts are prefilled in groups of at most about this many positions
PREFILL_STEP_MIN = 16  # ... padded to a multiple of an eighth of their bucket, or of this


@dataclasses.dataclass
class Generation:
    """One sampled continuation. ``token_logprobs`` are temperature-1 log-probabilities of the
    chosen tokens; ``top_logprobs`` [T, k] the top-k of the same distributions."""

    text: str
    token_ids: list[int]
    token_logprobs: np.ndarray
    top_logprobs: np.ndarray
    top_ids: np.ndarray
    finish_reason: str  # "eos" | "stop" | "length"
    prompt_ids: list[int] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class EngineStats:
    """Counters of the continuous-batching loop (summed over calls that share the object)."""

    chunks: int = 0
    prefills: int = 0
    useful_row_steps: int = 0  # tokens generated
    row_steps: int = 0  # row slots x steps computed
    ctx_read: int = 0  # context positions the decode attention read (per context, per step)
    ctx_valid: int = 0  # of those, positions some live row of that context attends to
    ctx_read_ragged: int = 0  # what the Pallas kernels read: each context to its own longest
    host_reads: int = 0  # device-to-host transfers (one per chunk)
    drain_row_steps: int = 0  # row_steps computed after the queue drained

    @property
    def row_utilisation(self) -> float:
        return self.useful_row_steps / max(self.row_steps, 1)

    @property
    def ctx_padding(self) -> float:
        """Padding in the context KV the XLA decode attention reads (to the batch's longest
        live row, every context slot)."""
        return 1.0 - self.ctx_valid / max(self.ctx_read, 1)

    @property
    def ctx_padding_ragged(self) -> float:
        """The same for the Pallas kernels (``fcjax.models.attention_pallas``), which read
        each live context to its own longest row, in their key blocks."""
        return 1.0 - self.ctx_valid / max(self.ctx_read_ragged, 1)


def bucket(n: int, minimum: int = 16) -> int:
    """Rounds n up to a power of two (>= minimum), then to multiples of 1024 beyond 1024."""
    n = max(n, minimum)
    if n <= 1024:
        return 1 << math.ceil(math.log2(n))
    return int(math.ceil(n / 1024) * 1024)


def shrink_widths(n_ctx: int) -> tuple[int, ...]:
    """The narrower pools, widest first, that a drained pool of ``n_ctx`` context slots may
    move its live rows into (``SHRINK_EIGHTHS``)."""
    return tuple(sorted({n_ctx * k // 8 for k in SHRINK_EIGHTHS} - {0}, reverse=True))


def prefill_width(longest: int, ctx_len: int) -> int:
    """Positions a group of contexts is prefilled at: its longest context rounded up to an
    eighth of the cache's bucket ``ctx_len`` (at least 16 positions), so prompts of 65-80
    tokens pad to 80 rather than 128: one prefill program per eighth used."""
    step = min(ctx_len, max(PREFILL_STEP_MIN, ctx_len // 8))
    return min(ctx_len, -(-longest // step) * step)


def row_bucket(n: int, multiple: int) -> int:
    b = 1 << math.ceil(math.log2(max(n, 1)))
    return int(math.ceil(b / multiple) * multiple)


def _encode_prompts(lm: LM, prompts) -> list[list[int]]:
    out = []
    for p in prompts:
        if isinstance(p, str):
            if lm.tokenizer is None:
                raise ValueError(f"{lm.name} has no tokenizer: pass token ids, not strings")
            out.append(lm.encode(p))
        else:
            out.append([int(t) for t in p])
        if not out[-1]:
            raise ValueError(f"prompt {len(out) - 1} is empty")
    return out


def _stop_cut(text: str, stops: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def _decode_text(lm: LM, ids: list[int]) -> str:
    if lm.tokenizer is None:
        return ""
    return lm.tokenizer.decode(ids, skip_special_tokens=False)


def _serve(lm: LM, contexts, layout: Layout, params, mesh, *args) -> list[Row]:
    """Runs every row of every context through the slot pool; returns rows by ``out``."""
    with mesh_lib.active(mesh):  # the programs trace on the mesh (``fcjax.models.sharding``)
        return _serve_on(lm, contexts, layout, params, mesh, *args)


def _serve_on(
    lm: LM,
    contexts: list[Context],
    layout: Layout,
    params: SamplingParams,
    mesh,
    row_axis: int,
    n_rows: int,
    progress: Callable[[int, int], None] | None,
    stats: EngineStats | None,
) -> list[Row]:
    stats = stats if stats is not None else EngineStats()
    n_ctx, n_slot = layout.contexts, layout.rows
    n_data = mesh_lib.data_size(mesh)
    weights = mesh_lib.replicate(lm.state, mesh)
    pool = init_pool(lm.config, layout, lm.dtype, mesh, row_axis)
    stops = jax.device_put(stop_tables(lm, params.stop), mesh_lib.replicated(mesh))
    scalars = np.int32(params.max_new_tokens), np.uint32(params.seed)
    limit, seed = jax.device_put(scalars, mesh_lib.replicated(mesh))
    sampler = jax.device_put(params.sampler, mesh_lib.replicated(mesh))  # values are data
    group = max(1, min(n_ctx, PREFILL_TOKENS // layout.ctx_len))
    group = 1 << (group.bit_length() - 1)  # a power of two, so it divides n_ctx
    # once the queue has drained, the live context slots move into a narrower pool (a copy
    # and that pool's chunk: two more programs per width, compiled when first needed):
    # finished rows cost the XLA attention their blocks and every matmul its rows. Not with
    # the Pallas kernels (finished rows read nothing there) nor with the context slots split
    # over ``data`` (the slots kept would cross devices).
    narrower = ()
    if n_data == 1 and n_ctx >= COMPACT_FROM and lm.decode_attention == "xla":
        narrower = shrink_widths(n_ctx)
    sched = Scheduler(contexts, n_ctx, n_slot, n_rows, IDENT_WORDS, narrower)

    def prefill(pool, new: list[tuple[int, int]]):
        for begin in range(0, len(new), group):
            # a refill admits a few contexts: prefill that many rows (a power of two, a
            # multiple of ``data`` where the contexts are split over it), not a whole group
            batch = new[begin : begin + group]
            rows = min(group, row_bucket(len(batch), n_data if row_axis == 0 else 1))
            width = prefill_width(max(len(contexts[j].tokens) for _, j in batch), layout.ctx_len)
            tokens = np.zeros((rows, width), np.int32)
            lengths = np.ones((rows,), np.int32)
            reads = np.zeros((rows, layout.reads), np.int32)
            slots = np.full((rows,), n_ctx, np.int32)  # out of range: dropped
            for i, (c, j) in enumerate(batch):
                ctx = contexts[j]
                tokens[i, : len(ctx.tokens)] = ctx.tokens
                lengths[i] = len(ctx.tokens)
                reads[i, : len(ctx.reads)] = ctx.reads
                slots[i] = c
            axis = 0 if row_axis == 0 and rows % n_data == 0 else None
            args = (mesh_lib.put(x, mesh, axis) for x in (tokens, lengths, reads, slots))
            pool = prefill_into(lm.graphdef, weights, pool, *args)
            stats.prefills += 1
        return pool

    def collect(inflight):
        emitted = sched.emitted_row_steps
        sched.collect(jax.device_get(inflight[0]), inflight[1])
        stats.host_reads += 1
        stats.useful_row_steps += sched.emitted_row_steps - emitted
        if progress is not None:
            progress(sched.generated, n_rows * params.max_new_tokens)

    inflight = None
    while True:
        new = sched.admit()
        if new:
            pool = prefill(pool, new)
        if sched.drain_slots() is not None:  # drained, and the live rows fit a narrower pool
            if inflight is not None:  # read it first: its snapshot names the slots as they are
                collect(inflight)
                inflight = None
            slots = sched.drain_slots()  # what is live after that read
            if slots is not None:
                layout = dataclasses.replace(layout, contexts=len(slots))
                kept = mesh_lib.put(slots, mesh, None)
                pool = shrink_pool(lm.config, layout, lm.dtype, mesh, row_axis, pool, kept)
                sched.shrink(slots)
        chunk = sched.dispatch(sched.refill())
        launched = None
        if chunk is not None:
            put = lambda x: mesh_lib.put(x, mesh, row_axis)  # noqa: E731
            refill = Refill(put(chunk.start), put(chunk.read), put(chunk.valid), put(chunk.ident))
            pool, out = decode_chunk(
                lm.graphdef,
                weights,
                pool,
                refill,
                stops,
                limit,
                seed,
                sampler=sampler,
                steps=CHUNK,
            )
            launched = (out, chunk.snapshot)
            _count_chunk(stats, layout, chunk, sched.needed_context())
        if inflight is not None:  # the previous chunk, read while this one runs
            collect(inflight)
        elif launched is None:
            break
        inflight = launched
    return sched.results  # type: ignore[return-value]


def _count_chunk(stats: EngineStats, layout: Layout, chunk: Chunk, needed: list[int]) -> None:
    """A launched chunk's row-steps, and the context positions its decode steps read
    (context slots run, in blocks up to the longest live row) against those the live rows
    need (``needed``: per live context slot)."""
    n_run = layout.contexts
    stats.chunks += 1
    stats.row_steps += CHUNK * n_run * layout.rows
    if chunk.drained:
        stats.drain_row_steps += CHUNK * n_run * layout.rows
    if not needed:
        return
    blk = block_size(layout.ctx_len)
    read = math.ceil(max(needed) / blk) * blk
    stats.ctx_read += CHUNK * n_run * read
    stats.ctx_valid += CHUNK * sum(needed)
    kblk = min(KEY_BLOCK, layout.ctx_len)
    stats.ctx_read_ragged += CHUNK * sum(math.ceil(n / kblk) * kblk for n in needed)


def _result(lm: LM, row: Row, params: SamplingParams, prompt_ids) -> Generation:
    ids = row.tokens
    k = params.logprobs
    cat = lambda xs, shape, dt: np.concatenate(xs) if xs else np.zeros(shape, dt)  # noqa: E731
    chosen = cat(row.chosen, (0,), np.float32)
    top_lp = cat(row.top_lp, (0, k), np.float32)
    top_ids = cat(row.top_ids, (0, k), np.int32)
    finish = "length"
    if ids and ids[-1] in lm.eos_token_ids and not row.stopped:
        ids, finish = ids[:-1], "eos"
    text = _decode_text(lm, ids)
    cut = _stop_cut(text, params.stop) if params.stop else None
    if cut is not None:
        finish, text = "stop", text[:cut]
        # keep the tokens that cover the text up to the stop string (a token straddling the
        # stop is kept, so token_ids may decode slightly past ``text``)
        kept = len(ids)
        while kept > 1 and len(_decode_text(lm, ids[: kept - 1])) >= len(text):
            kept -= 1
        ids = ids[:kept]
    m = len(ids)
    return Generation(
        text=text,
        token_ids=list(ids),
        token_logprobs=np.asarray(chosen[:m], np.float32),
        top_logprobs=np.asarray(top_lp[:m], np.float32),
        top_ids=np.asarray(top_ids[:m], np.int32),
        finish_reason=finish,
        prompt_ids=list(prompt_ids),
    )


def generate(
    lm: LM,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    params: SamplingParams | None = None,
    *,
    keys: Sequence | None = None,
    batch_size: int = 64,
    mesh=None,
    progress: Callable[[int, int], None] | None = None,
    stats: EngineStats | None = None,
) -> list[Generation]:
    """Samples one continuation per prompt (strings are tokenized as given: chat-format
    them first). ``keys`` (e.g. example ids) seed each row; by default the prompt index.
    ``batch_size`` is the number of rows decoded together; finished rows are refilled.
    ``progress(tokens, budget)`` is called after each chunk with the tokens generated so far
    and rows x max_new_tokens; ``stats`` accumulates the loop's counters."""
    params = params or SamplingParams()
    mesh = mesh or mesh_lib.default_mesh()
    ids = _encode_prompts(lm, prompts)
    keys = list(range(len(ids))) if keys is None else list(keys)
    if len(keys) != len(ids):
        raise ValueError(f"{len(keys)} keys for {len(ids)} prompts")
    if not ids:
        return []
    # similar lengths decode side by side (rows are seeded by key, not position)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    contexts = [
        Context(
            ids[i],
            [len(ids[i]) - 1],
            collections.deque([Row(i, 0, len(ids[i]), row_ident(stable_key(keys[i]), 0, 0))]),
        )
        for i in order
    ]
    n_data = mesh_lib.data_size(mesh)
    layout = Layout(
        contexts=row_bucket(min(batch_size, len(ids)), n_data),
        rows=1,
        ctx_len=bucket(max(map(len, ids))),
        new=bucket(params.max_new_tokens),
        reads=1,
    )
    rows = _serve(lm, contexts, layout, params, mesh, 0, len(ids), progress, stats)
    return [_result(lm, row, params, ids[i]) for i, row in enumerate(rows)]


def branch(
    lm: LM,
    ids: Sequence[int],
    cuts: Sequence[int],
    k: int,
    params: SamplingParams | None = None,
    *,
    key=0,
    mesh=None,
    max_rows: int = 512,
    progress: Callable[[int, int], None] | None = None,
    stats: EngineStats | None = None,
) -> list[list[Generation]]:
    """``k`` continuations from every prefix ``ids[:cut]``: one prefill of ``ids``, then all
    cuts x k rows decode against that single shared KV copy. ``key`` (the example id) seeds
    the rows together with each row's cut and sample index."""
    return branch_many(
        lm,
        [(ids, cuts)],
        k,
        params,
        keys=[key],
        mesh=mesh,
        max_rows=max_rows,
        progress=progress,
        stats=stats,
    )[0]


def branch_many(
    lm: LM,
    traces: Sequence[tuple[Sequence[int], Sequence[int]]],
    k: int,
    params: SamplingParams | None = None,
    *,
    keys: Sequence | None = None,
    mesh=None,
    max_rows: int = 512,
    progress: Callable[[int, int], None] | None = None,
    stats: EngineStats | None = None,
) -> list[list[list[Generation]]]:
    """``branch`` for several traces at once: each trace is one context slot of the pool and
    its cuts x k rows read only that context's KV (once per step for all of them); finished
    rows and traces are replaced from the queue. Returns [trace][cut][sample]. Rows are
    seeded by (``keys[i]``, cut, sample), so grouping or splitting changes no token.
    ``max_rows`` bounds the rows decoded together."""
    params = params or SamplingParams()
    mesh = mesh or mesh_lib.default_mesh()
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    keys = list(range(len(traces))) if keys is None else list(keys)
    if len(keys) != len(traces):
        raise ValueError(f"{len(keys)} keys for {len(traces)} traces")
    seqs = [[int(t) for t in ids] for ids, _ in traces]
    cut_lists = [[int(c) for c in cuts] for _, cuts in traces]
    for ids, cuts in zip(seqs, cut_lists, strict=True):
        for c in cuts:
            if not 1 <= c <= len(ids):
                raise ValueError(f"cut {c} outside 1..{len(ids)} (the trace has {len(ids)} tokens)")
    specs = [  # (trace, cut index, sample) per row, in result order
        (i, j, s) for i, cuts in enumerate(cut_lists) for j in range(len(cuts)) for s in range(k)
    ]
    if not specs:
        return [[] for _ in traces]
    contexts, of_context = [], []
    for i, cuts in enumerate(cut_lists):
        if not cuts:
            continue
        reads = sorted(set(cuts))
        ctx = Context(seqs[i], [c - 1 for c in reads], collections.deque())
        contexts.append(ctx)
        of_context.append(i)
    by_trace = dict(zip(of_context, contexts, strict=True))
    for out, (i, j, s) in enumerate(specs):
        ctx, cut = by_trace[i], cut_lists[i][j]
        ident = row_ident(stable_key(keys[i]), cut, s)
        ctx.rows.append(Row(out, ctx.reads.index(cut - 1), cut, ident))
    n_data = mesh_lib.data_size(mesh)
    most = max(len(c.rows) for c in contexts)
    rows = max(1, min(row_bucket(most, 1), max_rows))
    n_ctx = max(1, min(max_rows // rows, row_bucket(len(contexts), 1)))
    if n_ctx % n_data == 0:
        row_axis = 0
    else:
        row_axis, rows = 1, int(math.ceil(rows / n_data) * n_data)
    layout = Layout(
        contexts=n_ctx,
        rows=rows,
        ctx_len=bucket(max(len(c.tokens) for c in contexts)),
        new=bucket(params.max_new_tokens),
        reads=row_bucket(max(len(c.reads) for c in contexts), 1),
    )
    t0 = time.perf_counter()
    done = _serve(lm, contexts, layout, params, mesh, row_axis, len(specs), progress, stats)
    log.debug("branch: %d rows in %.2fs", len(specs), time.perf_counter() - t0)
    gens = [
        _result(lm, row, params, seqs[i][: cut_lists[i][j]])
        for row, (i, j, _) in zip(done, specs, strict=True)
    ]
    out: list[list[list[Generation]]] = [[[] for _ in cuts] for cuts in cut_lists]
    for g, (i, j, _) in zip(gens, specs, strict=True):
        out[i][j].append(g)
    return out
