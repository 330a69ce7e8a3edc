"""One Flax NNX decoder for Llama, Qwen2 and Qwen3, switched by ``ModelConfig``.

Layer parameters are stacked along a leading [layers] axis and the forward pass scans over
them, so compile time does not grow with depth. Two entry points cover all uses:

- ``prefill``: a right-padded block of tokens -> final hidden states, per-layer K/V (to seed
  a cache) and, optionally, hidden states of every layer at chosen positions.
- ``decode``: one token per row against a shared context cache plus each row's own cache.

The residual stream is kept in float32 (matmuls run in the weight dtype), which keeps
bfloat16 models closer to their float32 logits at negligible cost.

Weight layouts name their axes: q ``[embed, heads, head_dim]``, o ``[heads, head_dim, embed]``,
gate/up ``[embed, mlp]``, down ``[mlp, embed]``, embedding ``[vocab, embed]``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from fcjax.models.attention import decode_attention, prefill_attention
from fcjax.models.config import ModelConfig
from fcjax.models.rope import apply_rope, rope_tables


def _init(rngs: nnx.Rngs, shape: tuple[int, ...], dtype) -> nnx.Param:
    return nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), shape, dtype))


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32, scaled in the activation dtype (as transformers does)."""

    def __init__(self, shape: tuple[int, ...], eps: float, dtype):
        self.scale = nnx.Param(jnp.ones(shape, dtype))
        self.eps = eps

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        dtype = self.scale[...].dtype
        x32 = x.astype(jnp.float32)
        var = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        return self.scale[...] * (x32 * jax.lax.rsqrt(var + self.eps)).astype(dtype)


class Attention(nnx.Module):
    """Q/K/V/O projections (+ optional q/k/v bias and q/k RMSNorm over head_dim)."""

    def __init__(self, config: ModelConfig, stack: tuple[int, ...], dtype, rngs: nnx.Rngs):
        d, h, kv, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.q = _init(rngs, (*stack, d, h, hd), dtype)
        self.k = _init(rngs, (*stack, d, kv, hd), dtype)
        self.v = _init(rngs, (*stack, d, kv, hd), dtype)
        self.o = _init(rngs, (*stack, h, hd, d), dtype)
        if config.qkv_bias:
            self.q_bias = _init(rngs, (*stack, h, hd), dtype)
            self.k_bias = _init(rngs, (*stack, kv, hd), dtype)
            self.v_bias = _init(rngs, (*stack, kv, hd), dtype)
        if config.qk_norm:
            self.q_norm = RMSNorm((*stack, hd), config.rms_norm_eps, dtype)
            self.k_norm = RMSNorm((*stack, hd), config.rms_norm_eps, dtype)
        self.config = config

    def project(self, x, cos, sin, precision=None):
        """x [..., embed] -> rotated q [..., heads, hd], k and v [..., kv_heads, hd]."""
        q = jnp.einsum("...d,dnh->...nh", x, self.q[...], precision=precision)
        k = jnp.einsum("...d,dnh->...nh", x, self.k[...], precision=precision)
        v = jnp.einsum("...d,dnh->...nh", x, self.v[...], precision=precision)
        if self.config.qkv_bias:
            q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def output(self, attn, precision=None):
        return jnp.einsum("...nh,nhd->...d", attn, self.o[...], precision=precision)


class MLP(nnx.Module):
    """SwiGLU feed-forward."""

    def __init__(self, config: ModelConfig, stack: tuple[int, ...], dtype, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.gate = _init(rngs, (*stack, d, f), dtype)
        self.up = _init(rngs, (*stack, d, f), dtype)
        self.down = _init(rngs, (*stack, f, d), dtype)

    def __call__(self, x, precision=None):
        gate = jnp.einsum("...d,df->...f", x, self.gate[...], precision=precision)
        up = jnp.einsum("...d,df->...f", x, self.up[...], precision=precision)
        return jnp.einsum(
            "...f,fd->...d", jax.nn.silu(gate) * up, self.down[...], precision=precision
        )


class Block(nnx.Module):
    """One pre-norm decoder layer (parameters may carry a leading [layers] axis)."""

    def __init__(self, config: ModelConfig, stack: tuple[int, ...], dtype, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm((*stack, config.hidden_size), config.rms_norm_eps, dtype)
        self.attn = Attention(config, stack, dtype, rngs)
        self.mlp_norm = RMSNorm((*stack, config.hidden_size), config.rms_norm_eps, dtype)
        self.mlp = MLP(config, stack, dtype, rngs)


class PrefillOut(NamedTuple):
    normed: jnp.ndarray  # [batch, seq, embed] after the final norm
    last_hidden: jnp.ndarray  # [batch, seq, embed] last layer output, before the final norm
    k: jnp.ndarray | None  # [layers, batch, seq, kv_heads, head_dim]
    v: jnp.ndarray | None
    captured: jnp.ndarray | None  # [layers + 1, batch, positions, embed] (HF convention)


class DecodeOut(NamedTuple):
    normed: jnp.ndarray  # [ctx, rows, embed]
    last_hidden: jnp.ndarray  # [ctx, rows, embed]
    k: jnp.ndarray  # [layers, ctx, rows, kv_heads, head_dim] of the new token
    v: jnp.ndarray


@dataclasses.dataclass(frozen=True)
class Numerics:
    """Activation dtype and matmul precision (HIGHEST for float32 parity on GPU/TPU)."""

    dtype: str = "float32"

    @property
    def precision(self):
        return jax.lax.Precision.HIGHEST if self.dtype == "float32" else None


class Decoder(nnx.Module):
    """The decoder: embedding, a stack of ``Block`` scanned over layers, final norm, head."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.numerics = Numerics(jnp.dtype(dtype).name)
        self.embed = _init(rngs, (config.vocab_size, config.hidden_size), dtype)
        self.blocks = Block(config, (config.num_layers,), dtype, rngs)
        self.final_norm = RMSNorm((config.hidden_size,), config.rms_norm_eps, dtype)
        if not config.tie_embeddings:
            self.lm_head = _init(rngs, (config.hidden_size, config.vocab_size), dtype)

    @property
    def dtype(self):
        return self.embed[...].dtype

    def _scan_layers(self, body, x, xs):
        graphdef, layers = nnx.split(self.blocks)

        def step(carry, layer_xs):
            layer_state, extra = layer_xs
            return body(nnx.merge(graphdef, layer_state), carry, extra)

        return jax.lax.scan(step, x, (layers, xs))

    def unembed(self, normed: jnp.ndarray) -> jnp.ndarray:
        """[..., embed] -> float32 logits [..., vocab]."""
        prec = self.numerics.precision
        if self.config.tie_embeddings:
            logits = jnp.einsum(
                "...d,vd->...v",
                normed,
                self.embed[...],
                precision=prec,
                preferred_element_type=jnp.float32,
            )
        else:
            logits = jnp.einsum(
                "...d,dv->...v",
                normed,
                self.lm_head[...],
                precision=prec,
                preferred_element_type=jnp.float32,
            )
        return logits.astype(jnp.float32)

    def prefill(
        self,
        tokens: jnp.ndarray,  # [batch, seq] int32, right padded
        lengths: jnp.ndarray,  # [batch]
        *,
        capture_positions: jnp.ndarray | None = None,  # [batch, positions]
        capture_all: bool = False,
        return_kv: bool = True,
    ) -> PrefillOut:
        """Runs the full causal forward; see ``PrefillOut``."""
        prec = self.numerics.precision
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        cos, sin = rope_tables(self.config, positions)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(jnp.float32)

        def capture(h):
            if capture_all:
                return h
            if capture_positions is None:
                return None
            return jnp.take_along_axis(h, capture_positions[..., None], axis=1)

        def body(block: Block, x, _):
            h = block.attn_norm(x)
            q, k, v = block.attn.project(h, cos, sin, prec)
            attn = prefill_attention(q, k, v, lengths, precision=prec)
            y = x + block.attn.output(attn, prec).astype(jnp.float32)
            y = y + block.mlp(block.mlp_norm(y), prec).astype(jnp.float32)
            kv = (k, v) if return_kv else (None, None)
            return y, (*kv, capture(x))

        x, (k, v, captured) = self._scan_layers(body, x, None)
        normed = self.final_norm(x)
        if captured is not None:
            captured = jnp.concatenate([captured, capture(normed)[None]], axis=0)
        return PrefillOut(normed, x, k, v, captured)

    def decode(
        self,
        tokens: jnp.ndarray,  # [ctx, rows]
        positions: jnp.ndarray,  # [ctx, rows]
        ctx_k: jnp.ndarray,  # [layers, ctx, ctx_len, kv_heads, head_dim]
        ctx_v: jnp.ndarray,
        ctx_valid: jnp.ndarray,  # [ctx, rows]
        own_k: jnp.ndarray,  # [layers, ctx, rows, new, kv_heads, head_dim]
        own_v: jnp.ndarray,
        own_valid: jnp.ndarray,  # [] or [ctx, rows]
    ) -> DecodeOut:
        """One decoding step for every row; returns the new token's K/V for the caller to
        write into the own cache (so the caches stay read-only inside the layer scan)."""
        prec = self.numerics.precision
        cos, sin = rope_tables(self.config, positions)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(jnp.float32)

        def body(block: Block, x, caches):
            ck, cv, ok, ov = caches
            h = block.attn_norm(x)
            q, k, v = block.attn.project(h, cos, sin, prec)
            attn = decode_attention(q, k, v, ck, cv, ctx_valid, ok, ov, own_valid, precision=prec)
            y = x + block.attn.output(attn, prec).astype(jnp.float32)
            y = y + block.mlp(block.mlp_norm(y), prec).astype(jnp.float32)
            return y, (k, v)

        x, (k, v) = self._scan_layers(body, x, (ctx_k, ctx_v, own_k, own_v))
        return DecodeOut(self.final_norm(x), x, k, v)
