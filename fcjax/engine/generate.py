"""``generate`` (one trace per prompt) and ``branch`` (many continuations from every cut of a
trace, all reading one shared copy of the trace's KV cache).

Shapes are bucketed (context length, rows, new tokens) so a run compiles a bounded number of
programs. Rows are padded to a multiple of the mesh's data axis and sharded over it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fcjax.engine import mesh as mesh_lib
from fcjax.engine.decode import decode_chunk, init_state, prefill_context
from fcjax.engine.sampling import SamplingParams, row_keys, stable_key
from fcjax.models.lm import LM

log = logging.getLogger("fcjax")


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


def bucket(n: int, minimum: int = 16) -> int:
    """Rounds n up to a power of two (>= minimum), then to multiples of 1024 beyond 1024."""
    n = max(n, minimum)
    if n <= 1024:
        return 1 << math.ceil(math.log2(n))
    return int(math.ceil(n / 1024) * 1024)


def _row_bucket(n: int, multiple: int) -> int:
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


def _run(
    lm: LM,
    ctx_tokens: np.ndarray,  # [ctx, seq]
    ctx_lengths: np.ndarray,  # [ctx]
    ctx_valid: np.ndarray,  # [ctx, rows]
    keys: jnp.ndarray,  # [ctx, rows, 2]
    active: np.ndarray,  # [ctx, rows]
    params: SamplingParams,
    mesh,
    progress: Callable[[int, int], None] | None = None,
):
    """Prefill + chunked decode; returns host arrays for every row and its finish reason."""
    sampler = params.sampler
    max_new = bucket(params.max_new_tokens)
    eos = lm.eos_token_ids
    row_axis = 1 if ctx_valid.shape[0] == 1 else 0
    put = _putter(mesh, row_axis)
    state_params = mesh_lib.replicate(lm.state, mesh)
    ctx_k, ctx_v, first = prefill_context(
        lm.graphdef,
        state_params,
        mesh_lib.put(ctx_tokens, mesh, 0 if row_axis == 0 else None),
        mesh_lib.put(ctx_lengths, mesh, 0 if row_axis == 0 else None),
        put(np.maximum(ctx_valid - 1, 0)),
    )
    st = init_state(lm.config, ctx_k, first, put(keys), put(active), max_new, sampler.logprobs)
    ctx_valid_dev = put(ctx_valid)
    limit = params.max_new_tokens
    chunk = 32 if params.stop else max_new  # stop strings are checked between chunks
    stopped = np.zeros(active.shape, bool)
    cut_text: dict[tuple[int, int], str] = {}
    t = 0
    while True:
        window = min(max_new, bucket(t + 1))  # own-cache slots this chunk may read
        st = decode_chunk(
            lm.graphdef,
            state_params,
            ctx_k,
            ctx_v,
            ctx_valid_dev,
            limit,
            st,
            min(chunk, window - t),
            sampler=sampler,
            eos=eos,
            window=window,
        )
        t = int(st.t)
        n_gen = np.asarray(st.n_gen)
        done = np.asarray(st.done) | (n_gen >= limit)
        if params.stop and lm.tokenizer is not None:
            tokens = np.asarray(st.tokens)
            for c, r in zip(*np.nonzero(active & ~stopped), strict=True):
                text = _decode_text(lm, tokens[c, r, : n_gen[c, r]].tolist())
                cut = _stop_cut(text, params.stop)
                if cut is not None:
                    stopped[c, r] = done[c, r] = True
                    cut_text[(c, r)] = text[:cut]
        if progress is not None:
            progress(t, limit)
        if done.all() or t >= limit:
            break
        st = st._replace(done=put(done))
    return jax.device_get(st), stopped, cut_text


def _putter(mesh, axis):
    return lambda x: mesh_lib.put(x, mesh, axis)


def _collect(lm: LM, st, c: int, r: int, limit: int, stopped, cut_text, prompt_ids) -> Generation:
    n = min(int(st.n_gen[c, r]), limit)
    ids = st.tokens[c, r, :n].tolist()
    finish = "length"
    if n and ids[-1] in lm.eos_token_ids and not stopped[c, r]:
        ids, finish = ids[:-1], "eos"
    text = _decode_text(lm, ids)
    if stopped[c, r]:
        finish = "stop"
        text = cut_text[(c, r)]
        # keep the tokens that cover the text up to the stop string (a token straddling the
        # stop is kept, so token_ids may decode slightly past ``text``)
        kept = len(ids)
        while kept > 1 and len(_decode_text(lm, ids[: kept - 1])) >= len(text):
            kept -= 1
        ids = ids[:kept]
    m = len(ids)
    return Generation(
        text=text,
        token_ids=ids,
        token_logprobs=np.asarray(st.chosen[c, r, :m], np.float32),
        top_logprobs=np.asarray(st.top_lp[c, r, :m], np.float32),
        top_ids=np.asarray(st.top_ids[c, r, :m], np.int32),
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
) -> list[Generation]:
    """Samples one continuation per prompt (strings are tokenized as given: chat-format
    them first). ``keys`` (e.g. example ids) seed each row; by default the prompt index."""
    params = params or SamplingParams()
    mesh = mesh or mesh_lib.default_mesh()
    ids = _encode_prompts(lm, prompts)
    keys = list(range(len(ids))) if keys is None else list(keys)
    if len(keys) != len(ids):
        raise ValueError(f"{len(keys)} keys for {len(ids)} prompts")
    results: list[Generation | None] = [None] * len(ids)
    n_data = mesh_lib.data_size(mesh)
    # batches of similar prompt lengths pad less (rows are seeded by key, not position)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for start in range(0, len(ids), batch_size):
        members = order[start : start + batch_size]
        chunk = [ids[i] for i in members]
        n_ctx = _row_bucket(len(chunk), n_data)
        seq = bucket(max(len(x) for x in chunk))
        tokens = np.zeros((n_ctx, seq), np.int32)
        lengths = np.ones((n_ctx,), np.int32)
        for i, x in enumerate(chunk):
            tokens[i, : len(x)] = x
            lengths[i] = len(x)
        active = (np.arange(n_ctx) < len(chunk))[:, None]
        ex_keys = [stable_key(keys[i]) for i in members] + [0] * (n_ctx - len(chunk))
        rk = row_keys(params.seed, ex_keys, [0] * n_ctx, [0] * n_ctx).reshape(n_ctx, 1, 2)
        st, stopped, cut = _run(
            lm, tokens, lengths, lengths[:, None].copy(), rk, active, params, mesh, progress
        )
        for row, (i, x) in enumerate(zip(members, chunk, strict=True)):
            results[i] = _collect(lm, st, row, 0, params.max_new_tokens, stopped, cut, x)
    return results  # type: ignore[return-value]


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
) -> list[list[Generation]]:
    """``k`` continuations from every prefix ``ids[:cut]``: one prefill of ``ids``, then all
    cuts x k rows decode together against that single shared KV copy. ``key`` (the example
    id) seeds the rows together with each row's cut and sample index."""
    return branch_many(
        lm, [(ids, cuts)], k, params, keys=[key], mesh=mesh, max_rows=max_rows, progress=progress
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
) -> list[list[list[Generation]]]:
    """``branch`` for several traces at once: each trace is one context of the batch and its
    cuts x k rows read only that context's KV, so a decode step serves every trace together.
    Returns [trace][cut][sample]. Rows are seeded by (``keys[i]``, cut, sample) exactly as in
    ``branch``, so grouping traces changes no token."""
    params = params or SamplingParams()
    mesh = mesh or mesh_lib.default_mesh()
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    keys = list(range(len(traces))) if keys is None else list(keys)
    if len(keys) != len(traces):
        raise ValueError(f"{len(keys)} keys for {len(traces)} traces")
    seqs = [[int(t) for t in ids] for ids, _ in traces]
    for ids, (_, cuts) in zip(seqs, traces, strict=True):
        for c in cuts:
            if not 1 <= c <= len(ids):
                raise ValueError(f"cut {c} outside 1..{len(ids)} (the trace has {len(ids)} tokens)")
    rows = [[(int(c), s) for c in cuts for s in range(k)] for _, cuts in traces]
    out: list[list[Generation]] = [[] for _ in traces]
    t0 = time.perf_counter()
    # traces decoded together, at most max_rows rows per group; a trace with more rows than
    # that goes alone and its rows are split
    groups: list[list[int]] = []
    for i, r in enumerate(rows):
        if r and groups and _group_rows(rows, groups[-1] + [i]) <= max_rows:
            groups[-1].append(i)
        elif r:
            groups.append([i])
    for group in groups:
        starts = range(0, len(rows[group[0]]), max_rows) if len(group) == 1 else [0]
        for start in starts:
            _branch_group(lm, seqs, rows, group, start, max_rows, keys, params, mesh, progress, out)
    log.debug("branch: %d rows in %.2fs", sum(map(len, rows)), time.perf_counter() - t0)
    return [
        [gens[j * k : (j + 1) * k] for j in range(len(cuts))]
        for gens, (_, cuts) in zip(out, traces, strict=True)
    ]


def _group_rows(rows, group) -> int:
    """Rows a group decodes: its traces times the bucketed rows of its largest trace."""
    return len(group) * _row_bucket(max(len(rows[i]) for i in group), 1)


def _branch_group(lm, seqs, rows, group, start, max_rows, keys, params, mesh, progress, out):
    """Decodes rows[start:start + max_rows] of every trace in ``group`` together."""
    parts = [rows[i][start : start + max_rows] for i in group]
    single, n_data = len(group) == 1, mesh_lib.data_size(mesh)
    n_ctx = 1 if single else _row_bucket(len(group), n_data)
    n_rows = _row_bucket(max(map(len, parts)), n_data if single else 1)
    seq = bucket(max(len(seqs[i]) for i in group))
    tokens = np.zeros((n_ctx, seq), np.int32)
    lengths = np.ones((n_ctx,), np.int32)
    valid = np.ones((n_ctx, n_rows), np.int32)
    active = np.zeros((n_ctx, n_rows), bool)
    ex_keys = np.zeros((n_ctx, n_rows), np.int64)
    cut_ids = np.zeros((n_ctx, n_rows), np.int64)
    samples = np.zeros((n_ctx, n_rows), np.int64)
    for c, (i, part) in enumerate(zip(group, parts, strict=True)):
        tokens[c, : len(seqs[i])] = seqs[i]
        lengths[c] = len(seqs[i])
        m = len(part)
        valid[c, :m] = [cut for cut, _ in part]
        active[c, :m] = True
        ex_keys[c, :m] = stable_key(keys[i])
        cut_ids[c, :m] = [cut for cut, _ in part]
        samples[c, :m] = [smp for _, smp in part]
    rk = row_keys(params.seed, ex_keys.ravel(), cut_ids.ravel(), samples.ravel())
    st, stopped, cut_text = _run(
        lm, tokens, lengths, valid, rk.reshape(n_ctx, n_rows, 2), active, params, mesh, progress
    )
    for c, (i, part) in enumerate(zip(group, parts, strict=True)):
        for j, (cut, _) in enumerate(part):
            out[i].append(
                _collect(lm, st, c, j, params.max_new_tokens, stopped, cut_text, seqs[i][:cut])
            )
