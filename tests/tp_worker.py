"""Runs the engine on tiny random models under one mesh and prints the outputs as JSON.

Used by test_tensor_parallel.py, one subprocess per mesh (8 forced CPU devices are set
before JAX is imported). argv: mesh spec ("one": a single device).
"""

import dataclasses
import importlib
import json
import os
import sys

# after the parent's flags (the tests' compiler settings)
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]
)

import jax
import numpy as np

import fcjax
from fcjax.engine import mesh as mesh_lib
from fcjax.engine.decode import Layout, init_pool
from fcjax.models import loading
from fcjax.models.config import ModelConfig
from fcjax.models.lm import LM

generate_lib = importlib.import_module("fcjax.engine.generate")  # the module, not the function

# every split axis divides 8: heads and KV heads split on all three meshes
FULL = ModelConfig(
    family="qwen2", vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
    num_heads=8, num_kv_heads=8, head_dim=16, qkv_bias=True, name="tp-full",
)  # fmt: skip
# 2 KV heads: attention replicated over model 8 and 4 (the documented rule), split over 2
GQA = ModelConfig(
    family="llama", vocab_size=192, hidden_size=48, intermediate_size=96, num_layers=2,
    num_heads=8, num_kv_heads=2, head_dim=16, name="tp-gqa",
)  # fmt: skip


def lm_of(config, seed):
    return LM.from_decoder(loading.random_decoder(config, jax.numpy.float32, seed), None)


def shard_shape(x) -> list[int]:
    return list(x.addressable_shards[0].data.shape)


def main(spec: str) -> dict:
    devices = jax.devices()[:1] if spec == "one" else jax.devices()
    mesh = mesh_lib.make_mesh(None if spec == "one" else spec, devices=devices)
    prompts = [[5, 6, 7, 8, 9], [12, 13, 14], [20, 21, 22, 23, 24, 25, 26], [3, 4]]
    keys = [f"ex-{i}" for i in range(len(prompts))]
    sampled = fcjax.SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=6, seed=11)
    out = {"mesh": dict(mesh.shape), "devices": mesh.size}
    lm = lm_of(FULL, 0)
    for impl in ("xla", "pallas_interpret"):
        model = lm.with_decode_attention(impl)
        gens = fcjax.generate(model, prompts, sampled, keys=keys, mesh=mesh)
        out[f"{impl}/generate"] = [g.token_ids for g in gens]
        out[f"{impl}/generate_logprobs"] = [g.token_logprobs.tolist() for g in gens]
        trace = prompts[0] + out[f"{impl}/generate"][0]
        branches = fcjax.branch(model, trace, [3, 7, 10], 3, sampled, key="ex-0", mesh=mesh)
        out[f"{impl}/branch"] = [[g.token_ids for g in cut] for cut in branches]
        out[f"{impl}/branch_logprobs"] = [
            [g.token_logprobs.tolist() for g in cut] for cut in branches
        ]
    # a pool that shrinks once drained (one device, or data:1 with the KV heads over model):
    # rows of many lengths (an EOS set of 1 in 8 ids), the live slots moved with their
    # shards into a narrower pool
    generate_lib.COMPACT_FROM = 8
    rng = np.random.default_rng(3)
    many = [rng.integers(1, 200, int(rng.integers(2, 9))).tolist() for _ in range(12)]
    eos = tuple(range(0, FULL.vocab_size, 8))
    ends = lm_of(dataclasses.replace(FULL, eos_token_ids=eos), 0)
    stats = generate_lib.EngineStats()
    params = fcjax.SamplingParams(temperature=1.0, max_new_tokens=24, seed=4)
    gens = fcjax.generate(ends, many, params, batch_size=8, mesh=mesh, stats=stats)
    out["compact/generate"] = [g.token_ids for g in gens]
    out["compact_shrank"] = stats.row_steps < 8 * generate_lib.CHUNK * stats.chunks
    caps = fcjax.capture(lm, [prompts[2], prompts[0]], [[0, 3, 6], [1, 4]], mesh=mesh)
    out["hidden"] = [c.states.tolist() for c in caps]
    out["last_hidden"] = [c.last_hidden.tolist() for c in caps]
    # greedy, with each step's top-2 gap: a near-tie may break either way under another
    # summation order (test_tensor_parallel allows that, and only that)
    gqa, greedy = lm_of(GQA, 1), fcjax.SamplingParams(temperature=0.0, max_new_tokens=6)
    for impl in ("xla", "pallas_interpret"):
        gens = fcjax.generate(gqa.with_decode_attention(impl), prompts, greedy, mesh=mesh)
        out[f"gqa/{impl}"] = [g.token_ids for g in gens]
        out[f"gqa/{impl}_logprobs"] = [g.token_logprobs.tolist() for g in gens]
        out[f"gqa/{impl}_gap"] = [
            (g.top_logprobs[:, 0] - g.top_logprobs[:, 1]).tolist() for g in gens
        ]
    # where the arrays live: per-device shard shapes of weights and of a KV pool
    weights = mesh_lib.replicate(lm.state, mesh)
    attn, mlp = weights["blocks"][0]["attn"], weights["blocks"][0]["mlp"]
    out["shards"] = {
        "q": shard_shape(attn["q"]), "k": shard_shape(attn["k"]),
        "down": shard_shape(mlp["down"]), "embed": shard_shape(weights["embed"]),
    }  # fmt: skip
    layout = Layout(contexts=8, rows=2, ctx_len=16, new=16, reads=1)
    for name, config in (("full", FULL), ("gqa", GQA)):
        pool = init_pool(config, layout, np.float32, mesh, 0)
        out["shards"][f"{name}_ctx_k"] = shard_shape(pool.cache.ctx_k[0])
        out["shards"][f"{name}_own_k"] = shard_shape(pool.cache.own_k[0])
    return out


# weights and KV dominate the decode step's arguments (every split axis divides 4)
WIDE = ModelConfig(
    family="qwen2", vocab_size=1024, hidden_size=128, intermediate_size=512, num_layers=2,
    num_heads=8, num_kv_heads=8, head_dim=16, qkv_bias=True, name="tp-wide",
)  # fmt: skip


def memory() -> dict:
    """The compiled decode step's memory_analysis and the planner's figures per mesh."""
    from fcjax.engine import plan as plan_lib

    layout = Layout(contexts=8, rows=1, ctx_len=256, new=256, reads=1)
    sampler = fcjax.SamplingParams(temperature=1.0, top_p=0.9).sampler
    out = {}
    for spec, n in (("data:1,model:1", 1), ("data:1,model:4", 4), ("data:2,model:4", 8)):
        mesh = mesh_lib.make_mesh(spec, devices=jax.devices()[:n])
        ma = plan_lib.compiled_step_memory(WIDE, layout, np.float32, mesh, sampler)
        p = plan_lib.plan(WIDE, dict(mesh.shape), 8, 256, 256, 1, "float32")
        out[spec] = {
            "argument": ma.argument_size_in_bytes, "temp": ma.temp_size_in_bytes,
            "weights": p.weights, "kv_pool": p.kv_pool, "pool_state": p.pool_state,
            "decode_transient": p.decode_activations + p.logits + p.sampler,
        }  # fmt: skip
    return out


if __name__ == "__main__":
    result = memory() if sys.argv[1] == "memory" else main(sys.argv[1])
    print("RESULT " + json.dumps(result))
