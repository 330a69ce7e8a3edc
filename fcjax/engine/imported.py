"""Generations of imported traces (``fcjax.data.traces``): the studied model's tokens of each
record and their teacher-forced log-probabilities (``fcjax.engine.scoring.force_many``),
the same ``Generation`` objects ``fcjax.generate`` returns, so every later stage reads an
imported trace as it reads a sampled one.

Tokens: a record's ``output_ids`` as given (their decode must start with its text: a
generation cut at a stop string keeps the straddling token), else the model's tokenization
of the text alone, as a generation's tokens follow its prompt's (whose decode must give the
text back, or the step spans could not index it). The prompt is the record's ``prompt``, or
the one the run builds from the question, tokenized as ``fcjax.generate`` tokenizes it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from fcjax.data import DataError, Example
from fcjax.data.traces import TraceRecord
from fcjax.engine.generate import Generation
from fcjax.engine.scoring import force_many
from fcjax.models.lm import LM


def _first_difference(a: str, b: str) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def output_ids(lm: LM, record: TraceRecord) -> list[int]:
    """The record's output tokens under ``lm``'s tokenizer (``DataError`` naming the record
    and field when they do not fit the model or the text)."""
    if lm.tokenizer is None:
        raise DataError(f"{record.where}: model {lm.name!r} has no tokenizer to read the trace")
    vocab = lm.config.vocab_size
    if record.output_ids is not None:
        ids = list(record.output_ids)
        bad = [t for t in ids if t >= vocab]
        if bad:
            raise DataError(
                f"{record.where}: field 'output_ids' has ids outside the model's vocabulary "
                f"0..{vocab - 1}: {bad[:5]} (another model's tokens?)"
            )
        decoded = lm.tokenizer.decode(ids, skip_special_tokens=False)
        if not decoded.startswith(record.text):
            at = _first_difference(decoded, record.text)
            raise DataError(
                f"{record.where}: field 'output_ids' does not decode to field 'text' (they "
                f"differ at character {at}: {decoded[at : at + 20]!r} vs "
                f"{record.text[at : at + 20]!r}); another tokenizer's ids?"
            )
        return ids
    ids = lm.encode(record.text)
    decoded = lm.tokenizer.decode(ids, skip_special_tokens=False)
    if decoded != record.text:
        at = _first_difference(decoded, record.text)
        raise DataError(
            f"{record.where}: field 'text' does not survive the model's tokenizer (decode of "
            f"its tokens differs at character {at}: {decoded[at : at + 20]!r} vs "
            f"{record.text[at : at + 20]!r}); give the record's 'output_ids'"
        )
    return ids


def check_records(lm: LM, records: Sequence[TraceRecord]) -> None:
    """Refuses the first record whose tokens do not fit ``lm`` (before a run writes)."""
    for record in records:
        output_ids(lm, record)


def imported_generations(
    lm: LM,
    records: Sequence[TraceRecord],
    build_prompt: Callable[[Example], str],
    top_k: int = 5,
    batch_size: int = 8,
) -> tuple[list[str], list[Generation]]:
    """(prompt texts, generations) of the records: each record's ``prompt``, else
    ``build_prompt(record.example)``; its tokens; one teacher-forced pass per batch."""
    prompts, pairs = [], []
    for record in records:
        prompt = record.prompt if record.prompt is not None else build_prompt(record.example)
        prompt_ids = lm.encode(prompt)
        if not prompt_ids:
            raise DataError(f"{record.where}: field 'prompt' has no tokens")
        prompts.append(prompt)
        pairs.append((prompt_ids, output_ids(lm, record)))
    gens = force_many(
        lm,
        pairs,
        top_k,
        batch_size,
        texts=[r.text for r in records],
        finish_reasons=[r.finish_reason for r in records],
    )
    return prompts, gens
