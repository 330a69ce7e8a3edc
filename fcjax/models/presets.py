"""Random-weight models of real shapes, for benchmarks and memory planning.

Real weights over 64 MiB cannot travel to a remote accelerator in one call, so speed is
measured on these: same shapes (hence the same FLOPs and bytes) as the named checkpoints.
The study's models (``r1-distill-*``, ``qwq-32b``, ``qwen3-8b``) carry the values of their
published ``config.json`` (sizes, rope, tied embeddings, context length); token ids are left
out (a random-weight model has no tokenizer).
"""

from __future__ import annotations

import dataclasses

from fcjax.models.config import ModelConfig, RopeConfig

# Llama-3.1's rope scaling (also DeepSeek-R1-Distill-Llama-8B's)
_LLAMA3_ROPE = RopeConfig(
    theta=500000.0,
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=8192,
)
# the switches every model of a family has
_FAMILY_SWITCHES = {"llama": {}, "qwen2": {"qkv_bias": True}, "qwen3": {"qk_norm": True}}
_TIED = ("smollm2-135m", "qwen2-1.5b")  # input and output embeddings tied

# name: (family, vocab, hidden, mlp, layers, heads, kv heads, RMSNorm eps, rope theta or
# RopeConfig, context length), or the name of the preset whose shape it has; every preset's
# head_dim is hidden // heads.
_TABLE: dict[str, tuple | str] = {
    # for smoke tests of the benchmark and memory planning
    "tiny-llama": ("llama", 256, 64, 128, 2, 4, 2, 1e-5, 10000.0, 2048),
    "smollm2-135m": ("llama", 49152, 576, 1536, 30, 9, 3, 1e-5, 100000.0, 8192),
    "qwen2-1.5b": ("qwen2", 151936, 1536, 8960, 28, 12, 2, 1e-6, 1000000.0, 32768),
    "qwen2-7b": ("qwen2", 152064, 3584, 18944, 28, 28, 4, 1e-6, 1000000.0, 32768),
    "llama-8b": ("llama", 128256, 4096, 14336, 32, 32, 8, 1e-5, _LLAMA3_ROPE, 131072),
    "qwen3-8b": ("qwen3", 151936, 4096, 12288, 36, 32, 8, 1e-6, 1000000.0, 40960),
    # The study's models. QwQ-32B's card suggests yarn (factor 4 over 32768) for inputs past
    # 32768 tokens; its config.json has none, and neither has this preset.
    "r1-distill-llama-8b": "llama-8b",  # a Llama-3.1-8B fine-tune
    # Qwen2.5-Math-7B based: rope theta 10000 (not Qwen2.5's 1e6)
    "r1-distill-qwen-7b": ("qwen2", 152064, 3584, 18944, 28, 28, 4, 1e-6, 10000.0, 131072),
    "r1-distill-qwen-14b": ("qwen2", 152064, 5120, 13824, 48, 40, 8, 1e-5, 1000000.0, 131072),
    "r1-distill-qwen-32b": ("qwen2", 152064, 5120, 27648, 64, 40, 8, 1e-5, 1000000.0, 131072),
    "qwq-32b": ("qwen2", 152064, 5120, 27648, 64, 40, 8, 1e-5, 1000000.0, 40960),
}


def _preset(name: str, row: tuple) -> ModelConfig:
    family, vocab, hidden, mlp, layers, heads, kv, eps, rope, context = row
    return ModelConfig(
        family=family,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=hidden // heads,
        rms_norm_eps=eps,
        rope=rope if isinstance(rope, RopeConfig) else RopeConfig(theta=rope),
        max_position_embeddings=context,
        tie_embeddings=name in _TIED,
        name=name,
        **_FAMILY_SWITCHES[family],
    )


def _presets() -> dict[str, ModelConfig]:
    out: dict[str, ModelConfig] = {}
    for name, row in _TABLE.items():
        out[name] = (
            dataclasses.replace(out[row], name=name) if isinstance(row, str) else _preset(name, row)
        )
    return out


PRESETS: dict[str, ModelConfig] = _presets()
