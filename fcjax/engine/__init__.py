"""Generation engine: KV-cached jitted decoding, prefix branching, mesh placement."""

from fcjax.engine.generate import Generation, branch, branch_many, generate
from fcjax.engine.mesh import make_mesh
from fcjax.engine.sampling import SamplingParams

__all__ = ["Generation", "SamplingParams", "branch", "branch_many", "generate", "make_mesh"]

from fcjax.engine.capture import Capture, capture

__all__ += ["Capture", "capture"]
