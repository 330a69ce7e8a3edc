"""The token sampler draws from the distribution it claims (chi-square against float64)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from fcjax.engine.sampling import Sampler, gumbel_choice, sample_step

VOCAB = 600  # not a multiple of the draw's block: the padded last block is exercised
DRAWS = 40_000


def _logits(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal(VOCAB) * 2.0
    logits[rng.choice(VOCAB, 12, replace=False)] += 6.0  # a few likely tokens in several blocks
    return logits.astype(np.float32)


def _expected(logits: np.ndarray, sampler: Sampler) -> np.ndarray:
    """The sampling distribution by a float64 descending sort."""
    scaled = logits.astype(np.float64) / sampler.temperature
    order = np.argsort(-scaled, kind="stable")
    keep = np.zeros(VOCAB, bool)
    n = VOCAB if sampler.top_k == 0 else sampler.top_k
    probs = np.exp(scaled[order] - scaled.max())
    probs /= probs.sum()
    if sampler.top_p < 1:
        before = np.cumsum(probs) - probs
        n = min(n, int(np.sum(before < sampler.top_p)))
    keep[order[:n]] = True
    p = np.where(keep, np.exp(scaled - scaled.max()), 0.0)
    return p / p.sum()


def _draw(logits: np.ndarray, sampler: Sampler, seed: int) -> np.ndarray:
    keys = jax.random.split(jax.random.PRNGKey(seed), DRAWS)
    rows = jnp.broadcast_to(jnp.asarray(logits), (DRAWS, VOCAB))
    tok, chosen, top_lp, top_ids = jax.jit(sample_step, static_argnums=2)(rows, keys, sampler)
    lp = np.log(np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum())
    np.testing.assert_allclose(np.asarray(chosen), lp[np.asarray(tok)], atol=1e-5)
    top5 = np.argsort(-logits, kind="stable")[:5]
    np.testing.assert_array_equal(np.asarray(top_ids[0]), top5)
    np.testing.assert_allclose(np.asarray(top_lp[0]), lp[top5], atol=1e-5)
    return np.bincount(np.asarray(tok), minlength=VOCAB)


@pytest.mark.parametrize(
    "sampler",
    [Sampler(1.0, 1.0, 0, 5), Sampler(0.7, 0.9, 0, 5), Sampler(1.3, 1.0, 20, 5)],
    ids=["plain", "top_p", "top_k"],
)
def test_draws_follow_the_filtered_softmax(sampler):
    logits = _logits(1)
    expected = _expected(logits, sampler)
    counts = _draw(logits, sampler, seed=2)
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
