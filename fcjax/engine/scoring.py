"""Teacher-forced log-probabilities of continuations given prefixes.

``force`` / ``force_many`` turn a given output (e.g. a trace from another engine) into the
``Generation`` that ``fcjax.generate`` would have returned had it sampled those tokens:
chosen-token and top-k log-probabilities at temperature 1, from one prefill per trace, the
vocabulary projected a block of positions at a time.

``score_after_cuts`` scores continuations after cuts of a shared sequence (a cue and an
answer after every step of a trace): one prefill of the sequence, then every continuation in
one ``Decoder.extend`` pass against the sequence's cache up to its cut, so n cuts cost one
prefill, not n. Logits are formed only for the positions scored (an answer after its cue),
8 at a time, and only [rows, scored] floats reach the host. Shapes are bucketed (sequences,
sequence length, rows, continuation length, positions scored) so a run compiles a bounded
number of programs.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fcjax.engine import mesh as mesh_lib
from fcjax.engine.generate import PREFILL_TOKENS, Generation, bucket, row_bucket
from fcjax.models.lm import LM, XLA_OPTIONS


@functools.partial(jax.jit, static_argnums=(0, 6, 7), compiler_options=XLA_OPTIONS)
def _forced(graphdef, state, tokens, lengths, positions, targets, top_k, block):
    """tokens [B, S] right padded, positions/targets [B, C] (C a multiple of block) ->
    chosen logp [B, C], top-k logp [B, C, k], top-k ids [B, C, k]; logits are formed for
    ``block`` positions at a time ([B, block, V], never [B, C, V])."""
    model = nnx.merge(graphdef, state)
    normed = model.prefill(tokens, lengths, return_kv=False).normed  # [B, S, D]
    h = jnp.take_along_axis(normed, positions[..., None], axis=1)  # [B, C, D]
    b, c, d = h.shape
    h = h.reshape(b, c // block, block, d).swapaxes(0, 1)  # [n, B, block, D]
    t = targets.reshape(b, c // block, block).swapaxes(0, 1)  # [n, B, block]

    def one(args):
        hb, tb = args
        logits = model.unembed(hb)  # [B, block, V] float32
        top, ids = jax.lax.top_k(logits, top_k)  # descending, lower id first on ties
        norm = jax.nn.logsumexp(logits, axis=-1)  # [B, block]
        chosen = jnp.take_along_axis(logits, tb[..., None], axis=-1)[..., 0] - norm
        return chosen, top - norm[..., None], ids

    chosen, top, ids = jax.lax.map(one, (h, t))
    unblock = lambda x: x.swapaxes(0, 1).reshape(b, c, *x.shape[3:])  # noqa: E731
    return unblock(chosen), unblock(top), unblock(ids)


FORCE_BLOCK = 128  # positions whose logits are formed together


def force_many(
    lm: LM,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    top_k: int = 5,
    batch_size: int = 8,
    *,
    texts: Sequence[str | None] | None = None,
    finish_reasons: Sequence[str] | None = None,
    mesh=None,
) -> list[Generation]:
    """One ``Generation`` per (prompt_ids, output_ids) pair, teacher-forced: token_logprobs
    [T] = log p(out[j] | prompt + out[:j]) and top_logprobs / top_ids [T, top_k] of the same
    distributions, at temperature 1 (as ``fcjax.generate`` records them). ``texts`` default
    to the decode of the output ids; ``finish_reasons`` to "unknown". Prompts must be
    non-empty; an empty output gives empty arrays."""
    n = len(pairs)
    texts = list(texts) if texts is not None else [None] * n
    finish = list(finish_reasons) if finish_reasons is not None else ["unknown"] * n
    if len(texts) != n or len(finish) != n:
        raise ValueError(f"force_many: {n} pairs, {len(texts)} texts, {len(finish)} reasons")
    if top_k < 1 or batch_size < 1:
        raise ValueError(f"force_many: top_k and batch_size must be >= 1 ({top_k}, {batch_size})")
    pre = [[int(t) for t in p] for p, _ in pairs]
    out_ids = [[int(t) for t in o] for _, o in pairs]
    vocab = lm.config.vocab_size
    for i, (p, o) in enumerate(zip(pre, out_ids, strict=True)):
        if not p:
            raise ValueError(f"force_many: prompt {i} is empty")
        bad = [t for t in p + o if not 0 <= t < vocab]
        if bad:
            raise ValueError(
                f"force_many: pair {i} has token ids outside 0..{vocab - 1}: {bad[:5]}"
            )
    k = min(top_k, vocab)
    chosen = [np.zeros(0, np.float32) for _ in pre]
    top = [np.zeros((0, k), np.float32) for _ in pre]
    top_ids = [np.zeros((0, k), np.int32) for _ in pre]
    for rows, width, params, batch in _forced_batches(lm, pre, out_ids, batch_size, mesh):
        block = min(width, FORCE_BLOCK)  # both powers of two up to 1024, then multiples
        got = jax.device_get(_forced(lm.graphdef, params, *batch, k, block))
        for r, i in enumerate(rows):
            m = len(out_ids[i])
            chosen[i] = np.asarray(got[0][r, :m], np.float32)
            top[i] = np.asarray(got[1][r, :m], np.float32)
            top_ids[i] = np.asarray(got[2][r, :m], np.int32)
    gens = []
    for i in range(n):
        text = texts[i]
        if text is None:
            text = (
                lm.tokenizer.decode(out_ids[i], skip_special_tokens=False) if lm.tokenizer else ""
            )
        gens.append(Generation(text, out_ids[i], chosen[i], top[i], top_ids[i], finish[i], pre[i]))
    return gens


def force(
    lm: LM,
    prompt_ids: Sequence[int],
    output_ids: Sequence[int],
    top_k: int = 5,
    *,
    text: str | None = None,
    finish_reason: str = "unknown",
    mesh=None,
) -> Generation:
    """``force_many`` for one trace: the ``Generation`` of ``output_ids`` after the prompt."""
    return force_many(
        lm,
        [(prompt_ids, output_ids)],
        top_k,
        1,
        texts=[text],
        finish_reasons=[finish_reason],
        mesh=mesh,
    )[0]


def _rows_bucket(n: int, batch_size: int) -> int:
    """Rows padded to a power of two (at most batch_size) to bound recompilation."""
    return min(1 << (n - 1).bit_length(), batch_size)


CUT_ROWS = 256  # continuations scored together from one sequence (more: the sequence again)
# a group of continuations this small (rows x width, padded to the next wider group) joins
# that group's program instead of compiling its own (a program: ~8 s of XLA for SmolLM2's
# 30 layers on a 2-core CPU; 1024 padded positions: about as long)
MERGE_TOKENS = 1024
SCORES = 1 << 24  # rows x continuation x context positions a call attends over, per head
# continuations are padded to at least this many tokens (then to a power of two): answer
# forcing's plain cue + a short answer (SmolLM2's tokenizer: 6 tokens with "yes") in 8, the
# think cue + answer (14 with "1234") in 16. Padding costs every padded position a whole
# extend: 113 such continuations after cuts of 8 SmolLM2 traces scored in 6.5 s padded to 16,
# 4.5 s padded to 8, on this CPU
CONT_WIDTH = 8


def score_after_cuts(
    lm: LM,
    sequences: Sequence[Sequence[int]],
    branches: Sequence[Sequence[tuple[int, Sequence[int]]]],
    *,
    mesh=None,
) -> list[list[np.ndarray]]:
    """Per sequence, per (cut, continuation[, first]) of its branches: float32
    [len(continuation) - first], log p(cont[j] | sequence[:cut] + cont[:j]) at temperature 1
    for j >= first (default 0): the tokens before ``first`` (an answer cue) are conditioned
    on, not scored, and their positions are never projected onto the vocabulary.

    Each sequence is prefilled ONCE and all its continuations then run in one pass against
    its cache, each reading positions [0, cut) (``Decoder.extend``): scoring a continuation
    after each of n steps of a trace of L tokens costs one prefill of L, not n prefills of
    up to L. Cuts lie in 1..len(sequence); an empty continuation gives an empty array.
    Continuations are grouped by their padded width and positions scored (small groups
    join the next wider one: ``_by_width``), sequences within a group by length (about
    ``PREFILL_TOKENS`` positions, and at most ``SCORES`` attention scores per head, a call),
    and shapes bucketed, so a run compiles few programs."""
    if len(sequences) != len(branches):
        raise ValueError(f"score_after_cuts: {len(sequences)} sequences, {len(branches)} lists")
    seqs = [[int(t) for t in s] for s in sequences]
    items = []  # (sequence index, [(branch index, cut, continuation, first)]) <= CUT_ROWS
    vocab = lm.config.vocab_size
    for i, (seq, cuts) in enumerate(zip(seqs, branches, strict=True)):
        todo = []
        for b, (cut, cont, *rest) in enumerate(cuts):
            cont = [int(t) for t in cont]
            first = int(rest[0]) if rest else 0
            if not 1 <= cut <= len(seq):
                raise ValueError(
                    f"score_after_cuts: sequence {i} branch {b}: cut {cut} outside "
                    f"1..{len(seq)} (the sequence has {len(seq)} tokens)"
                )
            if not 0 <= first <= len(cont):
                raise ValueError(
                    f"score_after_cuts: sequence {i} branch {b}: first scored token {first} "
                    f"outside 0..{len(cont)} (the continuation has {len(cont)} tokens)"
                )
            bad = [t for t in seq + cont if not 0 <= t < vocab]
            if bad:
                raise ValueError(
                    f"score_after_cuts: sequence {i} branch {b} has token ids outside "
                    f"0..{vocab - 1}: {bad[:5]}"
                )
            if first < len(cont):
                todo.append((b, int(cut), cont, first))
        items += [(i, todo[j : j + CUT_ROWS]) for j in range(0, len(todo), CUT_ROWS)]
    out = [[np.zeros(0, np.float32) for _ in cuts] for cuts in branches]
    if not items:
        return out
    mesh = mesh or mesh_lib.default_mesh()
    params = mesh_lib.replicate(lm.state, mesh)
    for widths, group in _by_width(items):
        group.sort(key=lambda item: len(seqs[item[0]]))
        start = 0
        while start < len(group):
            part = group[start : start + 1]
            for item in group[start + 1 :]:  # within both budgets
                n, seq_len, rows = _call_shape(seqs, [*part, item])
                if n * seq_len > PREFILL_TOKENS or n * seq_len * rows * widths[0] > SCORES:
                    break
                part.append(item)
            _score_part(lm, params, seqs, part, widths, out)
            start += len(part)
    return out


def _widths(item) -> tuple[int, int]:
    """(continuation width, positions scored) of one item's continuations, bucketed."""
    todo = item[1]
    return (
        bucket(max(len(c) for _, _, c, _ in todo), minimum=CONT_WIDTH),
        row_bucket(max(len(c) - f for _, _, c, f in todo), 1),
    )


def _by_width(items) -> list[tuple[tuple[int, int], list]]:
    """The items grouped into (width, scored) shapes, one program each: by their own
    shapes, ascending, a group whose rows padded to the next shape's width come to at most
    ``MERGE_TOKENS`` joins that shape (a few padded rows cost less than a program)."""
    own = {}
    for item in items:
        own.setdefault(_widths(item), []).append(item)
    groups, pending, shape = [], [], (0, 0)
    keys = sorted(own)
    for k, key in enumerate(keys):
        pending += own[key]
        shape = (max(shape[0], key[0]), max(shape[1], key[1]))
        rows = sum(len(todo) for _, todo in pending)
        last = k == len(keys) - 1
        if last or rows * keys[k + 1][0] > MERGE_TOKENS:  # keys ascend by width
            groups.append((shape, pending))
            pending, shape = [], (0, 0)
    return groups


def _score_part(lm, params, seqs, part, widths, out) -> None:
    """One call over ``part`` at ``widths``: its log-probabilities into ``out``."""
    n, seq_len, rows = _call_shape(seqs, part)
    width, scored = widths
    tokens = np.zeros((n, seq_len), np.int32)
    lengths = np.ones((n,), np.int32)
    cuts = np.ones((n, rows), np.int32)
    conts = np.zeros((n, rows, width), np.int32)
    firsts = np.zeros((n, rows), np.int32)
    for t, (i, todo) in enumerate(part):
        tokens[t, : len(seqs[i])] = seqs[i]
        lengths[t] = len(seqs[i])
        for r, (_, cut, cont, first) in enumerate(todo):
            cuts[t, r] = cut
            conts[t, r, : len(cont)] = cont
            firsts[t, r] = first
    arrays = (jnp.asarray(a) for a in (tokens, lengths, cuts, conts, firsts))
    logp = np.asarray(_logprobs_after_cuts(lm.graphdef, params, *arrays, scored))
    for t, (i, todo) in enumerate(part):
        for r, (b, _, cont, first) in enumerate(todo):
            out[i][b] = logp[t, r, : len(cont) - first].astype(np.float32)


def _call_shape(seqs, part) -> tuple[int, int, int]:
    """(sequences, length, rows) of one call over ``part``, bucketed."""
    return (
        row_bucket(len(part), 1),
        bucket(max(len(seqs[i]) for i, _ in part)),
        row_bucket(max(len(todo) for _, todo in part), 1),  # <= CUT_ROWS, a power of two
    )


@functools.partial(jax.jit, static_argnums=(0, 7), compiler_options=XLA_OPTIONS)
def _logprobs_after_cuts(graphdef, state, tokens, lengths, cuts, conts, firsts, scored):
    """tokens [T, S] right padded, lengths [T], cuts [T, R], conts [T, R, C], firsts [T, R]
    -> logp [T, R, scored]: log p(conts[firsts + i]) for i < ``scored`` (a power of two;
    past the continuation: padding). The first continuation token from the prefill's output
    at cut - 1, every later one from ``Decoder.extend`` of the continuation over the
    sequence's cache up to the cut; logits formed for the scored positions only, at most 8
    at a time."""
    model = nnx.merge(graphdef, state)
    pre = model.prefill(tokens, lengths)
    n, rows, width = conts.shape
    first = jnp.take_along_axis(pre.normed, (cuts - 1)[..., None], axis=1)  # [T, R, D]
    positions = cuts[..., None] + jnp.arange(width)
    after = model.extend(conts, positions, pre.k, pre.v, cuts)  # [T, R, C, D]
    # position j predicts token j + 1: the prefill's cut - 1 then the first C - 1 of extend
    h = jnp.concatenate([first[:, :, None], after[:, :, :-1]], axis=2)
    at = jnp.minimum(firsts[..., None] + jnp.arange(scored), width - 1)  # [T, R, scored]
    h = jnp.take_along_axis(h, at[..., None], axis=2)  # [T, R, scored, D]
    t = jnp.take_along_axis(conts, at, axis=2)
    block = min(scored, 8)
    h = h.reshape(n, rows, scored // block, block, -1).transpose(2, 0, 1, 3, 4)
    t = t.reshape(n, rows, scored // block, block).transpose(2, 0, 1, 3)

    def project(args):
        hb, tb = args
        logits = model.unembed(hb)  # [T, R, block, V] float32
        norm = jax.nn.logsumexp(logits, axis=-1)
        return jnp.take_along_axis(logits, tb[..., None], axis=-1)[..., 0] - norm

    logp = jax.lax.map(project, (h, t))  # [scored / block, T, R, block]
    return logp.transpose(1, 2, 0, 3).reshape(n, rows, scored)


def _forced_batches(lm: LM, pre, cont, batch_size: int, mesh):
    """The teacher-forced batches of the pairs with a non-empty continuation, grouped by
    length (fewer padded tokens): per batch (rows, width, replicated params, (tokens,
    lengths, positions, targets) on device), shapes bucketed as the module says."""
    todo = sorted((i for i in range(len(pre)) if cont[i]), key=lambda i: len(pre[i]) + len(cont[i]))
    mesh = mesh or mesh_lib.default_mesh()
    params = mesh_lib.replicate(lm.state, mesh)
    for start in range(0, len(todo), batch_size):
        rows = todo[start : start + batch_size]
        n_rows = _rows_bucket(len(rows), batch_size)
        seq = bucket(max(len(pre[i]) + len(cont[i]) for i in rows))
        width = bucket(max(len(cont[i]) for i in rows), minimum=8)
        batch = _forced_batch(pre, cont, rows, n_rows, seq, width)
        yield rows, width, params, tuple(jnp.asarray(a) for a in batch)


def _forced_batch(pre, cont, rows, n_rows: int, seq: int, width: int):
    """One teacher-forced batch: tokens [n_rows, seq] (prefix + continuation), lengths, and
    per continuation token the position whose logits predict it (len(prefix) + j - 1) and
    the token itself ([n_rows, width]); padding rows hold one token."""
    tokens = np.zeros((n_rows, seq), np.int32)
    lengths = np.ones((n_rows,), np.int32)
    positions = np.zeros((n_rows, width), np.int32)
    targets = np.zeros((n_rows, width), np.int32)
    for r, i in enumerate(rows):
        full = pre[i] + cont[i]
        tokens[r, : len(full)] = full
        lengths[r] = len(full)
        m = len(cont[i])
        positions[r, :m] = np.arange(len(pre[i]) - 1, len(pre[i]) - 1 + m)
        targets[r, :m] = cont[i]
    return tokens, lengths, positions, targets
