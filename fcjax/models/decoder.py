"""One Flax NNX decoder for Llama, Qwen2 and Qwen3, switched by ``ModelConfig``.

Each layer owns its parameters (``blocks`` is a list) and the forward pass is a Python loop
over them, as in flax's gemma example: a decode step reads every weight in place, where a
scan over layer-stacked weights copies each layer's slice out per step on backends that cannot
fuse the slice into the matmul. Three entry points cover all uses:

- ``prefill``: a right-padded block of tokens -> final hidden states, per-layer K/V (to seed
  a cache) and, optionally, hidden states of every layer at chosen positions.
- ``decode``: one token per row against a shared context cache plus each row's own cache
  (``KVCache``; layouts in ``fcjax.models.attention``).
- ``extend``: several given tokens per row at once against a prefix of the shared context
  cache (teacher forcing after each of many cuts of one prefilled trace).

The residual stream is kept in float32, which keeps bfloat16 models closer to their float32
logits at negligible cost. Products take the weight dtype and accumulate in float32
(``attention.dot``); those that feed the residual (attention output, MLP down) stay float32.

Weight layouts name their axes: q ``[embed, heads, head_dim]``, o ``[heads, head_dim, embed]``,
gate/up ``[embed, mlp]``, down ``[mlp, embed]``, embedding ``[vocab, embed]``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from fcjax.models.attention import decode_attention, dot, extend_attention, prefill_attention
from fcjax.models.config import ModelConfig
from fcjax.models.rope import apply_rope, rope_tables
from fcjax.models.sharding import constrain, shard_decode


def linear(x: jnp.ndarray, w: jnp.ndarray, precision=None, dtype=None) -> jnp.ndarray:
    """x [..., in] times w [in, *out] -> [..., *out] in ``dtype`` (default: the operands'),
    as one 2-D product accumulated in float32 (``dot``)."""
    x2, w2 = x.reshape(-1, x.shape[-1]), w.reshape(w.shape[0], -1)
    out = dot("mi,io->mo", x2, w2, precision=precision, dtype=dtype)
    return out.reshape(*x.shape[:-1], *w.shape[1:])


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

    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        d, h, kv, hd = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.q = _init(rngs, (d, h, hd), dtype)
        self.k = _init(rngs, (d, kv, hd), dtype)
        self.v = _init(rngs, (d, kv, hd), dtype)
        self.o = _init(rngs, (h, hd, d), dtype)
        if config.qkv_bias:
            self.q_bias = _init(rngs, (h, hd), dtype)
            self.k_bias = _init(rngs, (kv, hd), dtype)
            self.v_bias = _init(rngs, (kv, hd), dtype)
        if config.o_bias:
            self.o_bias = _init(rngs, (d,), dtype)
        if config.qk_norm:
            self.q_norm = RMSNorm((hd), config.rms_norm_eps, dtype)
            self.k_norm = RMSNorm((hd), config.rms_norm_eps, dtype)
        self.config = config

    def project(self, x, cos, sin, precision=None):
        """x [..., embed] -> rotated q [..., heads, hd], k and v [..., kv_heads, hd]."""
        q = linear(x, self.q[...], precision=precision)
        k = linear(x, self.k[...], precision=precision)
        v = linear(x, self.v[...], precision=precision)
        if self.config.qkv_bias:
            q, k, v = q + self.q_bias[...], k + self.k_bias[...], v + self.v_bias[...]
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = constrain(q, ("heads", "head_dim"), self.config)
        k = constrain(k, ("kv_heads", "head_dim"), self.config)
        v = constrain(v, ("kv_heads", "head_dim"), self.config)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def output(self, attn, precision=None):
        """attn [..., heads, hd] -> [..., embed]; heads x hd flattened on both sides (free
        reshapes), so no backend transposes the weight to match the activation's layout."""
        o = self.o[...]
        attn = constrain(attn, ("heads", "head_dim"), self.config)
        flat = attn.reshape(*attn.shape[:-2], -1)
        out = linear(flat, o.reshape(-1, o.shape[-1]), precision, jnp.float32)
        return out + self.o_bias[...] if self.config.o_bias else out


class MLP(nnx.Module):
    """SwiGLU feed-forward."""

    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        self.gate = _init(rngs, (d, f), dtype)
        self.up = _init(rngs, (d, f), dtype)
        self.down = _init(rngs, (f, d), dtype)
        self.config = config

    def __call__(self, x, precision=None):
        gate = linear(x, self.gate[...], precision=precision)
        up = linear(x, self.up[...], precision=precision)
        hidden = constrain(jax.nn.silu(gate) * up, ("mlp",), self.config)
        return linear(hidden, self.down[...], precision, jnp.float32)


class Block(nnx.Module):
    """One pre-norm decoder layer."""

    def __init__(self, config: ModelConfig, dtype, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm((config.hidden_size,), config.rms_norm_eps, dtype)
        self.attn = Attention(config, dtype, rngs)
        self.mlp_norm = RMSNorm((config.hidden_size,), config.rms_norm_eps, dtype)
        self.mlp = MLP(config, dtype, rngs)

    def __call__(self, x, cos, sin, attend, precision=None):
        """x float32 [..., embed] -> (x after the layer, this layer's new k, v)."""
        q, k, v = self.attn.project(self.attn_norm(x), cos, sin, precision)
        y = x + self.attn.output(attend(q, k, v), precision).astype(jnp.float32)
        y = constrain(y, ("embed",), self.attn.config)  # whole on every model shard
        y = y + self.mlp(self.mlp_norm(y), precision).astype(jnp.float32)
        return constrain(y, ("embed",), self.attn.config), k, v


class KVCache(NamedTuple):
    """Per-layer K/V a decode step reads (tuples with one array per layer)."""

    ctx_k: tuple  # [ctx, kv_heads, ctx_len, head_dim]: the context (prompt or trace)
    ctx_v: tuple
    own_k: tuple  # [ctx * rows, kv_heads, new, head_dim]: each row's generated tokens (a ring)
    own_v: tuple


class PrefillOut(NamedTuple):
    normed: jnp.ndarray  # [batch, seq, embed] after the final norm
    last_hidden: jnp.ndarray  # [batch, seq, embed] last layer output, before the final norm
    k: tuple | None  # per layer [batch, kv_heads, seq, head_dim]
    v: tuple | None
    captured: jnp.ndarray | None  # [layers + 1, batch, positions, embed] (HF convention)


class DecodeOut(NamedTuple):
    normed: jnp.ndarray  # [ctx, rows, embed]
    last_hidden: jnp.ndarray  # [ctx, rows, embed]
    own_k: tuple  # per layer: the own caches with the new token written
    own_v: tuple


DECODE_ATTENTION = ("xla", "xla_full", "pallas", "pallas_interpret")


@dataclasses.dataclass(frozen=True)
class Numerics:
    """Activation dtype, matmul precision (HIGHEST for float32 parity on GPU/TPU) and the
    decode attention: ``xla`` (every backend; the reference: on GPU it reads whole caches
    with static shapes, elsewhere the live blocks only), ``xla_full`` (whole caches on every
    backend: what a GPU runs, for CPU proxies), ``pallas`` (Triton kernels for GPU,
    ``fcjax.models.attention_pallas``) or ``pallas_interpret`` (the same kernels interpreted
    on any backend, for tests)."""

    dtype: str = "float32"
    decode_attention: str = "xla"

    def __post_init__(self):
        if self.decode_attention not in DECODE_ATTENTION:
            raise ValueError(
                f"decode_attention must be one of {', '.join(DECODE_ATTENTION)}, "
                f"got {self.decode_attention!r}"
            )

    @property
    def precision(self):
        return jax.lax.Precision.HIGHEST if self.dtype == "float32" else None

    def attend_decode(self, *args, config=None):
        """``decode_attention`` (args as in ``fcjax.models.attention``) by the chosen path;
        the Pallas kernels under ``shard_map`` on a multi-device mesh (``config`` says
        whether heads are split)."""
        if self.decode_attention in ("xla", "xla_full"):
            reads = "full" if self.decode_attention == "xla_full" else "auto"
            return decode_attention(*args, precision=self.precision, reads=reads)
        from fcjax.models import attention_pallas

        interpret = self.decode_attention == "pallas_interpret"
        kernel = functools.partial(attention_pallas.decode_attention, interpret=interpret)
        return shard_decode(kernel, config, *args)


class Decoder(nnx.Module):
    """The decoder: embedding, a list of ``Block`` layers, final norm, head."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.numerics = Numerics(jnp.dtype(dtype).name)
        self.embed = _init(rngs, (config.vocab_size, config.hidden_size), dtype)
        self.blocks = nnx.List([Block(config, dtype, rngs) for _ in range(config.num_layers)])
        self.final_norm = RMSNorm((config.hidden_size,), config.rms_norm_eps, dtype)
        if not config.tie_embeddings:
            self.lm_head = _init(rngs, (config.hidden_size, config.vocab_size), dtype)

    @property
    def dtype(self):
        return self.embed[...].dtype

    def unembed(self, normed: jnp.ndarray) -> jnp.ndarray:
        """[..., embed] -> float32 logits [..., vocab]."""
        prec = self.numerics.precision
        if self.config.tie_embeddings:
            spec, head = "...d,vd->...v", self.embed[...]
        else:
            spec, head = "...d,dv->...v", self.lm_head[...]
        logits = jnp.einsum(spec, normed, head, precision=prec, preferred_element_type=jnp.float32)
        # the whole vocabulary on every model shard: the sampler's top-k reads all of it
        return constrain(logits.astype(jnp.float32), (None,), self.config)

    def _embed(self, tokens):
        return jnp.take(self.embed[...], tokens, axis=0).astype(jnp.float32)

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

        def capture(h):
            if capture_all:
                return h
            if capture_positions is None:
                return None
            return jnp.take_along_axis(h, capture_positions[..., None], axis=1)

        def attend(q, k, v):
            return prefill_attention(q, k, v, lengths, precision=prec)

        x = self._embed(tokens)
        ks, vs, captured = [], [], []
        for block in self.blocks:
            captured.append(capture(x))
            x, k, v = block(x, cos, sin, attend, prec)
            if return_kv:  # batch-first cache layout [batch, kv_heads, seq, head_dim]
                ks.append(k.swapaxes(1, 2))
                vs.append(v.swapaxes(1, 2))
        normed = self.final_norm(x)
        stacked = None
        if captured[0] is not None:
            stacked = jnp.stack([*captured, capture(normed)])
        kv = (tuple(ks), tuple(vs)) if return_kv else (None, None)
        return PrefillOut(normed, x, *kv, stacked)

    def decode(
        self,
        tokens: jnp.ndarray,  # [ctx, rows]
        positions: jnp.ndarray,  # [ctx, rows]
        cache: KVCache,
        ctx_valid: jnp.ndarray,  # [ctx, rows]
        own_valid: jnp.ndarray,  # [ctx, rows] tokens in the own cache before this one
        slot: jnp.ndarray,  # [] the own-cache ring slot this step writes
    ) -> DecodeOut:
        """One decoding step for every row: each layer writes the new token's K/V into the
        own cache (in place) and attends to it with the rest; returns the written caches."""
        prec = self.numerics.precision
        cos, sin = rope_tables(self.config, positions)
        x = self._embed(tokens)
        ks, vs = [], []
        for layer, block in enumerate(self.blocks):

            def attend(q, k, v, layer=layer):
                own_k = _write_slot(cache.own_k[layer], k, slot)
                own_v = _write_slot(cache.own_v[layer], v, slot)
                ks.append(own_k)
                vs.append(own_v)
                return self.numerics.attend_decode(
                    q,
                    cache.ctx_k[layer],
                    cache.ctx_v[layer],
                    ctx_valid,
                    own_k,
                    own_v,
                    own_valid + 1,
                    slot + 1,
                    config=self.config,
                )

            x, _, _ = block(x, cos, sin, attend, prec)
        return DecodeOut(self.final_norm(x), x, tuple(ks), tuple(vs))

    def extend(
        self,
        tokens: jnp.ndarray,  # [ctx, rows, new] int32
        positions: jnp.ndarray,  # [ctx, rows, new]
        ctx_k: tuple,  # per layer [ctx, kv_heads, ctx_len, head_dim] (``prefill``'s k)
        ctx_v: tuple,
        ctx_valid: jnp.ndarray,  # [ctx, rows] context positions each row sees
    ) -> jnp.ndarray:
        """The rows' tokens after their context prefixes in one pass: returns the final
        normed hidden states [ctx, rows, new, embed] (``unembed`` gives the next-token
        logits). Nothing is cached."""
        prec = self.numerics.precision
        cos, sin = rope_tables(self.config, positions)
        x = self._embed(tokens)
        for layer, block in enumerate(self.blocks):

            def attend(q, k, v, layer=layer):
                return extend_attention(
                    q, ctx_k[layer], ctx_v[layer], ctx_valid, k, v, precision=prec
                )

            x, _, _ = block(x, cos, sin, attend, prec)
        return self.final_norm(x)


def _write_slot(buf: jnp.ndarray, value: jnp.ndarray, slot) -> jnp.ndarray:
    """buf [c * r, kv, new, hd] <- value [c, r, kv, hd] at ring ``slot`` (in place)."""
    value = value.reshape(buf.shape[0], *value.shape[2:]).astype(buf.dtype)
    return jax.lax.dynamic_update_index_in_dim(buf, value, slot, axis=2)


class _OneKey:
    """Stands in for ``nnx.Rngs`` where only shapes are made: every draw is one key. Each
    draw of an ``nnx.Rngs`` stream under ``eval_shape`` sets a traced counter, for which flax
    searches the trace so far: quadratic in the layers (12 s for a 64-layer 32B preset, 1.4 s
    for SmolLM2's 30 layers; 0.8 s and 0.5 s with this)."""

    def params(self) -> jax.Array:
        return jax.random.key(0)


def shaped(config: ModelConfig, dtype=jnp.float32) -> Decoder:
    """A ``Decoder`` of ``config``'s shape whose weights are ``ShapeDtypeStruct``s (nothing
    allocated): for loading into, sharding plans and compiling without weights."""
    return nnx.eval_shape(lambda: Decoder(config, dtype=dtype, rngs=_OneKey()))
