"""The engine's scheduler driven without a model: a fake device runs each chunk's rows for
their scripted lengths, and the host loop reads every chunk back one chunk late, as
``fcjax.engine.generate`` does."""

import collections
from typing import NamedTuple

import numpy as np
import pytest

from fcjax.engine.scheduler import Context, Row, Scheduler

STEPS = 4  # decode steps per chunk
K = 2  # top log-probabilities per token
WORDS = 4


class Out(NamedTuple):  # the host copy of decode.ChunkOut
    tokens: np.ndarray
    chosen: np.ndarray
    top_lp: np.ndarray
    top_ids: np.ndarray
    emitted: np.ndarray
    done: np.ndarray
    stopped: np.ndarray


class FakeDevice:
    """Row slots that emit token ``out * 1000 + i`` at their row's i-th step until the
    row's scripted length (rows are told apart by the first word of their ident)."""

    def __init__(self, n_ctx: int, n_slot: int, lengths: dict[int, int], stop: set[int] = ()):
        self.lengths, self.stop = lengths, set(stop)
        self.out = np.full((n_ctx, n_slot), -1)
        self.n = np.zeros((n_ctx, n_slot), int)
        self.done = np.ones((n_ctx, n_slot), bool)
        self.prefilled = np.zeros(n_ctx, bool)
        self.rows_run = 0

    def prefill(self, sched: Scheduler, new):
        for c, _ in new:  # never into a slot whose rows still run
            assert self.done[c].all()
            self.prefilled[c] = True

    def shrink(self, slots):  # ``decode.shrink_pool``
        live = {c for c in range(len(self.done)) if not self.done[c].all()}
        assert live <= set(slots.tolist()), "a live row left out of the narrower pool"
        self.out, self.n, self.done = self.out[slots], self.n[slots], self.done[slots]
        self.prefilled = self.prefilled[slots]

    def launch(self, chunk) -> Out:
        n_ctx, n_slot = self.out.shape
        assert chunk.start.shape == (n_ctx, n_slot)
        starts = np.argwhere(chunk.start)
        for c, r in starts:
            assert self.prefilled[c]
            self.out[c, r], self.n[c, r], self.done[c, r] = chunk.ident[c, r, 0], 0, False
        self.rows_run += n_ctx * n_slot * STEPS
        out = Out(
            np.zeros((n_ctx, n_slot, STEPS), np.int32),
            np.zeros((n_ctx, n_slot, STEPS), np.float32),
            np.zeros((n_ctx, n_slot, STEPS, K), np.float32),
            np.zeros((n_ctx, n_slot, STEPS, K), np.int32),
            np.zeros((n_ctx, n_slot, STEPS), bool),
            None,
            np.zeros((n_ctx, n_slot), bool),
        )
        for c in range(n_ctx):
            for r in range(n_slot):
                for t in range(STEPS):
                    if self.done[c, r]:
                        break
                    row, i = self.out[c, r], self.n[c, r]
                    out.tokens[c, r, t], out.chosen[c, r, t] = row * 1000 + i, -i
                    out.emitted[c, r, t] = True
                    self.n[c, r] += 1
                    if self.n[c, r] >= self.lengths[row] or (row in self.stop and i == 1):
                        self.done[c, r] = True
                        out.stopped[c, r] = row in self.stop and i == 1
        return out._replace(done=self.done.copy())


def _drive(contexts, n_ctx, n_slot, n_rows, lengths, narrower=(), stop=()):
    """The host loop of ``generate._serve`` over the fake device; also returns the slots
    each shrink kept."""
    sched = Scheduler(contexts, n_ctx, n_slot, n_rows, WORDS, narrower)
    device = FakeDevice(n_ctx, n_slot, lengths, stop)
    chunks, inflight, shrinks = [], None, []
    while True:
        new = sched.admit()
        if new:
            device.prefill(sched, new)
        if sched.drain_slots() is not None:
            if inflight is not None:
                sched.collect(*inflight)
                inflight = None
            slots = sched.drain_slots()
            if slots is not None:
                shrinks.append(slots.tolist())
                device.shrink(slots)
                sched.shrink(slots)
        chunk = sched.dispatch(sched.refill())
        launched = None
        if chunk is not None:
            chunks.append(chunk)
            launched = (device.launch(chunk), chunk.snapshot)
        if inflight is not None:
            sched.collect(*inflight)
        elif launched is None:
            break
        inflight = launched
    return sched, device, chunks, shrinks


def _contexts(rows_per_context: list[int]):
    contexts, out = [], 0
    for i, n in enumerate(rows_per_context):
        rows = collections.deque()
        for s in range(n):
            rows.append(Row(out, read=s % 2, ctx_valid=10 + i, ident=(out, 0, i, s)))
            out += 1
        contexts.append(Context(list(range(10 + i)), [8 + i, 9 + i], rows))
    return contexts, out


@pytest.mark.parametrize("n_ctx, n_slot", [(4, 1), (2, 3), (1, 8)])
def test_every_row_gets_its_own_tokens_in_order(n_ctx, n_slot):
    contexts, n_rows = _contexts([1, 3, 5, 1, 2, 7, 1])
    rng = np.random.default_rng(n_ctx)
    lengths = {i: int(rng.integers(1, 13)) for i in range(n_rows)}
    lengths[4] = 6
    sched, device, _, _ = _drive(contexts, n_ctx, n_slot, n_rows, lengths, stop={4})
    for i, row in enumerate(sched.results):
        want = 2 if i == 4 else lengths[i]  # row 4 hits a stop string at its second token
        assert row.out == i and row.finished and row.stopped == (i == 4)
        assert row.tokens == [i * 1000 + t for t in range(want)]
        assert np.concatenate(row.chosen).tolist() == [-t for t in range(want)]
        assert sum(len(x) for x in row.top_ids) == want
    assert sched.generated == sum(len(r.tokens) for r in sched.results)
    assert sched.emitted_row_steps == sched.generated
    assert all(ctx.live == 0 and not ctx.rows for ctx in contexts)
    assert device.prefilled.all() or len(contexts) < n_ctx


def test_refill_passes_each_rows_read_position_and_ident():
    contexts, n_rows = _contexts([3, 2])
    sched = Scheduler(contexts, 2, 2, n_rows, WORDS)
    assert sched.admit() == [(0, 0), (1, 1)]
    start, read, valid, ident = sched.refill()
    assert start.all()
    for c in range(2):
        for r in range(2):
            row = sched.slot_row[c][r]
            assert (read[c, r], valid[c, r]) == (row.read, row.ctx_valid)
            assert tuple(ident[c, r]) == row.ident
    assert contexts[0].live == 2 and len(contexts[0].rows) == 1
    # nothing is free: the next refill starts nothing, and no context slot is re-admitted
    assert not sched.refill()[0].any() and sched.admit() == []


def test_a_context_slot_is_reused_only_after_all_its_rows_finished():
    contexts, n_rows = _contexts([3, 1, 1])
    lengths = dict.fromkeys(range(n_rows), 2)
    lengths[0] = 9  # the first context's first row runs long
    sched, _, chunks, _ = _drive(contexts, 2, 2, n_rows, lengths)
    admitted_at = {}
    for k, chunk in enumerate(chunks):
        for _, _, row in chunk.snapshot:
            admitted_at.setdefault(row.ident[2], k)
    # context 2 waits for a free context slot: context 1 (one short row) frees one first,
    # while context 0 still has its long row
    assert admitted_at[0] == 0 and admitted_at[1] == 0 and admitted_at[2] > 0
    assert all(r.finished for r in sched.results)


def test_a_drained_pool_shrinks_to_the_live_slots_padded_to_a_narrower_width():
    contexts, n_rows = _contexts([1] * 8)
    lengths = {i: 1 + 4 * (i in (2, 5)) * (1 + i) for i in range(n_rows)}  # 2 and 5 run long
    sched, device, chunks, shrinks = _drive(contexts, 8, 1, n_rows, lengths, narrower=(4, 2))
    assert all(
        r.tokens == [i * 1000 + t for t in range(lengths[i])] for i, r in enumerate(sched.results)
    )
    assert chunks[0].start.shape == (8, 1) and chunks[0].start.any()  # the whole pool starts
    # the first chunk finishes the six short rows (one step each), which the host learns
    # while the second runs: from the third on, the pool is the two long rows' slots, in
    # their order (one shrink, straight past width 4)
    assert shrinks == [[2, 5]] and sched.n_ctx == 2 and sched.narrower == ()
    assert chunks[1].start.shape == (8, 1)
    assert all(c.start.shape == (2, 1) for c in chunks[2:])
    # fewer row-steps than running the whole pool for every chunk
    assert device.rows_run < len(chunks) * 8 * STEPS


def test_no_shrink_when_the_chunk_read_back_first_finishes_every_row():
    """The host reads the chunk in flight before it shrinks; when that chunk finished the
    last rows, nothing is copied and no chunk follows."""
    contexts, n_rows = _contexts([1] * 8)
    lengths = {i: 6 if i in (2, 5) else 1 for i in range(n_rows)}
    sched, _, chunks, shrinks = _drive(contexts, 8, 1, n_rows, lengths, narrower=(4, 2))
    assert shrinks == [] and len(chunks) == 2 and sched.n_ctx == 8
    assert [len(r.tokens) for r in sched.results] == [lengths[i] for i in range(n_rows)]
    assert sched.drain_slots() is None  # nothing live: nothing to keep


def test_shrink_refuses_before_the_queue_drains_or_without_a_live_slot():
    contexts, n_rows = _contexts([1] * 8)
    sched = Scheduler(contexts, 4, 1, n_rows, WORDS, narrower=(2,))
    sched.admit()
    sched.refill()
    with pytest.raises(RuntimeError, match="drained"):
        sched.shrink(np.array([0, 1]))  # four contexts still queued
    sched.queue.clear()
    with pytest.raises(ValueError, match="live row"):
        sched.shrink(np.array([0, 1]))  # slots 2 and 3 hold live rows


def test_drain_slots_pad_with_idle_slots_and_fall_back_to_the_whole_pool():
    contexts, n_rows = _contexts([1] * 8)
    sched = Scheduler(contexts, 8, 1, n_rows, WORDS, narrower=(4, 2))
    assert sched.drain_slots() is None  # the queue has not drained
    sched.admit()
    sched.refill()
    assert sched.drain_slots() is None  # 8 live slots: none of the narrower widths holds them
    for c in (0, 1, 3, 4, 6):
        sched.slot_row[c][0] = None
    assert sched.drain_slots().tolist() == [0, 2, 5, 7]  # 3 live, padded with idle slot 0
    sched.slot_row[2][0] = None
    assert sched.drain_slots().tolist() == [5, 7]
    assert Scheduler(contexts, 8, 1, n_rows, WORDS).drain_slots() is None  # no narrower


def test_collect_skips_rows_a_previous_chunk_finished():
    contexts, n_rows = _contexts([2])
    sched = Scheduler(contexts, 1, 2, n_rows, WORDS)
    sched.admit()
    chunk = sched.dispatch(sched.refill())
    emitted = np.zeros((1, 2, STEPS), bool)
    emitted[0, 0, :2] = True
    out = Out(
        np.arange(STEPS, dtype=np.int32)[None, None].repeat(2, 1),
        np.zeros((1, 2, STEPS), np.float32),
        np.zeros((1, 2, STEPS, K), np.float32),
        np.zeros((1, 2, STEPS, K), np.int32),
        emitted,
        np.asarray([[True, False]]),
        np.zeros((1, 2), bool),
    )
    assert sched.collect(out, chunk.snapshot) == 2
    assert sched.results[0].tokens == [0, 1] and sched.slot_row[0][0] is None
    assert sched.collect(out, chunk.snapshot) == 0  # the same chunk again: row 0 is done
    assert sched.results[0].tokens == [0, 1] and contexts[0].live == 1
