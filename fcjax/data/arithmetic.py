"""A built-in set of multi-step arithmetic word problems with exact integer answers.

Problems are generated, so the set needs no files and no network, and its difficulty is a
dial: a level sets how many operations a story chains and how large the operands are.
Level 1 is one addition or subtraction of numbers up to 10, easy enough for a 135M model
to solve about half the time; level 5 chains five operations with operands up to 500.

Each problem is drawn from its own generator seeded by (seed, difficulty, index), so
"arith-d2-s0-0007" is the same text whatever `num_examples` is.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fcjax.data.example import Example


@dataclasses.dataclass(frozen=True)
class Level:
    """A difficulty setting: `n_ops` chained operations, operands in [1, max_operand]."""

    n_ops: int
    max_operand: int
    ops: tuple[str, ...]  # subset of "add", "sub", "mul", "div"
    max_factor: int = 4  # multipliers/divisors are small: 2..max_factor


LEVELS: dict[int, Level] = {
    1: Level(n_ops=1, max_operand=10, ops=("add", "sub")),
    2: Level(n_ops=2, max_operand=20, ops=("add", "sub")),
    3: Level(n_ops=3, max_operand=50, ops=("add", "sub", "mul")),
    4: Level(n_ops=4, max_operand=100, ops=("add", "sub", "mul", "div"), max_factor=5),
    5: Level(n_ops=5, max_operand=500, ops=("add", "sub", "mul", "div"), max_factor=6),
}


@dataclasses.dataclass(frozen=True)
class Theme:
    """Story text for one kind of countable thing; `{n}` is the operand."""

    noun: str
    start: str  # "{who} has {n} apples."
    add: tuple[str, ...]
    sub: tuple[str, ...]
    mul: tuple[str, ...]  # "{k}" is the factor
    div: tuple[str, ...]
    question: str = "How many {noun} does {who} have now?"


THEMES: tuple[Theme, ...] = (
    Theme(
        "apples",
        "{who} has {n} apples.",
        ("{pr} picks {n} more apples.", "{pr} buys {n} more apples at the market."),
        ("{pr} eats {n} of the apples.", "{pr} gives {n} apples to a neighbour."),
        ("A friend gives {ob} enough apples to make {k} times as many as {pr_l} had.",),
        ("{pr} shares the apples equally among {k} baskets and keeps one basket.",),
    ),
    Theme(
        "coins",
        "{who} has {n} coins in a jar.",
        ("{pr} finds {n} more coins.", "{pr} earns {n} coins doing chores."),
        ("{pr} spends {n} coins on a snack.", "{pr} loses {n} coins."),
        ("The number of coins in the jar becomes {k} times as large.",),
        ("{pr} splits the coins equally into {k} piles and keeps one pile.",),
    ),
    Theme(
        "pages",
        "{who} has written {n} pages of a story.",
        ("{pr} writes {n} more pages.", "{pr} adds {n} pages to the story."),
        ("{pr} deletes {n} pages.", "{pr} throws away {n} pages."),
        ("After rewriting, the story is {k} times as long as before.",),
        ("{pr} splits the pages equally into {k} chapters and keeps only one chapter.",),
        "How many pages long is {who}'s story now?",
    ),
    Theme(
        "marbles",
        "{who} has {n} marbles.",
        ("{pr} wins {n} marbles in a game.", "{pr} gets {n} marbles as a gift."),
        ("{pr} loses {n} marbles.", "{pr} trades away {n} marbles."),
        ("{pr} ends up with {k} times as many marbles as before.",),
        ("{pr} divides the marbles equally among {k} bags and keeps one bag.",),
    ),
    Theme(
        "stickers",
        "{who} has {n} stickers.",
        ("{pr} buys {n} more stickers.", "A teacher gives {ob} {n} stickers."),
        ("{pr} uses {n} stickers on a card.", "{pr} gives away {n} stickers."),
        ("{pr} now has {k} times as many stickers as before.",),
        (
            "{pr} shares the stickers equally with friends so that each of {k} people, "
            "{ob} included, gets the same number.",
        ),
    ),
    Theme(
        "cookies",
        "{who} baked {n} cookies.",
        ("{pr} bakes {n} more cookies.", "A neighbour brings {n} more cookies."),
        ("{pr} eats {n} cookies.", "{pr} packs {n} cookies for a friend."),
        ("{pr} bakes more until there are {k} times as many cookies as before.",),
        ("{pr} puts the cookies equally on {k} plates and keeps one plate.",),
    ),
)

# (name, subject pronoun, object pronoun)
PEOPLE: tuple[tuple[str, str, str], ...] = (
    ("Mia", "She", "her"),
    ("Tom", "He", "him"),
    ("Ava", "She", "her"),
    ("Leo", "He", "him"),
    ("Zoe", "She", "her"),
    ("Sam", "He", "him"),
    ("Ivy", "She", "her"),
    ("Max", "He", "him"),
)

_SYMBOL = {"add": "+", "sub": "-", "mul": "*", "div": "//"}


def _level(difficulty: int | Level) -> Level:
    if isinstance(difficulty, Level):
        return difficulty
    if difficulty not in LEVELS:
        raise ValueError(f"difficulty must be one of {sorted(LEVELS)}, got {difficulty!r}")
    return LEVELS[difficulty]


def generate_problem(rng: np.random.Generator, difficulty: int | Level = 1) -> tuple[str, int, str]:
    """Draws one word problem; returns (question, answer, expression).

    `expression` is a Python expression over integers (+, -, *, exact //) whose value is
    `answer`, so tests can recompute the gold independently. Every intermediate value and
    the answer are >= 0; added and subtracted amounts are >= 2 (so nouns stay plural).
    """
    level = _level(difficulty)
    theme = THEMES[rng.integers(len(THEMES))]
    who, pr, ob = PEOPLE[rng.integers(len(PEOPLE))]
    fill = {"who": who, "pr": pr, "ob": ob, "pr_l": pr.lower()}

    value = int(rng.integers(2, level.max_operand + 1))
    sentences = [theme.start.format(n=value, **fill)]
    expression = str(value)
    for _ in range(level.n_ops):
        divisors = [k for k in range(2, level.max_factor + 1) if value % k == 0]
        ops = [op for op in level.ops if (op != "sub" or value >= 2) and (op != "div" or divisors)]
        op = ops[rng.integers(len(ops))]
        if op == "add":
            n = int(rng.integers(2, level.max_operand + 1))
            value += n
            pick = theme.add
        elif op == "sub":
            n = int(rng.integers(2, min(value, level.max_operand) + 1))
            value -= n
            pick = theme.sub
        elif op == "mul":
            n = int(rng.integers(2, level.max_factor + 1))
            value *= n
            pick = theme.mul
        else:
            n = divisors[rng.integers(len(divisors))]
            value //= n
            pick = theme.div
        text = pick[rng.integers(len(pick))]
        sentences.append(text.format(n=n, k=n, **fill))
        expression = f"({expression} {_SYMBOL[op]} {n})"
    sentences.append(theme.question.format(noun=theme.noun, who=who))
    return " ".join(sentences), value, expression


def generate(num_examples: int = 100, difficulty: int | Level = 1, seed: int = 0) -> list[Example]:
    """`num_examples` problems; ids "arith-d{difficulty}-s{seed}-{index:04d}"."""
    level = _level(difficulty)
    tag = difficulty if isinstance(difficulty, int) else f"{level.n_ops}x{level.max_operand}"
    examples = []
    for i in range(num_examples):
        key = [seed, level.n_ops, level.max_operand, i]
        question, answer, _ = generate_problem(np.random.default_rng(key), level)
        examples.append(
            Example(
                id=f"arith-d{tag}-s{seed}-{i:04d}",
                question=question,
                choices=None,
                answer=str(answer),
                kind="numeric",
                source=f"fcjax arithmetic (difficulty {tag}, seed {seed})",
            )
        )
    return examples
