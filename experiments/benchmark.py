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
import functools
import json
import logging
import math
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import fcjax
from fcjax.engine import profile
from fcjax.engine.generate import EngineStats
from fcjax.engine.sampling import Sampler
from fcjax.models import to_transformers
from fcjax.models.config import ModelConfig
from fcjax.models.presets import PRESETS

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

# Peak memory bandwidth (bytes/s) by device kind substring, most specific first.
PEAK_BANDWIDTH = (
    ("H100 PCIe", 2.0e12),
    ("H100", 3.35e12),  # SXM
    ("H200", 4.8e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100", 1.555e12),
    ("TPU v5 lite", 8.19e11),
    ("TPU v5e", 8.19e11),
    ("TPU v5p", 2.765e12),
    ("TPU v5", 2.765e12),
    ("TPU v4", 1.2e12),
    ("TPU v6", 1.64e12),
)


@dataclasses.dataclass
class Row:
    """One line of the table; None where a figure does not apply."""

    workload: str
    system: str
    tokens_per_s: float
    batch: int | None = None  # generate: prompts per call
    ms_per_token: float | None = None
    prefill_ms: float | None = None
    compile_s: float | None = None  # first calls' extra time over the timed ones (>= 0)
    ratio: float | None = None  # tokens/s over the peer's on the same workload
    roofline: float | None = None  # fraction of peak memory bandwidth per decode step
    bandwidth_gbs: float | None = None  # bytes read per decode step / step time
    peak_mem_gb: float | None = None
    new_tokens: int = 0
    times_s: list[float] = dataclasses.field(default_factory=list)
    note: str = ""


@dataclasses.dataclass
class Timing:
    first_s: float  # first call (compiles)
    best_s: float  # fastest timed call
    times_s: list[float]
    out: Any


# --- models ---------------------------------------------------------------------------------


def load_model(spec: str, dtype: str) -> fcjax.LM:
    """fcjax.load with EOS disabled (so every row makes exactly the new tokens asked for) and
    no tokenizer (prompts are token ids; neither system decodes text)."""
    name = spec.removeprefix("random:")
    lm = fcjax.load(f"random:{name}" if name in PRESETS else spec, dtype=dtype)
    config = dataclasses.replace(lm.config, eos_token_ids=())
    return dataclasses.replace(lm, config=config, tokenizer=None)


def torch_peer(lm: fcjax.LM, dtype: str):
    """A transformers model of lm's architecture holding lm's weights (eval mode)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = to_transformers(lm, dtype, device)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


# --- measurements ---------------------------------------------------------------------------


def random_tokens(rng: np.random.Generator, vocab: int, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(3, min(vocab, 32000), size=shape, dtype=np.int64)


def branch_cuts(trace_len: int, cuts: int) -> list[int]:
    """``cuts`` evenly spaced prefix lengths, the last the whole trace."""
    return sorted({max(1, round(trace_len * (i + 1) / cuts)) for i in range(cuts)})


def interleaved(cases: dict[str, Callable[[], Any]], repeats: int) -> dict[str, Timing]:
    """Calls every case once (warm-up, compiles), then ``repeats`` rounds of each case in
    turn, so load from other processes hits all systems alike; keeps each one's fastest."""
    first, outs = {}, {}
    for name, fn in cases.items():
        t0 = time.perf_counter()
        outs[name] = fn()
        first[name] = time.perf_counter() - t0
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(max(repeats, 1)):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            outs[name] = fn()
            times[name].append(time.perf_counter() - t0)
            logging.info("%s: %.3fs (first call %.3fs)", name, times[name][-1], first[name])
    return {n: Timing(first[n], min(times[n]), times[n], outs[n]) for n in cases}


def warmup_s(timing: Timing) -> float:
    """What the first call took beyond the fastest later one (compilation, caches); 0 where
    it was no slower, as happens when load from other processes varies."""
    return max(timing.first_s - timing.best_s, 0.0)


def fcjax_systems(lm, notes: list[str]) -> dict[str, Any]:
    """The fcjax systems to time: one per --decode_attention path (``fcjax`` is xla). A
    path that fails on a two-token call is left out, with the error in the notes."""
    systems = {}
    for impl in DECODE_ATTENTION.value:
        ours = lm.with_decode_attention(impl)
        if impl != "xla":
            try:
                fcjax.generate(ours, [[1, 2, 3]], fcjax.SamplingParams(max_new_tokens=2))
            except Exception as e:  # reported; the other paths still run
                notes.append(f"decode_attention={impl} failed, not timed: {e!r:.300}")
                continue
        systems["fcjax" if impl == "xla" else f"fcjax[{impl}]"] = ours
    return systems


def fcjax_generate_fn(lm, prompts: np.ndarray, params: fcjax.SamplingParams, new: int):
    batch = [p.tolist() for p in prompts]
    params = dataclasses.replace(params, max_new_tokens=new)

    def call() -> np.ndarray:
        gens = fcjax.generate(lm, batch, params, batch_size=len(batch))
        return np.array([g.token_ids for g in gens])

    return call


def _sampling_kwargs(temperature: float) -> dict:
    if temperature > 0:  # top_k=0 / top_p=1: no filtering, as in fcjax's defaults
        return {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
    return {"do_sample": False}


def peer_generate_fn(model, batches, new: int, temperature: float, cache: str):
    """transformers ``generate`` over left-padded (ids, mask) batches; returns new ids."""
    import torch

    extra = {"cache_implementation": "static"} if cache == "static" else {}

    def call() -> list[np.ndarray]:
        outs = []
        with torch.inference_mode():
            for ids, mask in batches:
                out = model.generate(
                    ids,
                    attention_mask=mask,
                    max_new_tokens=new,
                    eos_token_id=None,
                    pad_token_id=0,
                    **_sampling_kwargs(temperature),
                    **extra,
                )
                outs.append(out[:, ids.shape[1] :])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return [o.cpu().numpy() for o in outs]

    return call


def peer_batches(model, prefixes: Sequence[Sequence[int]], batch: int):
    """Left-padded torch (ids, attention mask) batches of ``batch`` rows."""
    import torch

    out = []
    for start in range(0, len(prefixes), batch):
        part = prefixes[start : start + batch]
        width = max(len(p) for p in part)
        ids = np.zeros((len(part), width), np.int64)
        mask = np.zeros((len(part), width), np.int64)
        for i, p in enumerate(part):
            ids[i, width - len(p) :], mask[i, width - len(p) :] = p, 1
        out.append(
            (torch.as_tensor(ids, device=model.device), torch.as_tensor(mask, device=model.device))
        )
    return out


def peer_caches(model, requested: str, notes: list[str]) -> list[str]:
    """The cache implementations to time: static falls back to dynamic when it fails."""
    caches = ["static", "dynamic"] if requested == "both" else [requested]
    if "static" not in caches:
        return caches
    try:
        peer_generate_fn(model, peer_batches(model, [[5, 6, 7]], 1), 2, 0.0, "static")()
    except Exception as e:
        notes.append(
            f"transformers static cache failed ({type(e).__name__}: {str(e)[:100]}); "
            "timed with the dynamic cache instead"
        )
        caches = list(dict.fromkeys("dynamic" if c == "static" else c for c in caches))
    return caches


def generate_rows(
    systems: dict[str, Any], model, caches: list[str], prompts: np.ndarray, notes: list[str]
) -> list[Row]:
    """The generate workload: fcjax and each peer cache, each at new_tokens and at 1 (the
    difference gives the per-step latency, the 1-token call the prefill time)."""
    params = fcjax.SamplingParams(
        temperature=TEMPERATURE.value, seed=SEED.value, logprobs=LOGPROBS.value
    )
    new, rows_n = NEW_TOKENS.value, prompts.shape[0]
    lengths = (new, 1) if new > 1 else (new,)
    cases: dict[str, Callable[[], Any]] = {}
    for system, ours in systems.items():
        for n in lengths:
            cases[f"{system}@{n}"] = fcjax_generate_fn(ours, prompts, params, n)
    if model is not None:
        batches = peer_batches(model, prompts.tolist(), rows_n)
        for cache in caches:
            for n in lengths:
                cases[f"transformers[{cache}]@{n}"] = peer_generate_fn(
                    model, batches, n, TEMPERATURE.value, cache
                )
    timings = interleaved(cases, REPEATS.value)
    rows, tokens = [], {}
    for system in dict.fromkeys(name.split("@")[0] for name in cases):
        full = timings[f"{system}@{new}"]
        out = full.out if system.startswith("fcjax") else np.concatenate(full.out)
        if out.shape != (rows_n, new):
            raise RuntimeError(f"{system} made {out.shape} new tokens, expected {(rows_n, new)}")
        tokens[system] = out
        row = Row("generate", system, rows_n * new / full.best_s, rows_n, new_tokens=rows_n * new)
        row.times_s, row.compile_s = full.times_s, warmup_s(full)
        if new > 1:
            one = timings[f"{system}@1"]
            row.ms_per_token = (full.best_s - one.best_s) / (new - 1) * 1e3
            row.prefill_ms = one.best_s * 1e3
            row.compile_s += warmup_s(one)
        row.note = "greedy" if TEMPERATURE.value == 0 else f"T={TEMPERATURE.value}"
        if not system.startswith("fcjax"):
            row.note += f", {system[13:-1]} cache"
        rows.append(row)
    if TEMPERATURE.value == 0:
        for system, out in tokens.items():
            if system != "fcjax" and "fcjax" in tokens:
                same = np.mean(out == tokens["fcjax"])
                notes.append(f"greedy tokens equal to {system}'s: {same:.1%}")
    return rows


def branch_rows(systems: dict[str, Any], model, caches: list[str], trace: list[int]) -> list[Row]:
    """The branch workload: fcjax.branch vs re-prefilling every explicit prefix."""
    cuts = branch_cuts(len(trace), CUTS.value)
    k, new, batch = K.value, BRANCH_NEW.value, BRANCH_BATCH.value
    prefixes = [trace[:c] for c in cuts for _ in range(k)]
    params = fcjax.SamplingParams(
        temperature=BRANCH_TEMPERATURE.value,
        max_new_tokens=new,
        seed=SEED.value,
        logprobs=LOGPROBS.value,
    )
    keys = list(range(len(prefixes)))
    cases: dict[str, Callable[[], Any]] = {}
    notes = {}
    for system, ours in systems.items():
        cases[f"{system}.branch"] = functools.partial(fcjax.branch, ours, trace, cuts, k, params)
        notes[f"{system}.branch"] = "one shared prefill"
    base = next(iter(systems.values()))  # the re-prefill baseline: the first path
    cases["fcjax.generate"] = lambda: fcjax.generate(
        base, prefixes, params, keys=keys, batch_size=batch
    )
    notes["fcjax.generate"] = f"re-prefill, {batch}/call"
    if model is not None:
        batches = peer_batches(model, prefixes, batch)
        for cache in caches:
            system = f"transformers[{cache}]"
            cases[system] = peer_generate_fn(model, batches, new, BRANCH_TEMPERATURE.value, cache)
            notes[system] = f"re-prefill, {batch}/call, {cache} cache"
    timings = interleaved(cases, REPEATS.value)
    rows = []
    for system, timing in timings.items():
        if system.endswith(".branch"):
            n = sum(len(g.token_ids) for per_cut in timing.out for g in per_cut)
        elif system == "fcjax.generate":
            n = sum(len(g.token_ids) for g in timing.out)
        else:
            n = sum(o.size for o in timing.out)
        if n != len(prefixes) * new:
            raise RuntimeError(f"{system} made {n} new tokens, expected {len(prefixes) * new}")
        row = Row("branch", system, n / timing.best_s, new_tokens=n, note=notes[system])
        row.times_s, row.compile_s = timing.times_s, warmup_s(timing)
        rows.append(row)
    return rows


def step_bytes(config: ModelConfig, itemsize: int, rows: int, mean_context: float) -> float:
    """Bytes a decode step must read: every weight once (the embedding table only when tied,
    since the unembedding reads it; an untied one is gathered row by row) plus each row's
    K/V over its mean context."""
    weights = config.param_count()
    if not config.tie_embeddings:
        weights -= config.vocab_size * config.hidden_size
    kv = 2 * config.num_layers * config.num_kv_heads * config.head_dim * rows * mean_context
    return float((weights + kv) * itemsize)


def peak_bandwidth(device_kind: str) -> float | None:
    """Peak memory bandwidth of a device kind from the table (None when not listed)."""
    for key, value in PEAK_BANDWIDTH:
        if key.lower() in device_kind.lower():
            return value
    return None


def jax_peak_gb() -> float | None:
    """The accelerator's peak bytes in use (None where the backend keeps no such count)."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # some backends do not implement memory_stats
        stats = {}
    return stats["peak_bytes_in_use"] / 1e9 if "peak_bytes_in_use" in stats else None


def torch_peak_gb() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None


def host_max_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def torch_available() -> bool:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


# --- report ---------------------------------------------------------------------------------

COLUMNS = (  # header, width, format, Row field
    ("workload", 9, "s", "workload"),
    ("system", 21, "s", "system"),
    ("batch", 5, "d", "batch"),
    ("tokens/s", 10, ".1f", "tokens_per_s"),
    ("ms/token", 9, ".2f", "ms_per_token"),
    ("prefill ms", 10, ".1f", "prefill_ms"),
    ("ratio", 6, ".2f", "ratio"),
    ("compile s", 9, ".2f", "compile_s"),
    ("roofline", 8, ".3f", "roofline"),
    ("GB/s", 7, ".1f", "bandwidth_gbs"),
    ("peak GB", 7, ".2f", "peak_mem_gb"),
)


def format_table(rows: Sequence[Row]) -> str:
    def cell(value, width: int, spec: str) -> str:
        text = "-" if value is None else format(value, spec)
        return text.ljust(width) if spec == "s" else text.rjust(width)

    header = " ".join(cell(h, w, "s" if f == "s" else "") for h, w, f, _ in COLUMNS) + "  note"
    lines = [header, "-" * len(header)]
    for r in rows:
        cells = [cell(getattr(r, field), w, f) for _, w, f, field in COLUMNS]
        lines.append(" ".join(cells) + f"  {r.note}")
    return "\n".join(lines)


def add_ratios(rows: list[Row]) -> None:
    """Each row's tokens/s over the fastest transformers row of its workload and batch."""
    for group in {(r.workload, r.batch) for r in rows}:
        same = [r for r in rows if (r.workload, r.batch) == group]
        peers = [r.tokens_per_s for r in same if r.system.startswith("transformers")]
        for r in same:
            r.ratio = r.tokens_per_s / max(peers) if peers else None


def add_roofline(rows: list[Row], nbytes: float, peak: float | None) -> None:
    """Bytes read per decode step (``nbytes``, at these rows' batch) over the step time
    (generate rows), and that as a fraction of the device's peak bandwidth where known."""
    for r in rows:
        if r.workload == "generate" and r.ms_per_token and r.ms_per_token > 0:
            r.bandwidth_gbs = nbytes / (r.ms_per_token / 1e3) / 1e9
            r.roofline = None if peak is None else r.bandwidth_gbs * 1e9 / peak


def setup_peer(lm: fcjax.LM, notes: list[str]):
    """The transformers peer and the cache implementations to time (None, [] without one)."""
    if PEER.value != "transformers":
        return None, []
    if not torch_available():
        notes.append("peer skipped: torch/transformers not importable")
        return None, []
    import torch

    if PEER_THREADS.value > 0:
        torch.set_num_threads(PEER_THREADS.value)
    model = torch_peer(lm, DTYPE.value)
    caches = peer_caches(model, PEER_CACHE.value, notes)
    notes.append(
        f"peer: transformers {transformers_version()} on {model.device} "
        f"({torch.get_num_threads()} threads), same weights"
    )
    if model.device.type != "cpu":
        notes.append("peak GB: each library's own accelerator peak so far (jax, torch.cuda)")
    return model, caches


def chat_rows(notes: list[str]) -> list[Row]:
    """The chat workload: ``batch`` chat-formatted questions, sampled until each row's own
    EOS (or ``new_tokens``), fcjax then the transformers peer on the same prompts; tokens/s
    counts useful tokens (up to and including each row's EOS) over the wall time."""
    from fcjax.data import build_messages, load_dataset

    lm = fcjax.load(MODEL.value, dtype=DTYPE.value)
    examples = load_dataset(DATASET.value, num_examples=BATCH.value, seed=SEED.value)
    prompts = [lm.encode(lm.chat(build_messages(e))) for e in examples]
    params = fcjax.SamplingParams(
        temperature=TEMPERATURE.value,
        top_p=TOP_P.value,
        max_new_tokens=NEW_TOKENS.value,
        seed=SEED.value,
        logprobs=LOGPROBS.value,
    )
    keys = [e.id for e in examples]
    eos = set(lm.eos_token_ids)

    def ours():
        gens = fcjax.generate(lm, prompts, params, keys=keys, batch_size=len(prompts))
        return [len(g.token_ids) + (g.finish_reason == "eos") for g in gens]

    cases: dict[str, Callable[[], Any]] = {"fcjax": ours}
    if PEER.value == "transformers" and torch_available():
        import torch

        if PEER_THREADS.value > 0:
            torch.set_num_threads(PEER_THREADS.value)
        model = to_transformers(lm, DTYPE.value)
        batches = peer_batches(model, prompts, len(prompts))
        kwargs = _sampling_kwargs(TEMPERATURE.value)
        if TEMPERATURE.value > 0:
            kwargs["top_p"] = TOP_P.value

        def peer():
            lengths = []
            with torch.inference_mode():
                for ids, mask in batches:
                    out = model.generate(
                        ids,
                        attention_mask=mask,
                        max_new_tokens=NEW_TOKENS.value,
                        eos_token_id=sorted(eos),
                        pad_token_id=lm.tokenizer.pad_token_id or 0,
                        **kwargs,
                    )[:, ids.shape[1] :].numpy()
                    for row in out:
                        hit = [i for i, t in enumerate(row.tolist()) if t in eos]
                        lengths.append(hit[0] + 1 if hit else len(row))
            return lengths

        cases["transformers"] = peer
        notes.append(
            f"peer: transformers {transformers_version()} generate, dynamic cache, "
            f"{torch.get_num_threads()} threads"
        )
    timings = interleaved(cases, REPEATS.value)
    rows = []
    for system, timing in timings.items():
        n = sum(timing.out)
        row = Row("chat", system, n / timing.best_s, new_tokens=n)
        row.times_s, row.compile_s = timing.times_s, warmup_s(timing)
        lengths = sorted(timing.out)
        row.note = f"lengths {lengths[0]}-{lengths[-1]}, median {lengths[len(lengths) // 2]}"
        rows.append(row)
    notes.append(
        f"chat: {len(prompts)} {DATASET.value} prompts ({lm.name}, {DTYPE.value}), "
        f"T={TEMPERATURE.value} top-p {TOP_P.value}, up to {NEW_TOKENS.value} new tokens"
    )
    return rows


PROXY_LAYOUTS = {"generate": (32, 1), "branch": (8, 16)}
PROXY_SAMPLERS = {"greedy": Sampler(0.0, 1.0, 0, 5), "T=0.8 top-p 0.95": Sampler(0.8, 0.95, 0, 5)}
PROXY_POSITIONS = (1024, 4096)  # context cache positions of the decode-step bytes
CUDA_POSITIONS = 2048  # ... and of the decode step lowered for CUDA


def proxies() -> None:
    """``--proxies``: every figure from compiled programs and engine counters, no timing."""
    config = PRESETS.get(MODEL.value.removeprefix("random:"))
    config = config if config is not None else load_model(MODEL.value, "float32").config
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
        other = [list(range(3, n)) for n in (25, 38, 60)]  # same buckets, other lengths
        fcjax.generate(tiny, other, dataclasses.replace(params, max_new_tokens=50), stats=stats)
    print(
        f"programs compiled: first generate call {first.count}, a second call with other "
        f"lengths in the same buckets {second.count}; no implicit host transfers "
        f"(transfer_guard=disallow); per chunk {stats.host_reads / stats.chunks:.0f} read "
        f"back (tokens, log-probabilities, flags) and 4 small refill arrays sent"
    )
    with profile.CompileCounter() as tailed:
        work = profile.long_tailed(tiny, PROXY_PROMPTS.value, 32, mean=253, limit=565)
    s = work.stats
    print(
        f"long-tailed workload: {PROXY_PROMPTS.value} prompts, 32 rows, lengths mean "
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


def main(argv):
    del argv
    if SUITE.value == "gpu":
        from experiments import benchmark_gpu

        benchmark_gpu.run(OUT.value, PRESET.value)
        return
    if PROXIES.value:
        proxies()
        return
    device = jax.devices()[0]
    notes = [f"device: {device.platform} {device.device_kind} x{len(jax.devices())}"]
    if device.platform == "cpu":
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        notes.append(f"host: {os.cpu_count()} CPUs, load average at start {load}")
    if WORKLOAD.value == "chat":
        rows = chat_rows(notes)
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
    model, caches = setup_peer(lm, notes)
    systems = fcjax_systems(lm, notes)
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
            batch_rows = generate_rows(systems, model, caches, prompts[b], notes)
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
        branch = branch_rows(systems, model, caches, trace)
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
