"""The estimator plug-in contract: ``Estimator``, ``EstimatorContext`` and the registry.

An estimator scores every step of every trace. ``score`` returns, per trace, a dict of
columns of length ``n_steps``: always ``conf_<name>`` in [0, 1] (NaN where the step was not
scored) plus any raw columns it wants to keep (``deepconf_raw``, ``sampling_unparsed``...).
The trace-level confidence is ``fcjax.metrics.trace_confidence(conf_<name>,
estimator.trace_reduce)``.

Adding an estimator is one new module in ``fcjax/confidence`` with a class decorated by
``@register``; ``get_estimator`` imports every module of the package the first time it is
asked, so no other file changes. Estimators defined elsewhere register when imported.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import pkgutil
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from fcjax.confidence.consistency_judge import PROMPT as CONSISTENCY_PROMPT
from fcjax.confidence.trace import Trace
from fcjax.engine.sampling import SamplingParams
from fcjax.metrics.summary import Reduce
from fcjax.text.chat import Messages

Complete = Callable[[list[Messages]], list[str]]
Columns = dict[str, np.ndarray]


class EstimatorError(ValueError):
    """An unknown estimator name, a missing requirement, or columns that do not fit."""


@dataclasses.dataclass(frozen=True)
class EstimatorContext:
    """What estimators share: the model, the judge and the sampling budget.

    ``judge_complete`` maps chat-message lists to reply strings (e.g.
    ``fcjax.engine.complete.chat_completer``); only judge-based estimators need it.
    ``k``, ``max_steps`` and the branch sampling settings are METHOD.md 4.3's defaults.
    ``consistency_prompt`` is the consistency judge's template ({context}, {assertion}).
    ``progress(estimator_name, traces_done, n_traces)`` is called after each trace.
    ``keep(estimator_name, rows)`` receives records an estimator wants stored beside the
    step table (columns of equal length, e.g. the sampling estimator's continuations and
    judge verdicts); estimators call ``ctx.store``, which does nothing without ``keep``.
    """

    lm: Any
    judge_complete: Complete | None = None
    k: int = 10
    max_steps: int = 20
    seed: int = 0
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 200
    consistency_prompt: str = CONSISTENCY_PROMPT
    progress: Callable[[str, int, int], None] | None = None
    keep: Callable[[str, dict[str, list]], None] | None = None
    # --protocol=paper (fcjax.protocol.Protocol.judges): the published consistency judging;
    # ``selected``: the steps each trace samples from (``paper_step_draw``), by example id
    protocol: str = "fcjax"
    selected: Mapping[str, Sequence[int]] | None = None

    def __post_init__(self):
        if self.k < 1:
            raise EstimatorError(f"EstimatorContext.k must be >= 1, got {self.k}")
        if self.max_steps < 1:
            raise EstimatorError(f"EstimatorContext.max_steps must be >= 1, got {self.max_steps}")

    def branch_params(self, stop: tuple[str, ...] = ()) -> SamplingParams:
        """Sampling settings of continuations from step prefixes."""
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            max_new_tokens=self.max_new_tokens,
            stop=stop,
            seed=self.seed,
            logprobs=0,
        )

    def store(self, name: str, rows: dict[str, list]) -> None:
        if self.keep is not None:
            self.keep(name, rows)

    def report(self, name: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(name, done, total)


class Estimator(abc.ABC):
    """A per-step intrinsic confidence estimator (see the module docstring)."""

    name: ClassVar[str]
    trace_reduce: ClassVar[Reduce] = "mean"
    needs_judge: ClassVar[bool] = False  # reads ``ctx.judge_complete``
    # samples K continuations from each scored step: a trace costs K x steps generations,
    # not one forward pass, so runners hand it fewer traces at a time
    samples: ClassVar[bool] = False

    @property
    def column(self) -> str:
        return f"conf_{self.name}"

    @abc.abstractmethod
    def score(self, traces: Sequence[Trace], ctx: EstimatorContext) -> list[Columns]:
        """Per trace, columns of length ``n_steps`` (``conf_<name>`` always among them)."""


REGISTRY: dict[str, type[Estimator]] = {}


def register(cls: type[Estimator]) -> type[Estimator]:
    """Class decorator adding an estimator to ``REGISTRY`` under ``cls.name``."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        raise EstimatorError(f"{cls.__qualname__}: `name` must be an identifier, got {name!r}")
    if cls.trace_reduce not in ("mean", "last"):
        raise EstimatorError(
            f"{cls.__qualname__}: trace_reduce must be 'mean' or 'last', got {cls.trace_reduce!r}"
        )
    existing = REGISTRY.get(name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise EstimatorError(f"estimator {name!r} is already registered by {existing.__qualname__}")
    REGISTRY[name] = cls
    return cls


_DISCOVERED = False


def _discover() -> None:
    """Imports every module of fcjax.confidence once, so their ``@register`` calls run."""
    global _DISCOVERED
    if _DISCOVERED:
        return
    import fcjax.confidence as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")
    _DISCOVERED = True


def available_estimators() -> list[str]:
    _discover()
    return sorted(REGISTRY)


def get_estimator(name: str | Estimator, **params: Any) -> Estimator:
    """An estimator instance by registry name (``params`` go to its constructor); an
    ``Estimator`` instance is returned as it is."""
    if isinstance(name, Estimator):
        if params:
            raise EstimatorError("get_estimator: params given with an estimator instance")
        return name
    _discover()
    if name not in REGISTRY:
        raise EstimatorError(
            f"unknown estimator {name!r}; valid names: {', '.join(sorted(REGISTRY))} "
            f"(estimators defined outside fcjax register when imported: `import probes` "
            f"adds 'probe')"
        )
    return REGISTRY[name](**params)


def check_columns(estimator: Estimator, trace: Trace, columns: Columns) -> Columns:
    """Validates one trace's columns: ``conf_<name>`` present, every column [n_steps],
    confidences inside [0, 1] or NaN."""
    where = f"estimator {estimator.name!r} on trace {trace.example_id!r}"
    if estimator.column not in columns:
        raise EstimatorError(f"{where}: missing column {estimator.column!r}")
    out = {}
    for key, value in columns.items():
        arr = np.asarray(value, np.float64)
        if arr.shape != (trace.n_steps,):
            raise EstimatorError(
                f"{where}: column {key!r} has shape {arr.shape}, expected ({trace.n_steps},)"
            )
        out[key] = arr
    conf = out[estimator.column]
    bad = np.isfinite(conf) & ((conf < 0) | (conf > 1))
    if bad.any():
        raise EstimatorError(
            f"{where}: {estimator.column} outside [0, 1] at steps {np.flatnonzero(bad).tolist()}"
        )
    return out


def run_estimators(
    traces: Sequence[Trace],
    names: Sequence[str | Estimator],
    ctx: EstimatorContext,
) -> list[Columns]:
    """Runs each estimator over all traces and merges their columns per trace; a column
    name produced by two estimators is an error."""
    merged: list[Columns] = [{} for _ in traces]
    for name in names:
        estimator = get_estimator(name)
        results = estimator.score(list(traces), ctx)
        if len(results) != len(traces):
            raise EstimatorError(
                f"estimator {estimator.name!r} returned {len(results)} results for "
                f"{len(traces)} traces"
            )
        for trace, columns, out in zip(traces, results, merged, strict=True):
            columns = check_columns(estimator, trace, columns)
            clash = sorted(set(columns) & set(out))
            if clash:
                raise EstimatorError(
                    f"estimator {estimator.name!r} writes columns {clash} already written"
                )
            out.update(columns)
    return merged


def nan_columns(n_steps: int, *names: str) -> Columns:
    """Columns of NaN (steps not scored)."""
    return {name: np.full(n_steps, np.nan) for name in names}
