"""``generate`` (one trace per prompt) and ``branch`` (many continuations from every cut of a
trace, all reading one shared copy of the trace's KV cache), both served by one continuously
batched loop.

The work is a queue of *contexts* (a prompt, or a trace) each with its *rows* (one
continuation per prompt; cuts x k per trace). The device keeps a pool of context slots x row
slots (``fcjax.engine.decode``); the host fills free slots from the queue, dispatches a
fixed-length decode chunk, and reads back the previous chunk's tokens while the next one runs,
so no batch waits for its longest row and no step waits for the host. A call compiles three
programs: the pool, a prefill into it and the decode chunk, and (one device, 8+ context
slots) up to two narrower chunks the first time its tail shrinks; shapes are bucketed, so a
later call with other lengths in the same buckets compiles none.
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
from fcjax.engine.decode import Layout, Refill, decode_chunk, init_pool, prefill_into
from fcjax.engine.sampling import SamplingParams, stable_key
from fcjax.engine.stops import stop_tables
from fcjax.models.attention import KEY_BLOCK, block_size
from fcjax.models.lm import LM

log = logging.getLogger("fcjax")

CHUNK = 8  # decode steps per dispatched chunk (rows are refilled between chunks)
COMPACT_FROM = 8  # pools of at least this many context slots shrink in the tail (one device)
PREFILL_TOKENS = 4096  # contexts are prefilled in groups of about this many positions


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
    tail_row_steps: int = 0  # row_steps computed after the queue ran empty

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


# --- the work queue --------------------------------------------------------------------------


@dataclasses.dataclass
class _Row:
    """One continuation: sampled from ``context.tokens[:ctx_valid]`` with its own key."""

    out: int  # index of its result
    read: int  # index of position ctx_valid - 1 in the context's read positions
    ctx_valid: int
    ident: tuple[int, int, int]  # (example key, cut, sample): the row's random stream
    tokens: list = dataclasses.field(default_factory=list)
    chosen: list = dataclasses.field(default_factory=list)
    top_lp: list = dataclasses.field(default_factory=list)
    top_ids: list = dataclasses.field(default_factory=list)
    stopped: bool = False
    finished: bool = False


@dataclasses.dataclass
class _Context:
    tokens: list[int]
    reads: list[int]  # positions whose next-token distribution starts a row
    rows: collections.deque  # _Row not yet started
    live: int = 0  # rows in slots, not yet known finished


def _serve(lm: LM, contexts, layout: Layout, params, mesh, *args) -> list[_Row]:
    """Runs every row of every context through the slot pool; returns rows by ``out``."""
    with mesh_lib.active(mesh):  # the programs trace on the mesh (``fcjax.models.sharding``)
        return _serve_on(lm, contexts, layout, params, mesh, *args)


def _serve_on(
    lm: LM,
    contexts: list[_Context],
    layout: Layout,
    params: SamplingParams,
    mesh,
    row_axis: int,
    n_rows: int,
    progress: Callable[[int, int], None] | None,
    stats: EngineStats | None,
) -> list[_Row]:
    stats = stats if stats is not None else EngineStats()
    sampler = params.sampler
    n_ctx, n_slot = layout.contexts, layout.rows
    n_data = mesh_lib.data_size(mesh)
    weights = mesh_lib.replicate(lm.state, mesh)
    pool = init_pool(lm.config, layout, lm.dtype, mesh, row_axis)
    stops = jax.device_put(stop_tables(lm, params.stop), mesh_lib.replicated(mesh))
    scalars = np.int32(params.max_new_tokens), np.uint32(params.seed)
    limit, seed = jax.device_put(scalars, mesh_lib.replicated(mesh))
    eos = tuple(lm.eos_token_ids)
    group = max(1, min(n_ctx, PREFILL_TOKENS // layout.ctx_len))
    group = 1 << (group.bit_length() - 1)  # a power of two, so it divides n_ctx
    prefill_axis = 0 if row_axis == 0 and group % n_data == 0 else None

    queue = collections.deque(range(len(contexts)))
    ctx_of: list[int | None] = [None] * n_ctx
    slot_row: list[list[_Row | None]] = [[None] * n_slot for _ in range(n_ctx)]
    results: list[_Row | None] = [None] * n_rows
    inflight = None
    generated = 0
    # once nothing is left to start, a chunk runs on the live context slots only, padded to
    # half or a quarter of the pool (one more program each, compiled when first needed):
    # finished rows cost the XLA attention their blocks and every matmul its rows. Not with
    # the Pallas kernels (finished rows read nothing there) nor over several devices (the
    # slots taken would cross them).
    narrower = ()
    if n_data == 1 and n_ctx >= COMPACT_FROM and lm.decode_attention == "xla":
        narrower = (n_ctx // 2, n_ctx // 4)

    def prefill(new: list[tuple[int, int]]) -> None:
        nonlocal pool
        for start in range(0, len(new), group):
            part = new[start : start + group]
            tokens = np.zeros((group, layout.ctx_len), np.int32)
            lengths = np.ones((group,), np.int32)
            reads = np.zeros((group, layout.reads), np.int32)
            slots = np.full((group,), n_ctx, np.int32)  # out of range: dropped
            for i, (c, j) in enumerate(part):
                ctx = contexts[j]
                tokens[i, : len(ctx.tokens)] = ctx.tokens
                lengths[i] = len(ctx.tokens)
                reads[i, : len(ctx.reads)] = ctx.reads
                slots[i] = c
            put = lambda x: mesh_lib.put(x, mesh, prefill_axis)  # noqa: E731
            pool = prefill_into(
                lm.graphdef, weights, pool, put(tokens), put(lengths), put(reads), put(slots)
            )
            stats.prefills += 1

    def finish(c: int, r: int, row: _Row, stopped: bool) -> None:
        row.finished, row.stopped = True, stopped
        results[row.out] = row
        if slot_row[c][r] is row:
            slot_row[c][r] = None
            contexts[ctx_of[c]].live -= 1

    def read_back(out, snapshot) -> None:
        nonlocal generated
        out = jax.device_get(out)
        stats.host_reads += 1
        for c, r, row in snapshot:
            if row.finished:
                continue
            emitted = out.emitted[c, r]
            n = int(emitted.sum())
            if n:
                row.tokens += out.tokens[c, r, :n].tolist()
                row.chosen.append(out.chosen[c, r, :n])
                row.top_lp.append(out.top_lp[c, r, :n])
                row.top_ids.append(out.top_ids[c, r, :n])
                generated += n
            if out.done[c, r]:
                finish(c, r, row, bool(out.stopped[c, r]))
        stats.useful_row_steps += int(out.emitted.sum())

    while True:
        # context slots whose rows are all finished take the next contexts of the queue
        new = []
        for c in range(n_ctx):
            j = ctx_of[c]
            if j is not None and not contexts[j].rows and contexts[j].live == 0:
                ctx_of[c] = j = None
            if j is None and queue:
                ctx_of[c] = queue.popleft()
                new.append((c, ctx_of[c]))
        if new:
            prefill(new)
        # free row slots take their context's next rows
        start = np.zeros((n_ctx, n_slot), bool)
        read = np.zeros((n_ctx, n_slot), np.int32)
        valid = np.ones((n_ctx, n_slot), np.int32)
        ident = np.zeros((n_ctx, n_slot, 3), np.uint32)
        for c in range(n_ctx):
            if ctx_of[c] is None:
                continue
            ctx = contexts[ctx_of[c]]
            for r in range(n_slot):
                if slot_row[c][r] is None and ctx.rows:
                    row = slot_row[c][r] = ctx.rows.popleft()
                    ctx.live += 1
                    start[c, r], read[c, r], valid[c, r] = True, row.read, row.ctx_valid
                    ident[c, r] = row.ident
        snapshot = [(c, r, row) for c in range(n_ctx) for r, row in enumerate(slot_row[c]) if row]
        launched = None
        if snapshot:
            tail = not queue and not any(contexts[j].rows for j in ctx_of if j is not None)
            slots = _tail_slots(slot_row, narrower) if tail and not start.any() else None
            put = lambda x: mesh_lib.put(x, mesh, row_axis)  # noqa: E731
            refill = Refill(put(start), put(read), put(valid), put(ident))
            pool, out = decode_chunk(
                lm.graphdef,
                weights,
                pool,
                refill,
                stops,
                limit,
                seed,
                None if slots is None else mesh_lib.put(slots, mesh, None),
                sampler=sampler,
                eos=eos,
                steps=CHUNK,
            )
            launched = (out, snapshot)
            n_run = n_ctx if slots is None else len(slots)
            stats.chunks += 1
            stats.row_steps += CHUNK * n_run * n_slot
            if tail:
                stats.tail_row_steps += CHUNK * n_run * n_slot
            _count_context_reads(stats, layout, n_run, contexts, ctx_of, slot_row)
        if inflight is not None:
            read_back(*inflight)  # the previous chunk, while this one runs
            if progress is not None:
                progress(generated, n_rows * params.max_new_tokens)
        elif launched is None:
            break
        inflight = launched
    return results  # type: ignore[return-value]


def _tail_slots(slot_row, narrower: tuple[int, ...]) -> np.ndarray | None:
    """The context slots a tail chunk runs on: every slot with a live row, padded with idle
    ones to the smallest width of ``narrower`` that holds them (None: the whole pool)."""
    live = [c for c, rows in enumerate(slot_row) if any(rows)]
    fits = [m for m in narrower if m >= len(live)]
    if not fits:
        return None
    idle = [c for c, rows in enumerate(slot_row) if not any(rows)]
    return np.asarray(sorted(live + idle[: min(fits) - len(live)]), np.int32)


def _count_context_reads(stats, layout, n_read, contexts, ctx_of, slot_row) -> None:
    """Context positions one decode step reads (``n_read`` context slots, in blocks up to
    the longest live row) against those the live rows need, times the chunk's steps."""
    needed = []
    for c, j in enumerate(ctx_of):
        rows = [row.ctx_valid for row in slot_row[c] if row is not None]
        if j is not None and rows:
            needed.append(max(rows))
    if not needed:
        return
    blk = block_size(layout.ctx_len)
    read = math.ceil(max(needed) / blk) * blk
    stats.ctx_read += CHUNK * n_read * read
    stats.ctx_valid += CHUNK * sum(needed)
    kblk = min(KEY_BLOCK, layout.ctx_len)
    stats.ctx_read_ragged += CHUNK * sum(math.ceil(n / kblk) * kblk for n in needed)


def _result(lm: LM, row: _Row, params: SamplingParams, prompt_ids) -> Generation:
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
        _Context(
            ids[i],
            [len(ids[i]) - 1],
            collections.deque([_Row(i, 0, len(ids[i]), (stable_key(keys[i]), 0, 0))]),
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
        ctx = _Context(seqs[i], [c - 1 for c in reads], collections.deque())
        contexts.append(ctx)
        of_context.append(i)
    by_trace = dict(zip(of_context, contexts, strict=True))
    for out, (i, j, s) in enumerate(specs):
        ctx, cut = by_trace[i], cut_lists[i][j]
        ident = (stable_key(keys[i]), cut, s)
        ctx.rows.append(_Row(out, ctx.reads.index(cut - 1), cut, ident))
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
