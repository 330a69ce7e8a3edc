"""Generation engine: continuously batched jitted decoding, prefix branching, hidden-state
capture, mesh placement. ``fcjax.engine.capture`` is the capture module; the function is
``fcjax.capture``."""

from fcjax.engine.capture import Capture
from fcjax.engine.generate import EngineStats, Generation, branch, branch_many, generate
from fcjax.engine.mesh import make_mesh
from fcjax.engine.sampling import SamplingParams

__all__ = [
    "Capture",
    "EngineStats",
    "Generation",
    "SamplingParams",
    "branch",
    "branch_many",
    "generate",
    "make_mesh",
]
