"""Character offsets of generated tokens and the token span of each step (METHOD.md section 2).

A step's tokens are the generated tokens whose decoded character range overlaps the step's
character span; a token straddling a step boundary belongs to both steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from fcjax.text.steps import Step

_REPLACEMENT = "\ufffd"


def _decode(tokenizer: Any, ids: Sequence[int], skip_special_tokens: bool) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


def _emitted_length(decoded: str, final: str, base: int) -> int:
    """Length of `decoded` (a decode of a prefix of the ids) minus trailing U+FFFD that only
    stand for an incomplete UTF-8 sequence (byte-fallback tokens), relative to `base`."""
    length = len(decoded)
    while (
        length > base
        and decoded[length - 1] == _REPLACEMENT
        and (length - base > len(final) or final[length - base - 1] != _REPLACEMENT)
    ):
        length -= 1
    return length - base


def token_char_offsets(
    tokenizer: Any,
    ids: Sequence[int],
    prefix_ids: Sequence[int] | None = None,
    *,
    skip_special_tokens: bool = False,
    chunk: int = 128,
    context: int = 16,
) -> list[tuple[int, int]]:
    """Char (start, end) of each generated token within the decoded generation text.

    The generation text is `tokenizer.decode(ids)`, or, with `prefix_ids` (e.g. the prompt,
    so that leading-space rules see the real context), `decode(prefix_ids + ids)` minus the
    decoded prefix. Token i ends where the decode of the first i + 1 tokens ends: the length
    of `decode(ids[:i+1])`, less trailing U+FFFD of an unfinished byte sequence (a
    byte-fallback token that completes a character later gets an empty range). Ends are
    clamped to be monotone and the last equals len(text); token i starts where token i - 1
    ends. Works with any transformers tokenizer (only `decode` is used).

    Decoding every prefix is quadratic, so the exact prefix decode is taken every `chunk`
    tokens and, in between, the decode of the tokens since the chunk start with `context`
    tokens of left context (at least 4, so that a character split into byte tokens across
    the chunk start is decoded whole); `chunk=0` decodes every prefix exactly.
    """
    context = max(context, 4)
    ids = [int(i) for i in ids]
    prefix = [int(i) for i in prefix_ids] if prefix_ids is not None else []
    all_ids = prefix + ids
    base = len(_decode(tokenizer, prefix, skip_special_tokens)) if prefix else 0
    final = _decode(tokenizer, all_ids, skip_special_tokens)[base:]
    n_prefix = len(prefix)

    def exact_end(n_generated: int) -> int:
        decoded = _decode(tokenizer, all_ids[: n_prefix + n_generated], skip_special_tokens)
        return _emitted_length(decoded, final, base)

    ends: list[int] = []
    previous = 0
    shift = head_len = left = 0
    for i in range(len(ids)):
        if chunk <= 0 or (i + 1) % chunk == 0:
            end = exact_end(i + 1)
        else:
            chunk_start = (i // chunk) * chunk
            if i == chunk_start or i == 0:
                # Anchor: exact end at the chunk start; head = `context` tokens before it.
                anchor_end = previous
                left = max(0, n_prefix + chunk_start - context)
                head = all_ids[left : n_prefix + chunk_start]
                head_text = _decode(tokenizer, head, skip_special_tokens) if head else ""
                # The head's text ends at anchor_end in the final text (drop its
                # unfinished-character U+FFFD unless the final text has one there too).
                head_len = len(head_text)
                while (
                    head_len > 0
                    and head_text[head_len - 1] == _REPLACEMENT
                    and not (0 < anchor_end <= len(final) and final[anchor_end - 1] == _REPLACEMENT)
                ):
                    head_len -= 1
                shift = anchor_end - head_len
            window_text = _decode(tokenizer, all_ids[left : n_prefix + i + 1], skip_special_tokens)
            decoded_len = len(window_text)
            while (
                decoded_len > head_len
                and window_text[decoded_len - 1] == _REPLACEMENT
                and not (
                    0 < decoded_len + shift <= len(final)
                    and final[decoded_len + shift - 1] == _REPLACEMENT
                )
            ):
                decoded_len -= 1
            end = decoded_len + shift
        end = min(max(end, previous), len(final))
        ends.append(end)
        previous = end
    if not ends:
        return []
    ends[-1] = len(final)
    starts = [0, *ends[:-1]]
    return list(zip(starts, ends, strict=True))


def token_spans(offsets: Sequence[tuple[int, int]], steps: Sequence[Step]) -> list[Step]:
    """Steps with token_start/token_end filled from per-token char `offsets`.

    A token belongs to a step when its char range overlaps the step's span (a straddling
    token belongs to both neighbours); a token with an empty range (start == end) belongs to
    the step whose span contains that position (start <= pos < end). A step that no token
    touches keeps token_start = token_end = None.
    """
    token_range = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    tok_start, tok_end = token_range[:, 0], token_range[:, 1]
    empty = tok_start == tok_end
    out = []
    for step in steps:
        overlaps = (tok_start < step.end) & (tok_end > step.start)
        contains = empty & (step.start <= tok_start) & (tok_start < step.end)
        members = np.flatnonzero(overlaps | contains)
        if members.size:
            first, last = int(members[0]), int(members[-1])
            out.append(dataclasses.replace(step, token_start=first, token_end=last + 1))
        else:
            out.append(dataclasses.replace(step, token_start=None, token_end=None))
    return out
