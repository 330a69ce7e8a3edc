"""The run directory: lock, stored config, stage markers, resumable parts, progress.

Every stage writes its outputs under temporary names and renames them, then writes its
marker ``stages/<stage>.done``; a stage with a marker is skipped on rerun. Long stages
write ``parts`` (one parquet file per batch of examples) so a killed run resumes inside the
stage. A rerun whose result-affecting flags differ from the stored ones is refused with the
list of differences, unless ``--redo`` names a stage at or before the first affected one.
The directory is a local path or a URL (``gs://bucket/run``); every file goes through
``fcjax.store.fs``.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from absl import logging

from experiments import logs
from experiments.config import AFFECTS, STAGES
from fcjax.store.fs import Location, PathLike, location
from fcjax.store.strict_json import dumps_strict
from fcjax.store.tables import read_table, write_json_atomic, write_table_atomic


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
        """Whether ``stage`` has left anything behind: its marker, parts or output directory."""
        if self.done(stage) or (stage in ("hidden", "probes") and (self.path / stage).exists()):
            return True
        return any(d.is_dir() and any(d.iterdir()) for d in self.stages.glob(f"{stage}*"))

    def info(self, stage: str) -> dict:
        return json.loads(self.marker(stage).read_text()) if self.done(stage) else {}

    def invalidate_from(self, stage: str) -> None:
        """Removes markers (and parts) of ``stage`` and every later stage, last stage first,
        so a crash midway still leaves the finished stages a prefix of ``STAGES``."""
        for s in reversed(STAGES[STAGES.index(stage) :]):
            self.marker(s).unlink()
            if s in ("hidden", "probes"):  # their outputs live beside the tables
                (self.path / s).rmtree()
            for d in self.stages.glob(f"{s}*"):
                if d.is_dir():
                    d.rmtree()

    # --- resumable parts ----------------------------------------------------------------------
    def parts_dir(self, name: str) -> Location:
        d = self.stages / name
        d.mkdir()
        return d

    def part_size(self, name: str, size: int) -> int:
        """Items per part of ``name``: ``size``, or the size its existing parts were cut with,
        so a stage resumed with another ``--batch_size`` keeps its parts' boundaries (part
        ``index`` always holds the same items)."""
        path = self.parts_dir(name) / "part_size.json"
        if path.exists():
            return int(json.loads(path.read_text())["size"])
        write_json_atomic(path, {"size": int(size)})
        return int(size)

    def write_part(self, name: str, index: int, columns: Mapping[str, Any]) -> None:
        write_table_atomic(self.parts_dir(name) / f"part-{index:06d}.parquet", columns)
        _crash_for_tests(name, self.process_index)

    def part_done(self, name: str, index: int) -> bool:
        return (self.parts_dir(name) / f"part-{index:06d}.parquet").exists()

    def read_parts(self, name: str) -> dict[str, list]:
        merged: dict[str, list] = {}
        for f in self.parts_dir(name).glob("part-*.parquet"):
            for k, v in read_table(f).items():
                merged.setdefault(k, []).extend(list(v))
        return merged


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


def batches(items: Sequence, size: int) -> Iterable[tuple[int, Sequence]]:
    for i, start in enumerate(range(0, len(items), size)):
        yield i, items[start : start + size]


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
