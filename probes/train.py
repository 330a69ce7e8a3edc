"""Probe stage of a run, and probe transfer across runs.

The stage reads ``DIR/hidden`` (a finalized HiddenStore of step-end states; ``hidden_mean``
for features averaged over each step's tokens), ``DIR/steps.parquet`` (example_id, step,
and ``conf_agreement`` / ``conf_sampling`` for those labels) and ``DIR/examples.parquet``
(example_id, correct). It streams minibatches from the store (``probes.trainer``), so no
more than a minibatch of states is in memory. Per probe family it writes cross-fitted
per-layer rows of ``DIR/probes/layers.parquet`` (AUROC with a 95% question-bootstrap
interval and a permutation-null band over ``reps`` resamples, ECE, log-loss, Spearman and MAE
against the label; in a run ``reps`` is ``--bootstrap``, and with 0 the interval and band
are NaN with the reason in ``auroc_ci_absent`` / ``null_band_absent``)
and a final probe trained on all labeled rows (``DIR/probes/ckpt`` for the first family,
``ckpt_<family>`` for others); the first family's calibrated probability becomes the step
column ``conf_probe``. With ``checkpoint`` a saved probe scores the run instead (no
training). Labels: ``correct`` (the trace's answer), ``agreement`` (conf_agreement) and
``c_samp`` (conf_sampling, a soft-label regression target: cross-entropy without class
weights, so the probe estimates E[C_samp | state]).

    python -m probes.train --run=DIR [--family=linear,mlp] [--label=c_samp] [--reps=1000]
    python -m probes.train --train_runs=A,B --eval_runs=C --out=DIR   # transfer
"""

from __future__ import annotations

import json
import resource
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from fcjax import plots
from fcjax.metrics.bootstrap import REPS
from fcjax.store.fs import Location, PathLike, location
from fcjax.store.hidden import HiddenReader, HiddenStoreError
from fcjax.store.tables import read_table, require_columns, update_columns, write_table_atomic
from probes.checkpoint import Probe, load_probe, save_probe
from probes.common import ProbeError, TooFewLabels
from probes.figures import layer_panel, transfer_panel
from probes.sources import ConcatSource, StoreSource
from probes.stats import layer_table
from probes.streamfit import crossfit_source, fit_select
from probes.trainer import FAMILIES, Standardizer, TrainConfig, predict_logits

LABELS = ("correct", "agreement", "c_samp")
LABEL_COLUMNS = {"agreement": "conf_agreement", "c_samp": "conf_sampling"}
FEATURES = {"end": "hidden", "mean": "hidden_mean"}


def _as_float(values: Any) -> np.ndarray:
    """Column -> float64 array; None/missing -> NaN, bools -> 0/1."""
    if isinstance(values, np.ndarray) and values.dtype != object:
        return values.astype(np.float64)
    return np.array([np.nan if v is None else float(v) for v in values], np.float64)


def _model_name(run_dir: Location) -> str:
    for name in ("config.json", "summary.json"):
        path = run_dir / name
        if path.exists():
            try:
                raw = json.loads(path.read_text())
            except json.JSONDecodeError:
                continue
            config = raw.get("config", raw) if isinstance(raw, dict) else {}
            if isinstance(config, dict) and config.get("model"):
                return str(config["model"])
    return ""


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class RunRows:
    """A run's stored states joined to its labels, in the store's row order."""

    def __init__(self, run_dir, label: str, features: str = "end", layers=None):
        if label not in LABELS:
            raise ValueError(f"label must be one of {LABELS}, got {label!r}")
        if features not in FEATURES:
            raise ValueError(f"features must be one of {tuple(FEATURES)}, got {features!r}")
        self.run_dir = location(run_dir)
        hidden_dir = self.run_dir / FEATURES[features]
        if not hidden_dir.exists():
            raise HiddenStoreError(f"hidden-state store not found: {hidden_dir}")
        self.reader = HiddenReader(hidden_dir)
        self.source = StoreSource(self.reader, layers)
        self.layers = self.source.layers
        steps_path, examples_path = (
            self.run_dir / "steps.parquet",
            self.run_dir / "examples.parquet",
        )
        steps = read_table(steps_path)
        require_columns(steps_path, steps, ["example_id", "step"])
        examples = read_table(examples_path)
        require_columns(examples_path, examples, ["example_id", "correct"])
        self.steps_path = steps_path
        self.step_eids = [str(e) for e in steps["example_id"]]
        step_nums = np.asarray(steps["step"], np.int64).tolist()
        ex_keys = [str(e) for e in examples["example_id"]]
        correct = dict(zip(ex_keys, _as_float(examples["correct"]), strict=True))
        if label == "correct":
            y_steps = np.array([correct.get(e, np.nan) for e in self.step_eids])
        else:
            require_columns(steps_path, steps, [LABEL_COLUMNS[label]])
            y_steps = _as_float(steps[LABEL_COLUMNS[label]])
        idx = self.reader.index
        where = {key: i for i, key in enumerate(zip(self.step_eids, step_nums, strict=True))}
        self.step_of_row = np.array(
            [
                where.get((e, int(s)), -1)
                for e, s in zip(idx["example_id"], idx["step"], strict=True)
            ]
        )
        if not (self.step_of_row >= 0).any():
            raise HiddenStoreError(f"{hidden_dir}: no (example_id, step) of {steps_path} is stored")
        has = self.step_of_row >= 0
        self.y = np.where(has, y_steps[np.maximum(self.step_of_row, 0)], np.nan)
        self.correct = np.array([correct.get(e, np.nan) for e in idx["example_id"]])
        self.groups = np.asarray(idx["example_id"])
        self.n_steps = len(self.step_eids)

    def step_column(self, per_row: np.ndarray) -> np.ndarray:
        out = np.full(self.n_steps, np.nan)
        has = self.step_of_row >= 0
        out[self.step_of_row[has]] = per_row[has]
        return out


def _probe(sel, layers, label: str, model: str, features: str) -> Probe:
    params = {k: v[0] for k, v in sel.params.items()}
    return Probe(
        params,
        sel.stats,
        sel.layer,
        tuple(layers),
        fold=-1,
        label=label,
        model=model,
        family=sel.family,
        calibration=sel.calibration,
        features=features,
    )


def _table_rows(family: str, layers, table: dict, chosen: np.ndarray | None) -> dict:
    n = len(layers)
    times = np.zeros(n, np.int64) if chosen is None else np.bincount(chosen, minlength=n)
    return {
        "family": np.array([family] * n),
        "layer": np.asarray(layers, np.int64),
        **{k: np.asarray(v) for k, v in table.items()},
        "times_chosen": times,
    }


def _concat(tables: list[dict]) -> dict:
    return {k: np.concatenate([np.asarray(t[k]) for t in tables]) for k in tables[0]}


def _plot_layers(path: Location, table: dict, title: str, chosen: int | None = None) -> None:
    """``plots/probe_layers.png``: the same panel the run report draws."""
    plots.save_png(path, [layer_panel(table, title, chosen)])


def _configs(families: Sequence[str], seed: int, **kw) -> list[TrainConfig]:
    bad = [f for f in families if f not in FAMILIES]
    if bad or not families:
        raise ValueError(f"family: {bad or 'none given'}; valid: {', '.join(FAMILIES)}")
    return [TrainConfig.for_family(f, seed=seed, **kw) for f in families]


def run_probe_stage(
    run_dir: PathLike | Location,
    layers: Sequence[int] | None = None,
    folds: int = 5,
    label: str = "correct",
    seed: int = 0,
    *,
    families: Sequence[str] = ("linear",),
    features: str = "end",
    batch_size: int = 0,
    epochs: int | None = None,
    checkpoint: PathLike | Location | None = None,
    reps: int = REPS,
    inner_val_frac: float = 0.2,
    model_name: str | None = None,
    mesh=None,
) -> dict:
    """Runs the probe stage on ``run_dir``; returns a summary dict (also the CLI's output)."""
    t0 = time.perf_counter()
    run_dir = location(run_dir)
    model = _model_name(run_dir) if model_name is None else model_name
    if checkpoint:
        return _apply_checkpoint(run_dir, checkpoint, label, features, model, reps, seed, mesh)
    rows = RunRows(run_dir, label, features, layers)
    kw = {"batch_size": batch_size, "balanced": label != "c_samp"}
    kw.update({"epochs": epochs} if epochs else {})
    configs = _configs(families, seed, **kw)
    labeled = np.flatnonzero(np.isfinite(rows.y))
    if labeled.size == 0:
        raise TooFewLabels(f"{rows.steps_path}: no stored step has a {label!r} label")
    tables, summary_fam, conf = [], {}, None
    paths: dict[str, str] = {}
    for i, config in enumerate(configs):
        result = crossfit_source(
            rows.source,
            rows.y,
            rows.groups,
            folds=folds,
            seed=seed,
            config=config,
            inner_val_frac=inner_val_frac,
            mesh=mesh,
        )
        table = layer_table(result.proba_layers, rows.y, rows.groups, reps=reps, seed=seed)
        tables.append(_table_rows(config.family, rows.layers, table, result.chosen_layer))
        final = fit_select(
            rows.source,
            rows.y,
            rows.groups,
            labeled,
            config=config,
            inner_val_frac=inner_val_frac,
            seed=seed,
            mesh=mesh,
        )
        probe = _probe(final, rows.layers, label, model, features)
        name = "ckpt" if i == 0 else f"ckpt_{config.family}"
        paths[f"checkpoint_{config.family}"] = str(save_probe(run_dir / "probes" / name, probe))
        if i == 0:
            conf = rows.step_column(result.proba)
        summary_fam[config.family] = {
            "chosen_layers": [rows.layers[j] for j in result.chosen_layer],
            "final_layer": probe.layer_id,
            "auroc_by_layer": dict(zip(rows.layers, map(float, table["auroc"]), strict=True)),
            **_tracking(result.proba, rows),
        }
    update_columns(rows.steps_path, {"conf_probe": conf})
    all_rows = _concat(tables)
    layers_path = run_dir / "probes" / "layers.parquet"
    write_table_atomic(layers_path, all_rows)
    plot_path = run_dir / "plots" / "probe_layers.png"
    first = summary_fam[configs[0].family]["final_layer"]
    _plot_layers(plot_path, all_rows, f"Probes by layer ({label}, cross-fitted)", first)
    return {
        "label": label,
        "features": features,
        "families": [c.family for c in configs],
        "layers": list(rows.layers),
        "folds": folds,
        "bootstrap": reps,
        "n_steps": rows.n_steps,
        "n_scored": int(np.isfinite(conf).sum()),
        "n_labeled": int(labeled.size),
        "chosen_layers": summary_fam[configs[0].family]["chosen_layers"],
        "final_layer": first,
        "by_family": summary_fam,
        "train_s": time.perf_counter() - t0,
        "peak_rss_mb": _peak_rss_mb(),
        "paths": {"layers": str(layers_path), "plot": str(plot_path), **paths},
    }


def _tracking(proba: np.ndarray, rows: RunRows) -> dict:
    """How the chosen-layer probability tracks the label (Spearman, MAE) where labeled."""
    from fcjax.metrics.agreement import spearman

    on = np.isfinite(rows.y) & np.isfinite(proba)
    if not on.any():
        return {"spearman": None, "mae": None}
    return {
        "spearman": float(spearman(proba[on], rows.y[on])),
        "mae": float(np.mean(np.abs(proba[on] - rows.y[on]))),
    }


def _score(probe: Probe, rows: RunRows, mesh=None) -> np.ndarray:
    """Calibrated probabilities [n, L] of a saved probe on every stored row of a run."""
    params = {k: v[None] for k, v in probe.arrays().items()}
    params = {k: np.asarray(v, np.float32) for k, v in params.items()}
    config = TrainConfig.for_family(probe.family, batch_size=4096)
    stats = Standardizer(np.asarray(probe.stats.mean, np.float32), np.asarray(probe.stats.std))
    s = predict_logits(params, stats, rows.source, config, mesh)[:, 0].astype(np.float64)
    if probe.calibration is not None:
        cal = np.asarray(probe.calibration, np.float64)
        s = s * cal[:, 0] + cal[:, 1]
    return 0.5 * (1.0 + np.tanh(0.5 * s))


def _load_checked(checkpoint, rows: RunRows, model: str) -> Probe:
    probe = load_probe(checkpoint)
    probe.check_compatible(
        model=model,
        layers=rows.reader.layers,
        width=rows.reader.meta.width,
        where=f"--probe_checkpoint={checkpoint} on {rows.run_dir}",
    )
    return probe


def _apply_checkpoint(run_dir, checkpoint, label, features, model, reps, seed, mesh) -> dict:
    probe = load_probe(checkpoint)
    if probe.features != features:
        raise ProbeError(
            f"--probe_checkpoint={checkpoint}: probe uses {probe.features!r} features, the run "
            f"asks for {features!r}"
        )
    rows = RunRows(run_dir, label, features, None)
    probe = _load_checked(checkpoint, rows, model)
    rows = RunRows(run_dir, label, features, probe.layers)
    proba = _score(probe, rows, mesh)
    table = layer_table(proba, rows.y, rows.groups, reps=reps, seed=seed)
    out = _table_rows(probe.family, rows.layers, table, None)
    conf = rows.step_column(proba[:, probe.layer])
    update_columns(rows.steps_path, {"conf_probe": conf})
    layers_path = run_dir / "probes" / "layers.parquet"
    write_table_atomic(layers_path, out)
    plot_path = run_dir / "plots" / "probe_layers.png"
    _plot_layers(plot_path, out, f"Saved probe {checkpoint} on this run ({label})", probe.layer_id)
    return {
        "label": label,
        "checkpoint": str(checkpoint),
        "bootstrap": reps,
        "families": [probe.family],
        "layers": list(rows.layers),
        "n_steps": rows.n_steps,
        "n_scored": int(np.isfinite(conf).sum()),
        "final_layer": probe.layer_id,
        "auroc_by_layer": dict(zip(rows.layers, map(float, table["auroc"]), strict=True)),
        **_tracking(proba[:, probe.layer], rows),
        "paths": {"layers": str(layers_path), "plot": str(plot_path)},
    }


def transfer(
    train_runs: Sequence[PathLike | Location],
    eval_runs: Sequence[PathLike | Location],
    out: PathLike | Location,
    *,
    label: str = "correct",
    families: Sequence[str] = ("linear",),
    features: str = "end",
    layers: Sequence[int] | None = None,
    batch_size: int = 0,
    epochs: int | None = None,
    reps: int = REPS,
    seed: int = 0,
    inner_val_frac: float = 0.2,
    mesh=None,
) -> dict:
    """Trains on all labeled rows of ``train_runs``, evaluates every layer on ``eval_runs``.

    Writes ``OUT/transfer.parquet`` (eval_run, family, layer, the layer-table columns),
    ``OUT/transfer.png`` and a checkpoint per family under ``OUT/ckpt_<family>``."""
    if not train_runs or not eval_runs:
        raise ValueError("transfer: give at least one training run and one evaluation run")
    out = location(out)
    train = [RunRows(r, label, features, layers) for r in train_runs]
    evals = [RunRows(r, label, features, layers) for r in eval_runs]
    models = {_model_name(r.run_dir) for r in train + evals} - {""}
    if len(models) > 1:
        raise ProbeError(f"transfer: runs use different models {sorted(models)}")
    model = models.pop() if models else ""
    ref = train[0]
    for r in train[1:] + evals:
        if r.layers != ref.layers or r.reader.meta.width != ref.reader.meta.width:
            raise ProbeError(
                f"transfer: {r.run_dir} stores layers {list(r.layers)} width "
                f"{r.reader.meta.width}, {ref.run_dir} layers {list(ref.layers)} width "
                f"{ref.reader.meta.width}"
            )
    source = ConcatSource([r.source for r in train])
    y = np.concatenate([r.y for r in train])
    groups = np.concatenate([[f"{i}:{g}" for g in r.groups] for i, r in enumerate(train)])
    labeled = np.flatnonzero(np.isfinite(y))
    if labeled.size == 0:
        raise TooFewLabels(f"transfer: no labeled rows in {list(map(str, train_runs))}")
    kw = {"batch_size": batch_size, "balanced": label != "c_samp"}
    kw.update({"epochs": epochs} if epochs else {})
    tables, summary = [], {}
    for config in _configs(families, seed, **kw):
        sel = fit_select(
            source,
            y,
            groups,
            labeled,
            config=config,
            inner_val_frac=inner_val_frac,
            seed=seed,
            mesh=mesh,
        )
        probe = _probe(sel, ref.layers, label, model, features)
        save_probe(out / f"ckpt_{config.family}", probe)
        for r in evals:
            proba = _score(probe, r, mesh)
            table = layer_table(proba, r.y, r.groups, reps=reps, seed=seed)
            t = _table_rows(config.family, r.layers, table, None)
            t["eval_run"] = np.array([str(r.run_dir)] * len(r.layers))
            tables.append(t)
            summary[f"{config.family}|{r.run_dir}"] = {
                "final_layer": probe.layer_id,
                "auroc_final_layer": float(table["auroc"][probe.layer]),
                **_tracking(proba[:, probe.layer], r),
            }
    all_rows = _concat(tables)
    write_table_atomic(out / "transfer.parquet", all_rows)
    _plot_transfer(out / "transfer.png", all_rows, [str(p) for p in train_runs])
    return {
        "train_runs": [str(p) for p in train_runs],
        "label": label,
        "bootstrap": reps,
        "results": summary,
        "paths": {"table": str(out / "transfer.parquet"), "plot": str(out / "transfer.png")},
    }


def _plot_transfer(path: Location, table: dict, train_runs: list[str]) -> None:
    names = ", ".join(location(r).name for r in train_runs)
    plots.save_png(path, [transfer_panel(table, f"Transfer: trained on {names}")])


def main(argv: Sequence[str]) -> None:
    del argv
    from absl import flags, logging

    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.

    f = flags.FLAGS
    layers = [int(v) for v in f.layers] if f.layers else None
    common = {
        "label": f.label,
        "features": f.features,
        "batch_size": f.batch_size,
        "epochs": f.epochs,
        "reps": f.reps,
        "seed": f.seed,
    }
    if f.train_runs or f.eval_runs:
        if f.run:
            raise flags.ValidationError("--run and --train_runs/--eval_runs exclude each other")
        if not (f.train_runs and f.eval_runs and f.out):
            raise flags.ValidationError("transfer needs --train_runs, --eval_runs and --out")
        summary = transfer(
            f.train_runs, f.eval_runs, f.out, families=f.family, layers=layers, **common
        )
    else:
        if not f.run:
            raise flags.ValidationError("give --run=DIR (or --train_runs/--eval_runs/--out)")
        summary = run_probe_stage(
            f.run,
            layers=layers,
            folds=f.folds,
            families=f.family,
            checkpoint=f.probe_checkpoint or None,
            **common,
        )
    print(json.dumps(summary, indent=1))


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("run", None, "Run directory (holds hidden/, steps.parquet, ...).")
    flags.DEFINE_list("train_runs", [], "Transfer: run directories to train on.")
    flags.DEFINE_list("eval_runs", [], "Transfer: run directories to evaluate on.")
    flags.DEFINE_string("out", None, "Transfer: output directory.")
    flags.DEFINE_string("probe_checkpoint", "", "Score --run with this saved probe (no training).")
    flags.DEFINE_list("layers", None, "Layer ids to probe (default: every stored layer).")
    flags.DEFINE_list("family", ["linear"], f"Probe families: {', '.join(FAMILIES)}.")
    flags.DEFINE_enum("features", "end", list(FEATURES), "Step-end token or mean over the step.")
    flags.DEFINE_integer("batch_size", 0, "Rows per training step (0: full batch).", lower_bound=0)
    flags.DEFINE_integer("epochs", None, "Training epochs (default: the family's).")
    flags.DEFINE_integer(
        "reps",
        REPS,
        "Question-bootstrap and permutation replicates of the layer table's AUROC interval and "
        "null band (0: none); the default is experiments.run's --bootstrap default, and in a "
        "run the stage uses that flag's value.",
        lower_bound=0,
    )
    flags.DEFINE_integer("folds", 5, "Cross-fitting folds (grouped by example).")
    flags.DEFINE_enum("label", "correct", list(LABELS), "Probe label.")
    flags.DEFINE_integer("seed", 0, "Seed for fold and inner-split assignment.")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
