"""Sampling parameters, per-row random keys and the token sampler (all on device).

Every row's key derives from (seed, example key, cut, sample index) and then the step, never
from the row's place in a batch, so the same seed gives the same tokens whatever the batch
composition or device count.
"""

from __future__ import annotations

import dataclasses
import hashlib

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to sample. ``temperature=0`` is greedy; ``top_k=0`` and ``top_p=1`` disable those
    filters; ``logprobs`` is how many top log-probabilities to keep per token (DeepConf: 5)."""

    temperature: float = 0.6
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int = 0
    logprobs: int = 5

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.logprobs < 0:
            raise ValueError("top_k and logprobs must be >= 0")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def sampler(self) -> Sampler:
        return Sampler(
            float(self.temperature), float(self.top_p), int(self.top_k), int(self.logprobs)
        )


@dataclasses.dataclass(frozen=True)
class Sampler:
    """The static (compile-time) part of SamplingParams."""

    temperature: float
    top_p: float
    top_k: int
    logprobs: int


def stable_key(x) -> int:
    """A 31-bit integer from any example id, identical across processes and runs."""
    if isinstance(x, (int, np.integer)) and 0 <= int(x) < 2**31:
        return int(x)
    digest = hashlib.sha256(str(x).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def row_keys(seed: int, example_keys, cuts, samples) -> jnp.ndarray:
    """Keys [rows, 2] from per-row (example key, cut, sample index)."""
    ex = jnp.asarray(np.asarray(example_keys, np.uint32))
    cut = jnp.asarray(np.asarray(cuts, np.uint32))
    smp = jnp.asarray(np.asarray(samples, np.uint32))
    base = jax.random.PRNGKey(seed)

    def one(e, c, s):
        return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(base, e), c), s)

    return jax.vmap(one)(ex, cut, smp)


def _filter_top_k(logits: jnp.ndarray, k: int) -> jnp.ndarray:
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def _top_p_threshold(sorted_logits: jnp.ndarray, log_norm: jnp.ndarray, p: float) -> jnp.ndarray:
    """Smallest logit kept by nucleus filtering, from logits sorted descending [rows, n]
    and the full-vocabulary log normaliser [rows, 1] (the token that crosses p is kept)."""
    probs = jnp.exp(sorted_logits - log_norm)
    cum = jnp.cumsum(probs, axis=-1)
    keep = (cum - probs) < p
    return jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)


def _sortable_bits(x: jnp.ndarray) -> jnp.ndarray:
    """float32 -> uint32 with the same order (so a threshold can be bisected exactly)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _bisect_top_p_keys(logits: jnp.ndarray, probs: jnp.ndarray, p: float) -> jnp.ndarray:
    """The largest sortable key k [rows, 1] with mass(logits >= k) >= p, by bisection over the
    32-bit keys: 32 passes over the vocabulary and no sort."""
    keys = _sortable_bits(logits)
    lo = jnp.min(keys, axis=-1, keepdims=True)
    hi = jnp.max(keys, axis=-1, keepdims=True)

    def body(_, bounds):
        lo, hi = bounds
        gap = hi - lo
        mid = lo + gap // 2 + gap % 2
        ok = jnp.sum(jnp.where(keys >= mid, probs, 0.0), axis=-1, keepdims=True) >= p
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    lo, _ = jax.lax.fori_loop(0, 32, body, (lo, jnp.maximum(hi, lo)))
    return lo


def _filter_top_p(logits: jnp.ndarray, p: float, shortlist: int = 256) -> jnp.ndarray:
    """Nucleus filter: keep the smallest set of largest logits whose probability reaches p
    (the token that crosses p is kept).

    A full sort of the vocabulary dominated a sampled decode step on CPU, so the nucleus is
    looked for in the ``shortlist`` largest logits (``lax.top_k``); only when some row's
    shortlist holds less than p of the mass is the threshold found by exact bisection over the
    float bit patterns. Both give the nucleus a descending sort would.
    """
    log_norm = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    probs = jnp.exp(logits - log_norm)
    keys = _sortable_bits(logits)

    def from_shortlist(top):
        top_probs = jnp.exp(top - log_norm)
        before = jnp.cumsum(top_probs, axis=-1) - top_probs
        threshold = jnp.min(jnp.where(before < p, top, jnp.inf), axis=-1, keepdims=True)
        return _sortable_bits(threshold)

    if shortlist >= logits.shape[-1]:
        threshold = _bisect_top_p_keys(logits, probs, p)
    else:
        top = jax.lax.top_k(logits, shortlist)[0]  # one top_k, shared by the test and the branch
        covered = jnp.all(jnp.sum(jnp.exp(top - log_norm), axis=-1) >= p)
        threshold = jax.lax.cond(
            covered, from_shortlist, lambda _: _bisect_top_p_keys(logits, probs, p), top
        )
    return jnp.where(keys < threshold, -jnp.inf, logits)


def sample(logits: jnp.ndarray, keys: jnp.ndarray, sampler: Sampler) -> jnp.ndarray:
    """logits float32 [rows, vocab], keys [rows, 2] -> tokens [rows] int32."""
    if sampler.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / sampler.temperature
    if sampler.top_k > 0:
        scaled = _filter_top_k(scaled, sampler.top_k)
    if sampler.top_p < 1.0:
        scaled = _filter_top_p(scaled, sampler.top_p)
    return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)


def logprob_stats(logits: jnp.ndarray, tokens: jnp.ndarray, k: int):
    """Temperature-1 log-probabilities before any filtering: the chosen token's [rows] and
    the top-k [rows, k] (values and ids)."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
    if k == 0:
        empty = jnp.zeros((logits.shape[0], 0))
        return chosen, empty, empty.astype(jnp.int32)
    top_lp, top_ids = jax.lax.top_k(logp, k)
    return chosen, top_lp, top_ids.astype(jnp.int32)
