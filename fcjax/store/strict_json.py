"""Strict JSON: no NaN/Infinity tokens; a missing (non-finite) number is written as null."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any


def to_strict(obj: Any) -> Any:
    """``obj`` as plain JSON values: numpy arrays/scalars become lists/numbers, tuples lists,
    non-finite floats None; anything else unknown becomes its ``str``."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str | int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): to_strict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_strict(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return to_strict(obj.tolist())
    if hasattr(obj, "item"):
        return to_strict(obj.item())
    return str(obj)


def dumps_strict(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` of ``to_strict(obj)`` with ``allow_nan=False``."""
    return json.dumps(to_strict(obj), allow_nan=False, **kwargs)
