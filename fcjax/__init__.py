"""fcjax: faithful confidence expression in reasoning models, measured with JAX."""

from fcjax.models import LM, ModelConfig, load

__all__ = ["LM", "ModelConfig", "load"]
