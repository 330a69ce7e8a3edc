"""A persistent XLA compilation cache, so a second process reuses the first one's programs."""

from __future__ import annotations

import os
from pathlib import Path

import jax

from fcjax.models.registry import cache_root


def enable_compilation_cache(path: str | os.PathLike | None = None) -> Path:
    """Stores compiled programs under ``path`` and reads them back in later processes.

    Without ``path``: a directory already configured (``JAX_COMPILATION_CACHE_DIR``) is kept,
    else ``$FCJAX_CACHE/jax`` beside the model cache. Programs that compiled in under 0.1 s
    are not stored unless the environment says otherwise. Returns the directory; call it
    before the first jitted call."""
    configured = jax.config.jax_compilation_cache_dir
    if path is None and configured:
        return Path(configured)
    path = Path(path) if path is not None else cache_root() / "jax"
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    return path
