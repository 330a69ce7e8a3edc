"""Model definitions, weight loading and the registry of named models."""

from fcjax.models.config import ConfigError, ModelConfig, RopeConfig
from fcjax.models.decoder import Decoder
from fcjax.models.export import hf_config_dict, hf_state_dict, to_transformers
from fcjax.models.lm import LM, load
from fcjax.models.loading import WeightError
from fcjax.models.presets import PRESETS
from fcjax.models.registry import REGISTRY, RegistryError, fetch

__all__ = [
    "LM",
    "PRESETS",
    "REGISTRY",
    "ConfigError",
    "Decoder",
    "ModelConfig",
    "RegistryError",
    "RopeConfig",
    "WeightError",
    "fetch",
    "hf_config_dict",
    "hf_state_dict",
    "load",
    "to_transformers",
]
