"""Sampling parameters, per-row random keys and the token sampler (all on device).

Every row's key derives from (seed, example key, cut, sample index) and then the step, never
from the row's place in a batch, so the same seed gives the same tokens whatever the batch
composition or device count.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fcjax.keys import key_words


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
        if self.temperature == 0:  # greedy: the filters change nothing
            return Sampler(0.0, 1.0, 0, int(self.logprobs))
        return Sampler(
            float(self.temperature), float(self.top_p), int(self.top_k), int(self.logprobs)
        )


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["temperature", "top_p"],
    meta_fields=["top_k", "logprobs", "greedy", "nucleus"],
)
@dataclasses.dataclass(frozen=True)
class Sampler:
    """SamplingParams as the decode step takes them, a pytree: the temperature and top-p are
    data (one compiled program serves every value of them); the rest is the program's
    structure: ``top_k`` and ``logprobs`` (shapes), ``greedy`` (temperature 0) and
    ``nucleus`` (top-p below 1), derived from the values when not given."""

    temperature: float | jax.Array
    top_p: float | jax.Array
    top_k: int
    logprobs: int
    greedy: bool | None = None
    nucleus: bool | None = None

    def __post_init__(self):
        if self.greedy is None:
            object.__setattr__(self, "greedy", float(self.temperature) == 0.0)
        if self.nucleus is None:
            object.__setattr__(self, "nucleus", float(self.top_p) < 1.0)


IDENT_WORDS = 4  # a row's identity: (example key low, example key high, cut, sample)


def row_ident(example_key: int, cut: int, sample: int) -> tuple[int, int, int, int]:
    """The uint32 words [IDENT_WORDS] naming a row's random stream: its example's 64-bit
    ``fcjax.keys.stable_key`` (two words), the cut and the sample index."""
    return (*key_words(example_key), cut, sample)


def row_keys(seed, idents) -> jnp.ndarray:
    """PRNG keys [rows, 2] from the seed and per-row idents [rows, IDENT_WORDS] (``row_ident``),
    every word folded in, so rows whose example keys differ in any of their 64 bits get
    different streams; traceable."""
    idents = jnp.asarray(idents, jnp.uint32)
    base = jax.random.PRNGKey(seed)

    def one(words):
        key = base
        for i in range(IDENT_WORDS):
            key = jax.random.fold_in(key, words[i])
        return key

    return jax.vmap(one)(idents)


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


SHORTLIST = 256  # CPU/TPU: the largest logits looked at before any full-vocabulary pass
SHORTLIST_GPU = 16  # XLA's GPU TopK kernel takes k <= 16; a larger k sorts the vocabulary


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a backend runs the sampler: the shortlist's size, whether a ``top_k`` larger than
    it is cheap (then a top-k filter's set is always in the shortlist), and whether rows that
    need the full vocabulary are served by a branch on the device (``lax.cond``: TPU) or by
    computing that path for every row (``branchless``: on GPU a branch reads its predicate on
    the host). ``row_chunk``: the rows that need the full vocabulary are gathered and served
    that many at a time in a loop on the device (CPU, where a third of a flat model's rows may
    need it at T=0.8 and each costs 32 passes over the vocabulary), instead of every row of the
    batch behind one ``lax.cond`` (TPU: rows are sharded, a gather would move logits)."""

    shortlist: int
    wide_top_k: bool
    branchless: bool
    radix: int = 2  # intervals per pass of the full-vocabulary search (2: bisection)
    row_chunk: int = 0  # > 0: serve only the rows that need the full vocabulary, so many a pass

    @property
    def passes(self) -> int:
        """Passes of the search to pin one of 2**32 bit patterns."""
        return -(-32 // (self.radix.bit_length() - 1))


# CPU, TPU: bisection, 32 cheap passes (compute-bound there); GPU: 16 passes of 3
# thresholds, each one read of the logits. Measured on an H200 (the sampler alone, 512 rows
# x 151,936, top-p 0.95; same tokens for every radix): radix 4 3.4 ms a step, 8 3.8, 16 5.0,
# 32 7.6 (a pass costs about its thresholds' compares, not its read, past 3)
PLANS = {
    "cpu": Plan(SHORTLIST, wide_top_k=True, branchless=False, radix=2, row_chunk=4),
    "default": Plan(SHORTLIST, wide_top_k=True, branchless=False, radix=2),
    "gpu": Plan(SHORTLIST_GPU, wide_top_k=False, branchless=True, radix=4),
}


class _Scaled(NamedTuple):
    """Logits [rows, vocab] at a temperature, computed where they are read (never stored),
    the n largest of them, descending [rows, n], and (top-p over the whole vocabulary) their
    log-sum-exp [rows, 1]."""

    logits: jnp.ndarray
    temperature: float | jax.Array
    top: jnp.ndarray
    log_norm: jnp.ndarray | None = None

    def values(self) -> jnp.ndarray:
        return self.logits / self.temperature

    @property
    def max(self) -> jnp.ndarray:
        return self.top[:, :1]


def _active_top_k(sampler: Sampler, vocab: int) -> int:
    return sampler.top_k if 0 < sampler.top_k < vocab else 0


def _log_normalisers(logits, top_logit, temperature):
    """log-sum-exp [rows, 1] of the logits and of the logits / ``temperature``, given their
    maximum ``top_logit``: two sums of one read (XLA fuses sibling reductions)."""
    # two expressions, no shared intermediate: XLA:CPU would store one [rows, vocab]
    ones = jnp.sum(jnp.exp(logits - top_logit), axis=-1, keepdims=True)
    top_scaled = top_logit / temperature
    scaled = jnp.sum(jnp.exp(logits / temperature - top_scaled), axis=-1, keepdims=True)
    return top_logit + jnp.log(ones), top_scaled + jnp.log(scaled)


def _shortlist_cut(s: _Scaled, sampler: Sampler):
    """The kept set's threshold [rows, 1] (keep the scaled logits at or above it) found in
    the shortlist alone, and ``ok`` [rows, 1]: the shortlist holds the whole kept set (the
    nucleus is reached and the shortlist's smallest logit is below the threshold)."""
    top = s.top
    n = top.shape[-1]
    top_k = _active_top_k(sampler, s.logits.shape[-1])
    threshold = jnp.full(s.max.shape, -jnp.inf, top.dtype)
    if top_k > n:  # the top-k set is not in the shortlist: every row takes the full path
        return threshold, jnp.zeros(s.max.shape, bool)
    reached = jnp.ones(s.max.shape, bool)
    if top_k:
        threshold = top[:, top_k - 1 : top_k]
    if sampler.nucleus:
        in_k = top >= threshold
        # renormalised over the top-k set, else over the whole vocabulary
        log_norm = _log_sum_exp(jnp.where(in_k, top, -jnp.inf), s.max) if top_k else s.log_norm
        probs = jnp.where(in_k, jnp.exp(top - log_norm), 0.0)
        before = jnp.cumsum(probs, axis=-1) - probs
        nucleus = in_k & (before < sampler.top_p)
        threshold = jnp.min(jnp.where(nucleus, top, jnp.inf), axis=-1, keepdims=True)
        reached = jnp.sum(probs, axis=-1, keepdims=True) >= sampler.top_p
    return threshold, reached & (top[:, -1:] < threshold)


def _radix_search(measure, target, lo, hi, plan: Plan) -> jnp.ndarray:
    """The largest threshold whose ``measure`` (non-increasing in it; thresholds [rows, j]
    -> [rows, j]) is at least ``target`` [rows, 1], searched over the float bit patterns in
    [``lo``, ``hi``] (sortable uint32 [rows, 1]; ``measure(lo) >= target``): each pass
    measures ``plan.radix - 1`` evenly spaced thresholds in one read of the logits and keeps
    the part of the interval that holds the answer, until one bit pattern is left (in
    straight-line code where the plan is branchless: no loop for the device to test)."""
    radix = plan.radix
    j = jnp.arange(1, radix, dtype=jnp.uint32)

    def narrow(_, bounds):
        lo, hi = bounds
        gap = hi - lo
        step = gap // radix + 1
        cand = lo + jnp.minimum(j * step, gap)  # [rows, radix - 1], non-decreasing
        thresholds = _from_sortable_bits(cand)
        # one reduction over the vocabulary per threshold: XLA fuses these siblings into one
        # kernel and one read of the logits, where a [rows, vocab, radix - 1] reduction over
        # its middle axis ran 1.65 ms a pass on an H200 at 512 x 151,936 (a column reduction)
        measured = [measure(thresholds[:, i : i + 1]) for i in range(radix - 1)]
        ok = jnp.concatenate(measured, axis=-1) >= target  # true on a prefix
        n = jnp.sum(ok, axis=-1, keepdims=True)
        below = jnp.take_along_axis(cand, jnp.maximum(n - 1, 0), axis=-1)
        above = jnp.take_along_axis(cand, jnp.minimum(n, radix - 2), axis=-1)
        new_lo = jnp.where(n > 0, below, lo)
        hi = jnp.where(n < radix - 1, jnp.maximum(above, new_lo + 1) - 1, hi)
        return new_lo, hi

    bounds = (lo, hi)
    if plan.branchless:
        for i in range(plan.passes):
            bounds = narrow(i, bounds)
    else:
        bounds = jax.lax.fori_loop(0, plan.passes, narrow, bounds)
    return _from_sortable_bits(bounds[0])


def _full_cut(s: _Scaled, sampler: Sampler, plan: Plan) -> jnp.ndarray:
    """The kept set's threshold over the whole vocabulary, with no sort: the top-k cut (from
    the shortlist, else the k-th largest logit by a radix search on counts), then for top-p
    the largest threshold whose mass (among the top-k set) reaches p, by a radix search on
    masses."""
    vocab = s.logits.shape[-1]
    top_k = _active_top_k(sampler, vocab)
    lowest = _sortable_bits(jnp.full(s.max.shape, -jnp.inf, jnp.float32))
    highest = _sortable_bits(s.max)

    def values():
        return s.values()[:, :, None]  # [rows, vocab, 1] against thresholds [rows, 1, j]

    floor = jnp.full(s.max.shape, -jnp.inf, s.max.dtype)
    if top_k and top_k <= s.top.shape[-1]:
        floor = s.top[:, top_k - 1 : top_k]
    elif top_k:

        def count(thresholds):
            return jnp.sum(values() >= thresholds[:, None, :], axis=1, dtype=jnp.int32)

        floor = _radix_search(count, top_k, lowest, highest, plan)
    if not sampler.nucleus:
        return floor

    # stored once for a few gathered rows (``row_chunk``), else computed where read: a
    # [rows, vocab] copy of a whole batch is what the GPU and TPU plans avoid
    stored = jnp.exp(values() - s.max[:, :, None]) if plan.row_chunk else None

    def mass(thresholds):
        x = values()
        weights = jnp.exp(x - s.max[:, :, None]) if stored is None else stored
        return jnp.sum(jnp.where(x >= thresholds[:, None, :], weights, 0.0), axis=1)

    total = mass(floor)
    return _radix_search(mass, sampler.top_p * total, _sortable_bits(floor), highest, plan)


def kept_cut(logits, sampler: Sampler, top=None, plan: Plan = PLANS["default"], log_norm=None):
    """The filter of ``sampler`` (top-k, then top-p, at its temperature) as a per-row
    threshold [rows, 1]: the scaled logits at or above it are kept; and ``ok``
    [rows, 1], whether the shortlist ``top`` (the largest logits, descending; default 256)
    held it. ``log_norm``: the log-sum-exp of the scaled logits, when the caller has it.

    The cut is the one a descending sort gives. It comes from the shortlist where that holds
    the kept set (most rows of a trained model: two thirds of SmolLM2-135M's chat rows at
    T=0.8, top-p 0.95) and else from a radix search over the vocabulary (``_full_cut``), run
    as the plan says (``_unless_all``)."""
    vocab = logits.shape[-1]
    t = sampler.temperature
    if top is None:
        top = jax.lax.top_k(logits, min(SHORTLIST, vocab))[0]
    if log_norm is None and sampler.nucleus:
        log_norm = _log_sum_exp(logits / t, top[:, :1] / t)
    short, ok = _shortlist_cut(_Scaled(logits, t, top / t, log_norm), sampler)

    def full(logits, top, log_norm):
        return _full_cut(_Scaled(logits, t, top / t, log_norm), sampler, plan)

    return _unless_all(ok, short, full, (logits, top, log_norm), plan), ok


def _unless_all(ok, cheap, full, args, plan: Plan):
    """``cheap`` [rows, ...] with the rows that are not ``ok`` [rows, 1] taken from
    ``full(*args)``, a function of each row alone (arrays [rows, ...], or None): computed
    for every row (``branchless``), for every row behind a ``lax.cond`` taken when some row
    needs it, or (``row_chunk``) for the rows that need it only, gathered ``row_chunk`` at a
    time in a loop on the device over every chunk of the batch whose iterations past the rows
    that need it do nothing (a static trip count, which the HLO byte proxies can scale)."""
    need = ~ok[:, 0]
    if plan.branchless:
        return _where_rows(need, full(*args), cheap)
    if not plan.row_chunk:
        every = lambda: _where_rows(need, full(*args), cheap)  # noqa: E731
        return jax.lax.cond(jnp.any(need), every, lambda: cheap)
    rows = need.shape[0]
    chunk = min(plan.row_chunk, rows)
    order = jnp.argsort(~need, stable=True)  # the rows that need it first
    count = jnp.sum(need, dtype=jnp.int32)

    def serve(i, out):  # the last chunk overlaps the one before rather than run past the rows
        idx = jax.lax.dynamic_slice_in_dim(order, jnp.minimum(i * chunk, rows - chunk), chunk)

        def run(out):
            got = full(*jax.tree.map(lambda a: a[idx], args))
            return out.at[idx].set(_where_rows(need[idx], got, out[idx]))

        return jax.lax.cond(i * chunk < count, run, lambda out: out, out)

    return jax.lax.fori_loop(0, -(-rows // chunk), serve, cheap)


def _where_rows(need, full, cheap):
    """``full`` on the rows that ``need`` [rows] it, else ``cheap``."""
    return jnp.where(need.reshape(need.shape + (1,) * (cheap.ndim - 1)), full, cheap)


def choice_block(vocab: int) -> int:
    """Entries per block of the two-stage draw: the divisor of ``vocab`` in [64, 1024] (two
    blocks at least) that needs the fewest random numbers (vocab / block + block); 256 with
    padding if there is none."""
    divisors = [b for b in range(64, min(1024, vocab // 2) + 1) if vocab % b == 0]
    return min(divisors, key=lambda b: vocab // b + b) if divisors else 256


def gumbel_choice(logits, keys, temperature=1.0, cut=None, shift=None) -> jnp.ndarray:
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


def sample_step(
    logits: jnp.ndarray,
    keys: jnp.ndarray,
    sampler: Sampler,
    branchless: bool | None = None,
    shortlist: int | None = None,
):
    """One step of the sampler over the logits float32 [rows, vocab] with keys [rows, 2] ->
    (tokens [rows] int32, chosen log-probability [rows], top-k log-probabilities [rows, k] and
    ids).

    Log-probabilities are at temperature 1 before any filter (DeepConf reads them). One
    ``top_k`` shortlist serves the log-probabilities, greedy decoding and the top-k / top-p
    filters (``kept_cut``), whose kept set nearly always lies in the shortlist: the draw is
    then a Gumbel-max over the shortlist, else (per row: a row's token depends only on its
    logits and key) a two-stage Gumbel-max over the filtered vocabulary (``gumbel_choice``).
    No scaled or filtered copy of the logits is stored.

    The plan is the lowering platform's (``PLANS``: a 16-entry shortlist and no branch on GPU;
    256 entries elsewhere, the rows that need more served by a loop over them alone on CPU and
    behind a ``lax.cond`` on TPU), chosen where the step is lowered, so a step
    lowered for CUDA on a CPU host is the GPU's; ``branchless`` and ``shortlist`` override it.
    """

    def on(plan: Plan):
        if shortlist is not None:  # a top_k past 16 is cheap only where larger ones are
            plan = dataclasses.replace(
                plan, shortlist=shortlist, wide_top_k=shortlist > SHORTLIST_GPU
            )
        if branchless is not None:
            plan = dataclasses.replace(plan, branchless=branchless)
        return functools.partial(_sample_step, sampler=sampler, plan=plan)

    if branchless is not None and shortlist is not None:  # nothing left to the platform
        return on(PLANS["default"])(logits, keys)
    return jax.lax.platform_dependent(
        logits,
        keys,
        cpu=on(PLANS["cpu"]),
        cuda=on(PLANS["gpu"]),
        rocm=on(PLANS["gpu"]),
        default=on(PLANS["default"]),
    )


def _sample_step(logits, keys, sampler: Sampler, plan: Plan):
    """``sample_step`` by one ``plan``."""
    vocab = logits.shape[-1]
    k = sampler.logprobs
    t = sampler.temperature
    top_k = _active_top_k(sampler, vocab)
    filtered = not sampler.greedy and (top_k > 0 or sampler.nucleus)
    n_top = max(k, 1)
    if filtered:  # one past top_k where that is cheap, so that a tie at the k-th is seen
        n_top = max(n_top, min(plan.shortlist, vocab))
        if plan.wide_top_k and top_k:
            n_top = max(n_top, min(top_k + 1, vocab))
    # descending; ties: lower id first. The barrier keeps later slices of the result from
    # being merged into the sort XLA lowers top_k to, which would stop XLA:CPU from
    # rewriting it into its TopK kernel (a full-vocabulary sort costs ~100x more). One
    # barrier per output: XLA's SPMD partitioner aborts on a barrier over top_k's tuple
    # when a mesh has a model axis and no data axis (data:1,model:M)
    top, top_ids = map(jax.lax.optimization_barrier, jax.lax.top_k(logits, n_top))
    nucleus_norm = None
    if filtered and sampler.nucleus and not top_k:  # top-p over the whole vocabulary
        log_norm, nucleus_norm = _log_normalisers(logits, top[:, :1], t)
    else:
        log_norm = _log_sum_exp(logits, top[:, :1])
    if sampler.greedy:
        tok = top_ids[:, 0]  # = argmax
    elif filtered:
        cut, ok = kept_cut(logits, sampler, top, plan, nucleus_norm)
        short = _shortlist_draw(top / t, top_ids, cut, keys)

        def full(logits, keys, cut, top_logit):
            return gumbel_choice(logits, keys, t, cut, top_logit / t)

        tok = _unless_all(ok, short, full, (logits, keys, cut, top[:, :1]), plan)
    else:
        tok = gumbel_choice(logits, keys, t, shift=top[:, :1] / t)
    tok = tok.astype(jnp.int32)
    chosen = jnp.take_along_axis(logits, tok[:, None], axis=-1)[:, 0] - log_norm[:, 0]
    top_lp = (top[:, :k] - log_norm).astype(jnp.float32)
    return tok, chosen, top_lp, top_ids[:, :k].astype(jnp.int32)
