"""The fcjax pipeline, from a dataset to a report, resumable after a crash.

    python -m experiments.run --out=runs/demo [--model=smollm2-135m-instruct]
        [--dataset=arithmetic | --data_path=FILE.jsonl] [--num_examples=20]
        [--intervention=blank] [--estimators=deepconf,rcc,sampling,probe,forcing] ...

Stages: generate -> segment -> estimators -> hidden -> probes -> decisiveness -> metrics ->
report. Rerunning the same command skips finished stages and resumes unfinished ones;
``--redo=STAGE`` recomputes from STAGE on. See ``--helpfull`` for every flag.
"""

from __future__ import annotations

import os
import sys
import time
import traceback

from absl import app, flags, logging

import fcjax
from experiments import cluster, logs
from experiments.config import FIELDS, STAGES, Settings, bounds_text, field_error
from experiments.rundir import RunDir, RunError
from experiments.stages.pipeline import Pipeline
from fcjax.engine import multihost as mh
from fcjax.store.fs import FsError, location
from probes.trainer import FAMILIES

_ = flags.DEFINE_string(
    "out",
    None,
    "run directory (created if missing): a local path, or a URL file:///PATH, "
    "gs://BUCKET/PATH, s3://BUCKET/PATH",
    required=True,
)


def _field_errors(values: dict) -> list[str]:
    """Bounds and choices of the ``Settings`` flags among ``values`` (a flag -> value map)."""
    return [e for f in FIELDS if f.name in values and (e := field_error(f, values[f.name]))]


def _name_errors(values: dict) -> list[str]:
    """Names that must be known to the library (or be files): dataset, interventions,
    stages."""
    from fcjax.data import DATASETS, INTERVENTIONS

    errors = []
    examples_from = values.get("data_path") or values.get("traces")
    if "dataset" in values and not examples_from and values["dataset"] not in DATASETS:
        errors.append(
            f"--dataset: unknown {values['dataset']!r}; valid: {', '.join(sorted(DATASETS))}"
        )
    if values.get("traces") and values.get("data_path"):
        errors.append("--traces and --data_path both give the examples: pass one")
    if values.get("traces") and not _is_file(values["traces"]):
        errors.append(f"--traces: file {values['traces']!r} not found")
    for name in ("intervention", "system_intervention"):
        value = values.get(name)
        if name in values and value not in INTERVENTIONS and not _is_file(value):
            errors.append(
                f"--{name}: unknown {value!r} (and not a file); valid: {', '.join(INTERVENTIONS)}"
            )
    for name in ("redo", "stop_after"):
        value = values.get(name)
        if value is not None and value not in STAGES:
            errors.append(f"--{name}: unknown stage {value!r}; valid: {', '.join(STAGES)}")
    return errors


def _validator(check, name: str):
    def validate(value) -> bool:
        errors = check(value if isinstance(value, dict) else {name: value})
        if errors:
            raise flags.ValidationError("; ".join(errors))
        return True

    return validate


def _define_settings_flags() -> None:
    """One flag per ``Settings`` field, with its default, help and kind, and an absl
    validator checking its bounds and list choices (``experiments.config.field_error``;
    absl's enum flags check the other choices)."""
    for f in FIELDS:
        help, choices = f.metadata["help"], f.metadata["choices"]
        allowed = bounds_text(f.metadata)
        if allowed:
            help = f"{allowed}: {help}"
        if choices and not isinstance(f.default, tuple):
            flags.DEFINE_enum(f.name, f.default, list(choices), help)
        elif isinstance(f.default, tuple):
            flags.DEFINE_list(f.name, [str(v) for v in f.default], help)
        elif isinstance(f.default, bool):
            flags.DEFINE_bool(f.name, f.default, help)
        elif isinstance(f.default, int):
            flags.DEFINE_integer(f.name, f.default, help)
        elif isinstance(f.default, float):
            flags.DEFINE_float(f.name, f.default, help)
        else:
            flags.DEFINE_string(f.name, f.default, help)
        flags.register_validator(f.name, _validator(_field_errors, f.name))


_define_settings_flags()
flags.DEFINE_string(
    "mesh",
    "",
    "device mesh, e.g. 'data:8' or 'data:4,model:2' "
    "(default: data-parallel over all local devices)",
)
flags.DEFINE_bool(
    "multihost",
    False,
    "one process per host: jax.distributed.initialize() from the cluster environment "
    "(Cloud TPU, SLURM, ...), or from the three flags below",
)
flags.DEFINE_string(
    "coordinator_address", "", "HOST:PORT of process 0 (with --num_processes, --process_id)"
)
flags.DEFINE_integer("num_processes", None, "how many processes run this study", lower_bound=1)
flags.DEFINE_integer("process_id", None, "this process's index, 0..num_processes-1", lower_bound=0)
flags.DEFINE_integer(
    "initialization_timeout", 300, "seconds to wait for every process to join the coordinator"
)
flags.DEFINE_string("redo", None, f"recompute from this stage on: {', '.join(STAGES)}")
flags.DEFINE_string("stop_after", None, f"stop after this stage: {', '.join(STAGES)}")

FLAGS = flags.FLAGS


flags.register_multi_flags_validator(
    ["dataset", "data_path", "traces"], _validator(_name_errors, "")
)
for _name in ("intervention", "system_intervention", "redo", "stop_after"):
    flags.register_validator(_name, _validator(_name_errors, _name))


def flag_errors(values: dict) -> list[str]:
    """Every error of the validators above over ``values`` (flag name -> value)."""
    return _field_errors(values) + _name_errors(values)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing (``app.run``'s ``flags_parser``); a bad flag value ends the process
    with exit code 2 and the bad flags listed (every one, but for a bad enum value, which
    absl refuses as soon as it reads it), before any work."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        values = {name: FLAGS[name].value for name in FLAGS if name in _CHECKED}
        errors = flag_errors(values) if isinstance(e, flags.IllegalFlagValueError) else []
        print("error: bad flags:\n  " + "\n  ".join(errors or [str(e)]), file=sys.stderr)
        sys.exit(2)


_CHECKED = {f.name for f in FIELDS} | {"redo", "stop_after"}


def settings_from_flags() -> Settings:
    """The parsed flags as ``Settings``, after the checks that read files or several flags."""
    from fcjax.confidence.consistency_judge import REQUIRED as CONSISTENCY_REQUIRED
    from fcjax.decisiveness.judge import REQUIRED as DECISIVENESS_REQUIRED
    from fcjax.text.templates import TemplateError, load_template

    f = FLAGS
    errors = flag_errors({name: getattr(f, name) for name in _CHECKED})
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
    if not f.probe_family:
        errors.append(f"--probe_family: give at least one of {', '.join(FAMILIES)}")
    if f.probe_label == "c_samp" and "sampling" not in f.estimators and "probe" in f.estimators:
        errors.append("--probe_label=c_samp needs the sampling estimator in --estimators")
    if f.probe_checkpoint:
        try:
            found = (location(f.probe_checkpoint) / "probe.json").is_file()
        except FsError as e:
            errors.append(f"--probe_checkpoint: {e}")
        else:
            if not found:
                errors.append(f"--probe_checkpoint: {f.probe_checkpoint}/probe.json not found")
    if errors:
        raise RunError("bad flags:\n  " + "\n  ".join(errors))
    values = {}
    for field in FIELDS:
        value = getattr(f, field.name)
        if isinstance(field.default, tuple):
            value = tuple(field.metadata["item"](x) for x in value)
        values[field.name] = value
    return Settings(**values)


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
    *,
    coordinator_address: str = "",
    num_processes: int | None = None,
    process_id: int | None = None,
    initialization_timeout: int = 300,
) -> RunDir:
    """Runs (or resumes) the pipeline into ``out``; the library form of the CLI.

    With several processes (``multihost`` or the explicit coordinator arguments) every
    process calls this with the same arguments: process 0 holds the lock and writes the
    shared files, every process runs its share of the model stages. ``out`` is a local path
    or a URL (``fcjax.store.fs``: file://, gs://, s3://). Bad settings are refused
    before anything starts."""
    errors = settings.errors() + _name_errors({"redo": redo, "stop_after": stop_after})
    if errors:
        raise RunError("bad settings:\n  " + "\n  ".join(errors))
    try:
        location(out).check_backend()  # every file of the run goes through etils.epath
    except FsError as e:
        raise RunError(f"--out={out}: {e}") from None
    procs = cluster.setup(
        multihost, coordinator_address, num_processes, process_id, initialization_timeout
    )
    cluster.check_same_flags(
        procs,
        {
            **settings.config(),
            "out": str(out),
            "redo": redo,
            "mesh": mesh,
            "stop_after": stop_after,
            "num_processes": procs.count,
            "coordinator_address": coordinator_address,
        },
    )
    try:
        return _run(procs, settings, out, redo, mesh, stop_after)
    except BaseException as e:
        if procs.count > 1:  # the others stop at their next barrier instead of waiting
            mh.fail(f"{type(e).__name__}: {e}")
        raise


def _run(procs, settings, out, redo, mesh, stop_after) -> RunDir:
    from fcjax.engine import mesh as mesh_lib

    if mesh:
        mesh_lib.set_default_mesh(mesh_lib.make_mesh(mesh))
    fcjax.enable_compilation_cache()
    rd = RunDir(out, procs.index)
    cluster.check_shared_out(procs, rd)
    _everywhere(procs, "lock", rd.lock if procs.main else lambda: None)
    try:
        config = settings.config()
        pipe = Pipeline(rd, settings, procs)
        first = _everywhere(
            procs, "config", (lambda: rd.check_config(config, redo)) if procs.main else None
        )
        # bad data or a bad model is reported before anything in the directory changes
        _everywhere(procs, "validate", lambda: pipe.validate(first, stop_after))
        if procs.main:
            if first is not None:
                logging.info("recomputing from stage %s", first)
                rd.invalidate_from(first)
            rd.save_config(config)
        procs.barrier("config saved")
        t0 = time.perf_counter()
        pipe.run_all(stop_after)
        logging.info("run finished in %.1fs: %s", time.perf_counter() - t0, rd.path)
    finally:
        rd.unlock()
    return rd


def _everywhere(procs: cluster.Processes, name: str, fn):
    """``fn()`` (process 0's result with several processes; ``fn=None``: only process 0
    has work). With one process errors propagate as they are; with several, an error on
    any process stops every process with all the errors listed."""
    if procs.count == 1:
        return fn() if fn else None
    result, error = None, None
    try:
        result = fn() if fn else None
    except _user_errors() as e:
        error = f"{type(e).__name__}: {e}"
    results = procs.exchange(name, [result, error])
    bad = [f"process {i}: {e}" for i, (_, e) in enumerate(results) if e]
    if bad:
        raise RunError("\n  ".join([f"{name} failed:", *bad]))
    return results[0][0]


def _user_errors() -> tuple[type[BaseException], ...]:
    from experiments.stages.generate import ResourceError
    from fcjax.confidence.base import EstimatorError
    from fcjax.data import DataError
    from fcjax.engine.mesh import MeshError
    from fcjax.models import ConfigError, RegistryError, WeightError
    from fcjax.text.templates import TemplateError

    return (
        RunError,
        mh.MultihostError,
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
    logs.quiet()
    try:
        settings = settings_from_flags()
        rd = run(
            settings,
            FLAGS.out,
            FLAGS.redo,
            FLAGS.mesh,
            FLAGS.stop_after,
            FLAGS.multihost,
            coordinator_address=FLAGS.coordinator_address,
            num_processes=FLAGS.num_processes,
            process_id=FLAGS.process_id,
            initialization_timeout=FLAGS.initialization_timeout,
        )
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        _exit(2)
    except BaseException:
        if not mh.is_distributed():
            raise
        traceback.print_exc()
        _exit(1)
    summary = rd.path / "summary.json"
    if rd.process_index == 0 and summary.exists():
        print(format_summary(summary))


def _exit(code: int) -> None:
    """Exits; with several processes without jax.distributed's shutdown, which would wait
    for processes that failed or will never get there."""
    if not mh.is_distributed():
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    mh.leave()
    os._exit(code)


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
    app.run(main, flags_parser=parse_flags)
