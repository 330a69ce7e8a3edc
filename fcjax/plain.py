"""Nested containers of numpy values as plain Python values (what JSON holds)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def to_python(obj: Any, *, strict: bool = False) -> Any:
    """``obj`` with numpy arrays and scalars turned into lists and numbers, tuples into lists.

    ``strict`` (strict JSON): non-finite floats become None, keys strings, and anything else
    unknown its ``str``; otherwise floats and unknown objects are kept as they are."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, str | int):
        return obj
    if isinstance(obj, float):
        return None if strict and not math.isfinite(obj) else obj
    if isinstance(obj, Mapping):
        return {(str(k) if strict else k): to_python(v, strict=strict) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_python(v, strict=strict) for v in obj]
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return to_python(obj.tolist(), strict=strict)
    if hasattr(obj, "item"):
        return to_python(obj.item(), strict=strict)
    return str(obj) if strict else obj
