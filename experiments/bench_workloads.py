"""The benchmark's workloads (generate, branch, chat): the cases each times, interleaved
timing and the table rows they make. Settings come in as a ``Settings``, never from flags."""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import fcjax
from experiments.bench_peer import chat_peer_fn, peer_batches, peer_generate_fn, torch_available
from experiments.bench_table import Row
from fcjax.models.presets import PRESETS


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the workloads read, named as ``experiments.benchmark``'s flags (their help
    says what each means; the defaults live there)."""

    model: str
    dtype: str
    batch: int
    new_tokens: int
    temperature: float
    top_p: float
    branch_temperature: float
    logprobs: int
    seed: int
    repeats: int
    cuts: int
    k: int
    branch_new: int
    branch_batch: int
    dataset: str
    chat_prompts: int
    peer: str
    peer_threads: int


@dataclasses.dataclass
class Timing:
    first_s: float  # first call (compiles)
    best_s: float  # fastest timed call
    times_s: list[float]
    out: Any  # what the fastest timed call returned


def load_model(spec: str, dtype: str) -> fcjax.LM:
    """fcjax.load with EOS disabled (so every row makes exactly the new tokens asked for) and
    no tokenizer (prompts are token ids; neither system decodes text)."""
    name = spec.removeprefix("random:")
    lm = fcjax.load(f"random:{name}" if name in PRESETS else spec, dtype=dtype)
    config = dataclasses.replace(lm.config, eos_token_ids=())
    return dataclasses.replace(lm, config=config, tokenizer=None)


def random_tokens(rng: np.random.Generator, vocab: int, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(3, min(vocab, 32000), size=shape, dtype=np.int64)


def branch_cuts(trace_len: int, cuts: int) -> list[int]:
    """``cuts`` evenly spaced prefix lengths, the last the whole trace."""
    return sorted({max(1, round(trace_len * (i + 1) / cuts)) for i in range(cuts)})


def interleaved(cases: dict[str, Callable[[], Any]], repeats: int) -> dict[str, Timing]:
    """Calls every case once (warm-up, compiles), then ``repeats`` rounds of each case in
    turn, so load from other processes hits all systems alike; keeps each one's fastest
    call, its time and what it returned (a rate is then that call's output over its time,
    even where calls return different outputs)."""
    first = {}
    for name, fn in cases.items():
        t0 = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - t0
    times: dict[str, list[float]] = {name: [] for name in cases}
    best: dict[str, Any] = {}
    for _ in range(max(repeats, 1)):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - t0)
            if times[name][-1] == min(times[name]):
                best[name] = out
            logging.info("%s: %.3fs (first call %.3fs)", name, times[name][-1], first[name])
    return {n: Timing(first[n], min(times[n]), times[n], best[n]) for n in cases}


def warmup_s(timing: Timing) -> float:
    """What the first call took beyond the fastest later one (compilation, caches); 0 where
    it was no slower, as happens when load from other processes varies."""
    return max(timing.first_s - timing.best_s, 0.0)


def fcjax_systems(lm, paths: list[str], notes: list[str]) -> dict[str, Any]:
    """The fcjax systems to time: one per decode attention path (``fcjax`` is xla). A
    path that fails on a two-token call is left out, with the error in the notes."""
    systems = {}
    for impl in paths:
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


def generate_rows(
    s: Settings,
    systems: dict[str, Any],
    model,
    caches: list[str],
    prompts: np.ndarray,
    notes: list[str],
) -> list[Row]:
    """The generate workload: fcjax and each peer cache, each at new_tokens and at 1 (the
    difference gives the per-step latency, the 1-token call the prefill time)."""
    params = fcjax.SamplingParams(temperature=s.temperature, seed=s.seed, logprobs=s.logprobs)
    new, rows_n = s.new_tokens, prompts.shape[0]
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
                    model, batches, n, s.temperature, cache
                )
    timings = interleaved(cases, s.repeats)
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
        row.note = "greedy" if s.temperature == 0 else f"T={s.temperature}"
        if not system.startswith("fcjax"):
            row.note += f", {system[13:-1]} cache"
        rows.append(row)
    if s.temperature == 0:
        for system, out in tokens.items():
            if system != "fcjax" and "fcjax" in tokens:
                same = np.mean(out == tokens["fcjax"])
                notes.append(f"greedy tokens equal to {system}'s: {same:.1%}")
    return rows


def branch_rows(
    s: Settings, systems: dict[str, Any], model, caches: list[str], trace: list[int]
) -> list[Row]:
    """The branch workload: fcjax.branch vs re-prefilling every explicit prefix."""
    cuts = branch_cuts(len(trace), s.cuts)
    k, new, batch = s.k, s.branch_new, s.branch_batch
    prefixes = [trace[:c] for c in cuts for _ in range(k)]
    params = fcjax.SamplingParams(
        temperature=s.branch_temperature, max_new_tokens=new, seed=s.seed, logprobs=s.logprobs
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
            cases[system] = peer_generate_fn(model, batches, new, s.branch_temperature, cache)
            notes[system] = f"re-prefill, {batch}/call, {cache} cache"
    timings = interleaved(cases, s.repeats)
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


def chat_rows(s: Settings, notes: list[str]) -> list[Row]:
    """The chat workload: ``chat_prompts`` (default ``batch``) chat-formatted questions,
    sampled until each row's own EOS (or ``new_tokens``), ``batch`` rows at a time, fcjax
    then the transformers peer on the same prompts; tokens/s counts useful tokens (up to and
    including each row's EOS) over the wall time."""
    from fcjax.data import build_messages, load_dataset

    lm = fcjax.load(s.model, dtype=s.dtype)
    examples = load_dataset(s.dataset, num_examples=s.chat_prompts or s.batch, seed=s.seed)
    prompts = [lm.encode(lm.chat(build_messages(e))) for e in examples]
    params = fcjax.SamplingParams(
        temperature=s.temperature,
        top_p=s.top_p,
        max_new_tokens=s.new_tokens,
        seed=s.seed,
        logprobs=s.logprobs,
    )
    keys = [e.id for e in examples]

    def ours():
        gens = fcjax.generate(lm, prompts, params, keys=keys, batch_size=s.batch)
        return [len(g.token_ids) + (g.finish_reason == "eos") for g in gens]

    cases: dict[str, Callable[[], Any]] = {"fcjax": ours}
    if s.peer == "transformers" and torch_available():
        cases["transformers"] = chat_peer_fn(
            lm,
            prompts,
            notes,
            dtype=s.dtype,
            threads=s.peer_threads,
            batch=s.batch,
            new=s.new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            seed=s.seed,
        )
    timings = interleaved(cases, s.repeats)
    rows = []
    for system, timing in timings.items():
        n = sum(timing.out)
        row = Row("chat", system, n / timing.best_s, new_tokens=n)
        row.times_s, row.compile_s = timing.times_s, warmup_s(timing)
        lengths = sorted(timing.out)
        row.note = f"lengths {lengths[0]}-{lengths[-1]}, median {lengths[len(lengths) // 2]}"
        rows.append(row)
    notes.append(
        f"chat: {len(prompts)} {s.dataset} prompts, {s.batch} rows at a time ({lm.name}, "
        f"{s.dtype}), "
        f"T={s.temperature} top-p {s.top_p}, up to {s.new_tokens} new tokens"
    )
    return rows
