"""Probe stage of a run: cross-fitted probe confidence for every step with hidden states.

Reads ``DIR/hidden`` (finalized HiddenStore), ``DIR/steps.parquet`` (example_id, step,
optional conf_agreement) and ``DIR/examples.parquet`` (example_id, correct). Writes the step
column ``conf_probe`` atomically, ``DIR/probes/layers.parquet``, ``DIR/plots/probe_layers.png``
and a final probe trained on all labeled rows under ``DIR/probes/ckpt``. Trace confidence and
faithfulness come from the metrics stage (``fcjax.metrics.summarize``), like every other
estimator's. Too few labels raise ``probes.TooFewLabels``.

    python -m probes.train --run=DIR [--layers=8,12] [--folds=5] [--label=correct] [--seed=0]
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fcjax.store.hidden import HiddenReader, HiddenStoreError
from fcjax.store.tables import read_table, require_columns, update_columns, write_table_atomic
from probes.checkpoint import Probe, save_probe
from probes.crossfit import crossfit, fit_with_selection
from probes.model import ProbeConfig

LABELS = ("correct", "agreement")


def _as_float(values: Any) -> np.ndarray:
    """Column -> float64 array; None/missing -> NaN, bools -> 0/1."""
    if isinstance(values, np.ndarray) and values.dtype != object:
        return values.astype(np.float64)
    return np.array([np.nan if v is None else float(v) for v in values], np.float64)


def _model_name(run_dir: Path) -> str:
    summary = run_dir / "summary.json"
    if summary.exists():
        try:
            config = json.loads(summary.read_text()).get("config", {})
        except (json.JSONDecodeError, AttributeError):
            return ""
        return str(config.get("model", "")) if isinstance(config, dict) else ""
    return ""


def _plot_layers(path: Path, layer_ids: Sequence[int], table: dict, chosen: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(layer_ids, table["auroc"], "o-", label="cross-fitted AUROC")
    ax.plot(layer_ids, table["ece"], "s--", label="ECE (10 bins)")
    ax.axvline(chosen, color="gray", lw=0.8, ls=":", label=f"final probe layer {chosen}")
    ax.axhline(0.5, color="k", lw=0.5)
    ax.set_xlabel("layer")
    ax.set_ylim(0, 1)
    ax.set_title("Linear probe by layer")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_probe_stage(
    run_dir: str | os.PathLike,
    layers: Sequence[int] | None = None,
    folds: int = 5,
    label: str = "correct",
    seed: int = 0,
    *,
    config: ProbeConfig | None = None,
    inner_val_frac: float = 0.2,
    model_name: str | None = None,
) -> dict:
    """Runs the probe stage on ``run_dir``; returns a summary dict (also the CLI's output)."""
    run_dir = Path(run_dir)
    if label not in LABELS:
        raise ValueError(f"label must be one of {LABELS}, got {label!r}")
    steps_path, examples_path = run_dir / "steps.parquet", run_dir / "examples.parquet"
    hidden_dir = run_dir / "hidden"
    if not hidden_dir.exists():
        raise HiddenStoreError(f"hidden-state store not found: {hidden_dir}")
    reader = HiddenReader(hidden_dir)
    layer_ids = tuple(reader.layers if layers is None else (int(v) for v in layers))

    steps = read_table(steps_path)
    require_columns(steps_path, steps, ["example_id", "step"])
    examples = read_table(examples_path)
    require_columns(examples_path, examples, ["example_id", "correct"])
    step_eids = [str(e) for e in steps["example_id"]]
    step_nums = np.asarray(steps["step"], np.int64)
    n_steps = len(step_eids)

    if label == "correct":
        ex_keys = [str(e) for e in examples["example_id"]]
        correct = dict(zip(ex_keys, _as_float(examples["correct"]), strict=True))
        y_all = np.array([correct.get(e, np.nan) for e in step_eids])
    else:
        require_columns(steps_path, steps, ["conf_agreement"])
        y_all = _as_float(steps["conf_agreement"])

    # Join steps to hidden rows.
    index_keys = zip(reader.index["example_id"], reader.index["step"], strict=True)
    position = {(e, int(s)): i for i, (e, s) in enumerate(index_keys)}
    step_keys = zip(step_eids, step_nums.tolist(), strict=True)
    hidden_pos = np.array([position.get(key, -1) for key in step_keys], np.int64)
    has_hidden = np.flatnonzero(hidden_pos >= 0)
    if has_hidden.size == 0:
        raise HiddenStoreError(f"{hidden_dir}: no (example_id, step) of {steps_path} is stored")
    x = reader.read_rows(reader.index["row"][hidden_pos[has_hidden]], layer_ids)
    y = y_all[has_hidden]
    groups = np.asarray([step_eids[i] for i in has_hidden])

    result = crossfit(
        x, y, groups, folds=folds, seed=seed, inner_val_frac=inner_val_frac, config=config
    )
    conf = np.full(n_steps, np.nan)
    conf[has_hidden] = result.proba

    # Final probe on all labeled rows, for reuse on new traces.
    labeled = np.flatnonzero(np.isfinite(y))
    final = fit_with_selection(
        x, y, groups, labeled, inner_val_frac=inner_val_frac, config=config, seed=seed
    )
    probe = Probe(
        final.params,
        final.stats,
        final.layer,
        layer_ids,
        fold=-1,
        label=label,
        model=_model_name(run_dir) if model_name is None else model_name,
    )
    ckpt = save_probe(run_dir / "probes" / "ckpt", probe)

    # Trace confidence and faithfulness are the metrics stage's (fcjax.metrics.summarize).
    update_columns(steps_path, {"conf_probe": conf})

    table = result.layer_table
    layers_path = run_dir / "probes" / "layers.parquet"
    write_table_atomic(
        layers_path,
        {"layer": np.asarray(layer_ids, np.int64), **{k: np.asarray(v) for k, v in table.items()}},
    )
    plot_path = run_dir / "plots" / "probe_layers.png"
    _plot_layers(plot_path, layer_ids, table, probe.layer_id)

    scored = np.isfinite(conf)
    return {
        "label": label,
        "layers": list(layer_ids),
        "folds": folds,
        "n_steps": n_steps,
        "n_scored": int(scored.sum()),
        "n_labeled": int(labeled.size),
        "chosen_layers": [layer_ids[j] for j in result.chosen_layer],
        "final_layer": probe.layer_id,
        "auroc_by_layer": dict(zip(layer_ids, map(float, table["auroc"]), strict=True)),
        "ece_by_layer": dict(zip(layer_ids, map(float, table["ece"]), strict=True)),
        "paths": {
            "layers": str(layers_path),
            "plot": str(plot_path),
            "checkpoint": str(ckpt),
        },
    }


def main(argv: Sequence[str]) -> None:
    del argv
    from absl import flags, logging

    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.

    f = flags.FLAGS
    summary = run_probe_stage(
        f.run,
        layers=[int(v) for v in f.layers] if f.layers else None,
        folds=f.folds,
        label=f.label,
        seed=f.seed,
    )
    print(json.dumps(summary, indent=1))


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("run", None, "Run directory (holds hidden/, steps.parquet, ...).")
    flags.DEFINE_list("layers", None, "Layer ids to probe (default: every stored layer).")
    flags.DEFINE_integer("folds", 5, "Cross-fitting folds (grouped by example).")
    flags.DEFINE_enum("label", "correct", list(LABELS), "Probe label.")
    flags.DEFINE_integer("seed", 0, "Seed for fold and inner-split assignment.")
    flags.mark_flag_as_required("run")


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
