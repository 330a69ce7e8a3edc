"""Tensor parallelism: the logical axis rules, the memory planner, and (in subprocesses on 8
forced CPU devices) the engine's outputs on data x model = 1x8, 2x4, 4x2 against one device
and the compiled decode step's per-device memory."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from child_env import child_env
from jax.sharding import PartitionSpec as P

from fcjax.engine import mesh as mesh_lib
from fcjax.engine import plan as plan_lib
from fcjax.engine.decode import Layout, zeros_pool
from fcjax.models import sharding
from fcjax.models.presets import PRESETS

WORKER = Path(__file__).parent / "tp_worker.py"
MESHES = ("data:1,model:8", "data:2,model:4", "data:4,model:2")


# --- rules and mesh (in process) ----------------------------------------------------------


def test_rules_split_heads_only_with_kv_heads():
    qwen = PRESETS["qwen2-1.5b"]  # 12 heads, 2 kv heads, mlp 8960, vocab 151936
    two = sharding.resolve(sharding.config_sizes(qwen), {"data": 4, "model": 2})
    assert two["heads"] == two["kv_heads"] == "model" and two["batch"] == "data"
    four = sharding.resolve(sharding.config_sizes(qwen), {"data": 2, "model": 4})
    # 12 query heads divide 4, but 2 kv heads do not: attention stays whole (replicated)
    assert four["heads"] is None and four["kv_heads"] is None
    assert four["mlp"] == "model" and four["vocab"] == "model"
    assert not sharding.attention_split(qwen, {"data": 2, "model": 4})
    assert sharding.resolve(sharding.config_sizes(qwen), {"data": 8, "model": 1})["mlp"] is None


def test_param_and_pool_specs():
    config = PRESETS["llama-8b"]
    shape = {"data": 2, "model": 8}
    assert sharding.param_axes(("blocks", "3", "attn", "k")) == ("embed", "kv_heads", "head_dim")
    assert sharding.param_axes(("lm_head",)) == ("embed", "vocab")
    assert sharding.param_axes(("blocks", "0", "attn", "q_norm", "scale")) == ("head_dim",)
    with pytest.raises(sharding.ShardingError, match="blocks/0/attn/rope_freqs"):
        sharding.param_axes(("blocks", "0", "attn", "rope_freqs"))
    layout = Layout(contexts=4, rows=2, ctx_len=64, new=32, reads=1)
    one_layer = dataclasses.replace(config, num_layers=1)
    pool = jax.eval_shape(lambda: zeros_pool(one_layer, layout, "bfloat16"))
    specs = {
        ".".join(str(getattr(k, "name", getattr(k, "idx", k))) for k in path): mesh_lib.pool_spec(
            config, shape, 0, path, x.ndim
        )
        for path, x in jax.tree_util.tree_leaves_with_path(pool)
    }
    assert specs["cache.ctx_k.0"] == P("data", "model", None, None)
    assert specs["cache.own_v.0"] == P("data", "model", None, None)
    assert specs["normed"] == P("data", None, None)
    row_split = mesh_lib.pool_spec(config, shape, 1, pool_path(pool, "ctx_k"), 4)
    assert row_split == P(None, "model", None, None)  # contexts whole when rows are split


def pool_path(pool, field):
    for path, _ in jax.tree_util.tree_leaves_with_path(pool):
        if any(getattr(k, "name", None) == field for k in path):
            return path
    raise KeyError(field)


def test_mesh_spec_errors():
    assert mesh_lib.mesh_sizes("data:4,model:2") == {"data": 4, "model": 2}
    assert mesh_lib.parse_mesh("data:-1,model:2", 8) == (4, 2)
    with pytest.raises(mesh_lib.MeshError, match="needs 6 devices, but 8"):
        mesh_lib.parse_mesh("data:3,model:2", 8)
    with pytest.raises(mesh_lib.MeshError, match="bad mesh spec"):
        mesh_lib.mesh_sizes("tensor:2")
    mesh = mesh_lib.make_mesh(None)
    assert mesh.axis_names == ("data", "model") and mesh.shape["model"] == 1
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


# --- the planner against hand-computed bytes ----------------------------------------------


def test_plan_counts_weights_and_kv_by_hand():
    c = PRESETS["llama-8b"]  # 32 layers, 8 kv heads x 128, untied
    p = plan_lib.plan(c, {"data": 2, "model": 8}, rows=16, context=4096, new=1024, dtype="bf16")
    per_token = c.num_layers * 2 * c.num_kv_heads * c.head_dim * 2  # k and v, bf16
    positions = 16 * 4096 + 16 * 1024  # 16 contexts of 4096, 16 rows of 1024 own
    assert p.kv_pool == per_token * positions // 16
    assert p.attention_split and p.weights_total == 2 * c.param_count()
    d, f, v = c.hidden_size, c.intermediate_size, c.vocab_size
    whole = c.num_layers * 2 * d + d  # the norms stay whole on every model shard
    assert p.weights == (2 * c.param_count() - 2 * whole) // 8 + 2 * whole
    assert p.host == 2 * c.param_count()
    assert v % 8 == 0 and f % 8 == 0


def test_plan_replicates_attention_when_kv_heads_do_not_divide():
    c = PRESETS["qwen2-1.5b"]  # 2 kv heads
    split = plan_lib.plan(c, {"data": 1, "model": 2}, 8, 1024)
    whole = plan_lib.plan(c, {"data": 1, "model": 4}, 8, 1024)
    assert split.attention_split and not whole.attention_split
    assert whole.kv_pool == 2 * split.kv_pool  # every model shard holds all kv heads


def test_largest_rows_is_the_boundary():
    c = PRESETS["qwen2-7b"]
    mesh = {"data": 2, "model": 4}
    budget = 16 * 10**9
    rows = plan_lib.largest_rows(c, mesh, 8192, budget, new=2048)
    assert rows > 0 and rows % 2 == 0
    assert plan_lib.plan(c, mesh, rows, 8192, 2048).total <= budget
    assert plan_lib.plan(c, mesh, rows + 2, 8192, 2048).total > budget


@pytest.mark.integration
def test_plan_cli(tmp_path):
    cfg = {
        "architectures": ["Qwen2ForCausalLM"], "hidden_size": 5120, "intermediate_size": 27648,
        "num_hidden_layers": 64, "num_attention_heads": 40, "num_key_value_heads": 8,
        "vocab_size": 152064, "max_position_embeddings": 4096,
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    out = subprocess.run(
        [sys.executable, "-m", "experiments.plan", f"--model={tmp_path}", "--mesh=data:1,model:1",
         "--rows=8", "--context=1024", "--new=1024", "--dtype=bf16", "--device_memory=141GB"],
        capture_output=True, text=True, timeout=600, env=_env(),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "weights                65.528 GB" in out.stdout
    assert "context    4096:" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "experiments.plan", "--model=nope", "--mesh=data:1"],
        capture_output=True, text=True, timeout=600, env=_env(),
    )  # fmt: skip
    assert bad.returncode != 0 and "--model 'nope'" in bad.stderr


# --- 8 forced CPU devices (subprocesses) --------------------------------------------------


def _env():
    env = child_env()
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    return env


def _start(arg):
    return subprocess.Popen(
        [sys.executable, str(WORKER), arg], env=_env(), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip


def _result(proc, timeout=1800):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:])


@pytest.fixture(scope="module")
def runs():
    """One worker per mesh, all started at once (mostly compile time)."""
    procs = {name: _start(name) for name in ("one", *MESHES)}
    return {name: _result(proc) for name, proc in procs.items()}


def _rows(key, x):
    """Per-row lists (branch results are [cut][sample][token])."""
    return [row for cut in x for row in cut] if key.endswith("branch_logprobs") else x


def _close(a, b, key):
    assert len(a) == len(b), key
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5, err_msg=key)


def _same_greedy(tp, one, key, tie=1e-4):
    """Greedy tokens identical up to a step where one device's top two log-probabilities are
    within ``tie`` (a split matmul may break that tie the other way; the row ends there), and
    the log-probabilities equal over the tokens both share. At most one row may end early."""
    early = 0
    for row, (a, b) in enumerate(zip(tp[key], one[key], strict=True)):
        short = min(len(a), len(b))  # a row may end earlier at EOS after a broken tie
        same = next((t for t in range(short) if a[t] != b[t]), short)
        if a != b:
            assert same < len(b), f"{key} row {row}: {a} runs past the reference {b}"
            gap = one[f"{key}_gap"][row][same]
            assert gap < tie, f"{key} row {row} differs at {same} (top-2 gap {gap:.2e}): {a} {b}"
            early += 1
        _close([tp[f"{key}_logprobs"][row][:same]], [one[f"{key}_logprobs"][row][:same]], key)
    assert early <= 1, f"{key}: {early} rows broke a tie"


@pytest.mark.slow
@pytest.mark.parametrize("spec", MESHES)
def test_mesh_matches_one_device(runs, spec):
    """Tokens identical; log-probabilities and hidden states equal up to float32 summation
    order (a split matmul sums its partial products in another order)."""
    one, tp = runs["one"], runs[spec]
    assert tp["devices"] == 8 and one["devices"] == 1
    for key in one:
        if key.endswith(("generate", "branch")):
            assert tp[key] == one[key], key
        elif key in ("gqa/xla", "gqa/pallas_interpret"):
            _same_greedy(tp, one, key)
        elif key.startswith("gqa/"):
            continue  # compared by _same_greedy, over the tokens both runs share
        elif key.endswith("logprobs"):
            _close(_rows(key, tp[key]), _rows(key, one[key]), key)
        elif key in ("hidden", "last_hidden"):
            _close(tp[key], one[key], key)
    # a drained pool shrinks on one device and under data:1 (its KV heads over model), not
    # where the context slots are split over data
    assert one["compact_shrank"] and tp["compact_shrank"] == (tp["mesh"]["data"] == 1)


@pytest.mark.slow
def test_weights_and_pool_are_split(runs):
    """Per-device blocks: heads, MLP columns, vocabulary and KV heads divided by model; the
    2-kv-head model's pool keeps all kv heads where they do not divide model."""
    for spec in MESHES:
        s, m = runs[spec]["shards"], runs[spec]["mesh"]["model"]
        d = runs[spec]["mesh"]["data"]
        assert s["q"] == [64, 8 // m, 16] and s["k"] == [64, 8 // m, 16], spec
        assert s["down"] == [128 // m, 64] and s["embed"] == [256 // m, 64], spec
        assert s["full_ctx_k"] == [8 // d, 8 // m, 16, 16], spec
        assert s["full_own_k"] == [16 // d, 8 // m, 16, 16], spec
        assert s["gqa_ctx_k"] == [8 // d, 2 // m if m == 2 else 2, 16, 16], spec


@pytest.mark.slow
def test_compiled_step_memory_divides_by_model():
    """The decode step compiled for data x model: per-device argument bytes (weights + KV
    pool + the step's small inputs) equal the planner's exact count, and weights + KV at
    model=4 are a quarter of model=1 (within the norms, which stay whole: 0.2%)."""
    mem = _result(_start("memory"))
    vocab, c, r = 1024, 8, 1
    for spec, m in mem.items():
        d = int(spec.split(",")[0].split(":")[1])
        # the step's other inputs: stop tables (EOS bool, bool, uint32, uint32 per vocabulary
        # entry), limit, seed, temperature and top-p, the refill (bool, int32, int32,
        # 3 x uint32 per row slot)
        small = vocab * (1 + 1 + 4 + 4) + 16 + c * r * (1 + 4 + 4 + 12) // d
        assert m["argument"] == m["weights"] + m["kv_pool"] + m["pool_state"] + small, spec
    one, four = mem["data:1,model:1"], mem["data:1,model:4"]
    big_one = one["weights"] + one["kv_pool"]
    big_four = four["weights"] + four["kv_pool"]
    assert big_one / 4 <= big_four <= big_one / 4 * 1.002
    both = mem["data:2,model:4"]
    assert both["kv_pool"] == one["kv_pool"] // 8 and both["weights"] == four["weights"]
