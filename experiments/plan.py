"""Memory plan of a decode run: bytes per device and per host, and the largest pools that fit.

    python -m experiments.plan --model=qwen2-7b --mesh=data:2,model:8 --rows=64 \
        --context=8192 --new=4096 --dtype=bf16 --device_memory=16GB

``--model``: a preset or an HF config.json (or its directory). ``--rows`` row slots decode
together, ``--rows_per_context`` of them per context slot (1: ``generate``; more: ``branch``
rows reading one trace); contexts hold ``--context`` positions and each row ``--new`` own
positions. The formulas live in ``fcjax.engine.plan``; this program parses and prints.
"""

from __future__ import annotations

import re

from absl import app, flags

from fcjax.engine import plan as plan_lib
from fcjax.engine.mesh import MeshError, mesh_sizes

MODEL = flags.DEFINE_string("model", "qwen2-7b", "preset name or path to an HF config.json")
MESH = flags.DEFINE_string("mesh", "data:1,model:1", "mesh shape, e.g. data:2,model:8")
ROWS = flags.DEFINE_integer("rows", 64, "row slots decoded together")
ROWS_PER_CONTEXT = flags.DEFINE_integer("rows_per_context", 1, "row slots per context slot")
CONTEXT = flags.DEFINE_integer("context", 4096, "positions per context slot (prompt or trace)")
NEW = flags.DEFINE_integer("new", 1024, "own positions per row (max_new_tokens)")
DTYPE = flags.DEFINE_string("dtype", "bf16", "weights and caches: bf16 or fp32")
DEVICE_MEMORY = flags.DEFINE_string(
    "device_memory", "16GB", "memory per device the fit table plans for (e.g. 16GB, 141GB)"
)
USABLE = flags.DEFINE_float(
    "usable", 0.9, "fraction of --device_memory the plan may fill (runtime and XLA overheads)"
)

_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10,
          "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise app.UsageError(f"--device_memory={text!r}: expected e.g. 16GB, 141GB or 80GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def gb(n: int) -> str:
    return f"{n / 1e9:9.3f} GB"


def main(argv):
    del argv
    try:
        config = plan_lib.model_config(MODEL.value)
        mesh = mesh_sizes(MESH.value)
    except (plan_lib.PlanError, MeshError) as e:
        raise app.UsageError(str(e)) from None
    if min(mesh.values()) < 1:
        raise app.UsageError(f"--mesh={MESH.value!r}: sizes must be >= 1 here (no -1)")
    if DTYPE.value not in plan_lib.DTYPES:
        raise app.UsageError(f"--dtype={DTYPE.value!r}: one of {', '.join(plan_lib.DTYPES)}")
    dtype = plan_lib.DTYPES[DTYPE.value]
    memory = parse_bytes(DEVICE_MEMORY.value)
    args = dict(new=NEW.value, rows_per_context=ROWS_PER_CONTEXT.value, dtype=dtype)
    try:
        p = plan_lib.plan(config, mesh, ROWS.value, CONTEXT.value, **args)
    except plan_lib.PlanError as e:
        raise app.UsageError(str(e)) from None
    n_dev = mesh["data"] * mesh["model"]
    print(
        f"{config.name or MODEL.value}: {config.num_layers} layers, hidden {config.hidden_size}, "
        f"{config.num_heads} heads / {config.num_kv_heads} kv heads x {config.head_dim}, "
        f"mlp {config.intermediate_size}, vocab {config.vocab_size}; {dtype}"
    )
    split = (
        "split over model"
        if p.attention_split
        else "REPLICATED over model (kv heads do not divide it)"
    )
    if mesh["model"] == 1:
        split = "whole (model=1)"
    print(f"mesh data={mesh['data']} model={mesh['model']} ({n_dev} devices); attention {split}")
    print(
        f"pool: {ROWS.value} rows ({ROWS_PER_CONTEXT.value} per context) x "
        f"({CONTEXT.value} context + {NEW.value} own) positions\n"
    )
    print("per device")
    for name, value in (
        ("weights", p.weights), ("KV pool", p.kv_pool), ("pool state", p.pool_state),
        ("decode activations", p.decode_activations), ("logits", p.logits),
        ("sampler", p.sampler), ("prefill activations", p.prefill_activations),
    ):  # fmt: skip
        print(f"  {name:<20}{gb(value)}")
    print(f"  {'total (peak)':<20}{gb(p.total)}   of {gb(memory)} x {USABLE.value:g} usable")
    print(f"per host\n  {'weights (one copy)':<20}{gb(p.host)}\n")
    budget = int(memory * USABLE.value)
    print(f"largest rows that fit {gb(budget).strip()} per device, --new={NEW.value}:")
    context = 1024
    while context <= max(config.max_position_embeddings, CONTEXT.value):
        rows = plan_lib.largest_rows(config, mesh, context, budget, **args)
        print(f"  context {context:>7}: {rows:>6} rows")
        context *= 2


if __name__ == "__main__":
    app.run(main)
