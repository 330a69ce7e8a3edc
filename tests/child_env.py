"""The XLA flags the tests compile with, and the environment of the processes they start."""

import os
from importlib import metadata

# XLA's CPU compiler at optimisation level 0 and without the MLIR fusion emitters: the tests'
# many small programs compile about 3x faster (the engine's compaction, batch and cache tests:
# 59 s of backend compilation with XLA's defaults, 18 s with these). The programs are the
# same; floating-point results can differ in the last bits, within every test's tolerance,
# and runs a test compares share these flags. Runs and benchmarks keep XLA's defaults.
# (jaxlib 0.11's XLA has no such flag and aborts on unknown ones: it gets the level alone)
_EMITTERS = tuple(int(x) for x in metadata.version("jaxlib").split(".")[:2]) < (0, 11)
COMPILE_FAST = "--xla_backend_optimization_level=0" + (
    " --xla_cpu_use_fusion_emitters=false" if _EMITTERS else ""
)
# ``jax.jit(..., compiler_options=OPTIMIZED)`` for a test's own program that runs long rather
# than compiles long: XLA's defaults back (the sampler's 40,000-draw step: 14 s at level 0,
# 2.3 s at level 2)
OPTIMIZED = {"xla_backend_optimization_level": 2} | (
    {"xla_cpu_use_fusion_emitters": True} if _EMITTERS else {}
)


def xla_flags(devices: int | None = None) -> str:
    """The tests' XLA flags, on ``devices`` forced host devices where given."""
    forced = f" --xla_force_host_platform_device_count={devices}" if devices else ""
    return COMPILE_FAST + forced


def child_env(devices: int | None = None, **extra: str) -> dict[str, str]:
    """This process's environment with ``xla_flags(devices)`` (none of the caller's own XLA
    flags carry over) and ``extra``."""
    return {**os.environ, "XLA_FLAGS": xla_flags(devices), **extra}
