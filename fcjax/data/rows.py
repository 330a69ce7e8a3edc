"""Checks of one record's fields, shared by the dataset loader (``datasets``) and the trace
reader (``traces``). Each raises ``DataError`` naming where the record is (``where``: "file
line N", "file row N") and the field."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fcjax.data.example import DataError

NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def existing_file(path: str | os.PathLike) -> Path:
    """``path`` as a Path; DataError when it is not a file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    return path


def jsonl_rows(path: Path) -> list[tuple[int, str, dict[str, Any]]]:
    """(line number, where, object) per non-blank line of a JSONL file, ``where`` being
    "<file name> line <N>"; text that is not UTF-8, malformed JSON or a line that is not an
    object raises DataError."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path.name} line {lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: malformed JSON ({e})") from None
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        out.append((lineno, where, row))
    return out


def require(row: Mapping[str, Any], fields: Iterable[str], where: str) -> None:
    """Each of ``fields`` is present and not null."""
    for field in fields:
        if row.get(field) is None:
            raise DataError(f"{where}: missing field {field!r}")


def id_field(row: Mapping[str, Any], where: str) -> str:
    """The record's ``id``: a non-empty string or an integer, as a string."""
    rid = row["id"]
    if isinstance(rid, bool) or not isinstance(rid, str | int) or not str(rid).strip():
        raise DataError(f"{where}: field 'id' must be a non-empty string, got {rid!r}")
    return str(rid)


def str_field(row: Mapping[str, Any], field: str, where: str, *, empty: bool = False) -> str:
    """A string field; blank only where ``empty``."""
    value = row[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    if not empty and not value.strip():
        raise DataError(f"{where}: field {field!r} is empty")
    return value


def answer_field(row: Mapping[str, Any], field: str, where: str) -> str:
    """A gold answer: a string or a number, as a stripped, non-empty string."""
    value = row[field]
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise DataError(f"{where}: field {field!r} must be a string or number, got {value!r}")
    value = str(value).strip()
    if not value:
        raise DataError(f"{where}: field {field!r} is empty")
    return value


def choices_field(row: Mapping[str, Any], where: str) -> tuple[str, ...] | None:
    """The optional ``choices``: None, or 1 to 26 non-empty option strings."""
    choices = row.get("choices")
    if choices is None:
        return None
    if isinstance(choices, str) or not isinstance(choices, Sequence) or not choices:
        raise DataError(f"{where}: field 'choices' must be a non-empty list or null")
    if len(choices) > 26:
        raise DataError(f"{where}: field 'choices' has {len(choices)} options (at most 26)")
    for j, c in enumerate(choices):
        if not isinstance(c, str) or not c.strip():
            raise DataError(f"{where}: field 'choices' option {j} is not a non-empty string")
    return tuple(choices)


def check_one_of(value: Any, valid: Iterable[str], field: str, where: str) -> None:
    """``value`` is one of ``valid`` (the message lists them)."""
    valid = tuple(valid)
    if value not in valid:
        raise DataError(f"{where}: field {field!r} {value!r} unknown; valid: {', '.join(valid)}")


def check_answer_form(answer: str, kind: str, field: str, where: str) -> None:
    """A numeric answer is a number and a yes/no answer Yes or No (else it could never
    match a prediction)."""
    if kind == "numeric" and not NUMBER.fullmatch(answer):
        raise DataError(f"{where}: field {field!r} {answer!r} is not a number")
    if kind == "yesno" and answer.lower() not in ("yes", "no"):
        raise DataError(f"{where}: field {field!r} {answer!r} is not Yes or No")
