"""Runs the stages of ``experiments.stages.REGISTRY`` over one run directory."""

from __future__ import annotations

import time

from absl import logging

from experiments import logs
from experiments.cluster import Processes
from experiments.config import Settings
from experiments.rundir import RunDir
from experiments.stages import REGISTRY, STAGES, spec
from experiments.stages.context import PROBE, Context
from fcjax.engine.imported import check_records


class Pipeline:
    """The stages of one run directory with one set of settings."""

    def __init__(self, run: RunDir, settings: Settings, procs: Processes | None = None):
        self.ctx = Context(run, settings, procs)

    def pending(self, first: str | None, stop_after: str | None = None) -> list[str]:
        """The stages this run will execute: from ``first`` on (a redo), and every
        unfinished one, up to ``stop_after``."""
        last = STAGES.index(stop_after) if stop_after else len(STAGES) - 1
        start = STAGES.index(first) if first else len(STAGES)
        return [
            s for i, s in enumerate(STAGES[: last + 1]) if i >= start or not self.ctx.run.done(s)
        ]

    def validate(self, first: str | None, stop_after: str | None = None) -> None:
        """Loads what the pending stages need (examples, models, prompts), so bad data or
        a bad model stops the run before it changes anything in the run directory."""
        from experiments.stages import estimators

        ctx, s = self.ctx, self.ctx.s
        pending = set(self.pending(first, stop_after))
        if not any(spec(st).model for st in pending):
            return
        ctx.examples()
        _ = ctx.lm
        if s.traces and "generate" in pending:  # records whose tokens the model refuses
            check_records(ctx.lm, ctx.trace_records())
        if "hidden" in pending and PROBE in s.estimators:
            ctx.check_layers()
        if "estimators" in pending and estimators.needs_judge(ctx):
            _ = ctx.template("consistency")
            _ = ctx.judge_lm
        for note in ctx.judge_notes(estimators.needs_judge(ctx)):
            logging.warning("%s", note)
        if "decisiveness" in pending and s.decisiveness == "judge":
            _ = ctx.template("decisiveness")
            if s.decisiveness_judge == s.model:
                logging.warning(
                    "the decisiveness judge is the studied model %s (set explicitly)", s.model
                )
            _ = ctx.decisiveness_lm

    def run_stage(self, stage: str) -> None:
        """Runs ``stage`` unless its marker exists. A split stage runs this process's share
        (``work``), waits for every process, and process 0 merges (``merge``) and writes the
        marker with each process's share; another stage runs on process 0 (``run``)."""
        ctx, st = self.ctx, spec(stage)
        procs = ctx.procs
        # process 0 decides, so every process takes the same path through the barriers
        if procs.exchange(f"{stage}:skip", ctx.run.done(stage))[0]:
            logging.info("stage %s: complete, skipped", stage)
            return
        t0 = time.perf_counter()
        logging.info("stage %s: start", stage)
        code, info = st.module(), {}  # the stage's code; its marker's content
        if st.split:
            mine = {"examples": code.work(ctx), "wall_s": time.perf_counter() - t0}
            shares = procs.exchange(f"{stage}:work", mine)  # waits for every process
            if procs.main:
                info = code.merge(ctx) or {}
                info["processes"] = {str(i): share for i, share in enumerate(shares)}
        elif procs.main:
            info = code.run(ctx) or {}
        if procs.main:
            wall = time.perf_counter() - t0
            ctx.run.mark(stage, {**info, "wall_s": wall})
            logging.info("stage %s: done in %.1fs", stage, wall)
        procs.barrier(f"{stage}:done")

    def run_all(self, stop_after: str | None = None) -> None:
        """Every stage in order (one console line each), up to ``stop_after``."""
        for st in REGISTRY:
            with logs.Stage(st.name, skipped=self.ctx.run.done(st.name)):
                self.run_stage(st.name)
            if st.name == stop_after:
                break
