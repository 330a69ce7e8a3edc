"""ModelConfig: one frozen, hashable description of a Llama / Qwen2 / Qwen3 decoder.

The three families differ only in a few switches (q/k/v biases, q/k RMSNorm, rope scaling,
tied embeddings), so a single decoder reads them from this config. It is built from an HF
``config.json`` (transformers-v5 ``rope_parameters`` or the older ``rope_theta`` /
``rope_scaling`` keys) or from GGUF metadata.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class ConfigError(ValueError):
    """A config that fcjax cannot run (unsupported architecture, rope type, bad field)."""


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters as transformers reads them."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static shape and switches of one decoder; hashable so it can be a jit static arg."""

    family: str  # "llama" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 32768
    tie_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False  # output projection bias (HF Llama/Qwen3 ``attention_bias``)
    qk_norm: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.rope.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"unsupported rope type {self.rope.rope_type!r}; supported: "
                f"{', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if self.o_bias and (self.family == "qwen2" or not self.qkv_bias):
            raise ConfigError(
                "o_bias (attention_bias) comes with q/k/v biases in llama and qwen3; "
                "qwen2 has q/k/v biases only"
            )

    @property
    def num_groups(self) -> int:
        """Query heads per KV head (grouped-query attention)."""
        return self.num_heads // self.num_kv_heads

    def param_count(self) -> int:
        d, f, h, kv, hd = (
            self.hidden_size,
            self.intermediate_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
        )
        attn = d * h * hd * 2 + d * kv * hd * 2
        per_layer = attn + 3 * d * f + 2 * d
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.num_layers * per_layer + emb + d


def _rope_from_hf(cfg: Mapping[str, Any]) -> RopeConfig:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if "rope_parameters" in cfg and isinstance(params, Mapping) and "full_attention" in params:
        params = params["full_attention"]  # per-layer-type form; all layers share it here
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"unsupported rope type {rope_type!r} in config.json; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0) or 1.0),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=params.get("original_max_position_embeddings"),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        attention_factor=params.get("attention_factor"),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        truncate=bool(params.get("truncate", True)),
    )


def _as_tuple(x) -> tuple[int, ...]:
    if x is None:
        return ()
    if isinstance(x, int):
        return (x,)
    return tuple(int(v) for v in x)


def from_hf_config(cfg: Mapping[str, Any], name: str = "") -> ModelConfig:
    """Builds a ModelConfig from a parsed HF ``config.json``."""
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type", "")
    family = None
    for a in archs:
        family = SUPPORTED_ARCHITECTURES.get(a, family)
    if family is None and model_type in ("llama", "qwen2", "qwen3"):
        family = model_type
    if family is None:
        got = ", ".join(archs) or model_type or "<none>"
        raise ConfigError(
            f"unsupported architecture {got!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or hidden // heads
    attention_bias = bool(cfg.get("attention_bias", False))
    qkv_bias = family == "qwen2" or attention_bias
    return ModelConfig(
        family=family,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope=_rope_from_hf(cfg),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=family != "qwen2" and attention_bias,
        qk_norm=family == "qwen3",
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_as_tuple(cfg.get("eos_token_id")),
        name=name,
    )


GGUF_ARCHITECTURES = ("llama", "qwen2", "qwen3")


def from_gguf_metadata(
    meta: Mapping[str, Any], has_output_weight: bool, name: str = ""
) -> ModelConfig:
    """Builds a ModelConfig from GGUF key/value metadata (``general.architecture`` etc.)."""
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ConfigError(
            f"unsupported GGUF architecture {arch!r}; supported: {', '.join(GGUF_ARCHITECTURES)}"
        )

    def get(key, default=None):
        return meta.get(f"{arch}.{key}", default)

    for key in ("embedding_length", "attention.head_count", "feed_forward_length", "block_count"):
        if get(key) is None:
            raise ConfigError(f"GGUF metadata lacks the required field {arch}.{key}")
    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    vocab = get("vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
    scaling = get("rope.scaling.type", "none")
    rope_type = {"none": "default", "linear": "linear", "yarn": "yarn"}.get(scaling)
    if rope_type is None:
        raise ConfigError(
            f"unsupported GGUF rope scaling {scaling!r}; supported: none, linear, yarn"
        )
    orig = get("rope.scaling.original_context_length")
    rope = RopeConfig(
        theta=float(get("rope.freq_base", 10000.0)),
        rope_type=rope_type,
        factor=float(get("rope.scaling.factor", 1.0) or 1.0),
        original_max_position_embeddings=int(orig) if orig else None,
    )
    eos = meta.get("tokenizer.ggml.eos_token_id")
    bos = meta.get("tokenizer.ggml.bos_token_id")
    return ModelConfig(
        family=arch,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(get("attention.key_length", hidden // heads)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope=rope,
        max_position_embeddings=int(get("context_length", 32768)),
        tie_embeddings=not has_output_weight,
        qkv_bias=arch == "qwen2",
        qk_norm=arch == "qwen3",
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_ids=_as_tuple(int(eos) if eos is not None else None),
        name=name,
    )
