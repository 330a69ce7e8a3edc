"""The fcjax pipeline, from a dataset to a report, resumable after a crash.

    python -m experiments.run --out=runs/demo [--model=smollm2-135m-instruct]
        [--dataset=arithmetic | --data_path=FILE.jsonl] [--num_examples=20]
        [--intervention=blank] [--estimators=deepconf,rcc,sampling,probe,forcing] ...

Stages: generate -> segment -> estimators -> hidden -> probes -> decisiveness -> metrics ->
report. Rerunning the same command skips finished stages and resumes unfinished ones;
``--redo=STAGE`` recomputes from STAGE on. See ``--helpfull`` for every flag.
"""

from __future__ import annotations

import sys
import time

from absl import app, flags, logging

from experiments.rundir import STAGES, RunDir, RunError
from experiments.stages import Pipeline, Settings

_ = flags.DEFINE_string("out", None, "run directory (created if missing)", required=True)
flags.DEFINE_string(
    "model",
    "smollm2-135m-instruct",
    "model: registry name, HF directory, .gguf path or random:<preset>",
)
flags.DEFINE_string(
    "judge_model",
    "",
    "model of the sampling estimator's consistency judge (default: qwen2.5-coder-1.5b-instruct)",
)
flags.DEFINE_string(
    "decisiveness_model", "", "model of the decisiveness judge (default: --judge_model)"
)
flags.DEFINE_enum(
    "protocol",
    "fcjax",
    ["fcjax", "paper"],
    "'paper': the published protocol (prompt, answer rule, cMFG binning; docs/PROTOCOL.md)",
)
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "parameter dtype")
flags.DEFINE_string("dataset", "arithmetic", "named dataset (see fcjax.data.DATASETS)")
flags.DEFINE_string(
    "data_path", "", "a JSONL file (id, question, choices, answer); overrides --dataset"
)
flags.DEFINE_integer("num_examples", 20, "how many examples (a seeded sample of the set)")
flags.DEFINE_integer("difficulty", 1, "difficulty of the built-in arithmetic set (1-5)")
flags.DEFINE_string("intervention", "blank", "prompt intervention name or a text file")
flags.DEFINE_enum(
    "intervention_role",
    "user",
    ["user", "system"],
    "put the intervention in the user turn or the system prompt",
)
flags.DEFINE_string(
    "system_intervention",
    "blank",
    "intervention name or text file used as the system prompt, combinable with --intervention",
)
flags.DEFINE_integer("max_new_tokens", 20480, "generation budget per trace")
flags.DEFINE_float("temperature", 0.6, "trace sampling temperature (0 = greedy)")
flags.DEFINE_integer("seed", 0, "seed for data sampling, generation and step selection")
flags.DEFINE_enum("segmenter", "paragraph", ["paragraph", "cue", "tokens"], "step segmentation")
flags.DEFINE_list(
    "estimators",
    ["deepconf", "rcc", "sampling", "probe", "forcing"],
    "confidence estimators to run",
)
flags.DEFINE_integer("k", 10, "continuations per step for sampling consistency")
flags.DEFINE_integer("max_steps", 20, "steps per trace scored by sampling consistency")
flags.DEFINE_integer("branch_new_tokens", 200, "tokens per sampled continuation")
flags.DEFINE_float("branch_temperature", 0.8, "temperature of sampled continuations")
flags.DEFINE_float("branch_top_p", 0.95, "top-p of sampled continuations")
flags.DEFINE_list("layers", [], "hidden_states layers dumped for probes (default: all)")
flags.DEFINE_integer("folds", 5, "cross-fitting folds of the probes (grouped by question)")
flags.DEFINE_enum("probe_label", "correct", ["correct", "agreement"], "probe training label")
flags.DEFINE_enum("decisiveness", "judge", ["judge", "lexicon"], "decisiveness source")
flags.DEFINE_integer("judge_batch", 20, "steps per decisiveness-judge call")
flags.DEFINE_string(
    "decisiveness_prompt", "", "text file replacing the decisiveness judge prompt ({n}, {steps})"
)
flags.DEFINE_string(
    "consistency_prompt",
    "",
    "text file replacing the consistency judge prompt ({context}, {assertion})",
)
flags.DEFINE_integer(
    "bootstrap", 1000, "bootstrap resamples of the questions for 95% intervals (0: none)"
)
flags.DEFINE_enum(
    "cmfg_binning",
    None,
    ["closed", "reference"],
    "cMFG bins: 'closed' last bin (counts c == 1.0) or the published 'reference' digitize "
    "(default: the --protocol's)",
)
flags.DEFINE_integer("batch_size", 16, "examples per generation batch (does not change results)")
flags.DEFINE_string(
    "mesh",
    "",
    "device mesh, e.g. 'data:8' or 'data:4,model:2' "
    "(default: data-parallel over all local devices)",
)
flags.DEFINE_bool("multihost", False, "call jax.distributed.initialize() (cluster env)")
flags.DEFINE_string("redo", None, f"recompute from this stage on: {', '.join(STAGES)}")
flags.DEFINE_string("stop_after", None, "stop after this stage (for staged runs)")

FLAGS = flags.FLAGS


def settings_from_flags() -> Settings:
    from fcjax.confidence.base import available_estimators
    from fcjax.confidence.consistency_judge import REQUIRED as CONSISTENCY_REQUIRED
    from fcjax.data import DATASETS, INTERVENTIONS
    from fcjax.decisiveness.judge import REQUIRED as DECISIVENESS_REQUIRED
    from fcjax.text.templates import TemplateError, load_template

    f = FLAGS
    errors = []
    if not f.data_path and f.dataset not in DATASETS:
        errors.append(f"--dataset: unknown {f.dataset!r}; valid: {', '.join(sorted(DATASETS))}")
    for name in ("intervention", "system_intervention"):
        value = getattr(f, name)
        if value not in INTERVENTIONS and not _is_file(value):
            errors.append(
                f"--{name}: unknown {value!r} (and not a file); valid: {', '.join(INTERVENTIONS)}"
            )
    if f.intervention_role == "system" and f.system_intervention != "blank":
        errors.append(
            "--intervention_role=system and --system_intervention both set the system prompt"
        )
    for name, required in (
        ("decisiveness_prompt", DECISIVENESS_REQUIRED),
        ("consistency_prompt", CONSISTENCY_REQUIRED),
    ):
        if getattr(f, name):
            try:
                load_template(getattr(f, name), required)
            except TemplateError as e:
                errors.append(f"--{name}: {e}")
    valid_est = available_estimators()
    for e in f.estimators:
        if e not in valid_est:
            errors.append(f"--estimators: unknown {e!r}; valid: {', '.join(valid_est)}")
    for name in ("redo", "stop_after"):
        value = getattr(f, name)
        if value is not None and value not in STAGES:
            errors.append(f"--{name}: unknown stage {value!r}; valid: {', '.join(STAGES)}")
    for name in (
        "k",
        "max_new_tokens",
        "max_steps",
        "num_examples",
        "batch_size",
        "branch_new_tokens",
        "judge_batch",
    ):
        if getattr(f, name) < 1:
            errors.append(f"--{name} must be >= 1, got {getattr(f, name)}")
    if f.bootstrap < 0:
        errors.append(f"--bootstrap must be >= 0, got {f.bootstrap}")
    if f.folds < 2:
        errors.append(f"--folds must be >= 2, got {f.folds}")
    try:
        layers = tuple(int(x) for x in f.layers)
    except ValueError:
        errors.append(f"--layers must be integers, got {f.layers}")
        layers = ()
    if errors:
        raise RunError("bad flags:\n  " + "\n  ".join(errors))
    return Settings(
        model=f.model,
        judge_model=f.judge_model,
        decisiveness_model=f.decisiveness_model,
        dtype=f.dtype,
        dataset=f.dataset,
        data_path=f.data_path,
        num_examples=f.num_examples,
        difficulty=f.difficulty,
        intervention=f.intervention,
        intervention_role=f.intervention_role,
        system_intervention=f.system_intervention,
        protocol=f.protocol,
        max_new_tokens=f.max_new_tokens,
        temperature=f.temperature,
        seed=f.seed,
        segmenter=f.segmenter,
        estimators=tuple(f.estimators),
        k=f.k,
        max_steps=f.max_steps,
        branch_new_tokens=f.branch_new_tokens,
        branch_temperature=f.branch_temperature,
        branch_top_p=f.branch_top_p,
        layers=layers,
        folds=f.folds,
        probe_label=f.probe_label,
        decisiveness=f.decisiveness,
        judge_batch=f.judge_batch,
        bootstrap=f.bootstrap,
        cmfg_binning=f.cmfg_binning or "",
        decisiveness_prompt=f.decisiveness_prompt,
        consistency_prompt=f.consistency_prompt,
        batch_size=f.batch_size,
    )


def _is_file(path: str) -> bool:
    from pathlib import Path

    return Path(path).is_file()


def run(
    settings: Settings,
    out: str,
    redo: str | None = None,
    mesh: str = "",
    stop_after: str | None = None,
    multihost: bool = False,
) -> RunDir:
    """Runs (or resumes) the pipeline into ``out``; the library form of the CLI."""
    from fcjax.engine import mesh as mesh_lib

    if multihost:
        from fcjax.engine import multihost as mh

        mh.initialize()
    if mesh:
        mesh_lib.set_default_mesh(mesh_lib.make_mesh(mesh))
    rd = RunDir(out)
    rd.lock()
    try:
        config = settings.config()
        first = rd.check_config(config, redo)
        pipe = Pipeline(rd, settings)
        # bad data or a bad model is reported before anything in the directory changes
        pipe.validate(first, stop_after)
        if first is not None:
            logging.info("recomputing from stage %s", first)
            rd.invalidate_from(first)
        rd.save_config(config)
        t0 = time.perf_counter()
        for stage in STAGES:
            pipe.run_stage(stage)
            if stage == stop_after:
                break
        logging.info("run finished in %.1fs: %s", time.perf_counter() - t0, rd.path)
    finally:
        rd.unlock()
    return rd


def _user_errors() -> tuple[type[BaseException], ...]:
    from experiments.stages import ResourceError
    from fcjax.confidence.base import EstimatorError
    from fcjax.data import DataError
    from fcjax.engine.mesh import MeshError
    from fcjax.models import ConfigError, RegistryError, WeightError
    from fcjax.text.templates import TemplateError

    return (
        RunError,
        DataError,
        MeshError,
        ConfigError,
        RegistryError,
        WeightError,
        EstimatorError,
        FloatingPointError,
        ResourceError,
        TemplateError,
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        settings = settings_from_flags()
        rd = run(settings, FLAGS.out, FLAGS.redo, FLAGS.mesh, FLAGS.stop_after, FLAGS.multihost)
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    summary = rd.path / "summary.json"
    if summary.exists():
        print(format_summary(summary))


def format_summary(path) -> str:
    import json

    s = json.loads(path.read_text())
    lines = [
        f"{s['n_examples']} examples, accuracy {s['accuracy']:.3f}"
        if s["accuracy"] is not None
        else f"{s['n_examples']} examples"
    ]
    lines.append(
        f"{'estimator':<10} {'mean C':>7} {'MFG':>7} {'cMFG':>7} {'cMFG*':>7} "
        f"{'ECE':>7} {'Brier':>7} {'AUROC':>7}"
    )
    for name, m in s["estimators"].items():
        vals = [
            m.get(k) for k in ("mean_conf", "mfg", "cmfg", "cmfg_star", "ece", "brier", "auroc")
        ]
        lines.append(
            f"{name:<10} " + " ".join(f"{v:7.3f}" if v is not None else f"{'-':>7}" for v in vals)
        )
    lines.append(f"report: {path.parent / 'report.html'}")
    return "\n".join(lines)


if __name__ == "__main__":
    app.run(main)
