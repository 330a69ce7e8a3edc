"""Rotary position embeddings, computed as transformers computes them (rotate-half form).

Because fcjax uses the same rotate-half convention as the HF checkpoints, q/k weights load
without any row permutation (GGUF's llama.cpp permutation is undone at load time).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from fcjax.models.config import ModelConfig


def inv_frequencies(config: ModelConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies [head_dim // 2] (float32) and the cos/sin scale factor.

    ``rope.freq_factors`` (llama.cpp's ``rope_freqs``) divide the frequencies after the rope
    type's own scaling, as ggml's rope does (``theta_i = pos * base^(-2i/d) / factors[i]``,
    then linear/yarn interpolation, both linear in the frequency)."""
    inv_freq, scale = _scaled_inv_frequencies(config)
    if config.rope.freq_factors is not None:
        inv_freq = (inv_freq / np.asarray(config.rope.freq_factors, np.float32)).astype(np.float32)
    return inv_freq, scale


def _scaled_inv_frequencies(config: ModelConfig) -> tuple[np.ndarray, float]:
    rope, dim = config.rope, config.head_dim
    base = np.float32(rope.theta)
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / (base**exponents)).astype(np.float32)
    if rope.rope_type == "default":
        return inv_freq, 1.0
    if rope.rope_type == "linear":
        return (inv_freq / np.float32(rope.factor)).astype(np.float32), 1.0
    if rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings or config.max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = np.float32(2 * math.pi) / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(rope.factor), inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / np.float32(rope.factor) + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32), 1.0
    if rope.rope_type == "yarn":
        return _yarn(config)
    raise ValueError(f"unsupported rope type {rope.rope_type!r}")


def _yarn(config: ModelConfig) -> tuple[np.ndarray, float]:
    rope, dim, base = config.rope, config.head_dim, config.rope.theta
    factor = rope.factor
    orig = rope.original_max_position_embeddings or config.max_position_embeddings

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations):
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    pos_freqs = np.float32(base) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (np.float32(factor) * pos_freqs)
    keep = 1 - ramp
    inv_freq = interpolation * (1 - keep) + extrapolation * keep
    return inv_freq.astype(np.float32), float(attention_factor)


def rope_tables(config: ModelConfig, positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos, sin of shape [*positions.shape, head_dim] in float32."""
    inv_freq, scale = inv_frequencies(config)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotates x [..., heads, head_dim] with cos/sin [..., head_dim] (broadcast over heads)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[..., None, :].astype(x.dtype), sin[..., None, :].astype(x.dtype)
    return x * cos + rotated * sin
