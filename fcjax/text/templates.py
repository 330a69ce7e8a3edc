"""Prompt templates as data: ``{name}`` placeholders, checked when a template is loaded."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class TemplateError(ValueError):
    """A prompt template file that cannot be used; the message names the file and the
    missing placeholder."""


def check_template(text: str, required: Sequence[str], source: str) -> str:
    """``text`` when it holds every ``{name}`` in ``required``; else TemplateError."""
    missing = [name for name in required if "{" + name + "}" not in text]
    if missing:
        needed = ", ".join("{" + n + "}" for n in required)
        raise TemplateError(
            f"{source}: missing placeholder {'{' + missing[0] + '}'} (a template must contain "
            f"{needed})"
        )
    return text


def load_template(path: str | Path, required: Sequence[str]) -> str:
    """A template from a UTF-8 text file, checked for its ``required`` placeholders."""
    path = Path(path)
    if not path.is_file():
        raise TemplateError(f"{path}: no such prompt file")
    text = path.read_text(encoding="utf-8").strip()
    if not text:
        raise TemplateError(f"{path}: the prompt file is empty")
    return check_template(text, required, str(path))


def fill(template: str, **values: object) -> str:
    """Replaces each ``{name}`` by its value; other braces (e.g. a JSON example) stay."""
    for name, value in values.items():
        template = template.replace("{" + name + "}", str(value))
    return template
