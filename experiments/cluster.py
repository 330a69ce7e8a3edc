"""The processes of one run: start-up checks, the split of a stage's work, barriers.

With one process every operation is a no-op and the whole work is this process's share, so
the single-process runner is the same code. With several (``--multihost`` or explicit
``--coordinator_address``/``--num_processes``/``--process_id``), ``fcjax.engine.multihost``
carries the barriers and exchanges over the jax.distributed coordination service.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from experiments.rundir import RunDir, RunError
from fcjax.engine import multihost as mh

SHARED_TOKEN = ".fcjax-shared"


@dataclasses.dataclass(frozen=True)
class Processes:
    """This process's place among the run's processes."""

    index: int = 0
    count: int = 1

    @property
    def main(self) -> bool:
        """Process 0: holds the lock, merges tables, runs the single-process stages."""
        return self.index == 0

    def barrier(self, name: str) -> None:
        if self.count > 1:
            mh.barrier(name)

    def exchange(self, name: str, payload: Any) -> list:
        return mh.exchange(name, payload) if self.count > 1 else [payload]

    def split(self, name: str, costs: Sequence[float]) -> list[list[int]]:
        """Every process's items (indices into ``costs``) of a stage's pending work, the
        same on every process (``multihost.assign``). Every process must have listed the
        pending work before anyone writes, so a barrier comes first."""
        self.barrier(f"{name}:listed")
        return mh.assign(costs, self.count)

    def share(self, name: str, costs: Sequence[float]) -> list[int]:
        """This process's items of ``split``."""
        return self.split(name, costs)[self.index]

    def agree(self, name: str, error: str | None) -> None:
        """Raises on every process when any process failed a start-up step."""
        errors = self.exchange(name, error)
        bad = [f"process {i}: {e}" for i, e in enumerate(errors) if e]
        if bad:
            raise RunError("\n  ".join(["start-up failed:", *bad]))


def setup(
    multihost: bool,
    coordinator: str = "",
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_s: int = 300,
) -> Processes:
    """Starts jax.distributed when asked (explicit values, or the cluster environment)."""
    explicit = bool(coordinator) or num_processes is not None or process_id is not None
    if not (multihost or explicit):
        return Processes()
    if explicit and (None in (num_processes, process_id) or not coordinator):
        raise RunError(
            "--coordinator_address, --num_processes and --process_id go together "
            "(or use --multihost alone to read them from the cluster environment)"
        )
    try:
        mh.initialize(coordinator or None, num_processes, process_id, timeout_s=timeout_s)
    except mh.MultihostError as e:
        raise RunError(str(e)) from None
    return Processes(mh.process_index(), mh.process_count())


def check_same_flags(procs: Processes, flags: Mapping[str, Any]) -> None:
    """Every process must run with the same flags: process 0 compares everyone's with its
    own, the others compare theirs with process 0's (so a process started with another
    --num_processes does not wait for processes that do not exist)."""
    if procs.count == 1:
        return
    flags = {k: _plain(v) for k, v in flags.items()}
    # process 0 waits for every process; the others read only process 0's flags
    gathered = mh.exchange("flags", flags, only_first=not procs.main)
    lines = []
    for i, theirs in enumerate(gathered):
        if i == procs.index:
            continue
        for k in sorted(set(flags) | set(theirs)):
            if flags.get(k) != theirs.get(k):
                lines.append(
                    f"--{k}: process {procs.index}: {flags.get(k)!r}, "
                    f"process {i}: {theirs.get(k)!r}"
                )
    if lines:
        raise RunError("processes were started with different flags:\n  " + "\n  ".join(lines))


def _plain(v):
    return list(v) if isinstance(v, tuple) else v


def check_shared_out(procs: Processes, rd: RunDir) -> None:
    """Process 0 writes a fresh token into the run directory; every other process must read
    the same token there, else ``--out`` is not one shared directory."""
    if procs.count == 1:
        return
    path = rd.path / SHARED_TOKEN
    token = secrets.token_hex(16) if procs.main else None
    if procs.main:
        path.write_text(token)
    token = procs.exchange("shared-token", token)[0]
    try:
        seen = path.read_text()
    except OSError:
        seen = None
    error = None
    if seen != token:
        error = (
            f"--out={rd.path} is not shared with process 0: {path} is "
            f"{'missing' if seen is None else 'another run'} here. Every process needs the "
            f"same directory: a network filesystem such as NFS, or a gs:// or s3:// URL."
        )
    procs.agree("shared-out", error)
