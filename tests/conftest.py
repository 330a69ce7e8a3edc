import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny_models import TINY_CONFIGS, build_tiny

import fcjax

# compiled programs persist across test sessions, and the subprocesses tests start share them
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(fcjax.enable_compilation_cache()))


@pytest.fixture(scope="session", params=sorted(TINY_CONFIGS))
def tiny_model_dir(request, tmp_path_factory):
    """An HF directory holding one tiny random model per family/config."""
    return build_tiny(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (real weights, float32), loaded once for every test that reads
    it, so they also share its compiled programs."""
    import fcjax

    return fcjax.load("smollm2-135m-instruct", dtype="float32")
