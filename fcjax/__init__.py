"""fcjax: faithful confidence expression in reasoning models, measured with JAX."""

from fcjax.compilation import enable_compilation_cache
from fcjax.engine import Generation, SamplingParams, branch, branch_many, generate, make_mesh
from fcjax.engine.capture import Capture, capture
from fcjax.models import LM, ModelConfig, load

__all__ = [
    "LM",
    "Capture",
    "Generation",
    "ModelConfig",
    "SamplingParams",
    "branch",
    "branch_many",
    "capture",
    "enable_compilation_cache",
    "generate",
    "load",
    "make_mesh",
]
