"""Sampling parameters, per-row random keys and the token sampler (all on device).

Every row's key derives from (seed, example key, cut, sample index) and then the step, never
from the row's place in a batch, so the same seed gives the same tokens whatever the batch
composition or device count.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import NamedTuple

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


def _from_sortable_bits(bits: jnp.ndarray) -> jnp.ndarray:
    """The inverse of ``_sortable_bits``."""
    positive = (bits >> 31) == 1
    return jax.lax.bitcast_convert_type(
        jnp.where(positive, bits & jnp.uint32(0x7FFFFFFF), ~bits), jnp.float32
    )


def _log_sum_exp(x: jnp.ndarray, x_max: jnp.ndarray) -> jnp.ndarray:
    """log-sum-exp over the last axis given an upper bound of it [.., 1]: one pass."""
    return x_max + jnp.log(jnp.sum(jnp.exp(x - x_max), axis=-1, keepdims=True))


SHORTLIST = 256  # largest logits looked at for top-k / top-p before any full-vocabulary pass


class _Scaled(NamedTuple):
    """Logits [rows, vocab] at a temperature, computed where they are read (never stored),
    and their maximum [rows, 1] (the first logit of the descending shortlist)."""

    logits: jnp.ndarray
    temperature: float
    top: jnp.ndarray  # [rows, n] the n largest scaled logits, descending

    def values(self) -> jnp.ndarray:
        return self.logits / self.temperature

    @property
    def max(self) -> jnp.ndarray:
        return self.top[:, :1]


def _shortlist_cut(s: _Scaled, sampler: Sampler):
    """The kept set's threshold [rows, 1] (keep the scaled logits at or above it) found in
    the shortlist alone, and ``ok`` [rows, 1]: the shortlist holds the whole kept set (the
    nucleus is reached and the shortlist's smallest logit is below the threshold)."""
    vocab = s.logits.shape[-1]
    top = s.top
    threshold = jnp.full(s.max.shape, -jnp.inf, top.dtype)
    reached = jnp.ones(s.max.shape, bool)
    if 0 < sampler.top_k < vocab:
        threshold = top[:, sampler.top_k - 1 : sampler.top_k]
    if sampler.top_p < 1.0:
        in_k = top >= threshold
        if 0 < sampler.top_k < vocab:  # renormalised over the top-k set
            log_norm = _log_sum_exp(jnp.where(in_k, top, -jnp.inf), s.max)
        else:  # over the whole vocabulary: one pass, the scaled logits are not stored
            log_norm = _log_sum_exp(s.values(), s.max)
        probs = jnp.where(in_k, jnp.exp(top - log_norm), 0.0)
        before = jnp.cumsum(probs, axis=-1) - probs
        nucleus = in_k & (before < sampler.top_p)
        threshold = jnp.min(jnp.where(nucleus, top, jnp.inf), axis=-1, keepdims=True)
        reached = jnp.sum(probs, axis=-1, keepdims=True) >= sampler.top_p
    return threshold, reached & (top[:, -1:] < threshold)


def _bisect_cut(s: _Scaled, sampler: Sampler) -> jnp.ndarray:
    """The kept set's threshold over the whole vocabulary: the top-k cut, then for top-p the
    largest threshold whose mass (among the top-k set) reaches p, by bisection over the float
    bit patterns: 32 passes that each read the logits alone and no sort."""
    vocab = s.logits.shape[-1]
    floor = jnp.full(s.max.shape, -jnp.inf, s.max.dtype)
    if 0 < sampler.top_k < vocab:
        floor = s.top[:, sampler.top_k - 1 : sampler.top_k]
    if sampler.top_p >= 1.0:
        return floor

    def mass(key):
        x = s.values()
        kept = jnp.where(x >= _from_sortable_bits(key), jnp.exp(x - s.max), 0.0)
        return jnp.sum(kept, axis=-1, keepdims=True)

    floor = _sortable_bits(floor)
    total = mass(floor)

    def body(_, bounds):
        lo, hi = bounds
        gap = hi - lo
        mid = lo + gap // 2 + gap % 2
        ok = mass(mid) >= sampler.top_p * total
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    lo, _ = jax.lax.fori_loop(0, 32, body, (floor, _sortable_bits(s.max)))
    return _from_sortable_bits(lo)


def kept_cut(logits, sampler: Sampler, top=None, branchless: bool | None = None):
    """The filter of ``sampler`` (top-k, then top-p, at its temperature) as a per-row
    threshold [rows, 1]: the scaled logits at or above it are kept; and ``ok``
    [rows, 1], whether the shortlist ``top`` (the largest logits, descending) held it.

    The cut is the one a descending sort gives. It comes from the shortlist where that holds
    the kept set (nearly every row of a trained model) and else from bisection;
    ``branchless`` (default: on GPU) computes both instead of branching on the device."""
    vocab = logits.shape[-1]
    if top is None:
        top = jax.lax.top_k(logits, min(SHORTLIST, vocab))[0]
    s = _Scaled(logits, sampler.temperature, top / sampler.temperature)
    short, ok = _shortlist_cut(s, sampler)
    cut = _unless_all(ok, short, lambda: jnp.where(ok, short, _bisect_cut(s, sampler)), branchless)
    return cut, ok


def _unless_all(ok, cheap, full, branchless: bool | None):
    """``cheap`` when every row is ``ok``, else ``full()`` (which keeps ``cheap`` for the ok
    rows): a ``lax.cond`` on the device that runs the step (CPU, TPU), or ``full()`` always
    (``branchless``, the default on GPU: no predicate goes back to the host)."""
    if branchless is None:
        branchless = jax.default_backend() == "gpu"
    return full() if branchless else jax.lax.cond(jnp.all(ok), lambda: cheap, full)


def choice_block(vocab: int) -> int:
    """Entries per block of the two-stage draw: the divisor of ``vocab`` in [64, 1024] (two
    blocks at least) that needs the fewest random numbers (vocab / block + block); 256 with
    padding if there is none."""
    divisors = [b for b in range(64, min(1024, vocab // 2) + 1) if vocab % b == 0]
    return min(divisors, key=lambda b: vocab // b + b) if divisors else 256


def gumbel_choice(logits, keys, temperature: float = 1.0, cut=None, shift=None) -> jnp.ndarray:
    """One draw per row from softmax(``logits`` / ``temperature``) [rows, vocab], restricted to
    the scaled logits at or above ``cut`` [rows, 1] (all when None; -inf
    logits are never drawn), with keys [rows, 2] -> token ids [rows] int32. ``shift``
    [rows, 1] is an upper bound of the scaled logits when the caller knows one.

    Two Gumbel-max draws, exact for the categorical: a block of ``choice_block(vocab)``
    entries with probability its share of the mass, then an entry within it. That needs
    ``vocab / block + block`` random numbers per row instead of ``vocab`` (the random bits of
    a full-vocabulary draw cost more than the rest of the sampler on CPU); the logits are
    read once, scaled and filtered where they are read.
    """
    rows, vocab = logits.shape
    block = choice_block(vocab)
    blocks = -(-vocab // block)
    if blocks * block != vocab:
        logits = jnp.pad(logits, ((0, 0), (0, blocks * block - vocab)), constant_values=-jnp.inf)
    grouped = logits.reshape(rows, blocks, block)

    def scaled(x, cut):  # x [.., block] raw logits -> kept scaled logits (-inf elsewhere)
        x = x / temperature
        return x if cut is None else jnp.where(x >= cut, x, -jnp.inf)

    cuts = None if cut is None else cut[:, :, None]
    if shift is None:
        shift = jnp.max(scaled(logits, cut), axis=-1, keepdims=True)
    block_mass = jnp.sum(jnp.exp(scaled(grouped, cuts) - shift[:, :, None]), axis=-1)
    block_lse = jnp.log(block_mass)  # [rows, blocks]; -inf where nothing is kept

    def draw(key, block_lse, grouped, cut):
        k_block, k_entry = jax.random.split(key)
        chosen = jnp.argmax(block_lse + jax.random.gumbel(k_block, (blocks,)))
        entries = scaled(jax.lax.dynamic_index_in_dim(grouped, chosen, keepdims=False), cut)
        entry = jnp.argmax(entries + jax.random.gumbel(k_entry, (block,)))
        return chosen * block + entry

    cut_rows = jnp.full((rows, 1), -jnp.inf, logits.dtype) if cut is None else cut
    return jax.vmap(draw)(keys, block_lse, grouped, cut_rows).astype(jnp.int32)


def _shortlist_draw(top, top_ids, cut, keys) -> jnp.ndarray:
    """A Gumbel-max draw among the shortlist's scaled logits at or above ``cut``."""
    gumbel = jax.vmap(lambda key: jax.random.gumbel(key, top.shape[-1:]))(keys)
    pick = jnp.argmax(jnp.where(top >= cut, top + gumbel, -jnp.inf), axis=-1)
    return jnp.take_along_axis(top_ids, pick[:, None], axis=-1)[:, 0]


def sample_step(logits: jnp.ndarray, keys: jnp.ndarray, sampler: Sampler, branchless=None):
    """One step of the sampler over the logits float32 [rows, vocab] with keys [rows, 2] ->
    (tokens [rows] int32, chosen log-probability [rows], top-k log-probabilities [rows, k] and
    ids).

    Log-probabilities are at temperature 1 before any filter (DeepConf reads them). One
    ``top_k`` shortlist serves the log-probabilities, greedy decoding and the top-k / top-p
    filters (``kept_cut``), whose kept set nearly always lies in the shortlist: the draw is
    then a Gumbel-max over the shortlist, else (per row: a row's token depends only on its
    logits and key) a two-stage Gumbel-max over the filtered vocabulary (``gumbel_choice``).
    No scaled or filtered copy of the logits is stored.
    """
    vocab = logits.shape[-1]
    k = sampler.logprobs
    filtered = sampler.temperature > 0 and (0 < sampler.top_k < vocab or sampler.top_p < 1.0)
    n_top = max(k, 1)
    if filtered:  # one past top_k, so that a tie at the k-th logit is seen
        n_top = max(n_top, min(SHORTLIST, vocab), min(sampler.top_k + 1, vocab))
    # descending; ties: lower id first. The barrier keeps later slices of the result from
    # being merged into the sort XLA lowers top_k to, which would stop XLA:CPU from
    # rewriting it into its TopK kernel (a full-vocabulary sort costs ~100x more). One
    # barrier per output: XLA's SPMD partitioner aborts on a barrier over top_k's tuple
    # when a mesh has a model axis and no data axis (data:1,model:M)
    top, top_ids = map(jax.lax.optimization_barrier, jax.lax.top_k(logits, n_top))
    log_norm = _log_sum_exp(logits, top[:, :1])
    t = sampler.temperature
    if t == 0.0:
        tok = top_ids[:, 0]  # = argmax
    elif filtered:
        s = _Scaled(logits, t, top / t)
        short_cut, ok = _shortlist_cut(s, sampler)
        short = _shortlist_draw(s.top, top_ids, short_cut, keys)

        def full():
            cut = jnp.where(ok, short_cut, _bisect_cut(s, sampler))
            return jnp.where(ok[:, 0], short, gumbel_choice(logits, keys, t, cut, s.max))

        tok = _unless_all(ok, short, full, branchless)
    else:
        tok = gumbel_choice(logits, keys, t, shift=top[:, :1] / t)
    tok = tok.astype(jnp.int32)
    chosen = jnp.take_along_axis(logits, tok[:, None], axis=-1)[:, 0] - log_norm[:, 0]
    top_lp = (top[:, :k] - log_norm).astype(jnp.float32)
    return tok, chosen, top_lp, top_ids[:, :k].astype(jnp.int32)
