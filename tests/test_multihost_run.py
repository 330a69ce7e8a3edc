"""``experiments.run`` over several jax.distributed processes: the work split, the set-up
errors, and (slow) two processes of two devices each, given the run as a file:// URL, equal
one, also after a killed process."""

import json
import os
import socket
import subprocess
import sys

import pytest
from child_env import child_env, xla_flags
from rundir_compare import assert_same_run, assert_same_tables

from experiments.cluster import Processes
from experiments.stages import REGISTRY
from fcjax.engine.multihost import assign
from fcjax.store.tables import read_table

# set-up checks of two-process runs; each stops before loading a model
FLAGS = ["--model=random:tiny", "--num_examples=2", "--max_new_tokens=4"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args, process_id, num_processes, port, cwd=None, env_extra=None):
    """One process of a multi-process ``experiments.run`` on a localhost coordinator."""
    env = child_env()
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


@pytest.mark.integration
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


@pytest.mark.integration
def test_disagreeing_process_counts(tmp_path):
    port = free_port()
    out = f"--out={tmp_path / 'run'}"
    p0 = start([out, *FLAGS], 0, 2, port)
    p1 = start([out, *FLAGS], 1, 3, port)
    for rc, text in finish([p0, p1]):
        assert rc == 2, text[-3000:]
        assert "--num_processes: process" in text, text[-3000:]
        assert ": 2, process" in text or ": 3, process" in text, text[-3000:]


@pytest.mark.integration
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


@pytest.mark.integration
def test_unreachable_coordinator(tmp_path):
    port = free_port()  # nobody listens there
    ((rc, text),) = finish(
        [start([f"--out={tmp_path}", *FLAGS, "--initialization_timeout=2"], 1, 2, port)]
    )
    assert rc == 2, text[-3000:]
    assert f"coordinator 127.0.0.1:{port} unreachable after 2s" in text, text[-3000:]


# --- two processes against one, every estimator --------------------------------------------

# The model is the tiny random Llama with SmolLM2's tokenizer (``tiny_chat``), not the real
# SmolLM2-135M: what is checked (the work split over processes and devices, the per-process
# parts, the merge, the resume after a kill) does not depend on the weights, and the
# 2-layer model compiles in a fraction of the 30-layer one's time.
RUN_FLAGS = [
    "--num_examples=4",
    "--max_new_tokens=24",
    "--temperature=1.0",
    "--estimators=deepconf,rcc,sampling,forcing,probe",
    "--k=2",
    "--max_steps=1",
    "--branch_new_tokens=4",
    "--folds=2",
    "--judge_batch=2",
    "--batch_size=2",
    "--seed=1",
    "--bootstrap=0",
]
TWO_DEVICES = {"XLA_FLAGS": xla_flags(devices=2)}
# the model stages, split over the processes (decisiveness: the default LLM judge)
SPLIT = ("generate", "estimators", "hidden", "decisiveness")


def model_flags(model):
    return [f"--model={model}", f"--judge_model={model}"]


def run_two(model, out, env_1=None, kill_0_after_1=False):
    """Both processes, each with two host devices; returns their (rc, log). With
    ``kill_0_after_1``, process 0 is killed as soon as process 1 has ended."""
    port = free_port()
    args = [f"--out={out}", *model_flags(model), *RUN_FLAGS]
    p0 = start(args, 0, 2, port, env_extra=TWO_DEVICES)
    p1 = start(args, 1, 2, port, env_extra={**TWO_DEVICES, **(env_1 or {})})
    if kill_0_after_1:
        out1, _ = p1.communicate(timeout=1500)
        p0.kill()
        out0, _ = p0.communicate(timeout=60)
        return [(p0.returncode, out0), (p1.returncode, out1)]
    return finish([p0, p1], timeout=1500)


@pytest.fixture(scope="module")
def reference(tiny_chat, tmp_path_factory):
    """The one-process run every multi-process run must equal."""
    out = tmp_path_factory.mktemp("one") / "run"
    env = child_env()
    env.update(JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.run",
            f"--out={out}",
            *model_flags(tiny_chat),
            *RUN_FLAGS,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _marker(out, stage):
    return json.loads((out / "stages" / f"{stage}.done").read_text())


@pytest.mark.slow
def test_two_processes_on_a_file_url_equal_one(tiny_chat, reference, tmp_path):
    """Two processes given the run as a file:// URL (shared token, lock, per-process parts,
    the hidden array's row ranges and process 0's merge all through fcjax.store.fs) give the
    one-process run into a plain path; each process does part of every model stage (the
    markers record its share)."""
    out = tmp_path / "run"
    for rc, log in run_two(tiny_chat, out.as_uri()):
        assert rc == 0, log[-3000:]
    assert_same_run(reference, out)
    assert_same_tables(reference, out, "sampling_samples.parquet", atol=0)
    assert [st.name for st in REGISTRY if st.split] == list(SPLIT)
    n_traces = len(read_table(out / "examples.parquet", ["example_id"])["example_id"])
    for stage in SPLIT:
        shares = _marker(out, stage)["processes"]
        assert sorted(shares) == ["0", "1"], stage
        assert all(s["examples"] > 0 and s["wall_s"] > 0 for s in shares.values()), stage
        if stage == "generate":
            assert sum(s["examples"] for s in shares.values()) == n_traces
    assert _marker(reference, "generate")["processes"]["0"]["examples"] == n_traces
    # the hidden array was written by two processes; the shared token lives in the run
    assert (out / "hidden" / "plan.json").exists() and (out / ".fcjax-shared").exists()


@pytest.mark.slow
def test_killed_process_then_rerun_equals_one(tiny_chat, reference, tmp_path):
    """Process 1 dies right after its first part of the sampling estimator (process 0 is then
    stopped too, as the coordination service would); rerunning both redoes only what is
    missing and gives the one-process result."""
    out = tmp_path / "run"
    _, (rc1, log1) = run_two(
        tiny_chat, out, env_1={"FCJAX_TEST_CRASH": "estimators_sampling:1:1"}, kill_0_after_1=True
    )
    assert rc1 == 13, log1[-3000:]
    stages = out / "stages"
    assert (stages / "generate.done").exists() and not (stages / "estimators.done").exists()
    parts = {p: p.stat().st_mtime_ns for p in stages.glob("estimators_*/part-*.parquet")}
    assert any("estimators_sampling" in str(p) for p in parts)
    for rc, log in run_two(tiny_chat, out):
        assert rc == 0, log[-3000:]
    assert_same_run(reference, out)
    for p, mtime in parts.items():  # finished parts were kept, not recomputed
        assert p.stat().st_mtime_ns == mtime, p
    shares = _marker(out, "estimators")["processes"]
    assert sorted(shares) == ["0", "1"]


def test_unsupported_out_refused_clearly(monkeypatch):
    """An --out the filesystem layer cannot serve stops the run before anything starts,
    naming the flag and the scheme (or the missing package for Orbax on gs://)."""
    import importlib.util

    from experiments.run import run
    from experiments.rundir import RunError
    from experiments.stages import Settings

    with pytest.raises(RunError, match=r"--out=ftp://host/run: .*unsupported scheme 'ftp'"):
        run(Settings(), "ftp://host/run")
    with pytest.raises(RunError, match=r"--out=file://host/run: .*local path"):
        run(Settings(), "file://host/run")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gcsfs" else find_spec(name, *a),
    )
    with pytest.raises(RunError, match=r"--out=gs://bucket/run: .*needs the gcsfs package"):
        run(Settings(), "gs://bucket/run")  # the default estimators include the probe


FAIL_SCRIPT = """
import sys
from fcjax.engine import multihost as mh
pid, port = int(sys.argv[1]), sys.argv[2]
mh.initialize(f"127.0.0.1:{port}", 2, pid, timeout_s=60)
mh.barrier("start")
if pid == 1:
    mh.fail("RuntimeError: boom")
    print("FAILED", flush=True)
else:
    try:
        mh.barrier("never complete")
    except mh.MultihostError as e:
        print("RAISED", e, flush=True)
"""


@pytest.mark.integration
def test_failure_reaches_the_waiting_process():
    """A process that reports a failure releases the others from their barrier at once
    (instead of waiting for the coordination service's heartbeat)."""
    port = free_port()
    env = child_env()
    env["JAX_PLATFORMS"] = "cpu"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", FAIL_SCRIPT, str(i), str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    (rc0, out0), (rc1, out1) = finish(procs, timeout=120)
    assert rc1 == 0 and "FAILED" in out1, out1[-2000:]
    assert rc0 == 0 and "RAISED process 1 failed: RuntimeError: boom" in out0, out0[-2000:]


class _Pretend(Processes):
    """Process ``index`` of ``count``, run one after another in this process: barriers and
    exchanges are no-ops (an exchange returns this process's payload for every process)."""

    def barrier(self, name):
        pass

    def exchange(self, name, payload):
        return [payload] * self.count


@pytest.mark.integration
def test_hidden_rows_of_two_processes_equal_one_and_resume(tmp_path):
    """The multi-process hidden stage, its processes run in turn: each fills its own row
    range of one array, process 0 merges, the states equal the one-process store; a rerun
    with the same split keeps a finished range and redoes only a lost one."""
    import shutil

    from rundir_compare import assert_same_hidden
    from tiny_models import build_tiny_chat

    from experiments.run import run
    from experiments.rundir import RunDir
    from experiments.stages import Settings, hidden
    from experiments.stages.context import Context

    model = build_tiny_chat(tmp_path / "model")
    s = Settings(
        model=str(model),
        num_examples=5,
        max_new_tokens=24,
        temperature=1.0,
        estimators=("deepconf", "probe"),
        batch_size=2,
        seed=3,
    )
    one = tmp_path / "one"
    run(s, str(one), stop_after="hidden")
    two = tmp_path / "two"
    shutil.copytree(one, two)
    (two / "stages" / "hidden.done").unlink()
    shutil.rmtree(two / "hidden")

    def hidden_stage():
        ctxs = [Context(RunDir(two, i), s, _Pretend(i, 2)) for i in range(2)]
        done = [hidden.work(c) for c in ctxs]
        return done, hidden.merge(ctxs[0])

    done, info = hidden_stage()
    n_traces = sum(done)
    assert all(n > 0 for n in done)  # each process captured its own traces
    plan = json.loads((two / "hidden" / "plan.json").read_text())
    assert plan["offsets"][0] == 0 and plan["offsets"][1] % 64 == 0 and sum(plan["rows"]) > 0
    assert_same_hidden(one, two)
    assert info["rows"] == RunDir(one).info("hidden")["rows"]
    # process 1's range is lost (its index and done marker gone): only its traces are redone
    for f in (two / "hidden" / "parts").glob(f"*-{plan['offsets'][1]:012d}.*"):
        f.unlink()
    done, info = hidden_stage()
    assert done[0] == 0 and done[1] > 0 and sum(done) < n_traces
    assert_same_hidden(one, two)


@pytest.mark.integration
def test_coordinator_alone_says_why_before_jax_aborts(tmp_path):
    """Process 0 whose peers never come: before jax aborts it, it names the coordinator and
    the likely causes."""
    port = free_port()
    ((rc, text),) = finish(
        [start([f"--out={tmp_path}", *FLAGS, "--initialization_timeout=4"], 0, 2, port)]
    )
    assert rc != 0, text[-3000:]
    assert (
        f"still waiting after 4s for all processes to join the coordinator at 127.0.0.1:{port}"
        in text
    ), text[-3000:]
    assert "--num_processes" in text
