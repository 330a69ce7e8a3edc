"""Generation speed of fcjax against transformers, both measured in this one process.

    python -m experiments.benchmark --model=smollm2-135m-instruct --batch=8 --prompt_len=128 \
        --new_tokens=64 --dtype=float32 --peer=transformers --workload=all --out=bench.json

Workloads:
- ``generate``: ``batch`` random prompts of ``prompt_len`` tokens, exactly ``new_tokens`` new
  tokens each (EOS disabled). tokens/s = batch * new_tokens / wall time of one call (prefill
  included); ms/token = per decode step of the whole batch, (t(new) - t(1)) / (new - 1).
- ``branch``: a random trace of ``trace_len`` tokens, ``cuts`` evenly spaced prefixes,
  ``k`` samples of ``branch_new`` tokens from each: ``fcjax.branch`` (one shared prefill),
  ``fcjax.generate`` on the explicit prefixes (one prefill per row) and transformers
  ``generate`` on the same prefixes.

The peer is a transformers model with the very weights fcjax holds (copied over, so greedy
outputs can be compared as a sanity check), in the same dtype, with a static KV cache where
that works (a dynamic one otherwise, and the table says so). Timed runs exclude the first
call of each shape, whose extra time is reported as compile seconds; the systems' timed runs
take turns and each figure is the fastest of ``repeats`` (the machine may be shared). On an
accelerator the table also shows the fraction of the memory-bandwidth roofline each decode
step reaches.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np
from absl import app, flags

from experiments.bench_peer import setup_peer, torch_peak_gb
from experiments.bench_proxies import proxies
from experiments.bench_table import (
    Row,
    add_ratios,
    add_roofline,
    format_table,
    host_max_rss_gb,
    jax_peak_gb,
    peak_bandwidth,
    step_bytes,
)
from experiments.bench_workloads import (
    Settings,
    branch_rows,
    chat_rows,
    fcjax_systems,
    generate_rows,
    load_model,
    random_tokens,
)

# This module's own flags: experiments.run defines flags of the same names (--model, --dtype,
# --k, ...) and tests import both modules into one process. They join absl's global flags
# only when this file runs as a program (see ``parse_flags``).
BENCH_FLAGS = flags.FlagValues()
MODEL = flags.DEFINE_string(
    "model",
    "random:smollm2-135m",
    "registry name, path, or random preset (random:NAME or NAME)",
    flag_values=BENCH_FLAGS,
)
BATCH = flags.DEFINE_integer("batch", 8, "prompts per generate call", flag_values=BENCH_FLAGS)
BATCHES = flags.DEFINE_list(
    "batches",
    [],
    "several generate batch sizes in one process (default: --batch)",
    flag_values=BENCH_FLAGS,
)
DECODE_ATTENTION = flags.DEFINE_list(
    "decode_attention",
    ["xla"],
    "decode attention paths to time (fcjax.models.decoder.DECODE_ATTENTION): xla, pallas (GPU "
    "kernels), pallas_interpret; each is a row of its own (fcjax[pallas], ...)",
    flag_values=BENCH_FLAGS,
)
SUITE = flags.DEFINE_enum(
    "suite",
    "none",
    ["none", "gpu"],
    "gpu: the accelerator suite (experiments.benchmark_gpu: qwen2-1.5b shape in bfloat16, "
    "XLA and Pallas decode at batch 32 and 128, the branching shape, transformers once), "
    "each case a line of --out=DIR/rows.jsonl as it finishes",
    flag_values=BENCH_FLAGS,
)
PRESET = flags.DEFINE_enum(
    "preset",
    "full",
    ["full", "tiny"],
    "--suite=gpu sizes: full (the accelerator's) or tiny (the same cases on CPU in seconds)",
    flag_values=BENCH_FLAGS,
)
PROMPT_LEN = flags.DEFINE_integer("prompt_len", 128, "tokens per prompt", flag_values=BENCH_FLAGS)
NEW_TOKENS = flags.DEFINE_integer(
    "new_tokens", 64, "new tokens per prompt (EOS disabled)", flag_values=BENCH_FLAGS
)
DTYPE = flags.DEFINE_enum(
    "dtype", "float32", ["float32", "bfloat16"], "weights and activations", flag_values=BENCH_FLAGS
)
PEER = flags.DEFINE_enum(
    "peer", "transformers", ["transformers", "none"], "system to compare", flag_values=BENCH_FLAGS
)
PEER_CACHE = flags.DEFINE_enum(
    "peer_cache",
    "static",
    ["static", "dynamic", "both"],
    "transformers KV cache (both: 2 rows)",
    flag_values=BENCH_FLAGS,
)
WORKLOAD = flags.DEFINE_enum(
    "workload",
    "all",
    ["generate", "branch", "all", "chat"],
    "what to time (chat: real chat prompts from --dataset, each row stopping at its EOS)",
    flag_values=BENCH_FLAGS,
)
DATASET = flags.DEFINE_string(
    "dataset", "strategyqa", "chat workload: questions to chat-format", flag_values=BENCH_FLAGS
)
CHAT_PROMPTS = flags.DEFINE_integer(
    "chat_prompts",
    0,
    "chat workload: prompts (0: --batch); both systems decode --batch rows at a time (fcjax "
    "refills its pool from the queue, transformers runs batches of --batch)",
    lower_bound=0,
    flag_values=BENCH_FLAGS,
)
TOP_P = flags.DEFINE_float("top_p", 1.0, "chat workload: nucleus", flag_values=BENCH_FLAGS)
TEMPERATURE = flags.DEFINE_float(
    "temperature", 0.0, "generate workload (0: greedy)", flag_values=BENCH_FLAGS
)
BRANCH_TEMPERATURE = flags.DEFINE_float(
    "branch_temperature", 0.6, "branch workload", flag_values=BENCH_FLAGS
)
LOGPROBS = flags.DEFINE_integer(
    "logprobs", 5, "top log-probabilities fcjax keeps per token", flag_values=BENCH_FLAGS
)
TRACE_LEN = flags.DEFINE_integer(
    "trace_len", 2000, "branch: trace length in tokens", flag_values=BENCH_FLAGS
)
CUTS = flags.DEFINE_integer(
    "cuts", 20, "branch: evenly spaced prefixes of the trace", flag_values=BENCH_FLAGS
)
K = flags.DEFINE_integer("k", 10, "branch: samples per prefix", flag_values=BENCH_FLAGS)
BRANCH_NEW = flags.DEFINE_integer(
    "branch_new", 200, "branch: new tokens per sample", flag_values=BENCH_FLAGS
)
BRANCH_BATCH = flags.DEFINE_integer(
    "branch_batch", 64, "branch: rows per call of the re-prefill baselines", flag_values=BENCH_FLAGS
)
PEER_THREADS = flags.DEFINE_integer(
    "peer_threads",
    0,
    "torch intra-op threads for the peer (0: torch's default)",
    flag_values=BENCH_FLAGS,
)
REPEATS = flags.DEFINE_integer(
    "repeats", 3, "timed runs per measurement (fastest is kept)", flag_values=BENCH_FLAGS
)
PEAK_BW = flags.DEFINE_float(
    "peak_bw",
    0.0,
    "peak memory bandwidth in bytes/s (0: from the device table, else skipped)",
    flag_values=BENCH_FLAGS,
)
SEED = flags.DEFINE_integer("seed", 0, "prompt tokens and sampling", flag_values=BENCH_FLAGS)
PROXIES = flags.DEFINE_bool(
    "proxies",
    False,
    "print CPU-measurable proxies of decode efficiency (HLO bytes per bf16 decode step against "
    "weights + KV at 1k and 4k context positions, layout copies, while loops and top_k of the "
    "step lowered for CUDA, programs compiled per call, row-step utilisation and context "
    "padding on a long-tailed workload, host transfers per chunk) instead of timing",
    flag_values=BENCH_FLAGS,
)
PROXY_PROMPTS = flags.DEFINE_integer(
    "proxy_prompts",
    256,
    "long-tailed workload: prompts (32 decode together)",
    flag_values=BENCH_FLAGS,
)
OUT = flags.DEFINE_string("out", "", "write the table as JSON here", flag_values=BENCH_FLAGS)


def settings() -> Settings:
    """The workloads' settings from this module's flags (``Settings`` fields are flag names)."""
    return Settings(**{f.name: BENCH_FLAGS[f.name].value for f in dataclasses.fields(Settings)})


def main(argv):
    del argv
    if SUITE.value == "gpu":
        from experiments import benchmark_gpu

        benchmark_gpu.run(OUT.value, PRESET.value)
        return
    if PROXIES.value:
        proxies(MODEL.value, PROXY_PROMPTS.value)
        return
    device = jax.devices()[0]
    notes = [f"device: {device.platform} {device.device_kind} x{len(jax.devices())}"]
    if device.platform == "cpu":
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        notes.append(f"host: {os.cpu_count()} CPUs, load average at start {load}")
    if WORKLOAD.value == "chat":
        rows = chat_rows(settings(), notes)
        add_ratios(rows)
        print(format_table(rows))
        for note in notes:
            print(note)
        ratio = rows[0].ratio if rows[0].ratio is not None else math.nan
        print(f"ratio_vs_transformers={ratio:.3f}")
        return
    t0 = time.perf_counter()
    lm = load_model(MODEL.value, DTYPE.value)
    notes.append(
        f"model: {lm.name} ({lm.config.family}, {lm.config.num_layers} layers, "
        f"{lm.config.param_count() / 1e6:.0f}M params, {DTYPE.value}), "
        f"loaded in {time.perf_counter() - t0:.1f}s"
    )
    model, caches = setup_peer(
        lm,
        notes,
        peer=PEER.value,
        dtype=DTYPE.value,
        cache=PEER_CACHE.value,
        threads=PEER_THREADS.value,
    )
    systems = fcjax_systems(lm, DECODE_ATTENTION.value, notes)
    bench = settings()
    rng = np.random.default_rng(SEED.value)
    batches = [int(b) for b in BATCHES.value] or [BATCH.value]
    prompts = {b: random_tokens(rng, lm.config.vocab_size, (b, PROMPT_LEN.value)) for b in batches}
    trace = random_tokens(rng, lm.config.vocab_size, (TRACE_LEN.value,)).tolist()
    rows: list[Row] = []
    itemsize = 4 if DTYPE.value == "float32" else 2
    mean_ctx = PROMPT_LEN.value + (NEW_TOKENS.value - 1) / 2
    peak = PEAK_BW.value or (
        peak_bandwidth(device.device_kind) if device.platform != "cpu" else None
    )
    if WORKLOAD.value in ("generate", "all"):
        for b in batches:
            batch_rows = generate_rows(bench, systems, model, caches, prompts[b], notes)
            for r in batch_rows:
                r.peak_mem_gb = jax_peak_gb() if r.system.startswith("fcjax") else torch_peak_gb()
            nbytes = step_bytes(lm.config, itemsize, b, mean_ctx)
            add_roofline(batch_rows, nbytes, peak)
            notes.append(
                f"batch {b}: a decode step reads {nbytes / 1e6:.1f} MB (weights + KV at mean "
                "context)"
            )
            rows += batch_rows
    if WORKLOAD.value in ("branch", "all"):
        branch = branch_rows(bench, systems, model, caches, trace)
        for r in branch:
            r.peak_mem_gb = jax_peak_gb() if r.system.startswith("fcjax") else torch_peak_gb()
        rows += branch
    add_ratios(rows)
    if WORKLOAD.value in ("generate", "all"):
        notes.append(
            f"roofline: skipped (no peak bandwidth known for {device.device_kind!r})"
            if peak is None
            else f"roofline: peak bandwidth {peak / 1e9:.0f} GB/s"
        )
    accel = jax_peak_gb()
    notes.append(
        f"peak memory: host max RSS {host_max_rss_gb():.2f} GB (whole process)"
        + ("" if accel is None else f", {device.platform} peak {accel:.2f} GB (jax)")
    )
    # the headline: fcjax at the largest generate batch
    ours = [r for r in rows if r.workload == "generate" and r.system.startswith("fcjax")]
    main_row = max(ours, key=lambda r: (r.batch or 0, r.tokens_per_s), default=None)
    ratio = main_row.ratio if main_row is not None and main_row.ratio is not None else math.nan
    print(
        f"\nbatches={','.join(map(str, batches))} prompt_len={PROMPT_LEN.value} "
        f"new_tokens={NEW_TOKENS.value} "
        f"trace_len={TRACE_LEN.value} cuts={CUTS.value} k={K.value} "
        f"branch_new={BRANCH_NEW.value} repeats={REPEATS.value} (fastest kept)"
    )
    notes.append(f"wall time of the whole benchmark: {time.perf_counter() - t0:.0f}s")
    if device.platform == "cpu":
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        notes.append(f"host load average at end {load}")
    print(format_table(rows))
    for note in notes:
        print(note)
    print(f"ratio_vs_transformers={ratio:.3f}")
    if OUT.value:
        payload = {
            "config": {
                v.name: v.value for v in globals().values() if isinstance(v, flags.FlagHolder)
            },
            "device": {"platform": device.platform, "kind": device.device_kind},
            "rows": [dataclasses.asdict(r) for r in rows],
            "notes": notes,
            "ratio_vs_transformers": None if math.isnan(ratio) else ratio,
        }
        Path(OUT.value).write_text(json.dumps(payload, indent=2))


def parse_flags(argv: list[str]) -> list[str]:
    """app.run's flag parser: this module's flags plus absl's own (--help, logging)."""
    # JAX and torch share an accelerator here: JAX allocates on demand instead of taking 75%.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    flags.FLAGS.append_flag_values(BENCH_FLAGS)
    for name in BENCH_FLAGS:  # listed under this program in --help
        flags.FLAGS.register_flag_by_module(sys.argv[0], BENCH_FLAGS[name])
    rest = flags.FLAGS(argv)
    BENCH_FLAGS.mark_as_parsed()
    return rest


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
