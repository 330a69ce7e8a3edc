"""The pipeline stages over a run directory (see ``experiments.rundir``).

generate -> segment -> estimators -> hidden -> probes -> decisiveness -> metrics -> report.
``segment`` writes the contract tables ``examples.parquet`` and ``steps.parquet``; each later
stage adds its columns to them atomically, and ``metrics`` derives faithfulness and the
summary from the tables alone, so every number in ``summary.json`` can be recomputed from them.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
from absl import logging

import fcjax
import probes  # registers the probe estimator
from experiments.cluster import Processes
from experiments.config import STAGES, Settings
from experiments.rundir import Progress, RunDir, RunError, batches
from fcjax.confidence.base import EstimatorContext, check_columns, get_estimator
from fcjax.confidence.consistency_judge import PAPER_PROMPT as CONSISTENCY_PAPER
from fcjax.confidence.consistency_judge import PROMPT as CONSISTENCY_PROMPT
from fcjax.confidence.consistency_judge import REPLY_TOKENS as CONSISTENCY_TOKENS
from fcjax.confidence.consistency_judge import REQUIRED as CONSISTENCY_REQUIRED
from fcjax.confidence.trace import Trace, build_trace
from fcjax.data import DataError, Example, build_messages, load_dataset
from fcjax.decisiveness.judge import PAPER_PROMPT as DECISIVENESS_PAPER
from fcjax.decisiveness.judge import PROMPT as DECISIVENESS_PROMPT
from fcjax.decisiveness.judge import REQUIRED as DECISIVENESS_REQUIRED
from fcjax.decisiveness.judge import judge_options, judge_traces, reply_budget
from fcjax.decisiveness.lexicon import lexicon_scores
from fcjax.engine.complete import chat_completer
from fcjax.engine.generate import Generation
from fcjax.metrics import summarize, trace_columns
from fcjax.metrics.trajectory import trajectory_bin
from fcjax.protocol import judge_notes
from fcjax.store.fs import Location
from fcjax.store.tables import read_table, update_columns, write_json_atomic, write_table_atomic
from fcjax.text.chat import has_chat_template, open_think
from fcjax.text.steps import paper_selection
from fcjax.text.templates import load_template

# estimators computed in the ``estimators`` stage (``probe`` has its own stages)
PROBE = "probe"
# top log-probabilities stored per generated token
TOP_K = 5
# stages that read the examples and run the model
MODEL_STAGES = ("generate", "segment", "estimators", "hidden", "decisiveness")
# stages whose work is split over the processes (``work_*``, then ``merge_*`` on process 0);
# the others run on process 0 alone
SPLIT_STAGES = ("generate", "estimators", "hidden", "decisiveness")
# the multi-process hidden store's row split (hidden/plan.json) and rows per chunk
PLAN = "plan.json"
HIDDEN_CHUNK = 64


class ResourceError(RuntimeError):
    """The device ran out of memory even for the smallest batch."""


class Pipeline:
    """Runs the stages of one run directory with one set of settings."""

    def __init__(self, run: RunDir, settings: Settings, procs: Processes | None = None):
        self.run, self.s, self.procs = run, settings, procs or Processes()
        self._lm = None
        self._others: dict[str, Any] = {}  # judge models other than --model, by name
        self._gen_batch = settings.batch_size  # lowered when a batch exhausts device memory

    def validate(self, first: str | None, stop_after: str | None = None) -> None:
        """Loads what the pending stages need (examples, models), so bad data or a bad model
        stops the run before it changes anything in the run directory."""
        last = STAGES.index(stop_after) if stop_after else len(STAGES) - 1
        start = STAGES.index(first) if first else len(STAGES)
        pending = {
            stage
            for i, stage in enumerate(STAGES[: last + 1])
            if i >= start or not self.run.done(stage)
        }
        if not pending & set(MODEL_STAGES):
            return
        self.examples()
        n_layers = self.lm.config.num_layers
        bad = [x for x in self.s.layers if not 0 <= x <= n_layers]
        if bad and "hidden" in pending and PROBE in self.s.estimators:
            raise RunError(f"--layers: {bad} outside 0..{n_layers} (the model has {n_layers})")
        if "estimators" in pending and self._needs_judge():
            _ = self.template("consistency")
            _ = self.judge_lm
        for note in self._judge_notes():
            logging.warning("%s", note)
        if "decisiveness" in pending and self.s.decisiveness == "judge":
            _ = self.template("decisiveness")
            if self.s.decisiveness_judge == self.s.model:
                logging.warning(
                    "the decisiveness judge is the studied model %s (set explicitly)", self.s.model
                )
            _ = self.decisiveness_lm

    def _judge_notes(self) -> list[str]:
        """Where this run's judges are not the published ones (``fcjax.protocol.judge_notes``)."""
        consistency = self.s.consistency_judge if self._needs_judge() else None
        return judge_notes(self.s.proto, consistency, self.s.decisiveness_judge)

    # --- shared resources -----------------------------------------------------------------
    @property
    def lm(self):
        if self._lm is None:
            logging.info("loading model %s (%s)", self.s.model, self.s.dtype)
            self._lm = fcjax.load(self.s.model, dtype=self.s.dtype).with_decode_attention(
                self.s.decode_attention
            )
        return self._lm

    def _model(self, name: str):
        if name == self.s.model:
            return self.lm
        if name not in self._others:
            logging.info("loading judge model %s (%s)", name, self.s.dtype)
            other = fcjax.load(name, dtype=self.s.dtype)
            self._others[name] = other.with_decode_attention(self.s.decode_attention)
        return self._others[name]

    @property
    def judge_lm(self):
        """The consistency judge of the sampling estimator (``--judge_model``)."""
        return self._model(self.s.consistency_judge)

    @property
    def decisiveness_lm(self):
        """The decisiveness judge (``--decisiveness_model``, default ``--judge_model``)."""
        return self._model(self.s.decisiveness_judge)

    def template(self, kind: str) -> str:
        """The decisiveness or consistency judge prompt: fcjax's, or the flag's file."""
        path = getattr(self.s, f"{kind}_prompt")
        paper = self.s.proto.judges == "paper"
        if kind == "decisiveness":
            default = DECISIVENESS_PAPER if paper else DECISIVENESS_PROMPT
            required = DECISIVENESS_REQUIRED
        else:
            default = CONSISTENCY_PAPER if paper else CONSISTENCY_PROMPT
            required = CONSISTENCY_REQUIRED
        return load_template(path, required) if path else default

    def examples(self) -> list[Example]:
        s = self.s
        kw: dict[str, Any] = {"subset_rule": s.proto.subset}
        seed = s.seed if s.proto.study_seed is None else s.proto.study_seed
        if s.data_path:
            try:
                return load_dataset(path=s.data_path, num_examples=s.num_examples, seed=seed, **kw)
            except UnicodeDecodeError as e:
                raise DataError(f"{s.data_path}: not UTF-8 text ({e})") from None
        if s.dataset == "arithmetic":
            kw["difficulty"] = s.difficulty
        return load_dataset(name=s.dataset, num_examples=s.num_examples, seed=seed, **kw)

    def prompt(self, example: Example) -> str:
        messages = build_messages(
            example,
            intervention=self.s.intervention,
            role=self.s.intervention_role,
            system_intervention=self.s.system_intervention,
            style=self.s.proto.prompt_style,
        )
        text = self.lm.chat(messages)
        return open_think(text, self.lm.tokenizer) if self.s.proto.open_think else text

    # --- stages -----------------------------------------------------------------------------
    def run_stage(self, stage: str) -> None:
        """Runs ``stage`` unless its marker exists. A split stage runs this process's share
        (``work_<stage>``), waits for every process, and process 0 merges (``merge_<stage>``)
        and writes the marker with each process's share; another stage runs on process 0."""
        # process 0 decides, so every process takes the same path through the barriers
        if self.procs.exchange(f"{stage}:skip", self.run.done(stage))[0]:
            logging.info("stage %s: complete, skipped", stage)
            return
        t0 = time.perf_counter()
        logging.info("stage %s: start", stage)
        info: dict[str, Any] = {}
        if stage in SPLIT_STAGES:
            n = getattr(self, f"work_{stage}")()
            mine = {"examples": n, "wall_s": time.perf_counter() - t0}
            shares = self.procs.exchange(f"{stage}:work", mine)  # waits for every process
            if self.procs.main:
                info = getattr(self, f"merge_{stage}")() or {}
                info["processes"] = {str(i): share for i, share in enumerate(shares)}
        elif self.procs.main:
            info = getattr(self, f"stage_{stage}")() or {}
        if self.procs.main:
            wall = time.perf_counter() - t0
            self.run.mark(stage, {**info, "wall_s": wall})
            logging.info("stage %s: done in %.1fs", stage, wall)
        self.procs.barrier(f"{stage}:done")

    def _mine(self, name: str, chunks, cost) -> list:
        """This process's share of the pending (index, chunk) parts of ``name``: parts not
        yet written, split over the processes by ``cost(chunk)``."""
        pending = [(i, c) for i, c in chunks if not self.run.part_done(name, i)]
        return [pending[j] for j in self.procs.share(name, [cost(c) for _, c in pending])]

    def work_generate(self) -> int:
        examples = self.examples()
        params = fcjax.SamplingParams(
            temperature=self.s.temperature,
            max_new_tokens=self.s.max_new_tokens,
            seed=self.s.seed,
            logprobs=TOP_K,
        )
        chat_template = has_chat_template(self.lm.tokenizer)
        if not chat_template:
            logging.warning(
                "%s has no chat template: prompts use the plain 'Role: text' format",
                self.s.model,
            )
        # expected cost: prompt tokens (about 4 characters each) plus the generation budget
        mine = self._mine(
            "generate",
            batches(examples, self.run.part_size("generate", self.s.batch_size)),
            lambda chunk: sum(len(e.question) / 4 + self.s.max_new_tokens for e in chunk),
        )
        progress = Progress("generate", sum(len(c) for _, c in mine))
        for index, chunk in mine:
            prompts = [self.prompt(e) for e in chunk]
            gens = self._generate(prompts, list(chunk), params, progress.tokens(len(chunk)))
            _check_finite(gens, chunk)
            self.run.write_part(
                "generate",
                index,
                {
                    "example_id": [str(e.id) for e in chunk],
                    "prompt": prompts,
                    "prompt_ids": [g.prompt_ids for g in gens],
                    "output_ids": [g.token_ids for g in gens],
                    "text": [g.text for g in gens],
                    "token_logprobs": [g.token_logprobs.tolist() for g in gens],
                    "top_logprobs": [g.top_logprobs.reshape(-1).tolist() for g in gens],
                    "top_ids": [np.asarray(g.top_ids).reshape(-1).tolist() for g in gens],
                    "finish_reason": [g.finish_reason for g in gens],
                },
            )
            progress.update(len(chunk))
        return progress.done

    def merge_generate(self) -> dict:
        return {
            "n_examples": len(self.examples()),
            "chat_template": has_chat_template(self.lm.tokenizer),
        }

    def _generate(
        self, prompts: list[str], chunk: list[Example], params, progress=None
    ) -> list[Generation]:
        """``fcjax.generate`` in batches of ``self._gen_batch``, halved while a batch exhausts
        device memory (rows are seeded by example id, so batching leaves results unchanged)."""
        while True:
            size, start = self._gen_batch, 0
            try:
                gens: list[Generation] = []
                for start in range(0, len(prompts), size):
                    gens += fcjax.generate(
                        self.lm,
                        prompts[start : start + size],
                        params,
                        keys=[e.id for e in chunk[start : start + size]],
                        batch_size=size,
                        progress=progress,
                    )
                return gens
            except Exception as e:
                if not _out_of_memory(e):
                    raise
                if size == 1:
                    raise ResourceError(
                        f"out of device memory even at batch 1 (example {chunk[start].id!r}, "
                        f"--max_new_tokens={self.s.max_new_tokens}): lower --max_new_tokens, "
                        f"use --dtype=bfloat16, a smaller model or more devices (--mesh)"
                    ) from e
                self._gen_batch = max(1, min(size, len(prompts)) // 2)
                logging.warning(
                    "out of device memory at batch %d; retrying with %d",
                    min(size, len(prompts)),
                    self._gen_batch,
                )

    def generations(self) -> dict[str, tuple[str, Generation]]:
        """The stored generations by example id, as ``fcjax.generate`` returned them."""
        rows = self.run.read_parts("generate")
        if rows and "top_ids" not in rows:
            raise RunError(
                f"{self.run.parts_dir('generate')}: written by an older fcjax (no top_ids); "
                f"rerun with --redo=generate"
            )
        out = {}
        for i, eid in enumerate(rows.get("example_id", [])):
            lp = np.asarray(rows["token_logprobs"][i], np.float32)
            # [T, k]; an empty generation (EOS first) has T = 0
            top = np.asarray(rows["top_logprobs"][i], np.float32).reshape(len(lp), TOP_K)
            top_ids = np.asarray(rows["top_ids"][i], np.int32).reshape(len(lp), TOP_K)
            g = Generation(
                rows["text"][i],
                list(rows["output_ids"][i]),
                lp,
                top,
                top_ids,
                rows["finish_reason"][i],
                list(rows["prompt_ids"][i]),
            )
            out[str(eid)] = (rows["prompt"][i], g)
        return out

    def traces(self) -> list[Trace]:
        gens = self.generations()
        proto = self.s.proto
        return [
            build_trace(
                self.lm,
                e,
                gens[str(e.id)][1],
                method=proto.split_method(self.s.segmenter),
                answer_rule=proto.answer_rule,
                numbered_choices=proto.numbered_choices,
            )
            for e in self.examples()
        ]

    def stage_segment(self) -> dict:
        gens = self.generations()
        examples = self.examples()
        traces = self.traces()
        ex_cols: dict[str, list] = {
            k: []
            for k in (
                "example_id",
                "question",
                "gold",
                "kind",
                "prediction",
                "correct",
                "scorable",
                "n_steps",
                "prompt",
                "prompt_ids",
                "output_ids",
                "text",
                "finish_reason",
            )
        }
        st_cols: dict[str, list] = {
            k: []
            for k in (
                "example_id",
                "step",
                "char_start",
                "char_end",
                "token_start",
                "token_end",
                "text",
                "position",
            )
        }
        for e, tr in zip(examples, traces, strict=True):
            prompt, g = gens[str(e.id)]
            for key, value in (
                ("example_id", tr.example_id),
                ("question", e.question),
                ("gold", e.answer),
                ("kind", e.kind),
                ("prediction", tr.answer),
                ("correct", bool(tr.correct)),
                ("scorable", bool(tr.scorable)),
                ("n_steps", tr.n_steps),
                ("prompt", prompt),
                ("prompt_ids", tr.prompt_ids),
                ("output_ids", tr.output_ids),
                ("text", tr.text),
                ("finish_reason", g.finish_reason),
            ):
                ex_cols[key].append(value)
            n = tr.n_steps
            for step in tr.steps:
                st_cols["example_id"].append(tr.example_id)
                st_cols["step"].append(step.index)
                st_cols["char_start"].append(step.start)
                st_cols["char_end"].append(step.end)
                st_cols["token_start"].append(step.token_start)
                st_cols["token_end"].append(step.token_end)
                st_cols["text"].append(step.text)
                st_cols["position"].append(step.index / (n - 1) if n > 1 else 0.0)
        write_table_atomic(self.run.path / "steps.parquet", st_cols)
        write_table_atomic(self.run.path / "examples.parquet", ex_cols)
        return {
            "n_steps": len(st_cols["step"]),
            "no_steps": sum(n == 0 for n in ex_cols["n_steps"]),
            "no_answer": sum(p is None for p in ex_cols["prediction"]),
            "unscorable": sum(not x for x in ex_cols["scorable"]),
            "truncated": sum(f == "length" for f in ex_cols["finish_reason"]),
        }

    def _needs_judge(self) -> bool:
        return any(get_estimator(n).needs_judge for n in self.s.estimators if n != PROBE)

    def _ctx(self) -> EstimatorContext:
        judge = (
            chat_completer(self.judge_lm, max_new_tokens=CONSISTENCY_TOKENS)
            if self._needs_judge()
            else None
        )
        return EstimatorContext(
            self.lm,
            judge,
            k=self.s.k,
            max_steps=self.s.max_steps,
            seed=self.s.seed,
            temperature=self.s.branch_temperature,
            top_p=self.s.branch_top_p,
            max_new_tokens=self.s.branch_new_tokens,
            consistency_prompt=self.template("consistency") if judge else CONSISTENCY_PROMPT,
            protocol=self.s.proto.judges,
        )

    def work_estimators(self) -> int:
        every = self.traces()
        traces = [t for t in every if t.n_steps > 0]
        ctx = self._ctx()
        if self.s.proto.step_draw == "paper":  # one draw for the whole run, in example order
            ids, counts = [t.example_id for t in every], [t.n_steps for t in every]
            chosen = paper_selection(ids, counts, self.s.max_steps, self.s.proto.study_seed)
            ctx = dataclasses.replace(ctx, selected=chosen)
        done: set[str] = set()
        for name in self._estimator_names():
            estimator = get_estimator(name)
            part = f"estimators_{name}"
            kept_part = f"{part}_kept"  # records kept through ctx.store (e.g. samples)
            # expected cost: the trace's tokens plus the continuations of its scored steps
            mine = self._mine(
                part,
                batches(traces, self.run.part_size(part, max(1, self.s.batch_size // 4))),
                lambda chunk: sum(
                    len(t.output_ids)
                    + min(t.n_steps, self.s.max_steps) * self.s.k * self.s.branch_new_tokens
                    for t in chunk
                ),
            )
            progress = Progress(f"estimator {name}", sum(len(c) for _, c in mine), "traces")
            for index, chunk in mine:
                kept: dict[str, list] = {}
                results = estimator.score(
                    list(chunk),
                    dataclasses.replace(ctx, keep=lambda _, rows, kept=kept: _extend(kept, rows)),
                )
                if kept:  # before the columns part, which marks the batch done
                    self.run.write_part(kept_part, index, kept)
                cols: dict[str, list] = {"example_id": [], "step": []}
                for tr, res in zip(chunk, results, strict=True):
                    res = check_columns(estimator, tr, res)
                    cols["example_id"] += [tr.example_id] * tr.n_steps
                    cols["step"] += list(range(tr.n_steps))
                    for key, value in res.items():
                        cols.setdefault(key, []).extend(np.asarray(value, float).tolist())
                self.run.write_part(part, index, cols)
                progress.update(len(chunk))
                done.update(t.example_id for t in chunk)
        return len(done)

    def _estimator_names(self) -> list[str]:
        return [n for n in self.s.estimators if n != PROBE]

    def merge_estimators(self) -> dict:
        names = self._estimator_names()
        columns: dict[str, np.ndarray] = {}
        for name in names:
            part = f"estimators_{name}"
            columns.update(_align_steps(self.run.path, self.run.read_parts(part)))
            kept_rows = self.run.read_parts(f"{part}_kept")
            if kept_rows:
                write_table_atomic(self.run.path / f"{name}_samples.parquet", kept_rows)
        if columns:
            update_columns(self.run.path / "steps.parquet", columns)
        return {"estimators": names}

    def _hidden_layers(self) -> list[int]:
        return list(self.s.layers) or list(range(self.lm.config.num_layers + 1))

    def _hidden_root(self) -> Location:
        """``hidden/`` (step-end states) or ``hidden_mean/`` (means over each step)."""
        return self.run.path / ("hidden_mean" if self.s.probe_features == "mean" else "hidden")

    def work_hidden(self) -> int:
        """Captures the step-end states of this process's traces into ``hidden/``: one
        store with one process; with several, process 0 pre-sizes one array and each process
        fills its own chunk-aligned row range (kept across a rerun with the same split)."""
        if PROBE not in self.s.estimators:
            return 0
        from fcjax.store.hidden import HiddenStore

        root, layers = self._hidden_root(), self._hidden_layers()
        width, dtype = self.lm.config.hidden_size, self.s.hidden_dtype
        traces = [t for t in self.traces() if t.n_steps > 0]
        if self.procs.count == 1:
            if (root / PLAN).exists():  # left by a multi-process run: another layout
                root.rmtree()
            store = HiddenStore(root, layers=layers, width=width, dtype=dtype)
            n = self._capture_into(store, traces)
            self._hidden_rows = store.finalize()
            return n
        # the split covers every trace (not only the pending ones), so a rerun with the same
        # processes finds the same row ranges and keeps what they hold
        shares = self.procs.split("hidden", [len(t.prompt_ids) + len(t.output_ids) for t in traces])
        rows = [sum(traces[i].n_steps for i in share) for share in shares]
        offsets = [0]
        for n in rows[:-1]:  # chunk-aligned ranges, one chunk at least, so none coincide
            offsets.append(offsets[-1] + max(-(-n // HIDDEN_CHUNK), 1) * HIDDEN_CHUNK)
        plan = {"layers": layers, "width": width, "offsets": offsets, "rows": rows}
        if self.procs.main:
            old = json.loads((root / PLAN).read_text()) if (root / PLAN).exists() else None
            if old != plan or not (root / "states").exists():
                HiddenStore.create_shared(
                    root, layers, width, offsets[-1] + rows[-1], dtype, chunk_rows=HIDDEN_CHUNK
                )
                write_json_atomic(root / PLAN, plan)
        self.procs.barrier("hidden:created")
        me, ends = self.procs.index, [*offsets[1:], offsets[-1] + rows[-1]]
        store = HiddenStore(
            root,
            layers=layers,
            width=width,
            dtype=dtype,
            chunk_rows=HIDDEN_CHUNK,
            row_offset=offsets[me],
            num_rows=ends[me] - offsets[me],
        )
        n = self._capture_into(store, [traces[i] for i in shares[me]])
        store.finalize()
        return n

    def _capture_into(self, store, traces: list[Trace]) -> int:
        """Captures the traces ``store`` lacks, a batched forward per chunk of traces."""
        from fcjax.engine.capture import capture

        layers, mean = self._hidden_layers(), self.s.probe_features == "mean"
        todo = [t for t in traces if (t.example_id, t.n_steps - 1) not in store]
        progress = Progress("hidden", len(todo), "traces")
        size = max(1, min(self.s.batch_size, 16))
        for start in range(0, len(todo), size):
            chunk = todo[start : start + size]
            spans = [_step_spans(t) for t in chunk]
            if mean:  # every token of every step, averaged per step below
                where = [[p for a, b in sp for p in range(a, b)] for sp in spans]
            else:
                where = [[b - 1 for _, b in sp] for sp in spans]
            caps = capture(self.lm, [t.prompt_ids + t.output_ids for t in chunk], where, layers)
            for tr, cap, sp in zip(chunk, caps, spans, strict=True):
                states = cap.states
                if mean:
                    sizes = np.array([b - a for a, b in sp])
                    starts = np.cumsum(sizes) - sizes
                    states = np.add.reduceat(states, starts, axis=0) / sizes[:, None, None]
                store.write(tr.example_id, list(range(tr.n_steps)), states)
            progress.update(len(chunk))
        return len(todo)

    def merge_hidden(self) -> dict:
        if PROBE not in self.s.estimators:
            return {"skipped": "probe estimator not requested"}
        from fcjax.store.hidden import HiddenStore

        if self.procs.count == 1:
            rows = self._hidden_rows
        else:
            rows = HiddenStore.finalize_shared(self._hidden_root(), self.procs.count)
        return {
            "rows": rows,
            "layers": self._hidden_layers(),
            "dtype": self.s.hidden_dtype,
            "features": self.s.probe_features,
        }

    def stage_probes(self) -> dict:
        if PROBE not in self.s.estimators:
            return {"skipped": "probe estimator not requested"}
        from probes.train import run_probe_stage

        try:  # on process 0 alone (probes.trainer.default_mesh: one device there)
            return run_probe_stage(
                self.run.path,
                folds=self.s.folds,
                label=self.s.probe_label,
                seed=self.s.seed,
                families=self.s.probe_family,
                features=self.s.probe_features,
                batch_size=self.s.probe_batch,
                checkpoint=self.s.probe_checkpoint or None,
                reps=self.s.bootstrap,
                model_name=self.s.model,
            )
        except probes.TooFewLabels as e:
            # a legitimate outcome of a small run, recorded in summary.json counts.not_scored;
            # anything else fails the run
            logging.warning("probe stage: no probe trained (%s); conf_probe left empty", e)
            n = len(read_table(self.run.path / "steps.parquet", ["step"])["step"])
            update_columns(self.run.path / "steps.parquet", {"conf_probe": np.full(n, np.nan)})
            return {"not_scored": f"too few labels: {e}"}

    def work_decisiveness(self) -> int:
        """The judge's replies for this process's traces (the lexicon needs no model)."""
        if self.s.decisiveness != "judge":
            return 0
        steps = read_table(self.run.path / "steps.parquet", ["example_id", "step", "text"])
        texts = list(steps["text"])
        sampling, judging = judge_options(self.s.proto.judges)
        complete = chat_completer(
            self.decisiveness_lm, max_new_tokens=reply_budget(self.s.judge_batch), **sampling
        )
        template = self.template("decisiveness")
        eids = np.asarray(steps["example_id"]).astype(str)
        order = list(dict.fromkeys(eids.tolist()))
        n_steps = Counter(eids.tolist())
        mine = self._mine(
            "decisiveness",
            batches(order, self.run.part_size("decisiveness", max(1, self.s.batch_size // 2))),
            lambda chunk: sum(n_steps[eid] for eid in chunk),  # the judge reads every step
        )
        progress = Progress("decisiveness judge", sum(len(c) for _, c in mine), "traces")
        for index, chunk in mine:
            out: dict[str, list] = {
                "example_id": [],
                "step": [],
                "d": [],
                "fallback": [],
                "failed": [],
            }
            rows = [np.flatnonzero(eids == eid) for eid in chunk]
            judged = judge_traces(
                [[texts[r] for r in rs] for rs in rows],
                complete,
                batch_size=self.s.judge_batch,
                template=template,
                **judging,
            )
            for eid, rs, j in zip(chunk, rows, judged, strict=True):
                out["example_id"] += [eid] * len(rs)
                out["step"] += np.asarray(steps["step"])[rs].tolist()
                out["d"] += j.scores.tolist()
                out["fallback"] += [j.fallback] * len(rs)
                out["failed"] += [j.failed] * len(rs)
            self.run.write_part("decisiveness", index, out)
            progress.update(len(chunk))
        return progress.done

    def merge_decisiveness(self) -> dict:
        steps = read_table(self.run.path / "steps.parquet", ["text"])
        cols = {"decisiveness_lexicon": lexicon_scores(list(steps["text"]))}
        info: dict[str, Any] = {"source": self.s.decisiveness, "judge": self.s.decisiveness_judge}
        if self.s.decisiveness == "judge":
            parts = self.run.read_parts("decisiveness")
            merged = _align_steps(self.run.path, parts)
            cols["decisiveness_judge"] = merged["d"]
            cols["decisiveness"] = merged["d"]
            for key in ("fallback", "failed"):  # replies (batches), counted once per trace
                per_trace = dict(zip(parts["example_id"], parts[key], strict=True))
                info[f"judge_{key}_batches"] = int(sum(per_trace.values()))
            info["judge_missing_steps"] = int(np.isnan(merged["d"]).sum())
        else:
            cols["decisiveness"] = cols["decisiveness_lexicon"]
        update_columns(self.run.path / "steps.parquet", cols)
        return info

    def stage_metrics(self) -> dict:
        """Faithfulness columns and summary.json, from the two tables alone."""
        steps_path, examples_path = (
            self.run.path / "steps.parquet",
            self.run.path / "examples.parquet",
        )
        steps, examples = read_table(steps_path), read_table(examples_path)
        estimators = {
            n: get_estimator(n).trace_reduce for n in self.s.estimators if f"conf_{n}" in steps
        }
        step_cols, ex_cols = trace_columns(steps, examples, estimators)
        step_cols["trajectory_bin"] = trajectory_bin(
            steps["position"], closed=self.s.proto.trajectory_closed
        )
        update_columns(steps_path, step_cols)
        update_columns(examples_path, ex_cols)
        probe_info = self.run.info("probes")
        not_scored = {PROBE: probe_info["not_scored"]} if "not_scored" in probe_info else {}
        decisiveness = self.run.info("decisiveness")
        summary = summarize(
            steps,
            examples,
            estimators,
            not_scored=not_scored,
            stage_wall_s={s: self.run.info(s).get("wall_s") for s in STAGES if self.run.done(s)},
            config=self.s.config(),
            binning=self.s.binning,
            bootstrap=self.s.bootstrap,
            seed=self.s.seed,
            counts={
                "decisiveness_judge": self.s.decisiveness_judge,
                "decisiveness_fallback": decisiveness.get("judge_fallback_batches", 0),
                "decisiveness_failed": decisiveness.get("judge_failed_batches", 0),
                "protocol_notes": self._judge_notes(),
            },
            protocol=self.s.protocol,
        )
        write_json_atomic(self.run.path / "summary.json", summary)
        return {"estimators": list(estimators)}

    def stage_report(self) -> dict:
        from experiments.report import write_report

        write_report(self.run.path)
        return {}


def _extend(columns: dict[str, list], rows: dict[str, list]) -> None:
    for key, values in rows.items():
        columns.setdefault(key, []).extend(values)


def _out_of_memory(error: Exception) -> bool:
    """True for an XLA RESOURCE_EXHAUSTED / out-of-memory runtime error."""
    import jax

    message = str(error)
    return isinstance(error, jax.errors.JaxRuntimeError) and (
        "RESOURCE_EXHAUSTED" in message or "out of memory" in message.lower()
    )


def _check_finite(gens: Sequence[Generation], examples: Sequence[Example]) -> None:
    for g, e in zip(gens, examples, strict=True):
        if g.token_logprobs.size and not np.all(np.isfinite(g.token_logprobs)):
            raise FloatingPointError(
                f"example {e.id!r}: the model produced non-finite log-probabilities (NaN/inf "
                f"logits); check the weights and dtype"
            )


def _align_steps(run_path: Location, parts: dict[str, list]) -> dict[str, np.ndarray]:
    """Orders per-step part columns like steps.parquet (NaN where a step has no row)."""
    steps = read_table(run_path / "steps.parquet", ["example_id", "step"])
    index = {
        (str(e), int(s)): i
        for i, (e, s) in enumerate(zip(steps["example_id"], steps["step"], strict=True))
    }
    n = len(index)
    out = {}
    rows = [
        index.get((str(e), int(s)))
        for e, s in zip(parts.get("example_id", []), parts.get("step", []), strict=True)
    ]
    for key, values in parts.items():
        if key in ("example_id", "step"):
            continue
        col = np.full(n, np.nan)
        for r, v in zip(rows, values, strict=True):
            if r is not None:
                col[r] = np.nan if v is None else float(v)
        out[key] = col
    return out


def _step_spans(trace: Trace) -> list[tuple[int, int]]:
    """[start, end) sequence positions (prompt + output) of each step's tokens."""
    off = len(trace.prompt_ids)
    return [(off + s.token_start, off + s.token_end) for s in trace.steps]
