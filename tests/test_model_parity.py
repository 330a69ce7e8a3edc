"""fcjax float32 logits and hidden states equal transformers' on tiny random models."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import fcjax

SEQ = 40


@pytest.fixture(scope="module")
def lm32(tiny_model_dir):
    """The float32 fcjax model of the current tiny directory, loaded once for its tests."""
    return fcjax.load(tiny_model_dir, dtype="float32")


def _reference(path, ids):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(torch.tensor(ids), output_hidden_states=True)
    return out.logits.numpy(), np.stack([h.numpy() for h in out.hidden_states])


def test_logits_and_hidden_states_match_transformers(tiny_model_dir, lm32):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 128, size=(2, SEQ))
    ref_logits, ref_hidden = _reference(tiny_model_dir, ids)
    lm = lm32
    logits = lm.logits(ids)
    hidden = lm.hidden_states(ids)
    assert logits.shape == ref_logits.shape
    assert hidden.shape == ref_hidden.shape
    np.testing.assert_allclose(logits, ref_logits, atol=1e-4, rtol=0)
    np.testing.assert_allclose(hidden, ref_hidden, atol=1e-4, rtol=0)


def test_bfloat16_tracks_float32(tiny_model_dir, lm32):
    ids = np.random.default_rng(1).integers(0, 128, size=(1, SEQ))
    f32 = lm32.logits(ids)
    bf16 = fcjax.load(tiny_model_dir, dtype="bfloat16").logits(ids)
    assert bf16.dtype == np.float32
    agree = (bf16.argmax(-1) == f32.argmax(-1)).mean()
    assert agree > 0.9, agree
    assert np.abs(bf16 - f32).max() < 0.1 * np.abs(f32).max()


def test_config_read_from_config_json_matches_transformers(tiny_model_dir, lm32):
    """Every field fcjax reads from config.json equals transformers' reading of it, and the
    exported config (``fcjax.models.hf_config_dict``) reads back as the same config."""
    import dataclasses

    from transformers import AutoConfig

    from fcjax.models.config import from_hf_config

    cfg = lm32.config
    hf = AutoConfig.from_pretrained(tiny_model_dir)
    rope = hf.rope_parameters
    assert (cfg.family, cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (
        hf.model_type,
        hf.vocab_size,
        hf.hidden_size,
        hf.intermediate_size,
    )
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (
        hf.num_hidden_layers,
        hf.num_attention_heads,
        hf.num_key_value_heads,
    )
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    assert cfg.head_dim == head_dim
    assert cfg.tie_embeddings == hf.tie_word_embeddings
    assert cfg.rms_norm_eps == pytest.approx(hf.rms_norm_eps)
    assert cfg.rope.rope_type == rope["rope_type"]
    assert cfg.rope.theta == pytest.approx(rope["rope_theta"])
    if rope["rope_type"] != "default":
        assert cfg.rope.factor == pytest.approx(rope["factor"])
    again = from_hf_config(fcjax.models.hf_config_dict(cfg), name=cfg.name)
    assert dataclasses.replace(again, eos_token_ids=cfg.eos_token_ids) == cfg


@pytest.mark.parametrize("name", ["llama3-rope", "qwen2-yarn", "qwen3-yarn"])
def test_long_context_logits_match_transformers(name, tmp_path):
    """Scaled rope (llama3, yarn) at positions 0..199, past the original context of 64."""
    from tiny_models import build_tiny

    path = build_tiny(name, tmp_path / name)
    ids = np.random.default_rng(3).integers(0, 128, size=(1, 200))
    ref_logits, _ = _reference(path, ids)
    err = np.abs(fcjax.load(path).logits(ids) - ref_logits).max()
    assert err < 1e-4, err
