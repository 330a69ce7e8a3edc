"""experiments.benchmark (and its bench_* modules): a tiny end-to-end run (exit status,
table rows, JSON) and its arithmetic (bytes per decode step, cuts, roofline, weight layouts).
Never a speed."""

import dataclasses
import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.bench_table import peak_bandwidth, step_bytes
from experiments.bench_workloads import branch_cuts
from fcjax.models.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(batch=2, prompt_len=16, new_tokens=8, trace_len=64, cuts=3, k=2, branch_new=8)
PEAK_BW = 1e10  # given on the command line so the roofline column is filled on CPU too


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    cmd = [
        sys.executable,
        "-m",
        "experiments.benchmark",
        "--model=random:tiny-llama",
        "--peer=transformers",
        "--workload=all",
        "--repeats=1",
        f"--peak_bw={PEAK_BW}",
        f"--out={out}",
        *(f"--{k}={v}" for k, v in TINY.items()),
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return proc, out


@pytest.mark.integration
def test_exits_cleanly_and_prints_every_row(run):
    proc, _ = run
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines()]
    pairs = {(r[0], r[1]) for r in rows if len(r) > 1}
    for workload, system in [
        ("generate", "fcjax"),
        ("generate", "transformers[static]"),
        ("branch", "fcjax.branch"),
        ("branch", "fcjax.generate"),
        ("branch", "transformers[static]"),
    ]:
        assert (workload, system) in pairs, proc.stdout
    ratio = [line for line in proc.stdout.splitlines() if line.startswith("ratio_vs_")]
    assert len(ratio) == 1 and ratio == [proc.stdout.strip().splitlines()[-1]]
    value = float(ratio[0].split("=")[1])
    assert math.isfinite(value) and value > 0


@pytest.mark.integration
def test_json_counts_tokens_and_derives_columns(run):
    proc, out = run
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    rows = {(r["workload"], r["system"]): r for r in data["rows"]}
    gen, peer = rows[("generate", "fcjax")], rows[("generate", "transformers[static]")]
    assert gen["new_tokens"] == peer["new_tokens"] == TINY["batch"] * TINY["new_tokens"]
    for system in ("fcjax.branch", "fcjax.generate", "transformers[static]"):
        want = TINY["cuts"] * TINY["k"] * TINY["branch_new"]
        assert rows[("branch", system)]["new_tokens"] == want
    # ratio: tokens/s over the peer's, workload by workload
    assert gen["ratio"] == pytest.approx(gen["tokens_per_s"] / peer["tokens_per_s"])
    assert data["ratio_vs_transformers"] == pytest.approx(gen["ratio"])
    branch_peer = rows[("branch", "transformers[static]")]["tokens_per_s"]
    fast = rows[("branch", "fcjax.branch")]
    assert fast["ratio"] == pytest.approx(fast["tokens_per_s"] / branch_peer)
    # tokens/s is tokens over the fastest timed call
    assert gen["tokens_per_s"] == pytest.approx(gen["new_tokens"] / min(gen["times_s"]))
    # roofline = bytes per step / step time / peak, for generate rows with a step time
    nbytes = step_bytes(
        PRESETS["tiny-llama"], 4, TINY["batch"], TINY["prompt_len"] + (TINY["new_tokens"] - 1) / 2
    )
    for row in (gen, peer):
        if row["ms_per_token"] is None or row["ms_per_token"] <= 0:
            continue  # a step time lost in timing noise leaves the columns empty
        bw = nbytes / (row["ms_per_token"] / 1e3)
        assert row["bandwidth_gbs"] == pytest.approx(bw / 1e9)
        assert row["roofline"] == pytest.approx(bw / PEAK_BW)
    # same weights in both systems: greedy tokens agree (a broken copy gives ~1/vocab)
    agree = [n for n in data["notes"] if n.startswith("greedy tokens equal")]
    assert agree and float(agree[0].rsplit(" ", 1)[1].rstrip("%")) >= 75


def test_step_bytes_by_hand():
    # tiny-llama: d=64, f=128, heads 4, kv 2, hd 16, 2 layers, vocab 256, untied
    attn = 64 * 4 * 16 * 2 + 64 * 2 * 16 * 2
    layer = attn + 3 * 64 * 128 + 2 * 64
    weights = 2 * layer + 256 * 64 + 64  # the untied embedding is gathered, not read whole
    kv = 2 * 2 * 2 * 16 * 3 * 10.5  # K and V, 2 layers, 2 kv heads x 16, 3 rows x 10.5 positions
    config = PRESETS["tiny-llama"]
    assert step_bytes(config, 2, 3, 10.5) == pytest.approx((weights + kv) * 2)
    tied = PRESETS["smollm2-135m"]  # tied: the unembedding reads the whole table
    assert step_bytes(tied, 4, 1, 0) == pytest.approx(tied.param_count() * 4)


def test_cuts_and_bandwidth_table():
    assert branch_cuts(64, 3) == [21, 43, 64]
    assert branch_cuts(2000, 20)[:2] == [100, 200]
    assert branch_cuts(5, 10) == [1, 2, 3, 4, 5]  # duplicates dropped
    assert peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert peak_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert peak_bandwidth("NVIDIA H200") == 4.8e12
    assert peak_bandwidth("cpu") is None


@pytest.mark.integration
def test_proxies_print_their_figures_and_the_summary_line():
    """``--proxies`` on a tiny shape: every proxy line, then the summary line whose values
    agree with the lines above it."""
    cmd = [
        sys.executable,
        "-m",
        "experiments.benchmark",
        "--proxies",
        "--model=random:tiny-llama",
        "--proxy_prompts=24",
    ]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    steps = [line for line in lines if line.startswith("decode step ") and "rows, " in line]
    steps = [line for line in steps if "lowered for CUDA" not in line]
    # 2 layouts x 1k and 4k positions x 2 samplers, in bf16, every loop's trip count known
    assert len(steps) == 8 and all(line.endswith("slices: 0") for line in steps)
    assert all("(counted once): 0;" in line for line in steps)
    assert {line.split(" context")[0].split()[-1] for line in steps} == {"1024", "4096"}
    cuda = [line for line in lines if line.startswith("decode step lowered for CUDA")]
    assert len(cuda) == 8  # xla and pallas (head_dim 16) x 2 layouts x 2 samplers
    loops = [int(line.split("while loops ")[1].split(",")[0]) for line in cuda]
    last = dict(kv.split("=") for kv in lines[-1].split())
    assert set(last) == {
        "hlo_bytes_ratio",
        "row_utilisation",
        "programs_per_call",
        "cuda_while_loops",
        "cuda_top_k_max",
    }
    ratios = [float(line.split(" = ")[1].split("x;")[0]) for line in steps]
    assert float(last["hlo_bytes_ratio"]) == pytest.approx(max(ratios), abs=1e-3)
    assert int(last["cuda_while_loops"]) == max(loops) <= 2
    assert 0 < float(last["row_utilisation"]) <= 1
    assert int(last["programs_per_call"]) <= 3


@pytest.mark.integration
def test_gpu_suite_tiny_preset_writes_each_case_as_it_finishes(tmp_path):
    """``--suite=gpu --preset=tiny`` on CPU: versions first, then every case one JSON line of
    rows.jsonl with every field, each written before the next case started; the Pallas path
    fails on CPU and its cases say so while the others run."""
    from experiments import benchmark_gpu

    cmd = [sys.executable, "-m", "experiments.benchmark", "--suite=gpu", "--preset=tiny"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [*cmd, f"--out={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("versions: {")
    lines = (tmp_path / "rows.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert all(set(r) == set(benchmark_gpu.FIELDS) for r in rows)
    assert rows[0]["case"] == "versions" and "jax" in json.loads(rows[0]["note"])
    by = {(r["case"], r["system"], r["batch"]): r for r in rows}
    tiny = benchmark_gpu.PRESETS["tiny"]
    for batch in tiny.batches:
        ours = by[("generate", "fcjax", batch)]
        assert ours["error"] is None and ours["new_tokens"] == batch * tiny.new
        assert ours["tokens_per_s"] > 0 and ours["compile_s"] >= 0
        assert "Only interpret mode" in by[("generate", "fcjax[pallas]", batch)]["error"]
    assert by[("smoke_decode_paths", "fcjax[pallas]", None)]["error"]
    branch = by[("branch", "fcjax.branch", None)]
    assert branch["error"] is None and branch["rows"] == tiny.cuts * tiny.k
    assert branch["new_tokens"] == branch["rows"] * tiny.branch_new
    kernels = by[("branch_kernels", "fcjax.branch", None)]
    assert kernels["error"] is None
    top = json.loads(kernels["note"])["top"]  # on CPU: XLA's ops, all in jitted programs
    assert top and all(program.startswith("jit_") and ms >= 0 for program, _, ms, _ in top)
    assert any(program == "jit_decode_chunk" for program, *_ in top)
    sampler = [r for r in rows if r["case"] == "sampler"]
    assert [r["note"].split(",")[0] for r in sampler] == [
        "T=0.8 top-p 0.95",
        "T=0.8 top-p 1.0",
        "T=0.0 top-p 1.0",
    ]
    assert all(r["error"] is None and r["ms_per_step"] > 0 for r in sampler)
    peer = by[("peer", "transformers", tiny.peer_batch)]
    assert peer["error"] is None and peer["tokens_per_s"] > 0
    # written case by case: each case's rows before the next case started (not all at the
    # end); the rows of one case (the sampler's three) are written together
    for before, row in itertools.pairwise(rows):
        if row["case"] != before["case"]:
            assert row["finished_at"] - before["finished_at"] >= 0.99 * (row["wall_s"] or 0)
    assert sum(r["wall_s"] or 0 for r in rows) > 0.5


def test_interleaved_pairs_the_fastest_calls_time_with_its_output():
    """A rate is one call's output over that call's time: ``Timing.out`` is what the fastest
    timed call returned, not the last one (a sampling peer returns other lengths each call)."""
    import time

    from experiments.bench_workloads import interleaved

    sleeps = iter([0.0, 0.06, 0.01, 0.04])  # the warm-up call, then three timed calls
    calls = itertools.count()

    def case():
        time.sleep(next(sleeps))
        return next(calls)

    timing = interleaved({"case": case}, repeats=3)["case"]
    assert len(timing.times_s) == 3 and timing.best_s == min(timing.times_s)
    assert timing.times_s.index(timing.best_s) == 1 and timing.out == 2  # the second timed


def test_chat_peer_draws_the_same_sample_every_call(tmp_path, monkeypatch):
    """The transformers chat peer reseeds torch each call: the useful lengths (what its rate
    counts) repeat from call to call, and another seed draws another sample."""
    from tiny_models import build_tiny_chat

    import fcjax
    from experiments import bench_peer
    from experiments.bench_peer import chat_peer_fn

    lm = fcjax.load(build_tiny_chat(tmp_path))
    prompts = [lm.encode(lm.chat([{"role": "user", "content": q}])) for q in ("Hi?", "Why?")]
    kwargs = dict(dtype="float32", threads=1, batch=2, new=12, temperature=1.0, top_p=0.95)
    # an EOS set of 1 in 4 ids, so sampled rows end at different steps
    ends = dataclasses.replace(lm.config, eos_token_ids=tuple(range(0, lm.config.vocab_size, 4)))
    lm = dataclasses.replace(lm, config=ends)
    call = chat_peer_fn(lm, prompts, [], seed=1, **kwargs)
    runs = [call() for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]
    others = [chat_peer_fn(lm, prompts, [], seed=s, **kwargs)() for s in range(2, 6)]
    assert any(o != runs[0] for o in others)
    # one row at a time (--chat_prompts beyond --batch): batches of one, a length per prompt
    rows, batches = [], bench_peer.peer_batches

    def spy(model, prefixes, batch):
        out = batches(model, prefixes, batch)
        rows.extend(ids.shape[0] for ids, _ in out)
        return out

    monkeypatch.setattr(bench_peer, "peer_batches", spy)
    one = chat_peer_fn(lm, prompts, [], seed=1, **{**kwargs, "batch": 1})()
    assert rows == [1, 1] and len(one) == 2 and all(1 <= n <= 12 for n in one)
