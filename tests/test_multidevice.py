"""Same outputs on 1 device, 8 (forced host) devices, and two jax.distributed processes."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from child_env import child_env, xla_flags
from tiny_models import build_tiny

WORKER = Path(__file__).parent / "engine_worker.py"
# five worker processes, mostly compile time: in CI (./dev test --all), not in the quick suite
pytestmark = pytest.mark.slow


def _run(args, env_extra=None):
    env = child_env(**(env_extra or {}))
    return subprocess.Popen(
        [sys.executable, str(WORKER), *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _result(proc, timeout=600):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    lines = [line for line in out.splitlines() if line.startswith("RESULT ")]
    return json.loads(lines[0][7:]) if lines else None


EIGHT = {"XLA_FLAGS": xla_flags(devices=8)}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every configuration's worker, all started at once (they are mostly compile time, so
    they overlap well): one device, eight devices, tensor parallel, and two processes."""
    model = build_tiny("qwen2-bias", tmp_path_factory.mktemp("md"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = {
        "one": _run([model]),
        "eight": _run([model], EIGHT),
        "tp": _run([model], {**EIGHT, "FCJAX_TEST_MESH": "data:4,model:2"}),
        "two": _run([model, 0, 2, port]),
        "two_b": _run([model, 1, 2, port]),
    }
    return {name: _result(proc) for name, proc in procs.items()}


def _same(a: dict, b: dict) -> None:
    """Identical tokens; log-probabilities equal up to float32 summation order (another
    device count splits the batch into other matmul shapes, so bits may differ)."""
    for key in ("greedy", "sampled", "branch"):
        assert a[key] == b[key], key
    for key in ("greedy_logprobs", "sampled_logprobs", "capture"):
        assert len(a[key]) == len(b[key]), key
        for x, y in zip(a[key], b[key], strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5, err_msg=key)


def test_eight_devices_match_one(results):
    one, eight = results["one"], results["eight"]
    assert (one["devices"], eight["devices"]) == (1, 8)
    _same(eight, one)


def test_two_processes_match_one(results):
    one, two = results["one"], results["two"]
    assert two["processes"] == 2 and results["two_b"] is None  # only process 0 prints
    _same(two, one)


def test_tensor_parallel_mesh_matches_one(results):
    """Heads and MLP columns split over a ``model`` axis (data:4, model:2) change nothing."""
    one, tp = results["one"], results["tp"]
    assert tp["devices"] == 8
    _same(tp, one)
