"""``python -m experiments.benchmark --proxies``: CPU-measurable proxies of decode
efficiency, every figure from compiled programs and engine counters (``fcjax.engine.profile``),
no timing."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import fcjax
from experiments.bench_workloads import load_model
from fcjax.engine import profile
from fcjax.engine.generate import EngineStats
from fcjax.engine.sampling import Sampler
from fcjax.models.presets import PRESETS

PROXY_LAYOUTS = {"generate": (32, 1), "branch": (8, 16)}
PROXY_SAMPLERS = {"greedy": Sampler(0.0, 1.0, 0, 5), "T=0.8 top-p 0.95": Sampler(0.8, 0.95, 0, 5)}
PROXY_POSITIONS = (1024, 4096)  # context cache positions of the decode-step bytes
CUDA_POSITIONS = 2048  # ... and of the decode step lowered for CUDA


def proxies(model: str, tailed_prompts: int) -> None:
    """Prints every proxy for ``model`` (a preset, or what ``load_model`` takes) in
    bfloat16, the long-tailed workload with ``tailed_prompts`` prompts, then a summary line."""
    config = PRESETS.get(model.removeprefix("random:"))
    config = config if config is not None else load_model(model, "float32").config
    lm = profile.abstract_lm(config, jnp.bfloat16)  # shapes only: nothing allocated
    full = lm.with_decode_attention("xla_full")  # the XLA program a GPU runs
    print(
        f"model: {config.name} in bfloat16; the decode step as a GPU runs it (XLA attention "
        f"reading whole caches), compiled for this CPU; every loop iteration counted"
    )
    ratios = []
    for what, (contexts, rows) in PROXY_LAYOUTS.items():
        for positions in PROXY_POSITIONS:
            layout = profile.cache_layout(contexts, rows, positions)
            for name, sampler in PROXY_SAMPLERS.items():
                compiled = profile.compile_step(full, layout, sampler)
                b = profile.step_bytes(full, layout, sampler, compiled)
                copies = profile.layout_copies(full, layout, compiled)
                upcasts = profile.cpu_upcasts(full, compiled)
                ratios.append(b.ratio)
                print(
                    f"decode step {what} {contexts}x{rows} rows, {positions} context + "
                    f"{layout.new} own positions, {name}: HLO {b.hlo / 1e6:.1f} MB vs ideal "
                    f"{b.ideal / 1e6:.1f} MB (weights {b.weights / 1e6:.1f} + KV "
                    f"{b.kv / 1e6:.1f}) = {b.ratio:.3f}x; loops with a traced trip count "
                    f"(counted once): {b.unscaled}; of the HLO bytes, XLA:CPU's bf16-to-f32 "
                    f"weight converts (a GPU has none): {upcasts / 1e6:.1f} MB; KV-sized "
                    f"copies/transposes or "
                    f"weight-sized slices: {len(copies)}"
                )
    whiles, top_k = [], []
    paths = ["xla", "pallas"] if _pallas_tiles(config.head_dim) else ["xla"]
    for attn in paths:
        for what, (contexts, rows) in PROXY_LAYOUTS.items():
            layout = profile.cache_layout(contexts, rows, CUDA_POSITIONS, CUDA_POSITIONS)
            for name, sampler in PROXY_SAMPLERS.items():
                ops = profile.cuda_step_ops(lm.with_decode_attention(attn), layout, sampler)
                vocab_sorts = [x for x in ops.sorts if x and x[-1] >= config.vocab_size]
                whiles.append(ops.whiles)
                top_k += ops.top_k
                print(
                    f"decode step lowered for CUDA, {attn} attention, {what} {contexts}x{rows} "
                    f"rows, {CUDA_POSITIONS} positions, {name}: while loops {ops.whiles}, "
                    f"top_k k={list(ops.top_k)}, sorts of the vocabulary {len(vocab_sorts)}"
                )
    if len(paths) == 1:
        print(f"(no Pallas kernels for head_dim {config.head_dim}: Triton tiles need 2^n >= 16)")
    tiny = load_model("random:tiny-llama", "float32")
    prompts = [list(range(1, n)) for n in (20, 33, 47)]
    params = fcjax.SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=40, seed=1)
    with profile.CompileCounter() as first:
        fcjax.generate(tiny, prompts, params)
    with profile.CompileCounter() as second, jax.transfer_guard("disallow"):
        stats = EngineStats()
        other = [list(range(3, n)) for n in (25, 38, 51)]  # same buckets, other lengths
        fcjax.generate(tiny, other, dataclasses.replace(params, max_new_tokens=50), stats=stats)
    print(
        f"programs compiled: first generate call {first.count}, a second call with other "
        f"lengths in the same buckets {second.count}; no implicit host transfers "
        f"(transfer_guard=disallow); per chunk {stats.host_reads / stats.chunks:.0f} read "
        f"back (tokens, log-probabilities, flags) and 4 small refill arrays sent"
    )
    with profile.CompileCounter() as tailed:
        work = profile.long_tailed(tiny, tailed_prompts, 32, mean=253, limit=565)
    s = work.stats
    print(
        f"long-tailed workload: {tailed_prompts} prompts, 32 rows, lengths mean "
        f"{np.mean(work.lengths):.0f} max {max(work.lengths)}: row-step utilisation "
        f"{s.row_utilisation:.3f} (fixed batches: {work.static_utilisation:.3f}); row-steps "
        f"after the queue ran empty {s.drain_row_steps / s.row_steps:.1%} (the tail runs on "
        f"the live slots: {tailed.count} programs compiled by this call, the narrower "
        f"chunks included); context KV read that is padding {s.ctx_padding:.1%} (XLA path "
        f"on CPU, live blocks; the Pallas kernels would read {s.ctx_padding_ragged:.1%})"
    )
    print(
        f"hlo_bytes_ratio={max(ratios):.3f} row_utilisation={s.row_utilisation:.3f} "
        f"programs_per_call={first.count} cuda_while_loops={max(whiles)} "
        f"cuda_top_k_max={max(top_k, default=0)}"
    )


def _pallas_tiles(head_dim: int) -> bool:
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0
