"""Writes a run's traces in the trace format of ``fcjax.data.traces``, for ``--traces``.

    python -m experiments.export --run=DIR --out=FILE.jsonl   (or FILE.parquet)

One record per row of ``examples.parquet``: its question, gold, text, prompt, finish reason,
choices, scorer (``dataset``: the row's ``dataset`` column when the run has one, else its
answer kind) and ``output_ids``, with ``model`` from ``config.json``. The ids make a
re-import exact (a text re-tokenized can give other tokens); drop them for a text-only file.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

from fcjax.data import DataError
from fcjax.data.traces import write_traces
from fcjax.store.fs import PathLike, location
from fcjax.store.tables import read_table

FLAGS = flags.FLAGS


def export_rows(run: PathLike, output_ids: bool = True) -> list[dict]:
    """The trace records of a finished (at least segmented) run."""
    run = location(run)
    path = run / "examples.parquet"
    if not path.exists():
        raise DataError(f"{path}: not found (the run has not passed its segment stage)")
    ex = read_table(path)
    config = json.loads((run / "config.json").read_text())
    choices = ex.get("choices")
    rows = []
    for i, eid in enumerate(ex["example_id"]):
        kind = str(ex["kind"][i])
        if kind == "letter" and choices is None:
            raise DataError(
                f"{path}: no 'choices' column (written by an older fcjax); rerun the run "
                f"with --redo=segment to store them"
            )
        row = {
            "id": str(eid),
            "question": ex["question"][i],
            "gold": ex["gold"][i],
            "text": ex["text"][i],
            "dataset": ex["dataset"][i] if "dataset" in ex else kind,
            "answer_type": ex["answer_type"][i] if "answer_type" in ex else None,
            "choices": list(choices[i]) if choices is not None and choices[i] else None,
            "prompt": ex["prompt"][i],
            "model": config.get("model"),
            "finish_reason": ex["finish_reason"][i],
        }
        if output_ids:
            row["output_ids"] = [int(t) for t in ex["output_ids"][i]]
        rows.append(row)
    return rows


def export(run: PathLike, out: str, output_ids: bool = True) -> int:
    """Writes the run's records to ``out``; returns how many."""
    rows = export_rows(run, output_ids)
    write_traces(out, rows)
    return len(rows)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        n = export(FLAGS.run, FLAGS.out, FLAGS.output_ids)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{n} traces written to {FLAGS.out}")


if __name__ == "__main__":  # flags defined here only: experiments.run has its own --out
    flags.DEFINE_string("run", None, "run directory (a path or URL)", required=True)
    flags.DEFINE_string("out", None, "trace file to write: .jsonl or .parquet", required=True)
    flags.DEFINE_bool("output_ids", True, "write each trace's token ids (exact re-import)")
    app.run(main)
