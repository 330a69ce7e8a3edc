"""Protocols: every behaviour where fcjax's defaults and the published study differ.

``--protocol=paper`` reproduces the published pipeline (yale-nlp/faithful_lrm at bc5fe95),
quirks included; ``--protocol=fcjax`` keeps fcjax's own choices. docs/PROTOCOL.md has the
behaviour-by-behaviour table.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Protocol:
    """One protocol's choices.

    prompt_style: ``fcjax.data.prompts.PROMPT_STYLES`` ("paper": the published prompts and
    intervention texts, "<think>" as literal user text). answer_rule: which ``\\boxed{}`` is
    the answer ("last" or "first"; "paper": ``extract_answer_paper``). numbered_choices:
    multiple-choice answers are option numbers. open_think: a reasoning model's turn is
    opened with ``<think>`` after the chat template when the template does not do it.
    cmfg_binning: ``fcjax.metrics`` cMFG bins ("closed" or "reference").
    scoring: "kind" (``score_answer`` by answer kind, unscorable traces counted wrong in
    accuracy) or "paper" (``fcjax.text.answers.score`` by study dataset, accuracy over the
    scorable traces only). segmenter: None (``--segmenter``) or "paper" (``paper_spans``).
    subset: ``fcjax.data.datasets.SUBSET_RULES``; study_seed: the seed of the published
    subset and step draw (None: ``--seed``). step_draw: "per_example" (``select_steps``) or
    "paper" (``paper_step_draw``, one stream for the run). trajectory_closed: "left" or
    "right" (``fcjax.metrics.trajectory.trajectory_bin``). judges: "fcjax" or "paper" (both
    judges' prompts, parsing, batching and sampling).
    """

    name: str
    prompt_style: str
    answer_rule: str
    numbered_choices: bool
    open_think: bool
    cmfg_binning: str
    scoring: str = "kind"
    segmenter: str | None = None
    subset: str = "fcjax"
    study_seed: int | None = None
    step_draw: str = "per_example"
    trajectory_closed: str = "left"
    judges: str = "fcjax"

    def split_method(self, segmenter: str) -> str:
        """The step segmentation for ``--segmenter``: the protocol's own (``segmenter``) in
        place of the default "paragraph"; "cue" and "tokens" as given."""
        return self.segmenter if segmenter == "paragraph" and self.segmenter else segmenter


PROTOCOLS: dict[str, Protocol] = {
    "fcjax": Protocol("fcjax", "fcjax", "last", False, False, "closed"),
    "paper": Protocol(
        "paper",
        "paper",
        "paper",
        True,
        False,  # the published prompt carries "<think>\n" as user text instead
        "reference",
        scoring="paper",
        segmenter="paper",
        subset="paper",
        study_seed=42,
        step_draw="paper",
        trajectory_closed="right",
        judges="paper",
    ),
}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; valid: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]


# The published judges: consistency by a local instruct model, decisiveness by a hosted one.
PAPER_CONSISTENCY_JUDGE = "Qwen/Qwen2.5-1.5B-Instruct"
PAPER_DECISIVENESS_JUDGE = "gemini-2.5-flash (hosted, temperature 0.5, top-p 0.1)"


def is_paper_consistency_judge(model: str) -> bool:
    """Whether ``model`` (a hub id, a registry name or a local path) names the published
    consistency judge: the hub id, or a last path part "Qwen2.5-1.5B-Instruct" (any case)."""
    tail = str(model).rstrip("/").split("/")[-1].lower()
    return tail == PAPER_CONSISTENCY_JUDGE.split("/")[-1].lower()


def judge_notes(protocol: Protocol, consistency_judge: str | None, decisiveness: str) -> list[str]:
    """Under a protocol with the published judges: one line per judge that is not the
    published one, for the start-up log and ``summary.json`` (``counts.protocol_notes``).
    ``consistency_judge`` None: no sampling estimator runs; ``decisiveness``: the model of
    the decisiveness judge or "lexicon". Empty for other protocols."""
    if protocol.judges != "paper":
        return []
    notes = []
    if consistency_judge is not None and not is_paper_consistency_judge(consistency_judge):
        notes.append(
            f"protocol {protocol.name}: the consistency judge is {consistency_judge!r}, not the "
            f"published {PAPER_CONSISTENCY_JUDGE} (pass its local path or hub id as "
            "--judge_model); sampling confidence is not the published one"
        )
    notes.append(
        f"protocol {protocol.name}: decisiveness comes from {decisiveness!r}; the published "
        f"judge is {PAPER_DECISIVENESS_JUDGE}, which fcjax cannot run"
    )
    return notes
