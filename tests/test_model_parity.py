"""fcjax float32 logits and hidden states equal transformers' on tiny random models."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import fcjax

SEQ = 40


def _reference(path, ids):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(torch.tensor(ids), output_hidden_states=True)
    return out.logits.numpy(), np.stack([h.numpy() for h in out.hidden_states])


def test_logits_and_hidden_states_match_transformers(tiny_model_dir):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 128, size=(2, SEQ))
    ref_logits, ref_hidden = _reference(tiny_model_dir, ids)
    lm = fcjax.load(tiny_model_dir, dtype="float32")
    logits = lm.logits(ids)
    hidden = lm.hidden_states(ids)
    assert logits.shape == ref_logits.shape
    assert hidden.shape == ref_hidden.shape
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=0)
    np.testing.assert_allclose(hidden, ref_hidden, atol=1e-4, rtol=0)


def test_bfloat16_tracks_float32(tiny_model_dir):
    ids = np.random.default_rng(1).integers(0, 128, size=(1, SEQ))
    f32 = fcjax.load(tiny_model_dir, dtype="float32").logits(ids)
    bf16 = fcjax.load(tiny_model_dir, dtype="bfloat16").logits(ids)
    assert bf16.dtype == np.float32
    agree = (bf16.argmax(-1) == f32.argmax(-1)).mean()
    assert agree > 0.9, agree
    assert np.abs(bf16 - f32).max() < 0.1 * np.abs(f32).max()


@pytest.mark.parametrize("bad", ["config"])
def test_config_from_json_forms(bad, tiny_model_dir):
    cfg = fcjax.load(tiny_model_dir).config
    assert cfg.family in ("llama", "qwen2", "qwen3")
