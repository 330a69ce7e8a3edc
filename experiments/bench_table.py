"""The benchmark's table and its arithmetic: rows, columns, ratios against the peer, the
bytes a decode step reads and the memory-bandwidth roofline, peak memory."""

from __future__ import annotations

import dataclasses
import resource
from collections.abc import Sequence

import jax

from fcjax.models.config import ModelConfig

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


def host_max_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
