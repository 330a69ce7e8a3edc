"""Multi-host runs: every process works on its own share of the examples on its local
devices; processes meet only at barriers and small exchanges.

Sampling needs no communication between hosts per token, so each host runs the same jitted
programs independently on a data-parallel mesh over ``jax.local_devices()``. ``assign``
splits work by expected cost, the same on every process; ``barrier`` and ``exchange`` go
through the jax.distributed coordination service's key-value store (no device programs), and
``fail`` makes the others stop at their next one instead of waiting. Row keys come from
example ids, so the outputs equal a single-process run whatever the number of processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Sequence

import jax

from fcjax import _jax_compat


class MultihostError(RuntimeError):
    """A multi-process set-up problem: coordinator unreachable, processes that disagree."""


# how long barriers and exchanges wait for the other processes (stages can run for days; a
# process that dies is detected sooner by the coordination service's heartbeat)
WAIT_S = 7 * 24 * 3600


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: int = 300,
) -> None:
    """``jax.distributed.initialize`` (arguments from the cluster environment when omitted);
    on CPU it selects gloo collectives so the final gather works there too.

    A process other than 0 first checks that the coordinator accepts connections and raises
    ``MultihostError`` naming the address after ``timeout_s``; while connecting, a process
    that still waits at 90% of ``timeout_s`` says on stderr why (jax then aborts it)."""
    if jax.config.jax_platforms in (None, "", "cpu") or os.environ.get("JAX_PLATFORMS") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator and process_id not in (None, 0):
        _wait_reachable(coordinator, timeout_s)
    where = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or "(from the cluster env)"
    warn = threading.Timer(
        0.9 * timeout_s,
        lambda: print(
            f"error: still waiting after {0.9 * timeout_s:.0f}s for all processes to join the "
            f"coordinator at {where}; jax aborts at {timeout_s}s. Check that every process "
            f"was started with the same --num_processes and --coordinator_address, and that "
            f"process 0 runs and is reachable.",
            file=sys.stderr,
            flush=True,
        ),
    )
    warn.daemon = True
    warn.start()
    try:
        jax.distributed.initialize(
            coordinator,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=int(timeout_s),
        )
    except (ValueError, TypeError, RuntimeError) as e:
        raise MultihostError(f"jax.distributed.initialize (coordinator {where}): {e}") from e
    finally:
        warn.cancel()


def _wait_reachable(address: str, timeout_s: float) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise MultihostError(f"coordinator address {address!r} is not HOST:PORT")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise MultihostError(
                    f"coordinator {address} unreachable after {timeout_s:.0f}s ({e}); is "
                    f"process 0 running there, and is the port open to this host?"
                ) from None
            time.sleep(0.5)


def _client():
    return _jax_compat.distributed_state().client  # the coordination service's key-value store


def is_distributed() -> bool:
    """Whether ``initialize`` connected this process to a coordinator."""
    return _jax_compat.distributed_state().client is not None


def process_index() -> int:
    """This process's index, without starting a backend when jax.distributed is set up."""
    state = _jax_compat.distributed_state()
    return state.process_id if state.client is not None else jax.process_index()


def process_count() -> int:
    """The number of processes this one was started with (``--num_processes``)."""
    state = _jax_compat.distributed_state()
    return state.num_processes if state.client is not None else jax.process_count()


_calls: dict[str, int] = {}


def _unique(name: str) -> str:
    """``name`` made unique per call; every process calls in the same order."""
    _calls[name] = _calls.get(name, 0) + 1
    return f"fcjax/{name}/{_calls[name]}"


FAILED = "fcjax/failed"
POLL_S = 0.2


def barrier(name: str, timeout_s: float = WAIT_S) -> None:
    """Waits until every process reached the barrier ``name`` (no-op with one process);
    raises ``MultihostError`` as soon as another process reported a failure (``fail``)."""
    if process_count() > 1:
        exchange(name, None, timeout_s)


def exchange(name: str, payload, timeout_s: float = WAIT_S, only_first: bool = False) -> list:
    """Every process's JSON-serialisable ``payload`` in process order, through the
    coordination service's key-value store (no device work, so it also runs before any
    backend starts). ``only_first``: just process 0's, for a process that must not wait for
    the others (e.g. one whose process count may be wrong). Raises ``MultihostError`` when
    another process reported a failure while this one waits, or after ``timeout_s``."""
    if process_count() == 1:
        return [payload]
    key, client = _unique(name), _client()
    client.key_value_set(f"{key}/{process_index()}", json.dumps(payload))
    count = 1 if only_first else process_count()
    deadline = time.monotonic() + timeout_s
    while True:
        got = {int(k.rsplit("/", 1)[-1]): v for k, v in client.key_value_dir_get(f"{key}/")}
        if all(i in got for i in range(count)):
            return [json.loads(got[i]) for i in range(count)]
        failed = client.key_value_dir_get(f"{FAILED}/")
        if failed:
            raise MultihostError(
                "; ".join(f"process {k.rsplit('/', 1)[-1]} failed: {v}" for k, v in failed)
            )
        if time.monotonic() > deadline:
            missing = [i for i in range(count) if i not in got]
            raise MultihostError(f"{name}: processes {missing} did not arrive in {timeout_s:.0f}s")
        time.sleep(POLL_S)


def fail(message: str) -> None:
    """Tells the other processes that this one failed: their next ``barrier`` or
    ``exchange`` raises with ``message`` instead of waiting for this process."""
    if process_count() > 1:
        # best effort: if the service is gone, its heartbeat stops the others anyway
        with contextlib.suppress(Exception):
            _client().key_value_set(f"{FAILED}/{process_index()}", message)


LEFT = "fcjax/left"
# how long process 0 keeps the service up after the last process said it leaves: that
# process's ``key_value_set`` must get its reply, and it must reach ``os._exit``, before the
# service goes (else its coordination agent aborts the process, seen once on a loaded CI CPU)
LEAVE_GRACE_S = 2.0


def leave(timeout_s: float = 60) -> None:
    """Call before this process exits on an error (without jax.distributed's shutdown, which
    would wait for processes that may never get there): says so, and process 0, which hosts
    the coordination service, waits up to ``timeout_s`` for the others to leave too, so they
    can still read the errors and failures it published, then ``LEAVE_GRACE_S`` more so the
    last of them is gone before the service."""
    if not is_distributed():
        return
    client = _client()
    with contextlib.suppress(Exception):  # best effort, like ``fail``
        client.key_value_set(f"{LEFT}/{process_index()}", "1")
        if process_index() == 0:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if len(client.key_value_dir_get(f"{LEFT}/")) >= process_count():
                    time.sleep(LEAVE_GRACE_S)
                    return
                time.sleep(POLL_S)


def assign(costs: Sequence[float], num_processes: int) -> list[list[int]]:
    """Splits items (by index) over processes, balanced by expected cost: longest processing
    time first, items by decreasing cost (ties: lower index), each to the least-loaded
    process (ties: lower process). Deterministic, so every process computes the same split.
    Returns each process's item indices in increasing order."""
    if num_processes < 1:
        raise ValueError(f"assign: num_processes must be >= 1, got {num_processes}")
    load = [0.0] * num_processes
    out: list[list[int]] = [[] for _ in range(num_processes)]
    for i in sorted(range(len(costs)), key=lambda i: (-float(costs[i]), i)):
        p = min(range(num_processes), key=lambda p: (load[p], p))
        load[p] += float(costs[i])
        out[p].append(i)
    return [sorted(items) for items in out]
