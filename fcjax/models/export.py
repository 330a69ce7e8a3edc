"""Export an fcjax model to transformers: its config.json fields and its weights.

    model = fcjax.models.to_transformers(lm)  # a transformers *ForCausalLM in eval mode

``hf_state_dict(lm)`` holds the weights under transformers' names in torch layouts (float32
numpy), the exact inverse of loading; ``hf_config_dict(lm.config)`` the config fields.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fcjax.models.config import ConfigError, ModelConfig
from fcjax.models.lm import LM
from fcjax.models.loading import iter_hf_tensors

HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def hf_config_dict(config: ModelConfig) -> dict[str, Any]:
    """The transformers ``config.json`` fields of a ``ModelConfig``. A rope with llama.cpp
    frequency divisors (``freq_factors``, from a GGUF's ``rope_freqs``) has no config.json
    form and is refused."""
    rope = config.rope
    if rope.freq_factors is not None:
        raise ConfigError(
            "this model's rope carries llama.cpp frequency divisors (a GGUF's rope_freqs), "
            "which transformers' config.json cannot express; refusing to export a model "
            "that would run with a different rope"
        )
    rope_parameters: dict[str, Any] = {"rope_type": rope.rope_type, "rope_theta": rope.theta}
    if rope.rope_type != "default":
        rope_parameters["factor"] = rope.factor
    if rope.rope_type == "llama3":
        rope_parameters |= {
            "low_freq_factor": rope.low_freq_factor,
            "high_freq_factor": rope.high_freq_factor,
            "original_max_position_embeddings": rope.original_max_position_embeddings,
        }
    if rope.rope_type == "yarn":
        rope_parameters |= {
            "original_max_position_embeddings": rope.original_max_position_embeddings,
            "beta_fast": rope.beta_fast,
            "beta_slow": rope.beta_slow,
            "attention_factor": rope.attention_factor,
            "mscale": rope.mscale,
            "mscale_all_dim": rope.mscale_all_dim,
            "truncate": rope.truncate,
        }
    return {
        "model_type": config.family,
        "architectures": [HF_ARCHITECTURES[config.family]],
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": config.qkv_bias and config.family != "qwen2",
        "rope_parameters": rope_parameters,
        "rope_theta": rope.theta,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_ids) or None,
        "pad_token_id": 0,
    }


def hf_state_dict(lm: LM) -> dict[str, np.ndarray]:
    """``lm``'s weights under transformers' names, float32 numpy in torch layouts."""
    return dict(iter_hf_tensors(lm.config, lm.state))


def to_transformers(lm: LM, dtype: str = "float32", device: str = "cpu"):
    """A transformers causal LM of ``lm``'s architecture holding ``lm``'s weights (eval
    mode, ``dtype`` "float32" or "bfloat16"). Needs torch."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"to_transformers: dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    fields = hf_config_dict(lm.config)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch_dtype = torch.float32 if dtype == "float32" else torch.bfloat16
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    state = {k: torch.from_numpy(np.array(v)) for k, v in hf_state_dict(lm).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"to_transformers: missing {missing}, unexpected {unexpected}")
    return model.eval()
