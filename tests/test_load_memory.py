"""Loading keeps one copy of the weights: host memory measured in a fresh process.

A random-weight Llama of ~170 MB (float32) is written as safetensors and as GGUF (F32 and
Q8_0). A child process imports fcjax, loads a tiny model once (so imports and first-use
allocations are in its baseline), resets its peak-RSS counter (``/proc/self/clear_refs``)
and loads the big one. Its resident-set growth must stay within 1.15x the loaded weights'
bytes and the peak within 1.3x (before this was measured, loading held a staged host copy
and the files' mapped pages: 1.8-2.0x resident, 2.0-2.4x peak on a 300 MB model).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as QT
from test_gguf import write_gguf

pytestmark = pytest.mark.integration

CHILD = r"""
import json, sys

def status():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out

import jax
import fcjax

path, warmup, dtype = sys.argv[1], sys.argv[2], sys.argv[3]
jax.block_until_ready(fcjax.load(warmup, dtype=dtype).state)
base = status()["VmRSS"]
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets VmHWM to the current resident set
lm = fcjax.load(path, dtype=dtype)
jax.block_until_ready(lm.state)
now = status()
weights = sum(x.nbytes for x in jax.tree.leaves(lm.state))
resident, peak = now["VmRSS"] - base, now["VmHWM"] - base
print(json.dumps({"weights": weights, "resident": resident, "peak": peak}))
"""


def _write_model(out: Path, vocab: int, hidden: int, mlp: int, layers: int) -> Path:
    from flax import nnx
    from safetensors.numpy import save_file

    from fcjax.models.config import ModelConfig, RopeConfig
    from fcjax.models.export import hf_config_dict
    from fcjax.models.loading import iter_hf_tensors, random_decoder

    cfg = ModelConfig(
        family="llama",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_layers=layers,
        num_heads=hidden // 64,
        num_kv_heads=hidden // 128,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope=RopeConfig(theta=10000.0),
        max_position_embeddings=2048,
    )
    out.mkdir(parents=True)
    _, state = nnx.split(random_decoder(cfg))
    save_file(dict(iter_hf_tensors(cfg, state)), str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(hf_config_dict(cfg)))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    big = _write_model(root / "big", vocab=16000, hidden=512, mlp=1536, layers=8)
    write_gguf(big, big / "f32.gguf", QT.F32)
    write_gguf(big, big / "q8_0.gguf", QT.Q8_0)
    small = _write_model(root / "small", vocab=256, hidden=128, mlp=256, layers=1)
    write_gguf(small, small / "f32.gguf", QT.F32)
    return big, small


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize(
    "fmt, dtype",
    [
        ("safetensors", "float32"),
        ("f32.gguf", "float32"),
        ("q8_0.gguf", "float32"),
        ("safetensors", "bfloat16"),
    ],
)
def test_load_holds_one_copy_of_the_weights(models, fmt, dtype):
    big, small = models
    path, warmup = (big, small) if fmt == "safetensors" else (big / fmt, small / "f32.gguf")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(path), str(warmup), dtype],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    resident, peak = got["resident"] / got["weights"], got["peak"] / got["weights"]
    mb = got["weights"] / 1e6
    print(f"{fmt} -> {dtype}: weights {mb:.0f} MB, resident {resident:.3f}x, peak {peak:.3f}x")
    assert got["weights"] > 80e6  # the model is big enough for the ratios to mean something
    assert resident <= 1.15, got
    assert peak <= 1.3, got
