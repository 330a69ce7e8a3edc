"""``experiments.run`` over several jax.distributed processes: the work split, the set-up
errors, and (slow) two processes of a real model equal one, also after a killed process."""

import os
import socket
import subprocess
import sys

import pytest

from experiments.cluster import Processes
from fcjax.engine.multihost import assign

# set-up checks of two-process runs; each stops before loading a model
FLAGS = ["--model=random:tiny", "--num_examples=2", "--max_new_tokens=4"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, process_id, num_processes, port, cwd=None, env_extra=None):
    """One process of a multi-process ``experiments.run`` on a localhost coordinator."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=root, **(env_extra or {}))
    cmd = [sys.executable, "-m", "experiments.run", *args]
    cmd += [
        f"--coordinator_address=127.0.0.1:{port}",
        f"--num_processes={num_processes}",
        f"--process_id={process_id}",
    ]
    return subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def finish(procs, timeout=300):
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        outs.append((p.returncode, out))
    return outs


def test_assign_balances_cost_and_is_deterministic():
    costs = [5, 1, 3, 3, 8, 2, 2]
    shares = assign(costs, 3)
    # longest first to the least loaded (ties: lower index, lower process):
    # 8->p0, 5->p1, 3(i2)->p2, 3(i3)->p2 (3<5), 2(i5)->p1 (5<6<8), 2(i6)->p2 (6<7<8), 1->p1
    assert shares == [[4], [0, 1, 5], [2, 3, 6]]
    assert sorted(i for s in shares for i in s) == list(range(len(costs)))
    assert [sum(costs[i] for i in s) for s in shares] == [8, 8, 8]
    assert assign(costs, 3) == shares
    assert assign(costs, 1) == [list(range(len(costs)))]
    assert assign([], 2) == [[], []]
    assert assign([1.0], 3) == [[0], [], []]
    with pytest.raises(ValueError, match="num_processes"):
        assign([1.0], 0)


def test_single_process_share_is_everything():
    procs = Processes()
    assert procs.main and procs.share("x", [3.0, 1.0, 2.0]) == [0, 1, 2]
    assert procs.exchange("x", {"a": 1}) == [{"a": 1}]


def test_different_flags_listed(tmp_path):
    port = free_port()
    out = f"--out={tmp_path / 'run'}"
    results = finish(
        [
            start([out, *FLAGS, "--seed=1"], 0, 2, port),
            start([out, *FLAGS, "--seed=2", "--batch_size=3"], 1, 2, port),
        ]
    )
    for rc, text in results:
        assert rc == 2, text[-3000:]
        assert "processes were started with different flags" in text, text[-3000:]
        assert "--seed: process" in text and "--batch_size" in text, text[-3000:]
    # process 0 names the other process's values
    assert "--seed: process 0: 1, process 1: 2" in results[0][1]
    assert not (tmp_path / "run" / "config.json").exists()


def test_disagreeing_process_counts(tmp_path):
    port = free_port()
    out = f"--out={tmp_path / 'run'}"
    p0 = start([out, *FLAGS], 0, 2, port)
    p1 = start([out, *FLAGS], 1, 3, port)
    for rc, text in finish([p0, p1]):
        assert rc == 2, text[-3000:]
        assert "--num_processes: process" in text, text[-3000:]
        assert ": 2, process" in text or ": 3, process" in text, text[-3000:]


def test_out_not_shared(tmp_path):
    """The same relative --out in two working directories: two directories, not one."""
    port = free_port()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    results = finish(
        [
            start(["--out=run", *FLAGS], 0, 2, port, cwd=tmp_path / "a"),
            start(["--out=run", *FLAGS], 1, 2, port, cwd=tmp_path / "b"),
        ]
    )
    for rc, text in results:
        assert rc == 2, text[-3000:]
        assert "--out=run is not shared with process 0" in text, text[-3000:]
        assert "process 1:" in text  # every process reports which process failed


def test_unreachable_coordinator(tmp_path):
    port = free_port()  # nobody listens there
    ((rc, text),) = finish(
        [start([f"--out={tmp_path}", *FLAGS, "--initialization_timeout=2"], 1, 2, port)]
    )
    assert rc == 2, text[-3000:]
    assert f"coordinator 127.0.0.1:{port} unreachable after 2s" in text, text[-3000:]
