"""Traces from any engine (vLLM, SGLang, a released set): read, validate and write records.

One record per trace, in a JSONL file or a parquet table:

- required: ``id``, ``question``, ``gold`` (the gold answer; a letter for multiple choice),
  ``text`` (the model's whole output after the prompt, think block included; may be empty);
- optional: ``dataset`` (whose scorer: ``DATASET_KINDS``), ``answer_type`` (HLE's
  ``exactMatch`` / ``multipleChoice``), ``choices`` (the options, labelled A, B, ...),
  ``prompt`` (the exact prompt text; default: built from the question), ``model`` (recorded
  only), ``output_ids`` (the output's token ids under the studied model's tokenizer) and
  ``finish_reason`` (``eos``, ``stop``, ``length``, ``unknown``).

``output_ids`` make an import exact: re-tokenizing a text need not give the ids that were
sampled (``decode`` then ``encode`` merges tokens differently), so ``experiments.export``
writes them and an import uses them as given (their decode must start with ``text``). A
text-only record is tokenized with the model (``fcjax.engine.imported``). Unknown fields
are ignored with a warning. A bad record raises ``DataError`` naming file, line (JSONL) or
row (parquet), and field.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fcjax.data.datasets import KINDS, subset
from fcjax.data.example import DataError, Example, letters
from fcjax.data.rows import (
    answer_field,
    check_answer_form,
    check_one_of,
    choices_field,
    existing_file,
    id_field,
    jsonl_rows,
    require,
    str_field,
)
from fcjax.text.answers import infer_kind

log = logging.getLogger("fcjax")

REQUIRED = ("id", "question", "gold", "text")
OPTIONAL = (
    "dataset",
    "answer_type",
    "choices",
    "prompt",
    "model",
    "output_ids",
    "finish_reason",
)
# the study's datasets -> the fcjax answer kind that scores them (None: by answer_type, or
# inferred from the gold); fcjax's own kinds name themselves
DATASET_KINDS: dict[str, str | None] = {
    "aime": "numeric",
    "hle": None,
    "supergpqa": "letter",
    "musr": "letter",
    "legalbench": "yesno",
    **{k: k for k in KINDS},
}
HLE_ANSWER_TYPES = {"multipleChoice": "letter", "exactMatch": None}
FINISH_REASONS = ("eos", "stop", "length", "unknown")


@dataclasses.dataclass(frozen=True)
class TraceRecord:
    """One validated trace record; ``where`` is "file line N" (or "row N") for messages."""

    id: str
    question: str
    gold: str
    text: str
    kind: str  # the answer kind that scores it (``scoring_kind``)
    where: str
    dataset: str | None = None
    answer_type: str | None = None
    choices: tuple[str, ...] | None = None
    prompt: str | None = None
    model: str | None = None
    output_ids: tuple[int, ...] | None = None
    finish_reason: str = "unknown"

    @property
    def example(self) -> Example:
        """The question as a dataset example (its prompt and scoring read this)."""
        source = self.dataset or self.where.rsplit(" ", 2)[0]  # else the file's name
        return Example(
            self.id, self.question, self.choices, self.gold, self.kind, source, self.answer_type
        )


def scoring_kind(
    dataset: str | None, answer_type: str | None, gold: str, choices: Sequence[str] | None
) -> str:
    """The answer kind that scores a record: the dataset's (HLE: by ``answer_type``), else
    inferred from the gold and choices. The one place a record's scorer is chosen."""
    kind = DATASET_KINDS.get(dataset) if dataset else None
    if dataset == "hle" and answer_type:
        kind = HLE_ANSWER_TYPES[answer_type]
    return kind or infer_kind(gold, list(choices) if choices else None)


def to_record(row: Mapping[str, Any], where: str) -> TraceRecord:
    """Validates one record (a JSON object or a parquet row)."""
    require(row, REQUIRED, where)
    rid = id_field(row, where)
    question = str_field(row, "question", where)
    text = str_field(row, "text", where, empty=True)
    gold = answer_field(row, "gold", where)
    dataset, answer_type = row.get("dataset"), row.get("answer_type")
    if dataset is not None:
        check_one_of(dataset, DATASET_KINDS, "dataset", where)
    if answer_type is not None:
        if dataset != "hle":
            raise DataError(f"{where}: field 'answer_type' is read for dataset 'hle' only")
        check_one_of(answer_type, HLE_ANSWER_TYPES, "answer_type", where)
    choices = choices_field(row, where)
    kind = scoring_kind(dataset, answer_type, gold, choices)
    gold = _check_gold(gold, kind, choices, where)
    for field in ("prompt", "model"):
        if row.get(field) is not None:
            str_field(row, field, where, empty=field == "model")
    ids = row.get("output_ids")
    if ids is not None:
        if isinstance(ids, str) or not isinstance(ids, Sequence):
            raise DataError(f"{where}: field 'output_ids' must be a list of token ids")
        for j, t in enumerate(ids):
            if isinstance(t, bool) or not isinstance(t, int) or t < 0:
                raise DataError(
                    f"{where}: field 'output_ids' item {j} is not a token id (got {t!r})"
                )
        ids = tuple(int(t) for t in ids)
    finish = row.get("finish_reason") or "unknown"
    check_one_of(finish, FINISH_REASONS, "finish_reason", where)
    return TraceRecord(
        id=rid,
        question=question,
        gold=gold,
        text=text,
        kind=kind,
        where=where,
        dataset=dataset,
        answer_type=answer_type,
        choices=choices,
        prompt=row.get("prompt"),
        model=row.get("model"),
        output_ids=ids,
        finish_reason=finish,
    )


def _check_gold(gold: str, kind: str, choices: tuple[str, ...] | None, where: str) -> str:
    """The gold as its kind scores it; refuses one that could never match."""
    if kind == "letter":
        valid = letters(len(choices)) if choices else letters(26)
        if len(gold) != 1 or gold.upper() not in valid:
            raise DataError(
                f"{where}: field 'gold' {gold!r} is not an option letter ({valid[0]}-{valid[-1]})"
            )
        return gold.upper()
    if choices is not None:
        raise DataError(f"{where}: field 'choices' is set but the record is scored as {kind!r}")
    check_answer_form(gold, kind, "gold", where)
    return gold


def _rows(path: Path) -> list[tuple[str, Any]]:
    """(where, row) per record of a JSONL file or a parquet table."""
    if path.suffix == ".parquet":
        from fcjax.store.tables import read_arrow

        try:
            rows = read_arrow(path).to_pylist()
        except Exception as e:  # a truncated or foreign file: one clear message
            raise DataError(f"{path}: not a readable parquet table ({e})") from None
        return [(f"{path.name} row {i}", r) for i, r in enumerate(rows, start=1)]
    return [(where, row) for _, where, row in jsonl_rows(path)]


def read_traces(path: str | os.PathLike) -> list[TraceRecord]:
    """Every record of a JSONL file (``.parquet``: a parquet table), validated, in order."""
    path = existing_file(path)
    stat = path.stat()
    return list(_read_cached(str(path.resolve()), stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=4)
def _read_cached(path: str, mtime_ns: int, size: int) -> tuple[TraceRecord, ...]:
    records: list[TraceRecord] = []
    first: dict[str, str] = {}
    ignored: set[str] = set()
    for where, row in _rows(Path(path)):
        ignored |= set(row) - set(REQUIRED) - set(OPTIONAL)
        rec = to_record(row, where)
        if rec.id in first:
            raise DataError(f"{where}: field 'id' {rec.id!r} repeats ({first[rec.id]})")
        first[rec.id] = where
        records.append(rec)
    if not records:
        raise DataError(f"{path}: no records")
    if ignored:
        log.warning("%s: fields ignored (not trace fields): %s", path, ", ".join(sorted(ignored)))
    return tuple(records)


def select_traces(
    path: str | os.PathLike,
    num_examples: int | None = None,
    seed: int | None = 0,
    rule: str = "fcjax",
) -> list[TraceRecord]:
    """The records a run studies: ``fcjax.data.datasets.subset`` of the file (by ``rule``),
    as a dataset's examples are chosen."""
    return subset(read_traces(path), num_examples, seed, rule)


def traces_digest(path: str | os.PathLike) -> str:
    """sha256 of the file's bytes (recorded in config.json, so another file is a change)."""
    path = existing_file(path)
    stat = path.stat()
    return _digest_cached(str(path.resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _digest_cached(path: str, mtime_ns: int, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_traces(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> None:
    """Writes records (dicts of the fields above; None values left out) as JSONL, or as a
    parquet table when ``path`` ends in ``.parquet``. Each row is validated first."""
    path = Path(path)
    rows = [{k: v for k, v in r.items() if v is not None} for r in rows]
    for i, r in enumerate(rows, start=1):
        to_record(r, f"record {i}")
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        fields = [f for f in (*REQUIRED, *OPTIONAL) if any(f in r for r in rows)]
        table = pa.table({f: [r.get(f) for r in rows] for f in fields})
        pq.write_table(table, path)
        return
    with open(path, "w", encoding="utf-8") as fh:
        for r in rows:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")


def trace_info(path: str | os.PathLike, chosen: Sequence[TraceRecord]) -> dict:
    """What a run records of its trace file: path, hash, sizes and the models the studied
    records (``chosen``) name (``model`` field)."""
    return {
        "file": str(path),
        "sha256": traces_digest(path),
        "records": len(read_traces(path)),
        "studied": len(chosen),
        "models": sorted({r.model for r in chosen if r.model}),
        "with_output_ids": sum(r.output_ids is not None for r in chosen),
    }
