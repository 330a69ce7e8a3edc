"""Proxies of decode efficiency that a CPU can measure (``experiments.benchmark --proxies``).

- ``step_bytes``: the bytes XLA's cost analysis says one compiled decode step reads and
  writes, against the ideal (every weight and the live KV once). The cost analysis counts a
  loop body once; ``loop_bytes`` adds the other iterations of every loop whose trip count is
  known (the sampler's passes), and loops whose count is a traced value are reported (a
  ``xla_full`` model has none: it is the program a GPU runs, every cache read whole).
- ``layout_copies``: instructions of that program that copy, transpose or slice a KV-sized or
  weight-sized array: what a batch-first cache layout and per-layer weights exist to avoid.
- ``lowered_ops``: ``while`` loops, ``top_k`` and sorts of a step lowered for a GPU
  (``lower_step(..., platforms=("cuda",))``, no GPU needed): on a GPU each iteration of a
  loop sends its predicate to the host, and XLA's GPU TopK sorts the whole row for k > 16.
- ``CompileCounter``: XLA programs compiled during a call.
- ``device_kernels``: where a call's device time goes, summed per program and kernel from a
  ``jax.profiler`` trace (on an accelerator, its kernels; on a CPU, XLA's host-side ops).
- ``long_tailed``: row-step utilisation and context padding of continuous batching on a
  geometric length mix, against the same generations in fixed batches.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import glob
import re
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fcjax.engine.decode import STOP_DTYPES, Layout, Pool, StopTables, decode_step, zeros_pool
from fcjax.engine.generate import EngineStats, generate
from fcjax.engine.sampling import Sampler, SamplingParams
from fcjax.models.attention import MIN_BLOCK
from fcjax.models.lm import LM, XLA_OPTIONS


@functools.partial(
    jax.jit,
    static_argnames=("graphdef",),
    donate_argnames=("pool",),
    compiler_options=XLA_OPTIONS,
)
def _one_step(graphdef, params, pool: Pool, stops: StopTables, limit, *, sampler):
    return decode_step(nnx.merge(graphdef, params), pool, stops, limit, sampler)


def one_block_layout(contexts: int, rows: int) -> Layout:
    """A pool whose context and own caches are one attention block each."""
    return Layout(contexts=contexts, rows=rows, ctx_len=MIN_BLOCK, new=MIN_BLOCK, reads=1)


def cache_layout(contexts: int, rows: int, positions: int, new: int = 256) -> Layout:
    """A pool whose context caches hold ``positions`` positions and own rings ``new``."""
    return Layout(contexts=contexts, rows=rows, ctx_len=positions, new=new, reads=1)


def abstract_lm(config, dtype=jnp.float32) -> LM:
    """An LM of ``config``'s shape whose weights are shapes only (for compiling, not running:
    a large model's step can be analysed without allocating it)."""
    from fcjax.models.decoder import shaped

    return LM.from_decoder(shaped(config, dtype), name=f"abstract:{config.name}", source="abstract")


def compile_step(lm: LM, layout: Layout, sampler: Sampler):
    """The compiled program of one decode step over a pool of ``layout``."""
    return lower_step(lm, layout, sampler).compile()


GPU_TARGET = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="cuda")


def lower_for(jitted, platforms: tuple[str, ...], *args, **kwargs):
    """``jitted(*args, **kwargs)`` traced and lowered for ``platforms`` (empty: this
    backend). Lowering Pallas's Triton kernels for CUDA without a GPU needs a target GPU
    from jax 0.11 on, which it reads from the abstract mesh's device of the trace:
    ``GPU_TARGET``, set while tracing and lowering for CUDA."""
    if "cuda" not in platforms:
        traced = jitted.trace(*args, **kwargs)
        return traced.lower(lowering_platforms=platforms) if platforms else traced.lower()
    target = jax.sharding.AbstractMesh((), (), abstract_device=GPU_TARGET)
    with jax.sharding.use_abstract_mesh(target):
        return jitted.trace(*args, **kwargs).lower(lowering_platforms=platforms)


def lower_step(lm: LM, layout: Layout, sampler: Sampler, platforms: tuple[str, ...] = ()):
    """One decode step over a pool of ``layout``, lowered (for ``platforms``, e.g.
    ``("cuda",)``, which needs no such device; default: this backend)."""
    pool = jax.eval_shape(lambda: zeros_pool(lm.config, layout, lm.dtype))
    vocab = lm.config.vocab_size
    stops = StopTables(*(jax.ShapeDtypeStruct((vocab,), t) for t in STOP_DTYPES))
    limit = jax.ShapeDtypeStruct((), jnp.int32)
    args = (lm.graphdef, lm.state, pool, stops, limit)
    return lower_for(_one_step, platforms, *args, sampler=sampler)


@dataclasses.dataclass
class LoweredOps:
    """Ops of a lowered (StableHLO) program that a GPU runs badly."""

    whiles: int  # while loops (fori_loop, scan, while_loop), nested ones included
    top_k: tuple[int, ...]  # k of every top_k
    sorts: tuple[tuple[int, ...], ...]  # the shape of every sort's (first) operand


def lowered_ops(text: str) -> LoweredOps:
    """``LoweredOps`` of StableHLO text (``lowered.as_text()``)."""
    sorts, lines = [], text.splitlines()
    for i, line in enumerate(lines):
        if '"stablehlo.sort"(' in line:  # the operand types close the sort's region
            close = next(x for x in lines[i:] if re.match(r"^\s*\}\) : \(tensor<", x))
            dims = re.search(r"tensor<((?:\d+x)*)[a-z]\w*>", close).group(1)
            sorts.append(tuple(int(d) for d in dims.split("x") if d))
    top_k = re.findall(r"chlo\.top_k\(.*?k = (\d+)", text)
    return LoweredOps(text.count("stablehlo.while"), tuple(map(int, top_k)), tuple(sorts))


def cuda_step_ops(lm: LM, layout: Layout, sampler: Sampler) -> LoweredOps:
    """``LoweredOps`` of one decode step lowered for CUDA (on any machine)."""
    return lowered_ops(lower_step(lm, layout, sampler, platforms=("cuda",)).as_text())


def _nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


@dataclasses.dataclass
class StepBytes:
    hlo: float  # bytes accessed: XLA's cost analysis, every loop iteration counted
    weights: int
    kv: int
    unscaled: int = 0  # loops whose trip count is a traced value (their body counted once)

    @property
    def ideal(self) -> int:
        return self.weights + self.kv

    @property
    def ratio(self) -> float:
        return self.hlo / self.ideal


def step_bytes(lm: LM, layout: Layout, sampler: Sampler, compiled=None) -> StepBytes:
    """HLO bytes of one decode step against weights + KV, with every cache full (live).

    XLA's cost analysis counts a gather fusion (the token embedding lookup) as reading its
    whole table; it is counted here as reading the rows it gathers. It counts a loop body
    once; the other iterations of loops with a known trip count are added (``loop_bytes``)."""
    compiled = compiled or compile_step(lm, layout, sampler)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    pool = jax.eval_shape(lambda: zeros_pool(lm.config, layout, lm.dtype))
    text = compiled.as_text()
    extra, unscaled = loop_bytes(text)
    hlo = float(cost["bytes accessed"]) - gather_overcount(text) + extra
    return StepBytes(hlo, _nbytes(lm.state), _nbytes(pool.cache), unscaled)


_NOT_MOVED = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all"}
_SLICING = {"dynamic-slice", "slice", "gather"}


def _computations(text: str) -> dict[str, list[tuple[str, str, str, list[str], str]]]:
    """Computation name -> its instructions (name, shape, op, operand names (a parameter:
    its index), attributes)."""
    comps, current = {}, None
    for line in text.splitlines():
        head = re.match(r"^(?:ENTRY )?%(\S+) \(", line)
        if head:
            current = comps.setdefault(head.group(1), [])
            continue
        m = re.match(r"^\s*(?:ROOT )?%(\S+) = (\(.*?\)|\S+) ([\w\-]+)\((.*?)\)(.*)$", line)
        if current is not None and m:
            name, shape, op, operands, rest = m.groups()
            names = [operands] if op == "parameter" else re.findall(r"%([\w.\-]+)", operands)
            current.append((name, shape, op, names, rest))
    return comps


def _bytes_of(shape: str) -> int:
    return sum(_shape_bytes(d, dims) for d, dims in re.findall(r"(\w+)\[([\d,]*)\]", shape))


def _fusion_bytes(comp, shapes: dict[str, str], operands: list[str], out: str) -> int:
    """Bytes a fusion moves: its output, and each operand whole unless the fused computation
    only slices it (then the slices): how XLA's cost analysis counts a fusion."""
    params = {int(operands[0]): name for name, _, op, operands, _ in comp if op == "parameter"}
    total = _bytes_of(out)
    for index, operand in enumerate(operands):
        users = [i for i in comp if params.get(index) in i[3]]
        if users and all(u[2] in _SLICING and u[3][0] == params[index] for u in users):
            total += sum(_bytes_of(u[1]) for u in users)
        else:
            total += _bytes_of(shapes.get(operand, ""))
    return total


def loop_bytes(text: str) -> tuple[float, int]:
    """Bytes of the loop iterations after the first in compiled HLO ``text`` (XLA's cost
    analysis counts each loop body once), from each while loop's known trip count and its
    body's instructions (operands and outputs, fusions as XLA counts them); and how many
    loops have no known trip count (counted once)."""
    comps = _computations(text)
    unknown = 0

    def cost(name: str, scaled: bool) -> float:
        nonlocal unknown
        instrs = comps.get(name, [])
        shapes = {i[0]: i[1] for i in instrs}
        total = 0.0
        for _, shape, op, operands, rest in instrs:
            if op in _NOT_MOVED:
                continue
            if op == "while":
                body = re.search(r"body=%([\w.\-]+)", rest).group(1)
                cond = re.search(r"condition=%([\w.\-]+)", rest).group(1)
                trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
                unknown += scaled and trip is None
                n = int(trip.group(1)) if scaled and trip else 1
                total += n * (cost(body, scaled) + cost(cond, scaled))
            elif op == "fusion":
                fused = re.search(r"calls=%([\w.\-]+)", rest).group(1)
                total += _fusion_bytes(comps.get(fused, []), shapes, operands, shape)
            elif op == "call":
                total += cost(re.search(r"to_apply=%([\w.\-]+)", rest).group(1), scaled)
            else:
                total += _bytes_of(shape) + sum(_bytes_of(shapes.get(o, "")) for o in operands)
        return total

    entry = next((m.group(1) for m in re.finditer(r"^ENTRY %(\S+) \(", text, re.M)), None)
    if entry is None:
        return 0.0, 0
    return cost(entry, True) - cost(entry, False), unknown


def _shape_bytes(dtype: str, dims: str) -> int:
    return int(np.prod([int(d) for d in dims.split(",") if d] or [1])) * _ITEMSIZE.get(dtype, 4)


def gather_overcount(text: str) -> float:
    """Bytes XLA's cost analysis counts that the program does not move: a fusion that
    gathers rows from one of its parameters (the token embedding) is counted as reading the
    whole table; it reads the gathered rows only."""
    shape = r"(\w+)\[([\d,]*)\]"
    gathers: dict[str, tuple[dict, list]] = {}  # fused computation -> (params, gathers)
    current = None
    for line in text.splitlines():
        head = re.match(r"^%(\S+) \(", line)
        if head:
            current = head.group(1)
            gathers[current] = (dict(re.findall(r"([\w.\-]+): (\w+\[[\d,]*\])", line)), [])
            continue
        m = re.match(r"^\s*(?:ROOT )?%\S+ = " + shape + r"\S* gather\(%(\S+?)[,)]", line)
        if current and m:
            gathers[current][1].append((m.group(3), _shape_bytes(m.group(1), m.group(2))))
    over = 0.0
    for line in text.splitlines():
        m = re.match(r"^\s*(?:ROOT )?%\S+ = \S+ fusion\(.*calls=%([\w.\-]+)", line)
        if m and m.group(1) in gathers:
            params, found = gathers[m.group(1)]
            over += sum(
                max(_param_bytes(params, operand) - out, 0)
                for operand, out in found
                if operand in params
            )
    return over


def _param_bytes(params: dict[str, str], name: str) -> int:
    m = re.match(r"(\w+)\[([\d,]*)\]", params.get(name, ""))
    return _shape_bytes(*m.groups()) if m else 0


_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\w+)\[([\d,]*)\]\S* (\S+?)\(")
_ITEMSIZE = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1}
_LAYOUT_OPS = ("copy", "transpose", "dynamic-slice", "slice")


def _dims(shape) -> tuple[int, ...]:
    """A shape up to axis order and unit axes (what a copy, transpose or bitcast keeps)."""
    return tuple(sorted(int(d) for d in shape if int(d) != 1))


def layout_copies(lm: LM, layout: Layout, compiled) -> list[str]:
    """Instructions (fused or not) that copy or transpose an array shaped like one layer's
    KV cache, or slice one shaped like a weight tensor, in a decode step."""
    pool = jax.eval_shape(lambda: zeros_pool(lm.config, layout, lm.dtype))
    kv_shapes = {_dims(x.shape) for x in jax.tree.leaves(pool.cache)}
    weight_shapes = {_dims(np.shape(x)) for x in jax.tree.leaves(lm.state) if np.ndim(x) > 1}
    found = []
    for line in compiled.as_text().splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        name, dtype, dims, op = m.groups()
        if "update" in name or "update" in op:
            continue  # in-place writes
        kind = next((w for w in _LAYOUT_OPS if w == op or w in name), None)
        shapes = kv_shapes if kind in ("copy", "transpose") else weight_shapes
        if kind is not None and _dims(d for d in dims.split(",") if d) in shapes:
            found.append(f"{op} {name} {dtype}[{dims}]")
    return found


def cpu_upcasts(lm: LM, compiled) -> int:
    """Bytes of the instructions of a step that convert a weight-sized 16-bit array to float32
    (read 2 bytes, write 4 per element): XLA:CPU runs a bf16-out dot in float32, a GPU reads the
    16-bit weights, so these bytes (and the dots' wider reads) are the CPU's, not the step's.
    The decoder's own products accumulate in float32 and convert none."""
    weight_shapes = {_dims(np.shape(x)) for x in jax.tree.leaves(lm.state) if np.ndim(x) > 1}
    text = compiled.as_text()
    fused = set(re.findall(r"calls=%([\w.\-]+)", text))  # counted by their fusion instruction
    total = 0
    for comp, instrs in _computations(text).items():
        for name, shape, op, _, _ in instrs if comp not in fused else ():
            m = re.fullmatch(r"f32\[([\d,]*)\]\S*", shape)
            if m and ("convert" in name or op == "convert"):
                dims = [int(d) for d in m.group(1).split(",") if d]
                total += int(np.prod(dims)) * 6 if _dims(dims) in weight_shapes else 0
    return total


BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """Counts XLA backend compilations while active (``with CompileCounter() as c: ...``)."""

    def __init__(self):
        self.count = 0

    def _listen(self, event: str, duration: float, **kwargs) -> None:
        del duration, kwargs
        if event == BACKEND_COMPILE:
            self.count += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._listen)


@dataclasses.dataclass
class Workload:
    """What the engine did on a long-tailed batch of generations."""

    stats: EngineStats
    lengths: list[int]
    slots: int

    @property
    def static_utilisation(self) -> float:
        """Useful row-steps had the same generations run in fixed batches of ``slots``
        prompts (in prompt-length order, as the engine queues them), each batch until its
        longest row: what a batch without refilling computes."""
        computed = sum(
            self.slots * max(self.lengths[i : i + self.slots])
            for i in range(0, len(self.lengths), self.slots)
        )
        return sum(self.lengths) / computed


def long_tailed(lm: LM, prompts: int, slots: int, mean: int, limit: int, seed: int = 0):
    """Samples ``prompts`` random prompts (8-200 tokens) at temperature 1 with one EOS token
    chosen so a row ends with probability ~1/``mean`` per token (a geometric length mix, cut
    at ``limit``), ``slots`` rows decoding together. Meant for random-weight models, whose
    next-token distributions are near uniform."""

    vocab = lm.config.vocab_size
    rng = np.random.default_rng(seed)
    n_eos = max(1, round(vocab / mean))
    eos = tuple(int(t) for t in rng.choice(vocab, n_eos, replace=False))
    config = dataclasses.replace(lm.config, eos_token_ids=eos)
    lm = dataclasses.replace(lm, config=config, tokenizer=None)
    ids = [rng.integers(0, vocab, int(rng.integers(8, 201))).tolist() for _ in range(prompts)]
    params = SamplingParams(temperature=1.0, max_new_tokens=limit, seed=seed)
    stats = EngineStats()
    gens = generate(lm, ids, params, batch_size=slots, stats=stats)
    by_length = sorted(range(prompts), key=lambda i: len(ids[i]))
    lengths = [len(gens[i].token_ids) + (gens[i].finish_reason == "eos") for i in by_length]
    return Workload(stats, lengths, slots)


@dataclasses.dataclass(frozen=True)
class Kernel:
    program: str  # the XLA module, e.g. jit_decode_chunk
    name: str  # the kernel (accelerator) or HLO op (CPU)
    ms: float  # summed over its launches
    launches: int


def device_kernels(fn, top: int = 30) -> tuple[float, list[Kernel]]:
    """Runs ``fn()`` under ``jax.profiler.trace``: the device milliseconds of every XLA
    program's ops in total, and the ``top`` kernels by time. On a GPU that is each stream's
    kernels; where there is no device plane (CPU), the ops XLA records on host threads."""
    from jax.profiler import ProfileData

    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir):
            fn()
        [path] = glob.glob(f"{log_dir}/**/*.xplane.pb", recursive=True)
        data = ProfileData.from_file(path)
    planes = [p for p in data.planes if p.name.startswith("/device:")] or list(data.planes)
    ms, launches = collections.Counter(), collections.Counter()
    for plane in planes:
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                if "hlo_op" in stats:
                    key = (str(stats.get("hlo_module", "")), event.name)
                    ms[key] += event.duration_ns / 1e6
                    launches[key] += 1
    kernels = [Kernel(p, n, t, launches[(p, n)]) for (p, n), t in ms.most_common(top)]
    return sum(ms.values()), kernels
