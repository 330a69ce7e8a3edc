"""fcjax.models export to transformers: logits equal fcjax's, weights round-trip exactly."""

import dataclasses

import jax
import numpy as np
import pytest
import torch

import fcjax
from fcjax.models import PRESETS, hf_state_dict, to_transformers
from fcjax.models.loading import assemble

TINY = PRESETS["tiny-llama"]
CONFIGS = {
    "llama-tied": dataclasses.replace(TINY, tie_embeddings=True),
    "llama-bias": dataclasses.replace(TINY, qkv_bias=True, o_bias=True),
    "qwen2": dataclasses.replace(TINY, family="qwen2", qkv_bias=True),
    "qwen3": dataclasses.replace(TINY, family="qwen3", qk_norm=True, head_dim=24),
}


def _random_lm(config, seed=0):
    """A random-weight LM with non-trivial norms and biases (not left at 1/0)."""
    lm = fcjax.LM.from_decoder(fcjax.models.loading.random_decoder(config, seed=seed))
    leaves, treedef = jax.tree.flatten(lm.state)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [
        x + 0.1 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys, strict=True)
    ]
    return dataclasses.replace(lm, state=jax.tree.unflatten(treedef, leaves))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_exported_transformers_model_has_fcjax_logits(name):
    lm = _random_lm(CONFIGS[name])
    ids = np.random.default_rng(0).integers(3, lm.config.vocab_size, size=(2, 11))
    model = to_transformers(lm)
    assert type(model).__name__ == fcjax.models.export.HF_ARCHITECTURES[lm.config.family]
    with torch.no_grad():
        want = model(torch.tensor(ids)).logits.numpy()
    got = lm.logits(ids)
    assert np.abs(want).max() > 1e-2  # not a degenerate all-zero model
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["llama-bias", "qwen3"])
def test_exported_weights_load_back_unchanged(name):
    lm = _random_lm(CONFIGS[name])
    tensors = hf_state_dict(lm)
    back = fcjax.LM.from_decoder(assemble(lm.config, iter(tensors.items()), "float32", "export"))
    for a, b in zip(jax.tree.leaves(lm.state), jax.tree.leaves(back.state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
