import os
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from child_env import COMPILE_FAST

# before JAX starts its CPU backend; flags the caller set come after, so they win
os.environ["XLA_FLAGS"] = f"{COMPILE_FAST} {os.environ.get('XLA_FLAGS', '')}".strip()
# before JAX is imported (it reads these then): every program goes to the persistent cache, so
# the processes tests start reuse this one's (at level 0 most compile in under the 0.1 s a
# run's cache requires: test_run_e2e stored 1 program, and 74 with this)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

from tiny_models import TINY_CONFIGS, build_tiny, build_tiny_chat

import fcjax

# each pytest-xdist worker's share of the cores for torch's OpenMP threads (torch only: the
# processes tests start keep their defaults): OpenMP threads spin while they wait, so two
# workers' torch threads on two cores starve the other worker's XLA (test_real_smollm2 and
# test_engine side by side on this 2-core machine: 202 s, 140 s with this; the transformers
# generate test 45 s, 17.5 s)
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    import torch

    _share = (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    torch.set_num_threads(max(1, _share))

# compiled programs persist across test sessions, and the subprocesses tests start share them
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(fcjax.enable_compilation_cache()))


# the test groups that take longest (``./dev test --all --durations``), scheduled first in
# this order, the others after them by their number of tests: the two workers then finish
# together (a cost hint: it orders work, never selects it)
LONGEST_FIRST = (
    "smollm2",
    "test_engine",
    "test_reliability",
    "test_run_e2e",
    "test_benchmark",
    "test_multihost_run",
    "test_traces",
    "test_sampling",
    "test_engine_proxies",
    "test_attention_pallas",
    "test_probe_research",
    "test_probes",
)


def pytest_itemcollected(item):
    """A test that reads real weights is an integration test (pyproject.toml's markers)."""
    if item.get_closest_marker("real"):
        item.add_marker(pytest.mark.integration)


def pytest_configure(config):
    if getattr(config.option, "dist", None) == "loadgroup":
        config.option.loadscopereorder = False  # the order is set below


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``./dev test`` runs ``-n 2 --dist loadgroup``): each module's
    tests stay on one worker, so module fixtures are built once, and the modules that read
    the real SmolLM2 share one worker and its one load (``smollm2``). Groups are scheduled
    in the order of ``LONGEST_FIRST``, then by their number of tests.

    Collection runs on the workers, where xdist sets ``loadgroup`` (and ``numprocesses`` to
    None). xdist 3.8 appends the group to ``item._nodeid``, which pytest 9 no longer reads
    (it keeps ``item._id``): where the node id came back without its group, it is added
    here, else every test would be scheduled alone and module fixtures built per worker."""
    if not getattr(config.option, "loadgroup", False):
        return (yield)
    real = {item.module for item in items if "smollm2" in getattr(item, "fixturenames", ())}
    groups = {}
    for item in items:
        group = "smollm2" if item.module in real else item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group))
        groups[item] = group
    result = yield  # xdist's own hook (and -k/-m deselection) run here
    for item in items:
        suffix = f"@{groups[item]}"
        if hasattr(item, "_id") and not item.nodeid.endswith(suffix):
            from _pytest.nodeid import NodeId

            item._id = NodeId.parse(item.nodeid + suffix)
    sizes = Counter(groups[item] for item in items)
    rank = {group: i for i, group in enumerate(LONGEST_FIRST)}
    order = {item: i for i, item in enumerate(items)}
    items.sort(
        key=lambda item: (
            rank.get(groups[item], len(rank)),
            -sizes[groups[item]],
            groups[item],
            order[item],
        )
    )
    return result


@pytest.fixture(scope="session", params=sorted(TINY_CONFIGS))
def tiny_model_dir(request, tmp_path_factory):
    """An HF directory holding one tiny random model per family/config."""
    return build_tiny(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    """A tiny random Llama with SmolLM2's tokenizer and chat template (``build_tiny_chat``),
    built once per test module."""
    return build_tiny_chat(tmp_path_factory.mktemp("tinychat"))


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (real weights, float32), loaded once for every test that reads
    it, so they also share its compiled programs."""
    import fcjax

    return fcjax.load("smollm2-135m-instruct", dtype="float32")
