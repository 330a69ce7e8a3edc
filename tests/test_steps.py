"""Step segmentation, step selection and token/char alignment."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fcjax.text import (
    Step,
    reasoning_span,
    select_steps,
    split_steps,
    token_char_offsets,
    token_spans,
)

TRACE = (
    "<think>\nFirst, add the numbers: 2 + 3 = 5.\n\n\n  Wait, is that right? "
    "Yes.\n \n\nSo the sum is 5.   \n</think>\n\nThe answer is \\boxed{5}."
)


def _check_invariants(text: str, steps: list[Step]) -> None:
    start, end = reasoning_span(text)
    for i, step in enumerate(steps):
        assert step.index == i
        assert text[step.start : step.end] == step.text
        assert step.text.strip() == step.text and step.text
        assert start <= step.start < step.end <= end
    for a, b in itertools.pairwise(steps):
        assert a.end <= b.start


def test_reasoning_span_variants() -> None:
    assert reasoning_span("a<think>bc</think>d") == (8, 10)
    assert reasoning_span("abc</think>answer") == (0, 3)
    assert reasoning_span("<think>never closed") == (7, 19)
    assert reasoning_span("no tags") == (0, 7)


def test_paragraph_split_spans_and_text() -> None:
    steps = split_steps(TRACE)
    assert [s.text for s in steps] == [
        "First, add the numbers: 2 + 3 = 5.",
        "Wait, is that right? Yes.",
        "So the sum is 5.",
    ]
    _check_invariants(TRACE, steps)
    # The boxed answer after </think> is not part of any step.
    assert all("boxed" not in s.text for s in steps)


def test_paragraph_split_covers_all_non_whitespace() -> None:
    steps = split_steps(TRACE)
    start, end = reasoning_span(TRACE)
    covered = set()
    for s in steps:
        covered.update(range(s.start, s.end))
    for pos in range(start, end):
        if not TRACE[pos].isspace():
            assert pos in covered, (pos, TRACE[pos])


def test_lone_close_tag_and_no_tags() -> None:
    text = "Step one.\n\nStep two.</think>\n\nFinal answer: 3"
    assert [s.text for s in split_steps(text)] == ["Step one.", "Step two."]
    assert [s.text for s in split_steps("a\n\nb\n\n\n")] == ["a", "b"]
    assert split_steps("") == []
    assert split_steps("<think>\n\n  \n</think>x") == []


def test_cue_split() -> None:
    text = (
        "Compute 3*4 = 12. Wait, the problem says 3*5. So it is 15.\n"
        "Alternatively, add 5 three times.\n\n"
        "Let me verify this is right. To confirm: 5+5+5 = 15. Double check done.\n"
        "awaiting nothing. Waiting is not a cue word."
    )
    steps = split_steps(text, method="cue")
    assert [s.text for s in steps] == [
        "Compute 3*4 = 12.",
        "Wait, the problem says 3*5. So it is 15.",
        "Alternatively, add 5 three times.",
        "Let me verify this is right.",
        "To confirm: 5+5+5 = 15.",
        "Double check done.\nawaiting nothing. Waiting is not a cue word.",
    ]
    _check_invariants(text, steps)


def test_cue_split_case_and_markdown() -> None:
    text = "We get 4. **WAIT** that is wrong! make sure to recheck. Another way: 2*2."
    assert [s.text for s in split_steps(text, method="cue")] == [
        "We get 4.",
        "**WAIT** that is wrong!",
        "make sure to recheck.",
        "Another way: 2*2.",
    ]


def test_token_window_split() -> None:
    text = "<think>ab cd\n\nef</think> tail"
    # Tokens: "<think>", "ab", " cd", "\n\n", "ef", "</think>", " tail"
    offsets = [(0, 7), (7, 9), (9, 12), (12, 14), (14, 16), (16, 24), (24, 29)]
    steps = split_steps(text, method="tokens", token_offsets=offsets, window=2)
    # Only tokens 1..4 overlap the reasoning block (7, 16); windows (1, 2) and (3, 4).
    assert [(s.text, s.token_start, s.token_end) for s in steps] == [
        ("ab cd", 1, 3),
        ("ef", 3, 5),
    ]
    _check_invariants(text, steps)
    with pytest.raises(ValueError, match="token_offsets"):
        split_steps(text, method="tokens")
    with pytest.raises(ValueError, match=r"token_offsets\[1\]"):
        split_steps(text, method="tokens", token_offsets=[(0, 9), (5, 12)], window=2)


def test_unknown_method_raises() -> None:
    with pytest.raises(ValueError, match="unknown method"):
        split_steps("x", method="sentences")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- select_steps


def test_select_steps_all_when_few() -> None:
    assert select_steps(0) == []
    assert select_steps(5) == [0, 1, 2, 3, 4]
    assert select_steps(20) == list(range(20))


@pytest.mark.parametrize("n_steps", [21, 50, 400])
def test_select_steps_first_last_size(n_steps: int) -> None:
    picked = select_steps(n_steps, max_steps=20, seed=3, key="gsm8k-0001")
    assert len(picked) == 20 == len(set(picked))
    assert picked == sorted(picked)
    assert picked[0] == 0 and picked[-1] == n_steps - 1
    assert all(0 <= i < n_steps for i in picked)


def test_select_steps_deterministic_and_keyed() -> None:
    a = select_steps(200, seed=0, key="ex-1")
    assert a == select_steps(200, seed=0, key="ex-1")
    assert a != select_steps(200, seed=0, key="ex-2")
    assert a != select_steps(200, seed=1, key="ex-1")
    assert select_steps(200, max_steps=1) == [0]
    with pytest.raises(ValueError, match="max_steps"):
        select_steps(10, max_steps=0)


@pytest.mark.integration
def test_select_steps_is_stable_across_processes() -> None:
    # Python's str hash is salted per process; the draw must not depend on it.
    code = "from fcjax.text import select_steps; print(select_steps(100, key='abc'))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "123"},
    )
    assert out.stdout.strip() == str(select_steps(100, key="abc"))


# ----------------------------------------------------------------------------- token spans


def test_token_spans_straddling_and_empty_tokens() -> None:
    text = "abc\n\ndef gh"
    steps = split_steps(text)  # "abc" (0, 3), "def gh" (5, 11)
    assert [(s.start, s.end) for s in steps] == [(0, 3), (5, 11)]
    # Token 1 "c\n\nd" (2, 6) straddles both steps; tokens 2 and 4 are empty at 6 and 9,
    # inside step 2 only.
    offsets = [(0, 2), (2, 6), (6, 6), (6, 9), (9, 9), (9, 11)]
    spans = token_spans(offsets, steps)
    assert [(s.token_start, s.token_end) for s in spans] == [(0, 2), (1, 6)]
    assert spans[0].text == steps[0].text and spans[0].start == steps[0].start
    empty_at_boundary = [(0, 3), (3, 3), (3, 5), (5, 11)]
    spans = token_spans(empty_at_boundary, steps)
    # (3, 3) lies at step 1's end (exclusive), so in no step; (3, 5) is only whitespace.
    assert [(s.token_start, s.token_end) for s in spans] == [(0, 1), (3, 4)]
    assert token_spans([], steps)[0].token_start is None


@pytest.fixture(scope="module")
def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in-test (no downloads), wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<think>", "</think>"],
        show_progress=False,
    )
    corpus = [
        "Wait, let me check the answer again.",
        "So the total is 18 eggs per day.",
        "Alternatively we verify the sum.",
    ]
    tok.train_from_iterator(corpus * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


GEN = "<think>So é the 🙂 total is 18.\n\nWait, check again: 18 eggs.</think>\n\\boxed{18}"


def _naive_offsets(tokenizer, ids: list[int]) -> list[tuple[int, int]]:
    """Independent reference: decode every prefix; a prefix whose decode ends in U+FFFD
    (an unfinished byte sequence) has not emitted that character yet."""
    ends = []
    for i in range(len(ids)):
        ends.append(len(tokenizer.decode(ids[: i + 1]).rstrip("\ufffd")))
    return list(zip([0, *ends[:-1]], ends, strict=True))


def test_token_char_offsets_real_tokenizer(tiny_tokenizer) -> None:
    ids = tiny_tokenizer.encode(GEN, add_special_tokens=False)
    text = tiny_tokenizer.decode(ids)
    assert text == GEN
    offsets = token_char_offsets(tiny_tokenizer, ids, chunk=0)
    assert offsets == _naive_offsets(tiny_tokenizer, ids)
    assert offsets[0][0] == 0 and offsets[-1][1] == len(text)
    assert all(a <= b for a, b in offsets)
    assert "".join(text[a:b] for a, b in offsets) == text
    # Byte-fallback: é and 🙂 span several byte tokens; only the last one emits the char.
    assert any(a == b for a, b in offsets)
    for t, (a, b) in enumerate(offsets):
        piece = tiny_tokenizer.decode([ids[t]])
        if "\ufffd" not in piece:
            assert text[a:b] == piece
    # The chunked fast path agrees with exact prefix decoding (context is raised to >= 4).
    for chunk, context in [(1, 0), (3, 0), (4, 2), (7, 16), (128, 16)]:
        assert token_char_offsets(tiny_tokenizer, ids, chunk=chunk, context=context) == offsets


def test_token_char_offsets_with_prefix(tiny_tokenizer) -> None:
    prompt = tiny_tokenizer.encode("Question: total?", add_special_tokens=False)
    ids = tiny_tokenizer.encode(GEN, add_special_tokens=False)
    offsets = token_char_offsets(tiny_tokenizer, ids, prefix_ids=prompt, chunk=5)
    assert offsets == token_char_offsets(tiny_tokenizer, ids, chunk=0)
    assert token_char_offsets(tiny_tokenizer, []) == []


def test_steps_to_tokens_end_to_end(tiny_tokenizer) -> None:
    ids = tiny_tokenizer.encode(GEN, add_special_tokens=False)
    text = tiny_tokenizer.decode(ids)
    offsets = token_char_offsets(tiny_tokenizer, ids)
    steps = token_spans(offsets, split_steps(text))
    assert len(steps) == 2
    for step in steps:
        covered = "".join(text[a:b] for a, b in offsets[step.token_start : step.token_end])
        assert step.text in covered
        # Minimal: dropping the first or last token loses part of the step.
        inner = offsets[step.token_start + 1 : step.token_end - 1]
        assert step.text not in "".join(text[a:b] for a, b in inner)


# ----------------------------------------------------------------------------- properties

_TRACE_TEXT = st.lists(
    st.sampled_from([*"ab .!?\n\t", "Wait", "<think>", "</think>", "verify", "é"]), max_size=40
).map("".join)


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.text(max_size=200), _TRACE_TEXT))
def test_split_steps_invariants_property(text: str) -> None:
    for method in ("paragraph", "cue"):
        steps = split_steps(text, method=method)
        _check_invariants(text, steps)
    paragraph = split_steps(text)
    cue = split_steps(text, method="cue")
    # Cue splitting only refines paragraphs: every cue step lies inside one paragraph step.
    for step in cue:
        assert any(p.start <= step.start and step.end <= p.end for p in paragraph)
    # Paragraph steps cover every non-whitespace character of the reasoning block and
    # contain no blank line.
    start, end = reasoning_span(text)
    covered = sum(len(re.sub(r"\s", "", s.text)) for s in paragraph)
    assert covered == len(re.sub(r"\s", "", text[start:end]))
    assert all(not re.search(r"\n\s*\n", s.text) for s in paragraph)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=5), max_size=30), st.text(max_size=40))
def test_token_window_property(lengths: list[int], text: str) -> None:
    # Contiguous token offsets built from random lengths over a random text.
    offsets, cursor = [], 0
    for n in lengths:
        nxt = min(cursor + n, len(text))
        offsets.append((cursor, nxt))
        cursor = nxt
    steps = split_steps(text, method="tokens", token_offsets=offsets, window=3)
    _check_invariants(text, steps)
    for s in steps:
        assert 0 <= s.token_start < s.token_end <= len(offsets)
        assert s.token_end - s.token_start <= 3
