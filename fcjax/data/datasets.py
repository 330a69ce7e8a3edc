"""Evaluation examples: a validated JSONL loader, the named datasets and the hub sets.

Every loader returns `list[Example]`. Bad files raise `DataError` naming the file, the
1-based line and the field, so a broken row is found at load time, not mid-run.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from fcjax.data import arithmetic
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
from fcjax.text.answers import HLE_ANSWER_TYPES, infer_kind

KINDS = ("numeric", "math", "letter", "yesno")
T = TypeVar("T")


# ----------------------------------------------------------------------------- JSONL


def _row_to_example(row: dict[str, Any], where: str, kind: str | None, source: str) -> Example:
    """Validates one parsed JSON object; `where` is "file line N" for messages."""
    require(row, ("id", "question", "answer"), where)
    ex_id = id_field(row, where)
    question = str_field(row, "question", where)
    answer = answer_field(row, "answer", where)
    choices = choices_field(row, where)
    if choices is not None:
        valid = letters(len(choices))
        if len(answer) != 1 or answer.upper() not in valid:
            raise DataError(
                f"{where}: field 'answer' {answer!r} is not a letter of its "
                f"{len(choices)} choices ({valid[0]}-{valid[-1]})"
            )
        answer = answer.upper()

    if kind is None:
        kind = infer_kind(answer, choices)
    else:
        _check_kind(answer, choices, kind, where)
    row_source = row.get("source")
    answer_type = row.get("answer_type")
    if answer_type is not None:
        check_one_of(answer_type, HLE_ANSWER_TYPES, "answer_type", where)
    return Example(
        id=ex_id,
        question=question,
        choices=choices,
        answer=answer,
        kind=kind,
        source=row_source if isinstance(row_source, str) and row_source else source,
        answer_type=answer_type,
    )


def _check_kind(answer: str, choices: tuple[str, ...] | None, kind: str, where: str) -> None:
    """A declared dataset kind must fit the row; otherwise the gold could never match."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    if kind == "letter" and choices is None:
        raise DataError(f"{where}: field 'choices' is null but the dataset is multiple choice")
    if kind != "letter" and choices is not None:
        raise DataError(f"{where}: field 'choices' is set but the dataset kind is {kind!r}")
    check_answer_form(answer, kind, "answer", where)


def load_jsonl(path: str | os.PathLike, kind: str | None = None) -> list[Example]:
    """Loads and validates a JSONL file of `{"id","question","choices","answer","source"}`.

    Blank lines are skipped. `kind` forces every row's kind (checked against the row);
    None infers it per row with `fcjax.text.answers.infer_kind`.
    """
    path = existing_file(path)
    examples: list[Example] = []
    first_line: dict[str, int] = {}
    for lineno, where, row in jsonl_rows(path):
        ex = _row_to_example(row, where, kind, source=path.name)
        if ex.id in first_line:
            raise DataError(f"{where}: field 'id' {ex.id!r} duplicates line {first_line[ex.id]}")
        first_line[ex.id] = lineno
        examples.append(ex)
    if not examples:
        raise DataError(f"{path}: empty file (no rows)")
    return examples


# ----------------------------------------------------------------------------- data dir


def data_dir() -> Path:
    """The shared data folder: $FCJAX_DATA, else ../shared/data from the repo root or cwd."""
    env = os.environ.get("FCJAX_DATA")
    if env:
        if not Path(env).is_dir():
            raise DataError(f"FCJAX_DATA={env!r} is not a directory")
        return Path(env)
    repo_root = Path(__file__).resolve().parents[2]
    candidates = [repo_root / ".." / "shared" / "data", Path.cwd() / ".." / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    tried = ", ".join(str(c.resolve()) for c in candidates)
    raise DataError(
        f"data directory not found (tried {tried}); set FCJAX_DATA or pass path=... to load_dataset"
    )


# ----------------------------------------------------------------------------- hub sets


@dataclasses.dataclass(frozen=True)
class HubSpec:
    """Where a study dataset lives on the Hugging Face hub and how its rows map."""

    repo: str
    parts: tuple[tuple[str | None, str], ...]  # (config, split) pairs, concatenated
    to_row: Callable[[dict[str, Any], int, str], dict[str, Any] | None]  # None drops a row


def _aime2025_row(r: dict[str, Any], i: int, config: str | None) -> dict[str, Any]:
    return {
        "id": f"aime2025-{config}-{i + 1}",
        "question": r["question"],
        "choices": None,
        "answer": str(r["answer"]).strip(),
    }


def _supergpqa_row(r: dict[str, Any], i: int, config: str | None) -> dict[str, Any] | None:
    if str(r.get("difficulty", "")).lower() != "hard":
        return None
    return {
        "id": f"supergpqa-{r.get('uuid', i)}",
        "question": r["question"],
        "choices": list(r["options"]),
        "answer": r["answer_letter"],
    }


def _musr_row(r: dict[str, Any], i: int, config: str | None) -> dict[str, Any]:
    choices = r["choices"]
    if isinstance(choices, str):  # the hub stores the list as its Python repr
        import ast

        choices = ast.literal_eval(choices)
    return {
        "id": f"musr-{config}-{i:04d}",
        "question": f"{r['narrative']}\n\nQuestion: {r['question']}",
        "choices": list(choices),
        "answer": letters(len(choices))[int(r["answer_index"])],
    }


def _hle_row(r: dict[str, Any], i: int, config: str | None) -> dict[str, Any] | None:
    if r.get("image"):  # text-only subset
        return None
    return {
        "id": f"hle-{r.get('id', i)}",
        "question": r["question"],
        "choices": None,
        "answer": str(r["answer"]).strip(),
        "answer_type": r.get("answer_type") or "exactMatch",
    }


HUB_SETS: dict[str, HubSpec] = {
    "aime2025": HubSpec(
        "opencompass/AIME2025", (("AIME2025-I", "test"), ("AIME2025-II", "test")), _aime2025_row
    ),
    "supergpqa_hard": HubSpec("m-a-p/SuperGPQA", ((None, "train"),), _supergpqa_row),
    "musr": HubSpec(
        "TAUR-Lab/MuSR",
        ((None, "murder_mysteries"), (None, "object_placements"), (None, "team_allocation")),
        _musr_row,
    ),
    "hle_text": HubSpec("cais/hle", ((None, "test"),), _hle_row),
}


def load_hub(name: str) -> list[Example]:
    """Loads a study hub set with `datasets.load_dataset`; a clear DataError when offline."""
    spec = HUB_SETS[name]
    try:
        import datasets as hf_datasets
    except ImportError:
        raise DataError(
            f"dataset {name!r} comes from the Hugging Face hub ({spec.repo}) and needs the "
            "`datasets` package (pip install datasets); offline, export it to JSONL and pass "
            "path=..."
        ) from None
    examples: list[Example] = []
    seen: set[str] = set()
    for config, split in spec.parts:
        try:
            rows = hf_datasets.load_dataset(spec.repo, config, split=split)
        except Exception as e:  # network, auth, missing repo: all mean "not available"
            raise DataError(
                f"dataset {name!r}: could not load {spec.repo} (config={config}, "
                f"split={split}) from the Hugging Face hub: {type(e).__name__}: {e}. "
                "Offline, export it to JSONL and pass path=..."
            ) from e
        for i, r in enumerate(rows):
            where = f"{spec.repo} {config or ''}/{split} row {i}"
            try:
                row = spec.to_row(dict(r), i, config or split)
            except (KeyError, ValueError, IndexError, SyntaxError) as e:
                raise DataError(f"{where}: unexpected row layout ({type(e).__name__}: {e})") from e
            if row is None:
                continue
            ex = _row_to_example(row, where, None, spec.repo)
            if ex.id in seen:
                raise DataError(f"{where}: field 'id' {ex.id!r} repeats")
            seen.add(ex.id)
            examples.append(ex)
    if not examples:
        raise DataError(f"dataset {name!r}: {spec.repo} gave no usable rows")
    return examples


# ----------------------------------------------------------------------------- registry


def _file_loader(filename: str, kind: str) -> Callable[..., list[Example]]:
    def load(**_: Any) -> list[Example]:
        return load_jsonl(data_dir() / filename, kind=kind)

    load.__doc__ = f"{filename} from the shared data directory (kind {kind!r})."
    return load


def _arithmetic_loader(
    num_examples: int | None = None, seed: int = 0, difficulty: int = 1, **_: Any
) -> list[Example]:
    return arithmetic.generate(100 if num_examples is None else num_examples, difficulty, seed)


def _hub_loader(name: str) -> Callable[..., list[Example]]:
    def load(**_: Any) -> list[Example]:
        return load_hub(name)

    load.__doc__ = f"{HUB_SETS[name].repo} from the Hugging Face hub (needs `datasets`, online)."
    return load


DATASETS: dict[str, Callable[..., list[Example]]] = {
    "gsm8k": _file_loader("gsm8k_test.jsonl", "numeric"),
    "math500": _file_loader("math500.jsonl", "math"),
    "aime": _file_loader("aime_1983_2024.jsonl", "numeric"),
    "lsat_ar": _file_loader("agieval_lsat_ar.jsonl", "letter"),
    "lsat_lr": _file_loader("agieval_lsat_lr.jsonl", "letter"),
    "strategyqa": _file_loader("bigbench_strategyqa.jsonl", "yesno"),
    "logical_deduction_three": _file_loader(
        "bigbench_logical_deduction_three_objects.jsonl", "letter"
    ),
    "logical_deduction_five": _file_loader(
        "bigbench_logical_deduction_five_objects.jsonl", "letter"
    ),
    "logical_deduction_seven": _file_loader(
        "bigbench_logical_deduction_seven_objects.jsonl", "letter"
    ),
    "legalbench": _file_loader("legalbench_yesno.jsonl", "yesno"),
    "arithmetic": _arithmetic_loader,
    **{name: _hub_loader(name) for name in HUB_SETS},
}


SUBSET_RULES = ("fcjax", "paper")


def paper_subset(n_rows: int, num_examples: int | None, seed: int = 42) -> list[int]:
    """Row indices of the published question subset, in the published order.

    The published loaders take ``DataFrame.sample(n=min(num_examples, n_rows),
    random_state=seed)``: pandas draws ``numpy.random.RandomState(seed).permutation(n_rows)``
    and keeps its first n, in that (shuffled) order, so even a subset as large as the set
    comes back shuffled. ``num_examples`` None keeps every row (shuffled as well).
    """
    if n_rows < 0:
        raise ValueError(f"paper_subset: n_rows must be >= 0, got {n_rows}")
    n = n_rows if num_examples is None else min(num_examples, n_rows)
    return [int(i) for i in np.random.RandomState(seed).permutation(n_rows)[:n]]


def load_dataset(
    name: str | None = None,
    path: str | os.PathLike | None = None,
    num_examples: int | None = None,
    seed: int | None = 0,
    subset_rule: str = "fcjax",
    **kw: Any,
) -> list[Example]:
    """Loads a named dataset or a JSONL file.

    `num_examples` keeps a subset. subset_rule="fcjax": a random sample drawn with `seed` (file
    order kept), or the first rows when `seed` is None. subset_rule="paper": the published draw
    (`paper_subset` with `seed`, the rows in its shuffled order, always shuffled). For
    "arithmetic", `num_examples` is the number generated (default 100), `seed` the generator
    seed, and `difficulty=1..5` a keyword (the subset rule does not apply).
    """
    if subset_rule not in SUBSET_RULES:
        raise ValueError(
            f"load_dataset: subset_rule must be one of {SUBSET_RULES}, got {subset_rule!r}"
        )
    if (name is None) == (path is None):
        raise ValueError("load_dataset: pass exactly one of name= or path=")
    if num_examples is not None and num_examples < 1:
        raise ValueError(f"load_dataset: num_examples must be >= 1, got {num_examples}")
    if path is not None:
        examples = load_jsonl(path, kind=kw.pop("kind", None))
    elif name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(sorted(DATASETS))}")
    elif name == "arithmetic":
        return DATASETS[name](num_examples=num_examples, seed=0 if seed is None else seed, **kw)
    else:
        examples = DATASETS[name](**kw)
    return subset(examples, num_examples, seed, subset_rule)


def subset(
    items: Sequence[T], num_examples: int | None, seed: int | None, rule: str = "fcjax"
) -> list[T]:
    """The ``num_examples`` a run keeps of a dataset's (or a trace file's) items. ``rule``
    "fcjax": a random sample drawn with ``seed``, file order kept; the first ones when
    ``seed`` is None; all when ``num_examples`` is None or covers them. "paper": the
    published pandas ``sample`` (``paper_subset``, seed 42 when ``seed`` is None)."""
    if rule == "paper":
        return [
            items[i] for i in paper_subset(len(items), num_examples, 42 if seed is None else seed)
        ]
    if num_examples is None or num_examples >= len(items):
        return list(items)
    if seed is None:
        return list(items[:num_examples])
    keep = np.sort(np.random.default_rng(seed).choice(len(items), num_examples, replace=False))
    return [items[i] for i in keep]
