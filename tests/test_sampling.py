"""The token sampler draws from the distribution it claims (chi-square against float64)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from child_env import OPTIMIZED
from scipy import stats

from fcjax.engine.sampling import (
    SHORTLIST_GPU,
    Sampler,
    choice_block,
    gumbel_choice,
    sample_step,
)

VOCAB = 601  # prime: the draw's blocks are padded (the engine's vocabularies divide evenly)
DRAWS = 40_000


def _logits(seed: int, flat: bool = False) -> np.ndarray:
    """A few likely tokens in several blocks; ``flat``: mass spread so widely that the 256
    largest logits hold less than the nucleus (the full-vocabulary path)."""
    rng = np.random.default_rng(seed)
    if flat:
        return (rng.standard_normal(VOCAB) * 0.3).astype(np.float32)
    logits = rng.standard_normal(VOCAB) * 2.0
    logits[rng.choice(VOCAB, 12, replace=False)] += 6.0
    return logits.astype(np.float32)


def _expected(logits: np.ndarray, sampler: Sampler) -> np.ndarray:
    """The sampling distribution by a float64 descending sort."""
    scaled = logits.astype(np.float64) / sampler.temperature
    order = np.argsort(-scaled, kind="stable")
    keep = np.zeros(VOCAB, bool)
    n = VOCAB if sampler.top_k == 0 else sampler.top_k
    probs = np.exp(scaled[order] - scaled.max())
    probs[n:] = 0.0  # top-k first; the nucleus is taken of what it keeps (renormalised)
    probs /= probs.sum()
    if sampler.top_p < 1:
        before = np.cumsum(probs) - probs
        n = min(n, int(np.sum(before < sampler.top_p)))
    keep[order[:n]] = True
    p = np.where(keep, np.exp(scaled - scaled.max()), 0.0)
    return p / p.sum()


def _draw(logits: np.ndarray, sampler: Sampler, seed: int, branchless=None, shortlist=None):
    keys = jax.random.split(jax.random.PRNGKey(seed), DRAWS)
    rows = jnp.broadcast_to(jnp.asarray(logits), (DRAWS, VOCAB))
    step = jax.jit(sample_step, static_argnums=(2, 3, 4), compiler_options=OPTIMIZED)
    tok, chosen, top_lp, top_ids = step(rows, keys, sampler, branchless, shortlist)
    lp = np.log(np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum())
    np.testing.assert_allclose(np.asarray(chosen), lp[np.asarray(tok)], atol=1e-5)
    top5 = np.argsort(-logits, kind="stable")[:5]
    np.testing.assert_array_equal(np.asarray(top_ids[0]), top5)
    np.testing.assert_allclose(np.asarray(top_lp[0]), lp[top5], atol=1e-5)
    return np.bincount(np.asarray(tok), minlength=VOCAB)


GPU = (True, SHORTLIST_GPU)  # the GPU's plan: 16-entry shortlist, no branch


@pytest.mark.parametrize(
    "sampler, flat, plan",
    [
        (Sampler(1.0, 1.0, 0, 5), False, (None, None)),
        (Sampler(0.7, 0.9, 0, 5), False, (None, None)),  # the nucleus is in the shortlist
        (Sampler(1.3, 1.0, 20, 5), False, (None, None)),
        (Sampler(1.0, 0.9, 0, 5), True, (None, None)),  # it is not: radix search
        (Sampler(1.0, 0.9, 300, 5), True, (True, None)),  # top-k past the shortlist, top-p
        (Sampler(0.7, 0.9, 0, 5), False, GPU),
        (Sampler(1.0, 0.9, 0, 5), True, GPU),
        (Sampler(1.3, 1.0, 20, 5), False, GPU),  # top-k past 16: the k-th by counts
        (Sampler(1.0, 0.9, 300, 5), True, GPU),
    ],
    ids=[
        "plain",
        "top_p",
        "top_k",
        "top_p_flat",
        "top_k_p_flat_branchless",
        "gpu_top_p",
        "gpu_top_p_flat",
        "gpu_top_k",
        "gpu_top_k_p_flat",
    ],
)
def test_draws_follow_the_filtered_softmax(sampler, flat, plan):
    logits = _logits(1, flat)
    expected = _expected(logits, sampler)
    counts = _draw(logits, sampler, 2, *plan)
    assert counts[expected == 0].sum() == 0  # nothing outside the kept set
    support = expected > 0
    # pool the rare tokens so every cell expects >= 5 draws (chi-square's validity)
    exp_counts = expected[support] * DRAWS
    obs = counts[support]
    rare = exp_counts < 5
    f_exp = np.append(exp_counts[~rare], exp_counts[rare].sum())
    f_obs = np.append(obs[~rare], obs[rare].sum())
    if f_exp[-1] == 0:
        f_exp, f_obs = f_exp[:-1], f_obs[:-1]
    assert stats.chisquare(f_obs, f_exp).pvalue > 1e-4


def test_gumbel_choice_is_exact_for_two_blocks_and_excluded_entries():
    """A hand-computed case: mass split unevenly across blocks, one block all excluded."""
    scaled = np.full(3 * 256, -np.inf, np.float32)
    scaled[5], scaled[300] = np.log(0.2), np.log(0.8)  # blocks 0 and 1; block 2 empty
    keys = jax.random.split(jax.random.PRNGKey(0), DRAWS)
    tok = np.asarray(gumbel_choice(jnp.broadcast_to(jnp.asarray(scaled), (DRAWS, 768)), keys))
    assert set(np.unique(tok)) == {5, 300}
    share = np.mean(tok == 300)
    assert abs(share - 0.8) < 4 * np.sqrt(0.8 * 0.2 / DRAWS)


def test_a_rows_token_does_not_depend_on_the_other_rows():
    """A row whose nucleus the shortlist holds draws the same token whether or not another
    row of its batch sends the batch down the full-vocabulary path (and either way on GPU's
    branchless path)."""
    sampler = Sampler(0.7, 0.9, 0, 5)
    peaked, flat = _logits(1), _logits(2, flat=True)
    keys = jax.random.split(jax.random.PRNGKey(3), 64)
    step = jax.jit(sample_step, static_argnums=(2, 3, 4))
    mixed = np.stack([peaked] * 63 + [flat])
    for shortlist in (None, SHORTLIST_GPU):
        alone = step(jnp.asarray(np.stack([peaked] * 64)), keys, sampler, None, shortlist)[0]
        for branchless in (False, True):
            tok = step(jnp.asarray(mixed), keys, sampler, branchless, shortlist)[0]
            np.testing.assert_array_equal(np.asarray(tok)[:63], np.asarray(alone)[:63])


@pytest.mark.parametrize(
    "flat_at",
    [{0, 3, 4, 7, 10}, {0, 1, 2, 4, 5, 6, 8, 9, 10}],
    ids=["a_chunk_and_part_of_one", "last_chunk_overlaps"],
)
def test_the_cpu_plan_serves_the_rows_the_shortlist_misses_one_chunk_at_a_time(flat_at):
    """CPU gathers the rows that need the full vocabulary and serves them ``row_chunk`` at a
    time (of 11 rows, chunks of 4: 5 rows fill one chunk and part of the next; 9 need a third,
    which starts at row 7 of the gathered order so as not to run past the batch): cuts and
    tokens equal the plan that computes the full path for every row of the batch."""
    from fcjax.engine.sampling import PLANS, kept_cut

    sampler = Sampler(0.9, 0.9, 0, 5)
    assert PLANS["cpu"].row_chunk == 4
    logits = jnp.asarray(np.stack([_logits(i, flat=i in flat_at) for i in range(11)]))
    keys = jax.random.split(jax.random.PRNGKey(4), 11)
    cuts = {}
    for plan in ("cpu", "default"):
        cut, ok = kept_cut(logits, sampler, plan=PLANS[plan])
        assert sorted(np.flatnonzero(~np.asarray(ok)[:, 0])) == sorted(flat_at)
        cuts[plan] = np.asarray(cut)
    np.testing.assert_array_equal(cuts["cpu"], cuts["default"])
    step = jax.jit(sample_step, static_argnums=(2, 3, 4))
    on_cpu = step(logits, keys, sampler, False, None)[0]  # the platform's plan: "cpu"
    every_row = step(logits, keys, sampler, False, 256)[0]  # "default": lax.cond, all rows
    np.testing.assert_array_equal(np.asarray(on_cpu), np.asarray(every_row))


def test_choice_block_divides_the_vocabulary_when_it_can():
    assert choice_block(49152) == 192  # SmolLM2: 256 blocks of 192
    assert 151936 % choice_block(151936) == 0  # Qwen2
    assert choice_block(601) == 256  # prime: padded


@pytest.mark.parametrize(
    "sampler",
    [Sampler(0.8, 0.95, 0, 5), Sampler(0.8, 1.0, 40, 5), Sampler(0.6, 0.9, 300, 5)],
    ids=["top_p", "top_k", "top_k_p"],
)
def test_lowered_for_cuda_the_sampler_has_no_large_top_k_sort_or_loop(sampler):
    """On GPU, XLA's TopK takes k <= 16 (it sorts the whole vocabulary past that) and a loop
    or a branch reads its predicate on the host: the step lowered for CUDA (no GPU needed)
    has neither; lowered for CPU, the same call keeps its 256-entry shortlist and serves the
    rows it does not hold in a loop."""
    import re

    from fcjax.engine.profile import lower_for

    sd = jax.ShapeDtypeStruct

    def lowered(sampler, platform):
        args = sd((8, 151936), jnp.float32), sd((8, 2), jnp.uint32), sampler
        jitted = jax.jit(sample_step, static_argnums=(2,))
        return lower_for(jitted, (platform,), *args).as_text()  # jax >= 0.11 as well

    def branches(text):  # platform_dependent's own selection is a case in every step
        return text.count("stablehlo.case")

    greedy = Sampler(0.0, 1.0, 0, 5)
    cuda = lowered(sampler, "cuda")
    ks = [int(k) for k in re.findall(r"top_k\(.*k = (\d+)", cuda)]
    assert ks and max(ks) <= SHORTLIST_GPU
    assert "stablehlo.sort" not in cuda and "stablehlo.while" not in cuda
    assert branches(cuda) == branches(lowered(greedy, "cuda"))  # no lax.cond
    cpu = lowered(sampler, "cpu")
    assert max(int(k) for k in re.findall(r"top_k\(.*k = (\d+)", cpu)) >= 256
    # the fallback: a loop over chunks of the rows, each served when it needs the vocabulary
    assert "stablehlo.while" in cpu and "stablehlo.while" not in lowered(greedy, "cpu")
    assert branches(cpu) > branches(lowered(greedy, "cpu"))


@pytest.mark.parametrize(
    "sampler",
    [Sampler(1.0, 0.9, 0, 5), Sampler(0.7, 0.9, 0, 5), Sampler(1.3, 0.95, 20, 5)],
    ids=["top_p", "top_p_cold", "top_k_p"],
)
def test_every_radix_of_the_full_vocabulary_search_finds_the_sorts_kept_set(sampler):
    """The GPU plan's search (radix 4: 16 unrolled passes of 3 thresholds) and the others
    (bisection; radix 16, the GPU's until measured slower) pin the same threshold bit for
    bit, and it keeps exactly the set a float64 descending sort keeps, on flat rows (the
    full-vocabulary path) and peaked ones."""
    import dataclasses

    from fcjax.engine.sampling import PLANS, kept_cut

    rows = [_logits(i, flat=i % 2 == 0) for i in range(6)]
    logits = jnp.asarray(np.stack(rows))
    assert PLANS["gpu"].radix == 4 and PLANS["gpu"].branchless
    cuts, kept = {}, {}
    for radix in (2, 4, 16):
        plan = dataclasses.replace(PLANS["gpu"], radix=radix)
        top = jax.lax.top_k(logits, plan.shortlist)[0]

        def cut_and_kept(x, top, plan=plan):  # scaled as the sampler scales (XLA's division)
            cut = kept_cut(x, sampler, top, plan)[0]
            return cut, x / sampler.temperature >= cut

        cuts[radix], kept[radix] = map(np.asarray, jax.jit(cut_and_kept)(logits, top))
    np.testing.assert_array_equal(cuts[4], cuts[2])
    np.testing.assert_array_equal(cuts[16], cuts[2])
    for row, row_kept in zip(rows, kept[4], strict=True):
        np.testing.assert_array_equal(row_kept, _expected(row, sampler) > 0)
