"""Random-weight models of real shapes, for benchmarks and memory planning.

Real weights over 64 MiB cannot travel to a remote accelerator in one call, so speed is
measured on these: same shapes (hence the same FLOPs and bytes) as the named checkpoints.
The study's models (``r1-distill-*``, ``qwq-32b``, ``qwen3-8b``) carry the values of their
published ``config.json`` (sizes, rope, tied embeddings, context length); token ids are left
out (a random-weight model has no tokenizer).
"""

from __future__ import annotations

from fcjax.models.config import ModelConfig, RopeConfig

PRESETS: dict[str, ModelConfig] = {
    "tiny-llama": ModelConfig(  # for smoke tests of the benchmark and memory planning
        family="llama",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope=RopeConfig(theta=10000.0),
        max_position_embeddings=2048,
        name="tiny-llama",
    ),
    "smollm2-135m": ModelConfig(
        family="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope=RopeConfig(theta=100000.0),
        max_position_embeddings=8192,
        tie_embeddings=True,
        name="smollm2-135m",
    ),
    "qwen2-1.5b": ModelConfig(
        family="qwen2",
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_layers=28,
        num_heads=12,
        num_kv_heads=2,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope=RopeConfig(theta=1000000.0),
        max_position_embeddings=32768,
        tie_embeddings=True,
        qkv_bias=True,
        name="qwen2-1.5b",
    ),
    "qwen2-7b": ModelConfig(
        family="qwen2",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope=RopeConfig(theta=1000000.0),
        max_position_embeddings=32768,
        qkv_bias=True,
        name="qwen2-7b",
    ),
    "llama-8b": ModelConfig(
        family="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope=RopeConfig(
            theta=500000.0,
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
        max_position_embeddings=131072,
        name="llama-8b",
    ),
    "qwen3-8b": ModelConfig(
        family="qwen3",
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope=RopeConfig(theta=1000000.0),
        max_position_embeddings=40960,
        qk_norm=True,
        name="qwen3-8b",
    ),
}


def _llama3_rope() -> RopeConfig:
    """Llama-3.1's rope scaling (also DeepSeek-R1-Distill-Llama-8B's)."""
    return RopeConfig(
        theta=500000.0,
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=8192,
    )


def _qwen2(name: str, hidden, mlp, layers, heads, kv, theta, eps, max_pos) -> ModelConfig:
    return ModelConfig(
        family="qwen2",
        vocab_size=152064,
        hidden_size=hidden,
        intermediate_size=mlp,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=hidden // heads,
        rms_norm_eps=eps,
        rope=RopeConfig(theta=theta),
        max_position_embeddings=max_pos,
        qkv_bias=True,
        name=name,
    )


# The study's models. QwQ-32B's card suggests yarn (factor 4 over 32768) for inputs past
# 32768 tokens; its config.json has none, and neither has this preset.
PRESETS |= {
    "r1-distill-llama-8b": ModelConfig(
        family="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope=_llama3_rope(),
        max_position_embeddings=131072,
        name="r1-distill-llama-8b",
    ),
    # Qwen2.5-Math-7B based: rope theta 10000 (not Qwen2.5's 1e6)
    "r1-distill-qwen-7b": _qwen2(
        "r1-distill-qwen-7b", 3584, 18944, 28, 28, 4, 10000.0, 1e-6, 131072
    ),
    "r1-distill-qwen-14b": _qwen2(
        "r1-distill-qwen-14b", 5120, 13824, 48, 40, 8, 1000000.0, 1e-5, 131072
    ),
    "r1-distill-qwen-32b": _qwen2(
        "r1-distill-qwen-32b", 5120, 27648, 64, 40, 8, 1000000.0, 1e-5, 131072
    ),
    "qwq-32b": _qwen2("qwq-32b", 5120, 27648, 64, 40, 8, 1000000.0, 1e-5, 40960),
}
