"""What every stage shares: the settings, the run directory, the processes, the examples and
the models (loaded on first use), and this process's share of a stage's parts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from absl import logging

import fcjax
from experiments.cluster import Processes
from experiments.config import Settings
from experiments.rundir import RunDir, RunError
from fcjax.confidence.consistency_judge import PAPER_PROMPT as CONSISTENCY_PAPER
from fcjax.confidence.consistency_judge import PROMPT as CONSISTENCY_PROMPT
from fcjax.confidence.consistency_judge import REQUIRED as CONSISTENCY_REQUIRED
from fcjax.confidence.trace import Trace, build_trace
from fcjax.data import Example, build_messages, load_dataset
from fcjax.data.traces import select_traces
from fcjax.decisiveness.judge import PAPER_PROMPT as DECISIVENESS_PAPER
from fcjax.decisiveness.judge import PROMPT as DECISIVENESS_PROMPT
from fcjax.decisiveness.judge import REQUIRED as DECISIVENESS_REQUIRED
from fcjax.protocol import judge_notes
from fcjax.text.chat import open_think
from fcjax.text.templates import load_template

# the estimator with its own stages (hidden, probes), not run in ``estimators``
PROBE = "probe"


class Context:
    """One run's shared state; stages read it and write through ``run``."""

    def __init__(self, run: RunDir, settings: Settings, procs: Processes | None = None):
        self.run, self.s, self.procs = run, settings, procs or Processes()
        self.models: dict[str, Any] = {}  # loaded models by name (--model and the judges)
        self.gen_batch = settings.batch_size  # lowered when a batch exhausts device memory
        self._examples: list[Example] | None = None

    # --- models -----------------------------------------------------------------------------
    def model(self, name: str):
        """The model ``name`` with the run's dtype and decode attention, loaded once."""
        if name not in self.models:
            role = "model" if name == self.s.model else "judge model"
            logging.info("loading %s %s (%s)", role, name, self.s.dtype)
            lm = fcjax.load(name, dtype=self.s.dtype)
            self.models[name] = lm.with_decode_attention(self.s.decode_attention)
        return self.models[name]

    @property
    def lm(self):
        """The studied model (``--model``)."""
        return self.model(self.s.model)

    @property
    def judge_lm(self):
        """The consistency judge of the sampling estimator (``--judge_model``)."""
        return self.model(self.s.consistency_judge)

    @property
    def decisiveness_lm(self):
        """The decisiveness judge (``--decisiveness_model``, default ``--judge_model``)."""
        return self.model(self.s.decisiveness_judge)

    def template(self, kind: str) -> str:
        """The decisiveness or consistency judge prompt: the protocol's, or the flag's file."""
        path = getattr(self.s, f"{kind}_prompt")
        paper = self.s.proto.judges == "paper"
        if kind == "decisiveness":
            default = DECISIVENESS_PAPER if paper else DECISIVENESS_PROMPT
            required = DECISIVENESS_REQUIRED
        else:
            default = CONSISTENCY_PAPER if paper else CONSISTENCY_PROMPT
            required = CONSISTENCY_REQUIRED
        return load_template(path, required) if path else default

    def judge_notes(self, consistency: bool) -> list[str]:
        """Where this run's judges are not the published ones (``fcjax.protocol.judge_notes``);
        ``consistency``: whether the run uses the consistency judge."""
        judge = self.s.consistency_judge if consistency else None
        return judge_notes(self.s.proto, judge, self.s.decisiveness_judge)

    # --- examples and traces ----------------------------------------------------------------
    def examples(self) -> list[Example]:
        """The run's examples (``--dataset``, ``--data_path`` or ``--traces``), loaded once;
        the subset is drawn by the protocol's rule."""
        if self._examples is None:
            s = self.s
            if s.traces:
                self._examples = [r.example for r in self.trace_records()]
            elif s.data_path:
                self._examples = load_dataset(
                    path=s.data_path, num_examples=s.num_examples, **self._subset()
                )
            else:
                kw = {"difficulty": s.difficulty} if s.dataset == "arithmetic" else {}
                self._examples = load_dataset(
                    name=s.dataset, num_examples=s.num_examples, **self._subset(), **kw
                )
        return self._examples

    def _subset(self) -> dict[str, Any]:
        """How the run's subset is drawn: the protocol's rule and seed (the published
        study's own seed under ``paper``, else ``--seed``)."""
        proto = self.s.proto
        seed = self.s.seed if proto.study_seed is None else proto.study_seed
        return {"seed": seed, "subset_rule": proto.subset}

    def trace_records(self):
        """The ``--traces`` records this run studies (the subset rule as for a dataset)."""
        s, sub = self.s, self._subset()
        return select_traces(s.traces, s.num_examples, sub["seed"], sub["subset_rule"])

    def prompt(self, example: Example) -> str:
        """The exact text given to the model for ``example``."""
        messages = build_messages(
            example,
            intervention=self.s.intervention,
            role=self.s.intervention_role,
            system_intervention=self.s.system_intervention,
            style=self.s.proto.prompt_style,
        )
        text = self.lm.chat(messages)
        return open_think(text, self.lm.tokenizer) if self.s.proto.open_think else text

    def traces(self) -> list[Trace]:
        """Every example's trace, built from the stored generations."""
        from experiments.stages.generate import stored_generations

        gens = stored_generations(self.run)
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

    # --- this process's work ----------------------------------------------------------------
    def my_parts(
        self,
        name: str,
        items: Sequence,
        key: Callable[[Any], str],
        cost: Callable[[Any], float],
        size: int,
    ) -> list[tuple[int, list]]:
        """This process's share of the items of parts ``name`` not yet written, as (index,
        items) parts of at most ``size``. The pending items are split over the processes
        first (balanced by ``cost``, the same split on every process), then batched, so with
        N processes and at least N pending items every process gets work. A part's index
        is the position of its first item in ``items``: never the name of a written part,
        whatever the split or the batch size of the run that wrote it."""
        done = self.run.part_items(name)
        pending = [(i, x) for i, x in enumerate(items) if key(x) not in done]
        share = self.procs.share(name, [cost(x) for _, x in pending])
        mine = [pending[j] for j in share]
        return [
            (mine[start][0], [x for _, x in mine[start : start + size]])
            for start in range(0, len(mine), max(1, size))
        ]

    def check_layers(self) -> None:
        """``--layers`` must name layers of the model (0 = the embeddings)."""
        n = self.lm.config.num_layers
        bad = [x for x in self.s.layers if not 0 <= x <= n]
        if bad:
            raise RunError(f"--layers: {bad} outside 0..{n} (the model has {n})")
