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


def row_keys(seed, example_keys, cuts, samples) -> jnp.ndarray:
    """Keys [rows, 2] from per-row (example key, cut, sample index); traceable."""
    ex = jnp.asarray(example_keys, jnp.uint32)
    cut = jnp.asarray(cuts, jnp.uint32)
    smp = jnp.asarray(samples, jnp.uint32)
    base = jax.random.PRNGKey(seed)

    def one(e, c, s):
        return jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(base, e), c), s)

    return jax.vmap(one)(ex, cut, smp)


def _sortable_bits(x: jnp.ndarray) -> jnp.ndarray:
    """float32 -> uint32 with the same order (so a threshold can be bisected exactly)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _bisect_top_p_keys(logits: jnp.ndarray, log_norm: jnp.ndarray, p: float) -> jnp.ndarray:
    """The largest sortable key k [rows, 1] with mass(logits >= k) >= p, by bisection over the
    32-bit keys: 32 passes over the vocabulary and no sort. Each pass reads the logits alone
    (keys and probabilities are recomputed in it, never stored)."""
    lo = _sortable_bits(jnp.min(logits, axis=-1, keepdims=True))
    hi = _sortable_bits(jnp.max(logits, axis=-1, keepdims=True))

    def body(_, bounds):
        lo, hi = bounds
        gap = hi - lo
        mid = lo + gap // 2 + gap % 2
        kept = _sortable_bits(logits) >= mid
        mass = jnp.sum(jnp.where(kept, jnp.exp(logits - log_norm), 0.0), axis=-1, keepdims=True)
        ok = mass >= p
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    lo, _ = jax.lax.fori_loop(0, 32, body, (lo, jnp.maximum(hi, lo)))
    return lo


SHORTLIST = 256  # largest logits looked at for top-k / top-p before any full-vocabulary pass


def filter_top_p(
    logits: jnp.ndarray,
    p: float,
    shortlist: int = SHORTLIST,
    top: jnp.ndarray | None = None,
    log_norm: jnp.ndarray | None = None,
    branchless: bool | None = None,
) -> jnp.ndarray:
    """Nucleus filter: keep the smallest set of largest logits whose probability reaches p
    (the token that crosses p is kept).

    The nucleus is looked for in the ``shortlist`` largest logits (``top``, descending, when
    the caller has them); only when some row's shortlist holds less than p of the mass is the
    threshold found by exact bisection over the float bit patterns. Both give the nucleus a
    descending sort would.
    """
    if log_norm is None:
        log_norm = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    keys = _sortable_bits(logits)

    def bisect(_):
        return _bisect_top_p_keys(logits, log_norm, p)

    def from_shortlist(top):
        top_probs = jnp.exp(top - log_norm)
        before = jnp.cumsum(top_probs, axis=-1) - top_probs
        threshold = jnp.min(jnp.where(before < p, top, jnp.inf), axis=-1, keepdims=True)
        return _sortable_bits(threshold)

    if shortlist >= logits.shape[-1]:
        threshold = bisect(None)
    else:
        if top is None:
            top = jax.lax.top_k(logits, shortlist)[0]
        covered = jnp.sum(jnp.exp(top - log_norm), axis=-1, keepdims=True) >= p
        if branchless is None:
            branchless = jax.default_backend() == "gpu"
        if branchless:  # both, then per row: no predicate goes back to the host
            threshold = jnp.where(covered, from_shortlist(top), bisect(None))
        else:  # CPU and TPU decide on the device that runs the step: no round trip
            threshold = jax.lax.cond(jnp.all(covered), from_shortlist, bisect, top)
    return jnp.where(keys < threshold, -jnp.inf, logits)


CHOICE_BLOCK = 256  # vocabulary entries per block of the two-stage draw


def gumbel_choice(scaled: jnp.ndarray, keys: jnp.ndarray) -> jnp.ndarray:
    """One draw per row from softmax(``scaled`` [rows, vocab]) (-inf: excluded) with keys
    [rows, 2] -> token ids [rows] int32.

    Two Gumbel-max draws, exact for the categorical: a block of ``CHOICE_BLOCK`` entries with
    probability its share of the mass (its log-sum-exp), then an entry within it. That needs
    ``vocab / CHOICE_BLOCK + CHOICE_BLOCK`` random numbers per row instead of ``vocab`` (the
    random bits of a full-vocabulary draw cost more than the rest of the sampler on CPU).
    """
    rows, vocab = scaled.shape
    blocks = -(-vocab // CHOICE_BLOCK)
    if blocks * CHOICE_BLOCK != vocab:
        scaled = jnp.pad(
            scaled, ((0, 0), (0, blocks * CHOICE_BLOCK - vocab)), constant_values=-jnp.inf
        )
    grouped = scaled.reshape(rows, blocks, CHOICE_BLOCK)
    block_lse = jax.nn.logsumexp(grouped, axis=-1)  # [rows, blocks]; -inf where all excluded

    def draw(key, block_lse, grouped):
        k_block, k_entry = jax.random.split(key)
        block = jnp.argmax(block_lse + jax.random.gumbel(k_block, (blocks,)))
        entries = jax.lax.dynamic_index_in_dim(grouped, block, keepdims=False)
        entry = jnp.argmax(entries + jax.random.gumbel(k_entry, (CHOICE_BLOCK,)))
        return block * CHOICE_BLOCK + entry

    return jax.vmap(draw)(keys, block_lse, grouped).astype(jnp.int32)


def sample_step(logits: jnp.ndarray, keys: jnp.ndarray, sampler: Sampler):
    """One fused pass over the logits float32 [rows, vocab] with keys [rows, 2] -> (tokens
    [rows] int32, chosen log-probability [rows], top-k log-probabilities [rows, k] and ids).

    Log-probabilities are at temperature 1 before any filter (DeepConf reads them). One
    log-sum-exp and one ``top_k`` shortlist serve the log-probabilities, the top-k and top-p
    filters and greedy decoding; sampling is a two-stage Gumbel-max draw with the row's key
    (``gumbel_choice``).
    """
    vocab = logits.shape[-1]
    k = sampler.logprobs
    log_norm = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    filtered = sampler.temperature > 0 and (sampler.top_k > 0 or sampler.top_p < 1.0)
    n_top = max(k, 1)
    if filtered:
        n_top = max(n_top, min(SHORTLIST, vocab), min(sampler.top_k, vocab))
    # descending; ties: lower id first. The barrier keeps later slices of the result from
    # being merged into the sort XLA lowers top_k to, which would stop XLA:CPU from
    # rewriting it into its TopK kernel (a full-vocabulary sort costs ~100x more)
    top, top_ids = jax.lax.optimization_barrier(jax.lax.top_k(logits, n_top))
    if sampler.temperature == 0.0:
        tok = top_ids[:, 0]  # = argmax
    else:
        scaled, scaled_top = logits / sampler.temperature, top / sampler.temperature
        if sampler.top_k > 0 and sampler.top_k < vocab:
            kth = scaled_top[:, sampler.top_k - 1 : sampler.top_k]
            scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
            scaled_top = jnp.where(scaled_top < kth, -jnp.inf, scaled_top)
        if sampler.top_p < 1.0:
            scaled = filter_top_p(
                scaled,
                sampler.top_p,
                shortlist=n_top if n_top < vocab else vocab,
                top=scaled_top,
            )
        tok = gumbel_choice(scaled, keys)
    tok = tok.astype(jnp.int32)
    chosen = jnp.take_along_axis(logits, tok[:, None], axis=-1)[:, 0] - log_norm[:, 0]
    top_lp = (top[:, :k] - log_norm).astype(jnp.float32)
    return tok, chosen, top_lp, top_ids[:, :k].astype(jnp.int32)
