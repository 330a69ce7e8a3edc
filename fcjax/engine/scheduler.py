"""The host side of the continuous-batching loop: which context and which row hold each slot
of the pool, and what each decode chunk starts and runs on. No model and no device here:
``fcjax.engine.generate`` runs the chunks, and tests drive the scheduler with made-up chunk
outputs.

A round: ``admit`` gives free context slots the next contexts of the queue (to prefill),
``refill`` gives free row slots their context's next rows, ``dispatch`` describes the chunk
to launch, and ``collect`` reads a finished chunk's output back into its rows (the loop reads
the previous chunk while the next one runs, so ``collect`` sees the slots as they were when
that chunk was launched: its ``snapshot``).

Once the queue has drained (no context or row is left to start), the pool shrinks to the
context slots with live rows, padded with idle ones to the smallest of the ``narrower``
widths that holds them (``drain_slots``; ``shrink`` renumbers the slots as the device pool
was), so later chunks compute no finished rows.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np


@dataclasses.dataclass
class Row:
    """One continuation: sampled from ``context.tokens[:ctx_valid]`` with its own key."""

    out: int  # index of its result
    read: int  # index of position ctx_valid - 1 in the context's read positions
    ctx_valid: int
    ident: tuple[int, ...]  # ``sampling.row_ident(example key, cut, sample)``: its stream
    tokens: list = dataclasses.field(default_factory=list)
    chosen: list = dataclasses.field(default_factory=list)
    top_lp: list = dataclasses.field(default_factory=list)
    top_ids: list = dataclasses.field(default_factory=list)
    stopped: bool = False
    finished: bool = False


@dataclasses.dataclass
class Context:
    """A shared prefix (a prompt, or a trace that many branch rows read) and its rows."""

    tokens: list[int]
    reads: list[int]  # positions whose next-token distribution starts a row
    rows: collections.deque  # Row not yet started
    live: int = 0  # rows in slots, not yet known finished


@dataclasses.dataclass
class Chunk:
    """One decode chunk to launch: the row slots it (re)starts, [contexts, rows] each, and
    the rows in slots when it was launched."""

    start: np.ndarray  # bool: the slot starts a new row
    read: np.ndarray  # int32: index into the context's read positions
    valid: np.ndarray  # int32: context positions the row sees
    ident: np.ndarray  # uint32 [contexts, rows, words]
    snapshot: list[tuple[int, int, Row]]
    drained: bool  # launched after the queue drained


class Scheduler:
    """Slots of a pool of ``n_ctx`` contexts x ``n_slot`` rows, filled from ``contexts`` (in
    queue order) until all ``n_rows`` rows have finished."""

    def __init__(
        self,
        contexts: list[Context],
        n_ctx: int,
        n_slot: int,
        n_rows: int,
        ident_words: int,
        narrower: tuple[int, ...] = (),
    ):
        self.contexts = contexts
        self.n_ctx, self.n_slot, self.ident_words = n_ctx, n_slot, ident_words
        self.narrower = narrower
        self.queue = collections.deque(range(len(contexts)))
        self.ctx_of: list[int | None] = [None] * n_ctx
        self.slot_row: list[list[Row | None]] = [[None] * n_slot for _ in range(n_ctx)]
        self.results: list[Row | None] = [None] * n_rows
        self.generated = 0  # tokens collected so far
        self.emitted_row_steps = 0  # row-steps that emitted a token

    def admit(self) -> list[tuple[int, int]]:
        """Context slots whose rows have all finished take the next contexts of the queue;
        returns the (context slot, context index) pairs to prefill."""
        new = []
        for c in range(self.n_ctx):
            j = self.ctx_of[c]
            if j is not None and not self.contexts[j].rows and self.contexts[j].live == 0:
                self.ctx_of[c] = j = None
            if j is None and self.queue:
                self.ctx_of[c] = self.queue.popleft()
                new.append((c, self.ctx_of[c]))
        return new

    def refill(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Free row slots take their context's next rows: (start, read, valid, ident)."""
        shape = (self.n_ctx, self.n_slot)
        start = np.zeros(shape, bool)
        read = np.zeros(shape, np.int32)
        valid = np.ones(shape, np.int32)
        ident = np.zeros((*shape, self.ident_words), np.uint32)
        for c, j in enumerate(self.ctx_of):
            if j is None:
                continue
            ctx = self.contexts[j]
            for r in range(self.n_slot):
                if self.slot_row[c][r] is None and ctx.rows:
                    row = self.slot_row[c][r] = ctx.rows.popleft()
                    ctx.live += 1
                    start[c, r], read[c, r], valid[c, r] = True, row.read, row.ctx_valid
                    ident[c, r] = row.ident
        return start, read, valid, ident

    @property
    def drained(self) -> bool:
        """Nothing is left to start: the queue is empty and every admitted context's rows
        are in slots or finished."""
        return not self.queue and not any(
            self.contexts[j].rows for j in self.ctx_of if j is not None
        )

    def dispatch(self, refill) -> Chunk | None:
        """The chunk to launch after ``refill`` (None when no slot holds a live row)."""
        snapshot = [
            (c, r, row) for c in range(self.n_ctx) for r, row in enumerate(self.slot_row[c]) if row
        ]
        if not snapshot:
            return None
        return Chunk(*refill, snapshot=snapshot, drained=self.drained)

    def drain_slots(self) -> np.ndarray | None:
        """The context slots to keep once the queue has drained: every slot with a live row,
        padded with idle ones to the smallest width of ``narrower`` that holds them (None:
        keep the pool: the queue has not drained, no width holds them, or no row is live)."""
        if not self.narrower or not self.drained:
            return None
        live = [c for c, rows in enumerate(self.slot_row) if any(rows)]
        fits = [m for m in self.narrower if m >= len(live)]
        if not fits or not live:
            return None
        idle = [c for c, rows in enumerate(self.slot_row) if not any(rows)]
        return np.asarray(sorted(live + idle[: min(fits) - len(live)]), np.int32)

    def shrink(self, slots: np.ndarray) -> None:
        """Keeps context slots ``slots`` only, renumbered in that order (slot i is the old
        ``slots[i]``), as ``decode.shrink_pool`` does on the device; only narrower widths
        remain. Call it between chunks: the snapshot of a chunk in flight names old slots."""
        if not self.drained:
            raise RuntimeError("the pool shrinks only once the queue has drained")
        kept = set(slots.tolist())
        if len(kept) != len(slots) or any(
            any(self.slot_row[c]) for c in range(self.n_ctx) if c not in kept
        ):
            raise ValueError(f"slots {slots.tolist()} are not distinct or leave out a live row")
        self.ctx_of = [self.ctx_of[c] for c in slots]
        self.slot_row = [self.slot_row[c] for c in slots]
        self.n_ctx = len(slots)
        self.narrower = tuple(m for m in self.narrower if m < self.n_ctx)

    def collect(self, out, snapshot: list[tuple[int, int, Row]]) -> int:
        """Reads a chunk's host copy ``out`` (``decode.ChunkOut`` fields as numpy arrays)
        into the rows of its ``snapshot``; rows it finished free their slots. Returns the
        tokens it added."""
        added = 0
        for c, r, row in snapshot:
            if row.finished:
                continue
            n = int(out.emitted[c, r].sum())
            if n:
                row.tokens += out.tokens[c, r, :n].tolist()
                row.chosen.append(out.chosen[c, r, :n])
                row.top_lp.append(out.top_lp[c, r, :n])
                row.top_ids.append(out.top_ids[c, r, :n])
                added += n
            if out.done[c, r]:
                self._finish(c, r, row, bool(out.stopped[c, r]))
        self.generated += added
        self.emitted_row_steps += int(out.emitted.sum())
        return added

    def _finish(self, c: int, r: int, row: Row, stopped: bool) -> None:
        row.finished, row.stopped = True, stopped
        self.results[row.out] = row
        if self.slot_row[c][r] is row:
            self.slot_row[c][r] = None
            self.contexts[self.ctx_of[c]].live -= 1

    def needed_context(self) -> list[int]:
        """Per context slot with live rows: the context positions its longest row sees."""
        needed = []
        for c, j in enumerate(self.ctx_of):
            rows = [row.ctx_valid for row in self.slot_row[c] if row is not None]
            if j is not None and rows:
                needed.append(max(rows))
        return needed
