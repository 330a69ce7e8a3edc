"""``python -m experiments.benchmark --suite=gpu --out=DIR``: the accelerator suite.

Runs from a checkout on the image's own packages (``PYTHONPATH=.``; jax, flax, transformers,
torch; nothing to install). Prints the versions first, then runs its cases in order of
importance, each written to ``DIR/rows.jsonl`` as one JSON line the moment it finishes (so a
run cut short by a time limit keeps what it measured). A case that fails is a row with its
error, and the next case runs; cases that would start after ``budget_s`` are rows saying so.

Cases (preset ``full``: random weights of the qwen2-1.5b shape in bfloat16):
- ``smoke_cudnn_prefill``: cuDNN's prefill attention against the XLA path. If it fails, the
  rest of the suite prefills with the XLA path (each row says which).
- ``smoke_pallas``: the Pallas decode kernels against the XLA path, greedy tokens.
- ``generate``: XLA and Pallas decode attention at batch 32 (prompt 512, greedy), then
- ``branch``: the study's shape: one 2000-token trace, 32 cuts x 16 samples = 512 rows, T=0.8,
  top-p 0.95, then
- ``branch_kernels``: the device time of one such call per kernel (``profile.device_kernels``),
- ``sampler``: the sampler alone on logits of the branch case's rows x vocabulary (top-p 0.95,
  top-p 1, greedy: what the top-p cut costs per step), then
- ``peer``: transformers ``generate`` on the same weights at batch 32, once, then
- ``generate`` at batch 128.

Each timed row: tokens/s, ms per decode step (two calls whose new-token counts share a
bucket, so one program: their time difference over their step difference), the fraction of
the device's memory roofline (weights + KV read once per step over the step time), the
process's peak device memory so far and the compile time (first call minus a later one).
``--preset=tiny`` runs the same cases on a tiny model in seconds (CPU tests).
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import fcjax
from experiments.bench_peer import peer_batches, peer_generate_fn, torch_peak_gb, torch_peer
from experiments.bench_table import jax_peak_gb, peak_bandwidth, step_bytes
from experiments.bench_workloads import branch_cuts, load_model, random_tokens
from fcjax.engine import profile
from fcjax.engine.sampling import sample_step
from fcjax.models import attention, loading
from fcjax.models.lm import LM

FALLBACK_KIND = "H200"  # whose peak bandwidth a GPU missing from the device table gets


@dataclasses.dataclass(frozen=True)
class Preset:
    model: str
    dtype: str
    batches: tuple[int, ...]
    prompt_len: int
    new: int  # new tokens of the timed call ...
    new_short: int  # ... and of the shorter call in the same bucket (ms per step)
    trace_len: int
    cuts: int
    k: int
    branch_new: int
    branch_short: int
    peer_batch: int
    paths: tuple[str, ...]
    budget_s: float


PRESETS = {
    "full": Preset(
        model="random:qwen2-1.5b",
        dtype="bfloat16",
        batches=(32, 128),
        prompt_len=512,
        new=256,
        new_short=136,
        trace_len=2000,
        cuts=32,
        k=16,
        branch_new=200,
        branch_short=136,
        peer_batch=32,
        paths=("xla", "pallas"),
        budget_s=440.0,
    ),
    "tiny": Preset(
        model="random:tiny-llama",
        dtype="float32",
        batches=(2, 4),
        prompt_len=16,
        new=16,
        new_short=10,
        trace_len=48,
        cuts=4,
        k=2,
        branch_new=16,
        branch_short=10,
        peer_batch=2,
        paths=("xla", "pallas"),  # pallas fails on CPU: its rows carry the error
        budget_s=900.0,  # seconds on a quiet CPU; a shared test machine may be far slower
    ),
}

FIELDS = (  # every row has these keys (None where a figure does not apply)
    "case",
    "system",
    "batch",
    "rows",
    "new_tokens",
    "tokens_per_s",
    "ms_per_step",
    "roofline",
    "peak_mem_gb",
    "compile_s",
    "wall_s",
    "error",
    "note",
    "finished_at",
)


def versions() -> dict:
    """Python, the packages the suite uses, and the devices."""
    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "numpy", "transformers", "torch"):
        try:
            out[name] = __import__(name).__version__
        except Exception as e:  # reported, not fatal: the cases that need it fail alone
            out[name] = f"unavailable ({type(e).__name__})"
    devices = jax.devices()
    out["devices"] = f"{devices[0].platform} {devices[0].device_kind} x{len(devices)}"
    return out


class Writer:
    """Appends rows to ``DIR/rows.jsonl``, flushed and synced one by one."""

    def __init__(self, out_dir: str):
        self.path = Path(out_dir) / "rows.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = self.path.open("w")

    def write(self, row: dict) -> None:
        full = dict.fromkeys(FIELDS) | row | {"finished_at": time.time()}
        self.file.write(json.dumps(full) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())
        print(json.dumps(full), flush=True)


def timed(call: Callable[[int], object], new: int, short: int) -> dict:
    """First call (compiles), then the timed call at ``new`` and at ``short`` tokens (the
    same bucket: the same programs): wall times and the per-step difference."""
    t0 = time.perf_counter()
    call(new)
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    call(new)
    full = time.perf_counter() - t0
    t0 = time.perf_counter()
    call(short)
    part = time.perf_counter() - t0
    step = (full - part) / (new - short)
    return {"first": first, "full": full, "step_s": step if step > 0 else None}


class Suite:
    def __init__(self, preset: Preset, writer: Writer):
        self.p, self.writer = preset, writer
        self.t0 = time.perf_counter()
        self.prefill = "cudnn" if jax.default_backend() == "gpu" else "xla"
        self.paths_ok: dict[str, str | None] = {}  # path -> error of its smoke test
        self.lm = None
        device = jax.devices()[0]
        self.peak_bw = (
            peak_bandwidth(device.device_kind) or peak_bandwidth(FALLBACK_KIND)
            if device.platform == "gpu"
            else None
        )

    def run(self, name: str, fn: Callable[[], list[dict] | dict], system: str = "") -> None:
        """One case: its rows, or one row with its error; skipped past the budget."""
        start = time.perf_counter()
        if start - self.t0 > self.p.budget_s:
            self.writer.write({"case": name, "system": system, "error": "skipped: time budget"})
            return
        try:
            rows = fn()
        except Exception as e:  # recorded; the next case runs
            tb = traceback.format_exc(limit=4)
            rows = {"error": f"{type(e).__name__}: {str(e)[:800]}", "note": tb[-1500:]}
        for row in rows if isinstance(rows, list) else [rows]:
            base = {"case": name, "system": system, "wall_s": time.perf_counter() - start}
            self.writer.write(base | row)

    def model(self):
        if self.lm is None:
            self.lm = load_model(self.p.model, self.p.dtype)
        return self.lm

    def itemsize(self) -> int:
        return jnp.dtype(self.p.dtype).itemsize

    def figures(self, t: dict, rows: int, new: int, kv_tokens: float) -> dict:
        """The row's figures from ``timed``'s times."""
        out = {
            "rows": rows,
            "new_tokens": rows * new,
            "tokens_per_s": rows * new / t["full"],
            "compile_s": max(t["first"] - t["full"], 0.0),
            "peak_mem_gb": jax_peak_gb(),
            "note": f"prefill {self.prefill}",
        }
        if t["step_s"] is not None:
            out["ms_per_step"] = t["step_s"] * 1e3
            if self.peak_bw is not None:
                nbytes = step_bytes(self.model().config, self.itemsize(), 1, kv_tokens)
                out["roofline"] = nbytes / t["step_s"] / self.peak_bw
        return out

    # --- cases ---------------------------------------------------------------------------

    def smoke_cudnn_prefill(self) -> dict:
        """cuDNN's prefill attention (the GPU's bf16 path) against the XLA path."""
        if jax.default_backend() != "gpu":
            return {"note": "no GPU: prefill uses the XLA path", "error": None}
        rng = np.random.default_rng(0)
        shape = (2, 256, 12, 128)
        q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.bfloat16) for _ in range(3))
        k, v = k[:, :, :2], v[:, :, :2]
        lengths = jnp.asarray([256, 100], jnp.int32)
        try:
            got = jax.jit(attention.prefill_attention)(q, k, v, lengths)
            ref = jax.jit(attention.prefill_attention)(
                q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), lengths
            )
            err = float(jnp.max(jnp.abs(got[1, :100].astype(jnp.float32) - ref[1, :100])))
            err = max(err, float(jnp.max(jnp.abs(got[0].astype(jnp.float32) - ref[0]))))
        except Exception:
            attention.disable_cudnn_prefill()  # the suite goes on with XLA prefill
            self.prefill = "xla (cudnn failed)"
            raise
        return {"note": f"max abs error against XLA float32: {err:.3g}"}

    def smoke_paths(self) -> list[dict]:
        """Each decode attention path on a 2-row greedy call against the XLA path, on a
        2-layer model of the suite's shape and dtype (the kernels are per layer; two layers
        compile in seconds)."""
        config = dataclasses.replace(self.model().config, num_layers=2)
        decoder = loading.random_decoder(config, jnp.dtype(self.p.dtype).type, 0)
        lm = LM.from_decoder(decoder, None, name="smoke", source="random")
        prompts = random_tokens(np.random.default_rng(1), lm.config.vocab_size, (2, 24)).tolist()
        params = fcjax.SamplingParams(temperature=0.0, max_new_tokens=8)
        ref = [g.token_ids for g in fcjax.generate(lm, prompts, params)]
        rows = []
        for path in self.p.paths:
            if path == "xla":
                continue
            try:
                got = [
                    g.token_ids
                    for g in fcjax.generate(lm.with_decode_attention(path), prompts, params)
                ]
                same = float(np.mean(np.asarray(got) == np.asarray(ref)))
                self.paths_ok[path] = None
                rows.append(
                    {
                        "system": f"fcjax[{path}]",
                        "note": f"greedy tokens equal to XLA's: {same:.1%}",
                    }
                )
            except Exception as e:  # this path's cases are skipped with this error
                self.paths_ok[path] = f"{type(e).__name__}: {str(e)[:800]}"
                rows.append({"system": f"fcjax[{path}]", "error": self.paths_ok[path]})
        return rows

    def batch_case(self, batch: int, make_call: Callable[[list], Callable[[int], object]]):
        """A generate-shaped case: ``batch`` random prompts of ``prompt_len`` tokens (seeded by
        the batch, so every system gets the same ones), ``make_call(prompts)`` timed at
        ``new`` and ``new_short`` tokens; the row's batch and figures."""
        lm = self.model()
        prompts = random_tokens(
            np.random.default_rng(batch), lm.config.vocab_size, (batch, self.p.prompt_len)
        ).tolist()
        t = timed(make_call(prompts), self.p.new, self.p.new_short)
        kv = batch * (self.p.prompt_len + (self.p.new - 1) / 2)
        return {"batch": batch} | self.figures(t, batch, self.p.new, kv)

    def generate(self, path: str, batch: int) -> dict:
        if self.paths_ok.get(path):
            return {"batch": batch, "error": f"smoke test failed: {self.paths_ok[path]}"}
        lm = self.model().with_decode_attention(path)

        def make_call(prompts):
            def call(new: int):
                params = fcjax.SamplingParams(temperature=0.0, max_new_tokens=new)
                gens = fcjax.generate(lm, prompts, params, batch_size=batch)
                if any(len(g.token_ids) != new for g in gens):
                    raise RuntimeError(f"expected {new} tokens per row")

            return call

        return self.batch_case(batch, make_call) | {"note": f"greedy, prefill {self.prefill}"}

    def peer(self) -> dict:
        batch = self.p.peer_batch
        model = torch_peer(self.model(), self.p.dtype)

        def make_call(prompts):
            batches = peer_batches(model, prompts, batch)
            return lambda new: peer_generate_fn(model, batches, new, 0.0, "dynamic")()

        row = self.batch_case(batch, make_call)
        if (torch_gb := torch_peak_gb()) is not None:  # the peer's own device memory
            row["peak_mem_gb"] = torch_gb
        row["note"] = f"transformers on {model.device}, dynamic cache, greedy"
        return row

    def branch_call(self) -> tuple[Callable[[int], None], int, list[int]]:
        """The branch case's call (new tokens -> None), its rows and its cuts."""
        lm = self.model()
        trace = random_tokens(np.random.default_rng(7), lm.config.vocab_size, (self.p.trace_len,))
        trace = trace.tolist()
        cuts = branch_cuts(self.p.trace_len, self.p.cuts)
        rows = len(cuts) * self.p.k

        def call(new: int):
            params = fcjax.SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=new)
            out = fcjax.branch(lm, trace, cuts, self.p.k, params, key="bench", max_rows=rows)
            if sum(len(g.token_ids) for per_cut in out for g in per_cut) != rows * new:
                raise RuntimeError(f"expected {new} tokens per row")

        return call, rows, cuts

    def branch_kernels(self) -> dict:
        """One branch call (compiled by ``branch``) under the profiler: its top kernels."""
        call, rows, _ = self.branch_call()
        total, kernels = profile.device_kernels(lambda: call(self.p.branch_short), top=15)
        top = [[k.program, k.name[:60], round(k.ms, 2), k.launches] for k in kernels]
        note = {"device_ms": round(total, 1), "new_per_row": self.p.branch_short, "top": top}
        return {"rows": rows, "note": json.dumps(note)}

    def sampler(self) -> list[dict]:
        """The sampler alone on random logits [rows, vocab] of the branch case: ms per step
        at T=0.8 with top-p 0.95 and with top-p 1, and greedy."""
        rows = self.p.cuts * self.p.k
        vocab = self.model().config.vocab_size
        logits = jax.random.normal(jax.random.PRNGKey(0), (rows, vocab), jnp.float32) * 3.0
        keys = jax.random.split(jax.random.PRNGKey(1), rows)
        step = jax.jit(sample_step)
        out = []
        for temperature, top_p in ((0.8, 0.95), (0.8, 1.0), (0.0, 1.0)):
            sampler = fcjax.SamplingParams(temperature=temperature, top_p=top_p).sampler
            jax.block_until_ready(step(logits, keys, sampler))
            t0 = time.perf_counter()
            for _ in range(20):
                got = step(logits, keys, sampler)
            jax.block_until_ready(got)
            ms = (time.perf_counter() - t0) / 20 * 1e3
            note = f"T={temperature} top-p {top_p}, vocabulary {vocab}"
            out.append({"rows": rows, "ms_per_step": ms, "note": note})
        return out

    def branch(self) -> dict:
        call, rows, cuts = self.branch_call()
        t = timed(call, self.p.branch_new, self.p.branch_short)
        kv = max(cuts) + rows * (self.p.branch_new - 1) / 2  # the trace's KV is read once
        row = self.figures(t, rows, self.p.branch_new, kv)
        row["note"] = f"{len(cuts)} cuts x {self.p.k}, T=0.8 top-p 0.95, prefill {self.prefill}"
        return row


def run(out_dir: str, preset_name: str = "full") -> None:
    """The suite, rows to ``out_dir``/rows.jsonl as they finish."""
    if not out_dir:
        raise ValueError("--suite=gpu needs --out=DIR (rows.jsonl is written there)")
    preset = PRESETS[preset_name]
    info = versions()
    print("versions: " + json.dumps(info), flush=True)
    writer = Writer(out_dir)
    writer.write({"case": "versions", "note": json.dumps(info)})
    suite = Suite(preset, writer)
    suite.run("smoke_cudnn_prefill", suite.smoke_cudnn_prefill)
    suite.run("smoke_decode_paths", suite.smoke_paths)
    first = preset.batches[0]
    for path in preset.paths:
        suite.run("generate", lambda p=path: suite.generate(p, first), system=_system(path))
    suite.run("branch", suite.branch, system="fcjax.branch")
    suite.run("branch_kernels", suite.branch_kernels, system="fcjax.branch")
    suite.run("sampler", suite.sampler, system="fcjax")
    suite.run("peer", suite.peer, system="transformers")
    for batch in preset.batches[1:]:
        for path in preset.paths:
            case = lambda p=path, b=batch: suite.generate(p, b)  # noqa: E731
            suite.run("generate", case, system=_system(path))
    print(f"suite done in {time.perf_counter() - suite.t0:.0f}s: {writer.path}", file=sys.stderr)


def _system(path: str) -> str:
    return "fcjax" if path == "xla" else f"fcjax[{path}]"
