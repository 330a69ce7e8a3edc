"""The run configuration, defined once.

Each field of ``Settings`` carries its flag help, its flag kind and the first stage whose
output it changes. ``experiments.run`` defines its absl flags from these fields,
``experiments.rundir`` derives ``AFFECTS`` (which stage a changed setting invalidates) from
them, and the stages read the settings.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fcjax.metrics.bootstrap import REPS
from fcjax.protocol import Protocol, get_protocol

# the judges' default model: a registry instruct model, never silently the studied model
JUDGE_MODEL = "qwen2.5-coder-1.5b-instruct"

STAGES = (
    "generate",
    "segment",
    "estimators",
    "hidden",
    "probes",
    "decisiveness",
    "metrics",
    "report",
)


def setting(
    default: Any,
    help: str,
    *,
    stage: str | None,
    choices: tuple[str, ...] = (),
    minimum: int | None = None,
    item: type = str,
):
    """A ``Settings`` field: ``stage`` is the first stage whose output the setting changes
    (``None``: it changes no result, e.g. a batch size); ``choices`` makes it an enum flag;
    ``minimum`` is checked when flags are parsed; a tuple default makes it a comma-separated
    list flag of ``item`` values."""
    if stage is not None and stage not in STAGES:
        raise ValueError(f"setting: unknown stage {stage!r}; valid: {', '.join(STAGES)}")
    meta = {"help": help, "stage": stage, "choices": choices, "minimum": minimum, "item": item}
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Every result-defining flag of ``experiments.run`` (stored as ``config.json``)."""

    model: str = setting(
        "smollm2-135m-instruct",
        "model: registry name, HF directory, .gguf path or random:<preset>",
        stage="generate",
    )
    judge_model: str = setting(
        "",
        "model of the sampling estimator's consistency judge "
        "(default: qwen2.5-coder-1.5b-instruct)",
        stage="estimators",
    )
    decisiveness_model: str = setting(
        "", "model of the decisiveness judge (default: --judge_model)", stage="decisiveness"
    )
    protocol: str = setting(
        "fcjax",
        "'paper': the published pipeline, quirks included (docs/PROTOCOL.md)",
        stage="generate",
        choices=("fcjax", "paper"),
    )
    dtype: str = setting(
        "float32", "parameter dtype", stage="generate", choices=("float32", "bfloat16")
    )
    decode_attention: str = setting(
        "xla",
        "decode attention of every model: xla (any backend) or pallas (GPU kernels; sums in "
        "another order, so sampled tokens can differ from xla's)",
        stage="generate",
        choices=("xla", "pallas"),
    )
    dataset: str = setting(
        "arithmetic", "named dataset (see fcjax.data.DATASETS)", stage="generate"
    )
    data_path: str = setting(
        "", "a JSONL file (id, question, choices, answer); overrides --dataset", stage="generate"
    )
    num_examples: int = setting(
        20, "how many examples (a seeded sample of the set)", stage="generate", minimum=1
    )
    difficulty: int = setting(
        1, "difficulty of the built-in arithmetic set (1-5)", stage="generate"
    )
    intervention: str = setting(
        "blank", "prompt intervention name or a text file", stage="generate"
    )
    intervention_role: str = setting(
        "user",
        "put the intervention in the user turn or the system prompt",
        stage="generate",
        choices=("user", "system"),
    )
    system_intervention: str = setting(
        "blank",
        "intervention name or text file used as the system prompt, combinable with --intervention",
        stage="generate",
    )
    max_new_tokens: int = setting(20480, "generation budget per trace", stage="generate", minimum=1)
    temperature: float = setting(0.6, "trace sampling temperature (0 = greedy)", stage="generate")
    seed: int = setting(
        0, "seed for data sampling, generation and step selection", stage="generate"
    )
    segmenter: str = setting(
        "paragraph", "step segmentation", stage="segment", choices=("paragraph", "cue", "tokens")
    )
    estimators: tuple[str, ...] = setting(
        ("deepconf", "rcc", "sampling", "probe", "forcing"),
        "confidence estimators to run",
        stage="estimators",
    )
    k: int = setting(
        10, "continuations per step for sampling consistency", stage="estimators", minimum=1
    )
    max_steps: int = setting(
        20, "steps per trace scored by sampling consistency", stage="estimators", minimum=1
    )
    branch_new_tokens: int = setting(
        200, "tokens per sampled continuation", stage="estimators", minimum=1
    )
    branch_temperature: float = setting(
        0.8, "temperature of sampled continuations", stage="estimators"
    )
    branch_top_p: float = setting(0.95, "top-p of sampled continuations", stage="estimators")
    layers: tuple[int, ...] = setting(
        (), "hidden_states layers dumped for probes (default: all)", stage="hidden", item=int
    )
    hidden_dtype: str = setting(
        "float32",
        "dtype of the stored hidden states",
        stage="hidden",
        choices=("float32", "bfloat16", "float16"),
    )
    probe_features: str = setting(
        "end",
        "probe features: the step-end token's state or the mean over the step's tokens",
        stage="hidden",
        choices=("end", "mean"),
    )
    folds: int = setting(
        5, "cross-fitting folds of the probes (grouped by question)", stage="probes", minimum=2
    )
    probe_label: str = setting(
        "correct",
        "probe training label (c_samp: regression onto the sampling estimator's confidence)",
        stage="probes",
        choices=("correct", "agreement", "c_samp"),
    )
    probe_family: tuple[str, ...] = setting(
        ("linear",),
        "probe families (linear, mlp); the first gives conf_probe, all get layer-table rows",
        stage="probes",
    )
    probe_batch: int = setting(
        0, "probe training rows per step (0: full batch)", stage="probes", minimum=0
    )
    probe_checkpoint: str = setting(
        "", "score the run with this saved probe instead of cross-fitting one", stage="probes"
    )
    decisiveness: str = setting(
        "judge", "decisiveness source", stage="decisiveness", choices=("judge", "lexicon")
    )
    judge_batch: int = setting(
        20, "steps per decisiveness-judge call", stage="decisiveness", minimum=1
    )
    decisiveness_prompt: str = setting(
        "",
        "text file replacing the decisiveness judge prompt ({n}, {steps})",
        stage="decisiveness",
    )
    consistency_prompt: str = setting(
        "",
        "text file replacing the consistency judge prompt ({context}, {assertion})",
        stage="estimators",
    )
    bootstrap: int = setting(
        REPS,
        "bootstrap resamples of the questions for the 95% intervals of the metrics and of "
        "the probe layer table (0: none)",
        stage="probes",
        minimum=0,
    )
    cmfg_binning: str = setting(
        "",
        "cMFG bins: 'closed' last bin (counts c == 1.0) or the published 'reference' digitize "
        "(empty: the --protocol's)",
        stage="metrics",
        choices=("", "closed", "reference"),
    )
    batch_size: int = setting(
        16, "examples per generation batch (does not change results)", stage=None, minimum=1
    )

    @property
    def proto(self) -> Protocol:
        return get_protocol(self.protocol)

    @property
    def binning(self) -> str:
        return self.cmfg_binning or self.proto.cmfg_binning

    @property
    def consistency_judge(self) -> str:
        return self.judge_model or JUDGE_MODEL

    @property
    def decisiveness_judge(self) -> str:
        """The model whose judge produced D, or "lexicon"."""
        if self.decisiveness == "lexicon":
            return "lexicon"
        return self.decisiveness_model or self.consistency_judge

    def config(self) -> dict:
        """The settings as stored in ``config.json`` (judge models and binning resolved)."""
        d = dataclasses.asdict(self)
        d["judge_model"] = self.consistency_judge
        d["decisiveness_model"] = self.decisiveness_model or d["judge_model"]
        d["cmfg_binning"] = self.binning
        d["decisiveness_judge"] = self.decisiveness_judge
        d["estimators"] = list(self.estimators)
        d["layers"] = list(self.layers)
        d["probe_family"] = list(self.probe_family)
        return d


FIELDS = dataclasses.fields(Settings)

# result-affecting settings -> the first stage whose output they change
AFFECTS = {f.name: f.metadata["stage"] for f in FIELDS if f.metadata["stage"] is not None}
