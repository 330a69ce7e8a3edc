"""Stop strings as token-level properties, so rows stop on device.

A row stops when its new token's text contains a stop string, or when the previous token's
text ends with a stop's first j characters and the new one starts with the rest. That covers
every stop spread over at most two tokens (``"\\n\\n"`` always is); the host still cuts each
finished text at the first stop string, so a longer split only costs a few extra tokens.
"""

from __future__ import annotations

import functools

import numpy as np

from fcjax.engine.decode import StopTables

MAX_SPLITS = 32  # bits of the head/tail masks


@functools.lru_cache(maxsize=8)
def _tables(tokenizer, vocab: int, stops: tuple[str, ...]) -> tuple[np.ndarray, ...]:
    contains = np.zeros(vocab, bool)
    head = np.zeros(vocab, np.uint32)
    tail = np.zeros(vocab, np.uint32)
    if not stops or tokenizer is None:
        return contains, head, tail
    n = min(vocab, len(tokenizer)) if hasattr(tokenizer, "__len__") else vocab
    ids = [[i] for i in range(n)]
    if hasattr(tokenizer, "batch_decode"):  # transformers: one call into the fast tokenizer
        texts = tokenizer.batch_decode(ids, skip_special_tokens=False)
    else:
        texts = [tokenizer.decode(i, skip_special_tokens=False) for i in ids]
    splits = [(s, j) for s in stops if s for j in range(1, len(s))][:MAX_SPLITS]
    for i, text in enumerate(texts):
        if not text:
            continue
        contains[i] = any(s in text for s in stops if s)
        for bit, (s, j) in enumerate(splits):
            if text.endswith(s[:j]):
                tail[i] |= np.uint32(1 << bit)
            if text.startswith(s[j:]):
                head[i] |= np.uint32(1 << bit)
    return contains, head, tail


def eos_table(eos_token_ids, vocab: int) -> np.ndarray:
    """[vocab] bool: which tokens end a row (ids outside the vocabulary are never sampled)."""
    table = np.zeros(vocab, bool)
    table[[t for t in eos_token_ids if 0 <= t < vocab]] = True
    return table


def stop_tables(lm, stops: tuple[str, ...]) -> StopTables:
    """The device tables for ``lm``'s EOS ids and ``stops`` (the stop tables all zero when
    there are none or no tokenizer)."""
    vocab = lm.config.vocab_size
    return StopTables(
        eos_table(lm.eos_token_ids, vocab), *_tables(lm.tokenizer, vocab, tuple(stops))
    )
