"""Strict JSON: no NaN/Infinity tokens; a missing (non-finite) number is written as null."""

from __future__ import annotations

import json
from typing import Any

from fcjax.plain import to_python


def to_strict(obj: Any) -> Any:
    """``obj`` as plain JSON values: numpy arrays/scalars become lists/numbers, tuples lists,
    non-finite floats None; anything else unknown becomes its ``str``."""
    return to_python(obj, strict=True)


def dumps_strict(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` of ``to_strict(obj)`` with ``allow_nan=False``."""
    return json.dumps(to_strict(obj), allow_nan=False, **kwargs)
