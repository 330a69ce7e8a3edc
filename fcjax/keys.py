"""Stable 64-bit keys from example ids: the same in every process and run (unlike ``hash``).

One definition for everything seeded by an example: the engine's row streams
(``fcjax.engine.sampling.row_keys``) and the choice of steps to score
(``fcjax.text.select_steps``).
"""

from __future__ import annotations

import hashlib

import numpy as np

KEY_BITS = 64


def stable_key(x) -> int:
    """A 64-bit integer from any example id: a non-negative integer below 2**64 is its own key
    (so integer ids never share one), anything else the first 8 bytes of the SHA-256 of its
    ``str`` (two of a million distinct ids share a key with probability ~3e-8)."""
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool) and 0 <= int(x) < 2**64:
        return int(x)
    return int.from_bytes(hashlib.sha256(str(x).encode("utf-8")).digest()[:8], "little")


def key_words(key: int) -> tuple[int, int]:
    """A 64-bit key as (low, high) 32-bit words (what a PRNG fold-in takes)."""
    if not 0 <= key < 2**64:
        raise ValueError(f"a stable key is a 64-bit unsigned integer, got {key}")
    return key & 0xFFFFFFFF, key >> 32
