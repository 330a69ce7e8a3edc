"""The stage registry: every stage of a run, in order, with the outputs it owns.

generate -> segment -> estimators -> hidden -> probes -> decisiveness -> metrics -> report.
``segment`` writes the contract tables ``examples.parquet`` and ``steps.parquet``; each later
stage adds its columns to them atomically, and ``metrics`` derives faithfulness and the
summary from the tables alone, so every number in ``summary.json`` can be recomputed from them.

This table is the one place that names a stage's outputs: ``RunDir`` reads it to tell
whether a stage has started, to remove a stage's outputs (``--redo``, changed flags) and to
check that parts and columns are written by their owner; ``experiments.stages.pipeline``
reads it to run a stage (on every process or on process 0 alone) and to resume it. Each
stage's code is the module ``experiments.stages.<name>``: a split stage defines
``work(ctx) -> int`` (this process's share) and ``merge(ctx) -> dict`` (process 0), another
stage ``run(ctx) -> dict``; the dict goes into the stage's marker.

This module is data only (no imports of the stage modules), so ``experiments.rundir`` and
``experiments.config`` can read it.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
from types import ModuleType


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One stage. ``files``: glob patterns (relative to the run directory) of the files and
    directories it creates; ``parts``: glob patterns of its resumable parts directories
    (``stages/<name>/``); ``columns``: the tables it adds columns to, each with the columns
    known in advance (columns named at run time, e.g. an estimator's, are recorded when
    written, ``RunDir.add_columns``)."""

    name: str
    split: bool = False  # every process works on its share, process 0 merges
    model: bool = False  # reads the examples and a model (checked before the run changes)
    files: tuple[str, ...] = ()
    parts: tuple[str, ...] = ()
    columns: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def tables(self) -> dict[str, tuple[str, ...]]:
        return dict(self.columns)

    def owns_part(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.parts)

    def module(self) -> ModuleType:
        """The stage's code, ``experiments.stages.<name>``."""
        return importlib.import_module(f"{__name__}.{self.name}")


EXAMPLES, STEPS = "examples.parquet", "steps.parquet"

REGISTRY: tuple[StageSpec, ...] = (
    StageSpec("generate", split=True, model=True, parts=("generate",)),
    StageSpec("segment", model=True, files=(EXAMPLES, STEPS)),
    StageSpec(
        "estimators",
        split=True,
        model=True,
        parts=("estimators_*",),  # estimators_<name> and estimators_<name>_kept
        files=("*_samples.parquet",),  # records an estimator keeps, e.g. sampling's
        columns=((STEPS, ()),),  # each estimator's conf_<name> and extra columns
    ),
    # step-end states (hidden/) or step means (hidden_mean/): probes.train.FEATURES
    StageSpec("hidden", split=True, model=True, files=("hidden", "hidden_mean")),
    StageSpec("probes", files=("probes",), columns=((STEPS, ("conf_probe",)),)),
    StageSpec(
        "decisiveness",
        split=True,
        model=True,
        parts=("decisiveness",),
        columns=((STEPS, ("decisiveness", "decisiveness_lexicon", "decisiveness_judge")),),
    ),
    StageSpec(
        "metrics",
        files=("summary.json",),
        # faith_<E> and trajectory_bin; conf_<E>, faith_<E> per trace
        columns=((STEPS, ("trajectory_bin",)), (EXAMPLES, ())),
    ),
    StageSpec("report", files=("report.html", "plots")),
)

STAGES: tuple[str, ...] = tuple(s.name for s in REGISTRY)
SPECS: dict[str, StageSpec] = {s.name: s for s in REGISTRY}


def spec(name: str) -> StageSpec:
    if name not in SPECS:
        raise ValueError(f"unknown stage {name!r}; valid: {', '.join(STAGES)}")
    return SPECS[name]


def part_owner(name: str) -> StageSpec:
    """The stage whose parts ``name`` are."""
    owners = [s for s in REGISTRY if s.owns_part(name)]
    if len(owners) != 1:
        raise ValueError(f"parts {name!r} belong to no stage of the registry")
    return owners[0]


def __getattr__(name: str):
    """The names this package had as one module (``experiments.stages.Pipeline``, ...),
    imported on first use so that reading the registry imports no stage code."""
    if name == "Pipeline":
        from experiments.stages.pipeline import Pipeline

        return Pipeline
    if name == "ResourceError":
        from experiments.stages.generate import ResourceError

        return ResourceError
    if name == "Settings":
        from experiments.config import Settings

        return Settings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
