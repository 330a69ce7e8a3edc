"""The run directory: lock, stored config, stage markers, resumable parts, progress.

Every stage writes its outputs under temporary names and renames them, then writes its
marker ``stages/<stage>.done``; a stage with a marker is skipped on rerun. Long stages
write ``parts`` (one parquet file per batch of examples) so a killed run resumes inside the
stage. What each stage owns (files, parts, table columns) is listed once, in
``experiments.stages.REGISTRY``: ``started`` and ``invalidate_from`` read it. A rerun
whose result-affecting flags differ from the stored ones is refused with the
list of differences, unless ``--redo`` names a stage at or before the first affected one.
The directory is a local path or a URL (``gs://bucket/run``); every file goes through
``fcjax.store.fs``.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from absl import logging

from experiments import logs
from experiments.config import AFFECTS
from experiments.stages import STAGES, part_owner, spec
from fcjax.store.fs import Location, PathLike, location
from fcjax.store.strict_json import dumps_strict
from fcjax.store.tables import (
    drop_columns,
    read_table,
    update_columns,
    write_json_atomic,
    write_table_atomic,
)


class RunError(RuntimeError):
    """A user-facing problem with the run directory (lock, config mismatch, bad stage)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunDir:
    """One experiment's output directory."""

    def __init__(self, path: PathLike | Location, process_index: int = 0):
        self.path = location(path)
        self.stages = self.path / "stages"
        self.process_index = process_index  # of the processes sharing this run
        self._locked = False

    # --- lock -------------------------------------------------------------------------------
    @property
    def lock_path(self) -> Location:
        return self.path / ".lock"

    def lock(self) -> None:
        """Takes the directory lock; refuses if a live process holds it, takes over a stale
        lock left by a dead one (of this host). Exclusive locally and on GCS; on other
        object stores two runs started at the same moment may both get it
        (``fcjax.store.fs.Location.create_exclusive``)."""
        self.path.mkdir()
        me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()})
        for _ in range(3):
            if self.lock_path.create_exclusive(me.encode()):
                self._locked = True
                return
            try:
                holder = json.loads(self.lock_path.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                holder = {}
            pid, host = holder.get("pid"), holder.get("host")
            if pid and host == socket.gethostname() and not _pid_alive(int(pid)):
                logging.warning("taking over stale lock %s of dead pid %s", self.lock_path, pid)
                self._remove_stale_lock()
                continue
            raise RunError(
                f"{self.path} is in use: lock {self.lock_path} is held by pid {pid} on "
                f"{host}. Wait for it to finish, or remove the lock if that process is gone."
            )
        raise RunError(f"could not take lock {self.lock_path}")

    def _remove_stale_lock(self) -> None:
        """Removes a dead process's lock. Locally it is renamed away first, so of several
        processes taking it over at once only one removes it (the others retry and find the
        winner's lock); object stores have no rename and delete it directly."""
        if not self.lock_path.is_local:
            self.lock_path.unlink()
            return
        stale = self.lock_path.with_name(f".lock.stale{os.getpid()}").local_path
        try:
            os.replace(self.lock_path.local_path, stale)
            stale.unlink()
        except FileNotFoundError:
            pass

    def unlock(self) -> None:
        if self._locked:
            self.lock_path.unlink()
            self._locked = False

    # --- config -----------------------------------------------------------------------------
    def check_config(self, config: Mapping[str, Any], redo: str | None) -> str | None:
        """Returns the first stage to recompute because of changes (or ``redo``), or refuses
        when results would change and no redo covers it. Writes nothing: ``save_config``
        stores the config once the inputs are known to be good and stale stages are gone."""
        path = self.path / "config.json"
        first = STAGES.index(redo) if redo else len(STAGES)
        if path.exists():
            old = json.loads(path.read_text())
            changed = sorted(k for k in AFFECTS if _norm(old.get(k)) != _norm(config.get(k)))
            affected = min((STAGES.index(AFFECTS[k]) for k in changed), default=len(STAGES))
            if any(self.started(s) for s in STAGES[affected:]):
                diffs = ", ".join(f"--{k}: {old.get(k)!r} -> {config.get(k)!r}" for k in changed)
                if first > affected:
                    raise RunError(
                        f"{self.path} holds results made with other settings ({diffs}). "
                        f"Use a new --out, or --redo={STAGES[affected]} to recompute from "
                        f"the first affected stage."
                    )
        return STAGES[first] if first < len(STAGES) else None

    def save_config(self, config: Mapping[str, Any]) -> None:
        write_json_atomic(self.path / "config.json", dict(config))

    # --- stages -----------------------------------------------------------------------------
    def marker(self, stage: str) -> Location:
        return self.stages / f"{stage}.done"

    def done(self, stage: str) -> bool:
        return self.marker(stage).exists()

    def mark(self, stage: str, info: Mapping[str, Any]) -> None:
        self.stages.mkdir()
        write_json_atomic(self.marker(stage), dict(info))

    def started(self, stage: str) -> bool:
        """Whether ``stage`` has left anything behind: its marker, an output it owns
        (files, parts, recorded columns; ``experiments.stages.REGISTRY``)."""
        st = spec(stage)
        if self.done(stage) or self._columns_record(stage).exists():
            return True
        if any(self.path.glob(pattern) for pattern in st.files):
            return True
        return any(d.is_dir() and any(d.iterdir()) for p in st.parts for d in self.stages.glob(p))

    def info(self, stage: str) -> dict:
        return json.loads(self.marker(stage).read_text()) if self.done(stage) else {}

    def invalidate_from(self, stage: str) -> None:
        """Removes what ``stage`` and every later stage own (``experiments.stages.REGISTRY``:
        marker, files, parts, columns), last stage first, so a crash midway still leaves
        the finished stages a prefix of ``STAGES``."""
        for s in reversed(STAGES[STAGES.index(stage) :]):
            st = spec(s)
            self.marker(s).unlink()
            for table, known in st.columns:
                names = [*known, *self.recorded_columns(s).get(table, [])]
                if names and (self.path / table).exists():
                    drop_columns(self.path / table, names)
            self._columns_record(s).unlink()
            for pattern in st.files:
                for f in self.path.glob(pattern):
                    f.rmtree() if f.is_dir() else f.unlink()
            for pattern in st.parts:
                for d in self.stages.glob(pattern):
                    if d.is_dir():
                        d.rmtree()

    # --- columns added to the tables ------------------------------------------------------------
    def _columns_record(self, stage: str) -> Location:
        return self.stages / f"{stage}.columns.json"

    def recorded_columns(self, stage: str) -> dict[str, list[str]]:
        """The columns ``stage`` added to each table (``add_columns``)."""
        path = self._columns_record(stage)
        return json.loads(path.read_text()) if path.exists() else {}

    def add_columns(self, stage: str, table: str, columns: Mapping[str, Any]) -> None:
        """Replaces or appends ``columns`` of ``table`` (a file of the run directory), owned
        by ``stage``: their names are recorded first, so ``invalidate_from`` removes them
        even after a crash between the two writes."""
        if table not in spec(stage).tables:
            raise RunError(f"stage {stage} adds no columns to {table} (experiments.stages)")
        record = self.recorded_columns(stage)
        names = sorted({*record.get(table, []), *columns})
        if names != record.get(table):
            self.stages.mkdir()
            write_json_atomic(self._columns_record(stage), {**record, table: names})
        update_columns(self.path / table, columns)

    # --- resumable parts ----------------------------------------------------------------------
    def parts_dir(self, name: str) -> Location:
        part_owner(name)  # parts belong to a stage of the registry
        d = self.stages / name
        d.mkdir()
        return d

    def write_part(self, name: str, index: int, columns: Mapping[str, Any]) -> None:
        """Writes part ``index`` of ``name``: by convention the position of its first item
        among all items of the stage, so parts written in any split never share a name."""
        write_table_atomic(self.parts_dir(name) / f"part-{index:06d}.parquet", columns)
        _crash_for_tests(name, self.process_index)

    def part_done(self, name: str, index: int) -> bool:
        return (self.parts_dir(name) / f"part-{index:06d}.parquet").exists()

    def part_items(self, name: str, key: str = "example_id") -> set[str]:
        """The ``key`` values held by the written parts of ``name`` (the items done)."""
        done: set[str] = set()
        for f in self.parts_dir(name).glob("part-*.parquet"):
            done.update(str(v) for v in read_table(f, [key])[key])
        return done

    def read_parts(
        self, name: str, order: Sequence[str] | None = None, key: str = "example_id"
    ) -> dict[str, list]:
        """The rows of every part of ``name``; with ``order``, sorted by the position of
        their ``key`` in it, then by ``step`` and ``sample`` where the parts have them, so
        the merged rows do not depend on how the items were split into parts."""
        merged: dict[str, list] = {}
        for f in self.parts_dir(name).glob("part-*.parquet"):
            for k, v in read_table(f).items():
                merged.setdefault(k, []).extend(list(v))
        if order is None or not merged:
            return merged
        rank = {str(x): i for i, x in enumerate(order)}
        then = [merged[k] for k in ("step", "sample") if k in merged]
        keys = [
            (rank.get(str(v), len(rank)), *(int(c[i]) for c in then))
            for i, v in enumerate(merged[key])
        ]
        perm = sorted(range(len(keys)), key=keys.__getitem__)
        return {k: [v[i] for i in perm] for k, v in merged.items()}


_written: dict[str, int] = {}


def _crash_for_tests(name: str, process: int) -> None:
    """Test hook: ``FCJAX_TEST_CRASH=NAME:PROCESS:N`` ends process PROCESS abruptly (exit
    code 13, no clean-up) right after it wrote its N-th part of NAME, as a killed host would."""
    spec = os.environ.get("FCJAX_TEST_CRASH")
    if not spec:
        return
    want, proc, n = spec.split(":")
    if name == want and process == int(proc):
        _written[name] = _written.get(name, 0) + 1
        if _written[name] == int(n):
            logging.warning(
                "FCJAX_TEST_CRASH: process %d exits after part %d of %s", process, int(n), name
            )
            os._exit(13)


def _norm(v):
    return json.loads(dumps_strict(v))


class Progress:
    """Counts done/total; ``experiments.logs`` shows them with rate and ETA."""

    def __init__(self, stage: str, total: int, unit: str = "examples", every: float = 5.0):
        self.stage, self.total, self.unit, self.every = stage, total, unit, every
        self.start = self.last = time.perf_counter()
        self.done = 0

    def tokens(self, rows: int) -> Callable[[int, int], None]:
        """A ``progress`` callback for ``fcjax.generate``/``branch`` (called with the tokens
        generated so far and the call's budget, rows x max_new_tokens): shows the tokens of
        the current call of ``rows`` rows, so a long call is not silent."""
        start = time.perf_counter()

        def report(tokens: int, budget: int) -> None:
            if tokens < budget:
                rate = tokens / max(time.perf_counter() - start, 1e-9)
                logs.progress(self, f"current call of {rows} rows: {tokens} tokens ({rate:.1f}/s)")

        return report

    def update(self, n: int = 1) -> None:
        self.done += n
        logs.progress(self, final=self.done >= self.total)
