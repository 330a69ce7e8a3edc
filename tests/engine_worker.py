"""Runs generate and branch on a tiny model and prints the tokens as JSON.

Used by test_multidevice.py in subprocesses with different device counts / processes.
argv: model_dir [process_id num_processes coordinator_port]
"""

import json
import os
import sys

if len(sys.argv) > 2:
    import jax

    pid, nproc, port = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    from fcjax.engine import multihost as mh

    mh.initialize(f"127.0.0.1:{port}", num_processes=nproc, process_id=pid)

import dataclasses

import jax

import fcjax
from fcjax.engine import multihost

if os.environ.get("FCJAX_TEST_MESH"):
    from fcjax.engine import mesh as mesh_lib

    mesh_lib.set_default_mesh(mesh_lib.make_mesh(os.environ["FCJAX_TEST_MESH"]))
lm = fcjax.load(sys.argv[1])
lm = dataclasses.replace(lm, config=dataclasses.replace(lm.config, eos_token_ids=()))
prompts = [[5, 6, 7, 8, 9], [12, 13, 14], [20, 21, 22, 23, 24, 25, 26], [3, 4], [40, 41, 42]]
keys = [f"ex-{i}" for i in range(len(prompts))]
greedy = fcjax.SamplingParams(temperature=0.0, max_new_tokens=12)
sampled = fcjax.SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12, seed=11)
out = {"devices": len(jax.devices()), "processes": jax.process_count()}
# each process generates its share (the runner's split), then every row is exchanged
share = multihost.assign([len(p) for p in prompts], multihost.process_count())
mine = share[multihost.process_index()]
for name, params in (("greedy", greedy), ("sampled", sampled)):
    sub = [prompts[i] for i in mine]
    local = fcjax.generate(lm, sub, params, keys=[keys[i] for i in mine]) if mine else []
    rows = [[i, g.token_ids, g.token_logprobs.tolist()] for i, g in zip(mine, local, strict=True)]
    got = dict((i, (ids, lp)) for part in multihost.exchange(name, rows) for i, ids, lp in part)
    out[name] = [got[i][0] for i in range(len(prompts))]
    out[f"{name}_logprobs"] = [got[i][1] for i in range(len(prompts))]
trace = prompts[0] + out["greedy"][0]
branches = fcjax.branch(lm, trace, [3, 8, 14], 3, sampled, key="ex-0")
out["branch"] = [[g.token_ids for g in outs] for outs in branches]
caps = fcjax.capture(lm, [trace, prompts[2], prompts[1]], [[0, 5, 9], [1, 6], [2]], batch_size=4)
out["capture"] = [c.states.tolist() for c in caps]
if jax.process_index() == 0:
    print("RESULT " + json.dumps(out))
