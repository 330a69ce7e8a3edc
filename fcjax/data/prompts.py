"""Chat messages for a question: the question, lettered choices, an answer-format
instruction that `fcjax.text.extract_answer` can read, and an optional intervention."""

from __future__ import annotations

from fcjax.data.example import Example, letters
from fcjax.data.interventions import get_intervention

INSTRUCTIONS: dict[str, str] = {
    "numeric": "Reason step by step, then put the final answer in \\boxed{}.",
    "math": "Reason step by step, then put the final answer in \\boxed{}.",
    "yesno": "Reason step by step, then put the final answer, Yes or No, in \\boxed{}.",
    "letter": (
        "Reason step by step, then end with a line of the form 'Final answer: <letter>' "
        "giving the letter of the correct option."
    ),
}


def question_text(example: Example) -> str:
    """The question followed by its options as "A. ..." lines (if any)."""
    if not example.choices:
        return example.question
    options = "\n".join(
        f"{l}. {c}" for l, c in zip(letters(len(example.choices)), example.choices, strict=True)
    )
    return f"{example.question}\n\n{options}"


def build_messages(
    example: Example,
    intervention: str = "blank",
    role: str = "user",
    extra_text: str | None = None,
) -> list[dict[str, str]]:
    """Chat messages for one example.

    `intervention` is a name from `INTERVENTIONS` or a path to a text file. With
    role="user" its text ends the user turn; with role="system" it is the system message.
    `extra_text`, if given, is appended to the user turn last.
    """
    if role not in ("user", "system"):
        raise ValueError(f"role must be 'user' or 'system', got {role!r}")
    if example.kind not in INSTRUCTIONS:
        raise ValueError(f"example {example.id}: unknown kind {example.kind!r}")
    text = get_intervention(intervention)
    parts = [question_text(example), INSTRUCTIONS[example.kind]]
    if text and role == "user":
        parts.append(text)
    if extra_text:
        parts.append(extra_text)
    messages = [{"role": "user", "content": "\n\n".join(parts)}]
    if text and role == "system":
        messages.insert(0, {"role": "system", "content": text})
    return messages


def format_plain(messages: list[dict[str, str]]) -> str:
    """A plain-text rendering for tokenizers without a chat template; ends with the
    assistant cue so the model writes the reply."""
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    turns = []
    for m in messages:
        if m["role"] not in names:
            raise ValueError(f"unknown message role {m['role']!r}")
        turns.append(f"{names[m['role']]}: {m['content']}")
    return "\n\n".join([*turns, "Assistant:"])
