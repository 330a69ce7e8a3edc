"""ModelConfig: one frozen, hashable description of a Llama / Qwen2 / Qwen3 decoder.

The three families differ only in a few switches (q/k/v biases, q/k RMSNorm, rope scaling,
tied embeddings), so a single decoder reads them from this config. It is built from an HF
``config.json`` (transformers-v5 ``rope_parameters`` or the older ``rope_theta`` /
``rope_scaling`` keys) or from GGUF metadata (``fcjax.models.gguf_file``).

Every ``config.json`` key that changes the numbers of these architectures in transformers is
either read or refused with an error naming it (``from_hf_config``); the keys that change
nothing at inference are listed in ``_HF_INERT`` with the reason.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("fcjax")

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
    """Rotary embedding parameters as transformers reads them.

    ``freq_factors`` holds llama.cpp's per-frequency divisors (the GGUF tensor
    ``rope_freqs.weight``): frequency i is ``theta^(-2i/d) / freq_factors[i]``; it is how
    llama.cpp's converter stores Llama-3's rope scaling, so it comes with ``rope_type``
    "default" (or "linear"/"yarn", which it composes with as in ggml), never "llama3".
    """

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
    freq_factors: tuple[float, ...] | None = None


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
        if self.head_dim % 2:
            raise ConfigError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.rope.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"unsupported rope type {self.rope.rope_type!r}; supported: "
                f"{', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        factors = self.rope.freq_factors
        if factors is not None:
            if self.rope.rope_type == "llama3":
                raise ConfigError(
                    "rope freq_factors (llama.cpp's rope_freqs) already encode llama3 scaling; "
                    "both together would scale twice"
                )
            if len(factors) != self.head_dim // 2:
                raise ConfigError(
                    f"rope freq_factors has {len(factors)} entries, expected head_dim / 2 = "
                    f"{self.head_dim // 2}"
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


# --- HF config.json -------------------------------------------------------------------------

# transformers' per-family defaults for keys a config.json may omit
_HF_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048, "head_dim": None},
    "qwen2": {"max_position_embeddings": 32768, "head_dim": None},
    "qwen3": {"max_position_embeddings": 32768, "head_dim": 128},
}
# Keys of these architectures' config.json that do not change inference numerics (as read by
# transformers' Llama/Qwen2/Qwen3 modelling code), so they are accepted without being read.
_HF_INERT = {
    "attention_dropout",  # dropout; inference runs in eval mode
    "initializer_range",  # weight init only
    "pretraining_tp",  # transformers' v5 Llama no longer reads it (a tensor-parallel split)
    "use_cache",  # a generation switch
    "torch_dtype",  # storage dtype; fcjax takes the dtype from the caller
    "dtype",
    "transformers_version",
    "_name_or_path",
    "pad_token_id",
    "bos_token_id",  # read as metadata below
    "eos_token_id",
    "model_type",
    "architectures",
}
# Keys read by ``from_hf_config`` (with the refused ones below, every key it knows).
_HF_READ = {
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "rms_norm_eps",
    "rope_parameters",
    "rope_scaling",
    "rope_theta",
    "original_max_position_embeddings",
    "max_position_embeddings",
    "tie_word_embeddings",
    "attention_bias",
    "layer_types",
    "use_sliding_window",
    "sliding_window",
    "max_window_layers",
}
# Keys whose feature fcjax's decoder does not implement: refused when set to a non-trivial
# value (the value that is trivial, if any, is given).
_HF_REFUSED_UNLESS = {
    "mlp_bias": False,  # llama: biases on gate/up/down
    "hidden_act": "silu",
    "partial_rotary_factor": 1.0,  # rotary on part of each head only
    "quantization_config": None,  # AWQ/GPTQ/FP8 weights are not plain tensors
    "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
}


def _rope_from_hf(cfg: Mapping[str, Any], max_pos: int) -> RopeConfig:
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, Mapping):
        raise ConfigError(f"rope_parameters must be an object, got {params!r}")
    if "full_attention" in params or "sliding_attention" in params:
        if set(params) - {"full_attention"}:
            raise ConfigError(
                f"per-layer-type rope_parameters {sorted(params)} are not supported "
                "(fcjax has full attention only)"
            )
        params = params["full_attention"]  # per-layer-type form; all layers share it here
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        why = {
            "dynamic": " (dynamic NTK rescales with each call's sequence length, which a "
            "cached decode cannot reproduce)"
        }.get(rope_type, "")
        raise ConfigError(
            f"unsupported rope type {rope_type!r}{why}; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    partial = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if partial is not None and float(partial) != 1.0:
        raise ConfigError(
            f"partial_rotary_factor={partial} is not supported (fcjax rotates the whole head)"
        )
    orig = params.get("original_max_position_embeddings")
    if rope_type in ("llama3", "yarn"):
        # transformers: a top-level original_max_position_embeddings wins, then the rope
        # dict's, then max_position_embeddings
        orig = cfg.get("original_max_position_embeddings", orig) or max_pos
    if rope_type == "llama3":  # transformers requires all of them too
        absent = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in params]
        if absent:
            raise ConfigError(f"rope type 'llama3' needs {', '.join(absent)}")
    factor = params.get("factor")
    if factor is None:
        if rope_type == "yarn":  # transformers derives it from the two lengths
            factor = max_pos / orig
        elif rope_type != "default":
            raise ConfigError(f"rope type {rope_type!r} needs a 'factor'")
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(factor) if factor is not None else 1.0,
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(orig) if orig is not None else None,
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        attention_factor=params.get("attention_factor"),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        truncate=bool(params.get("truncate", True)),
    )


def _check_sliding_window(cfg: Mapping[str, Any], family: str, num_layers: int) -> None:
    """Refuses any layer with sliding-window attention (transformers' Qwen2/Qwen3 rule)."""
    layer_types = cfg.get("layer_types")
    if layer_types is not None:
        sliding = [i for i, t in enumerate(layer_types) if t != "full_attention"]
        if sliding:
            raise ConfigError(
                f"layer_types marks layers {sliding[:8]} as {layer_types[sliding[0]]!r}; "
                "fcjax supports full attention only"
            )
        return
    if family == "llama":
        return  # transformers' Llama has no sliding window
    if cfg.get("use_sliding_window") and cfg.get("sliding_window", 4096) is not None:
        first = int(cfg.get("max_window_layers", 28))
        if first < num_layers:
            raise ConfigError(
                f"use_sliding_window=true with sliding_window={cfg.get('sliding_window', 4096)} "
                f"and max_window_layers={first} < num_hidden_layers={num_layers} gives layers "
                f"{first}..{num_layers - 1} sliding-window attention, which fcjax does not "
                "support"
            )


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    """Logs a warning the first time this process sees ``message``."""
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning(message)


def _as_tuple(x) -> tuple[int, ...]:
    if x is None:
        return ()
    if isinstance(x, int):
        return (x,)
    return tuple(int(v) for v in x)


def from_hf_config(cfg: Mapping[str, Any], name: str = "") -> ModelConfig:
    """Builds a ModelConfig from a parsed HF ``config.json``; refuses (``ConfigError`` naming
    the key) any setting that would make fcjax compute something transformers does not."""
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
    for key, trivial in _HF_REFUSED_UNLESS.items():
        if key in cfg and cfg[key] is not None and cfg[key] != trivial:
            raise ConfigError(
                f"{key}={cfg[key]!r} is not supported by fcjax's {family} decoder"
                + (f" (supported: {trivial!r})" if trivial is not None else "")
            )
    unknown = sorted(set(cfg) - _HF_READ - _HF_INERT - set(_HF_REFUSED_UNLESS))
    if unknown:
        _warn_once(
            f"config.json keys fcjax does not read (assumed not to change numerics): "
            f"{', '.join(unknown)}"
        )
    defaults = _HF_DEFAULTS[family]
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    num_layers = int(cfg["num_hidden_layers"])
    head_dim = cfg.get("head_dim", defaults["head_dim"]) or hidden // heads
    max_pos = int(cfg.get("max_position_embeddings", defaults["max_position_embeddings"]))
    _check_sliding_window(cfg, family, num_layers)
    attention_bias = bool(cfg.get("attention_bias", False))
    qkv_bias = family == "qwen2" or attention_bias  # qwen2: q/k/v always, o never
    return ModelConfig(
        family=family,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(head_dim),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope=_rope_from_hf(cfg, max_pos),
        max_position_embeddings=max_pos,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=family != "qwen2" and attention_bias,
        qk_norm=family == "qwen3",
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_as_tuple(cfg.get("eos_token_id")),
        name=name,
    )
