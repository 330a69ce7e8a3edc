"""The run configuration, defined once.

Each field of ``Settings`` carries its flag help, its flag kind and the first stage whose
output it changes. ``experiments.run`` defines its absl flags from these fields,
``experiments.rundir`` derives ``AFFECTS`` (which stage a changed setting invalidates) from
them, and the stages read the settings.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from experiments.stages import STAGES
from fcjax.confidence.base import available_estimators
from fcjax.confidence.step_features import FEATURES
from fcjax.data.arithmetic import LEVELS
from fcjax.data.traces import traces_digest
from fcjax.metrics._arrays import BINNINGS
from fcjax.metrics.bootstrap import REPS
from fcjax.models.decoder import DECODE_ATTENTION
from fcjax.protocol import PROTOCOLS, Protocol, get_protocol
from fcjax.store.hidden import DTYPES as HIDDEN_DTYPES
from fcjax.text.steps import SplitMethod
from probes.train import LABELS
from probes.trainer import FAMILIES

# the judges' default model: a registry instruct model, never silently the studied model
JUDGE_MODEL = "qwen2.5-coder-1.5b-instruct"

# choice lists, each defined once: the library's where the library defines them
MODEL_DTYPES = ("float32", "bfloat16")  # fcjax.load's names (it also takes fp32, bf16)
ROLES = ("user", "system")  # where fcjax.data.build_messages puts the intervention
DECISIVENESS = ("judge", "lexicon")  # fcjax.decisiveness.judge or .lexicon
SEGMENTERS = typing.get_args(SplitMethod)
ESTIMATORS = tuple(available_estimators())  # with ``probe`` (registered by ``import probes``)


def setting(
    default: Any,
    help: str,
    *,
    stage: str | None,
    choices: tuple[str, ...] = (),
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    item: type = str,
):
    """A ``Settings`` field: ``stage`` is the first stage whose output the setting changes
    (``None``: it changes no result, e.g. a batch size); ``choices`` makes it an enum flag
    (of a list flag: the choices of each item); ``minimum``/``maximum`` bound it inclusively,
    ``above`` exclusively from below; a tuple default makes it a comma-separated list flag
    of ``item`` values. ``field_error`` checks a value against all of these."""
    if stage is not None and stage not in STAGES:
        raise ValueError(f"setting: unknown stage {stage!r}; valid: {', '.join(STAGES)}")
    meta = {
        "help": help,
        "stage": stage,
        "choices": choices,
        "minimum": minimum,
        "maximum": maximum,
        "above": above,
        "item": item,
    }
    return dataclasses.field(default=default, metadata=meta)


def bounds_text(meta: dict) -> str | None:
    """The allowed range of a bounded setting, e.g. ``(0, 1]`` or ``>= 1``."""
    lo, hi, above = meta["minimum"], meta["maximum"], meta["above"]
    if lo is None and hi is None and above is None:
        return None
    if hi is None:
        return f"> {above:g}" if above is not None else f">= {lo:g}"
    left = f"({above:g}" if above is not None else (f"[{lo:g}" if lo is not None else "(-inf")
    return f"{left}, {hi:g}]"


def field_error(field: dataclasses.Field, value: Any) -> str | None:
    """Why ``value`` is not allowed for the setting ``field`` (naming the flag and what is
    allowed), or None."""
    meta, flag = field.metadata, f"--{field.name}"
    if isinstance(field.default, tuple):
        try:
            items = [meta["item"](x) for x in value]
        except (TypeError, ValueError):
            kind = {int: "integers"}.get(meta["item"], "values")
            return f"{flag} must be a comma-separated list of {kind}, got {value!r}"
        bad = [x for x in items if meta["choices"] and x not in meta["choices"]]
        if bad:
            return (
                f"{flag}: unknown {', '.join(map(repr, bad))}; valid: {', '.join(meta['choices'])}"
            )
        return None
    if meta["choices"] and value not in meta["choices"]:
        return f"{flag} must be one of {', '.join(map(repr, meta['choices']))}, got {value!r}"
    lo, hi, above = meta["minimum"], meta["maximum"], meta["above"]
    if (
        (lo is not None and not value >= lo)
        or (hi is not None and not value <= hi)
        or (above is not None and not value > above)
    ):
        allowed = bounds_text(meta)
        where = f"in {allowed}" if allowed[0] in "([" else allowed
        return f"{flag} must be {where}, got {value!r}"
    return None


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
        choices=tuple(PROTOCOLS),
    )
    dtype: str = setting("float32", "parameter dtype", stage="generate", choices=MODEL_DTYPES)
    decode_attention: str = setting(
        "xla",
        "decode attention of every model: xla (any backend), pallas (GPU kernels; sums in "
        "another order, so sampled tokens can differ from xla's) or pallas_interpret (the "
        "kernels interpreted, any backend; for tests)",
        stage="generate",
        choices=DECODE_ATTENTION,
    )
    dataset: str = setting(
        "arithmetic", "named dataset (see fcjax.data.DATASETS)", stage="generate"
    )
    data_path: str = setting(
        "", "a JSONL file (id, question, choices, answer); overrides --dataset", stage="generate"
    )
    traces: str = setting(
        "",
        "JSONL or parquet file of traces from any engine (fcjax.data.traces): its records "
        "are the examples and their outputs are teacher-forced instead of generated",
        stage="generate",
    )
    num_examples: int = setting(
        20, "how many examples (a seeded sample of the set)", stage="generate", minimum=1
    )
    difficulty: int = setting(
        1,
        "difficulty of the built-in arithmetic set (1-5)",
        stage="generate",
        minimum=min(LEVELS),
        maximum=max(LEVELS),
    )
    intervention: str = setting(
        "blank", "prompt intervention name or a text file", stage="generate"
    )
    intervention_role: str = setting(
        "user",
        "put the intervention in the user turn or the system prompt",
        stage="generate",
        choices=ROLES,
    )
    system_intervention: str = setting(
        "blank",
        "intervention name or text file used as the system prompt, combinable with --intervention",
        stage="generate",
    )
    max_new_tokens: int = setting(20480, "generation budget per trace", stage="generate", minimum=1)
    temperature: float = setting(
        0.6, "trace sampling temperature (0 = greedy)", stage="generate", minimum=0.0
    )
    seed: int = setting(
        0, "seed for data sampling, generation and step selection", stage="generate"
    )
    segmenter: str = setting("paragraph", "step segmentation", stage="segment", choices=SEGMENTERS)
    estimators: tuple[str, ...] = setting(
        ("deepconf", "rcc", "sampling", "probe", "forcing"),
        "confidence estimators to run",
        stage="estimators",
        choices=ESTIMATORS,
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
        0.8, "temperature of sampled continuations (0 = greedy)", stage="estimators", minimum=0.0
    )
    branch_top_p: float = setting(
        0.95, "top-p of sampled continuations", stage="estimators", above=0.0, maximum=1.0
    )
    layers: tuple[int, ...] = setting(
        (),
        "hidden_states layers dumped for probes (default: all)",
        stage="hidden",
        item=int,
    )
    hidden_dtype: str = setting(
        "float32",
        "dtype of the stored hidden states",
        stage="hidden",
        choices=HIDDEN_DTYPES,
    )
    probe_features: str = setting(
        "end",
        "probe features: the step-end token's state or the mean over the step's tokens",
        stage="hidden",
        choices=FEATURES,
    )
    folds: int = setting(
        5, "cross-fitting folds of the probes (grouped by question)", stage="probes", minimum=2
    )
    probe_label: str = setting(
        "correct",
        "probe training label (c_samp: regression onto the sampling estimator's confidence)",
        stage="probes",
        choices=LABELS,
    )
    probe_family: tuple[str, ...] = setting(
        ("linear",),
        "probe families (linear, mlp); the first gives conf_probe, all get layer-table rows",
        stage="probes",
        choices=FAMILIES,
    )
    probe_batch: int = setting(
        0, "probe training rows per step (0: full batch)", stage="probes", minimum=0
    )
    probe_checkpoint: str = setting(
        "", "score the run with this saved probe instead of cross-fitting one", stage="probes"
    )
    decisiveness: str = setting(
        "judge", "decisiveness source", stage="decisiveness", choices=DECISIVENESS
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
        choices=("", *BINNINGS),
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

    def errors(self) -> list[str]:
        """Every setting outside its bounds or choices, each naming its flag and what the
        flag allows (``field_error``); empty when all are good."""
        return [e for f in FIELDS if (e := field_error(f, getattr(self, f.name)))]

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
        if self.traces:  # the file's content, so another file is a changed setting
            d["traces_sha256"] = traces_digest(self.traces)
        else:  # no trace keys: a config.json written before --traces existed still matches
            del d["traces"]
        return d


FIELDS = dataclasses.fields(Settings)

# facts config() derives from the settings -> the first stage whose output they change
DERIVED = {"traces_sha256": "generate"}
# result-affecting settings -> the first stage whose output they change
AFFECTS = {f.name: f.metadata["stage"] for f in FIELDS if f.metadata["stage"] is not None}
AFFECTS.update(DERIVED)
