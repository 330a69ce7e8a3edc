"""Same outputs on 1 device, 8 (forced host) devices, and two jax.distributed processes."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import build_tiny

WORKER = Path(__file__).parent / "engine_worker.py"


def _run(args, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(env_extra or {})
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


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    model = build_tiny("qwen2-bias", tmp_path_factory.mktemp("md"))
    return model, _result(_run([model]))


def test_eight_devices_match_one(baseline):
    model, one = baseline
    eight = _result(_run([model], {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}))
    assert (one["devices"], eight["devices"]) == (1, 8)
    for key in ("greedy", "sampled", "branch"):
        assert eight[key] == one[key], key


def test_two_processes_match_one(baseline):
    model, one = baseline
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [_run([model, pid, 2, port]) for pid in (0, 1)]
    results = [_result(p) for p in procs]
    two = results[0]
    assert two["processes"] == 2 and results[1] is None  # only process 0 prints
    for key in ("greedy", "sampled", "branch"):
        assert two[key] == one[key], key


def test_tensor_parallel_mesh_matches_one(baseline):
    """Heads and MLP columns split over a ``model`` axis (data:4, model:2) change nothing."""
    model, one = baseline
    tp = _result(
        _run(
            [model],
            {
                "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
                "FCJAX_TEST_MESH": "data:4,model:2",
            },
        )
    )
    assert tp["devices"] == 8
    for key in ("greedy", "sampled", "branch"):
        assert tp[key] == one[key], key
