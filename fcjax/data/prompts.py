"""Chat messages for a question under a prompt style, with optional interventions.

Two styles (``PROMPT_STYLES``): "fcjax" (lettered choices, an answer-format instruction that
`fcjax.text.extract_answer` reads) and "paper" (the published prompts: choices numbered
1..n, a per-dataset instruction, the answer in \\boxed{} after thinking, 20-30 paragraphs at
most, "<think>" as literal text ending the user turn; the published intervention texts).
In both, a user-turn intervention comes BEFORE the question, and a system-prompt
intervention can be combined with it.
"""

from __future__ import annotations

from fcjax.data.example import Example, letters
from fcjax.data.interventions import get_intervention
from fcjax.text.answers import study_dataset

PROMPT_STYLES = ("fcjax", "paper")

INSTRUCTIONS: dict[str, str] = {
    "numeric": "Reason step by step, then put the final answer in \\boxed{}.",
    "math": "Reason step by step, then put the final answer in \\boxed{}.",
    "yesno": "Reason step by step, then put the final answer, Yes or No, in \\boxed{}.",
    "letter": (
        "Reason step by step, then end with a line of the form 'Final answer: <letter>' "
        "giving the letter of the correct option."
    ),
}

# the paper style (the published prompts, in fcjax's words): the question, one instruction
# chosen by dataset, the length cap, then "<think>" and a newline as literal user text
PAPER_LENGTH = "Use no more than 20-30 steps (paragraphs)."
PAPER_THINK = "<think>\n"
PAPER_INSTRUCTIONS: dict[str, str] = {
    "aime": (
        "Solve it step by step. The answer is an integer from 0 to 999. Put your final "
        "answer in \\boxed{}, after thinking."
    ),
    "options": (
        "Give your answer as one of the answer options, 1-{n}. Put it in \\boxed{}, after thinking."
    ),
    "yesno": "Reply Yes or No. Put your answer in \\boxed{}, after thinking.",
    "hle_choice": (
        "Reply with only the letter or number of the right option. Put just that one choice "
        "in \\boxed{}, after thinking."
    ),
    "open": "Answer briefly. Put your answer in \\boxed{}, after thinking.",
}


def paper_user_text(example: Example) -> str:
    """The published user prompt, before any intervention: the question (options numbered
    1..n after one newline, two for MuSR), a newline and a space, the dataset's instruction
    (``PAPER_INSTRUCTIONS``: AIME; numbered options; yes/no; HLE multiple choice; any other
    open question), the length cap and ``PAPER_THINK``."""
    dataset = study_dataset(example.source)
    if dataset == "aime":
        instruction = PAPER_INSTRUCTIONS["aime"]
    elif example.choices:
        instruction = PAPER_INSTRUCTIONS["options"].replace("{n}", str(len(example.choices)))
    elif example.kind == "yesno":
        instruction = PAPER_INSTRUCTIONS["yesno"]
    elif example.answer_type == "multipleChoice":
        instruction = PAPER_INSTRUCTIONS["hle_choice"]
    else:
        instruction = PAPER_INSTRUCTIONS["open"]
    question = example.question
    if example.choices:
        options = "\n".join(f"{i + 1}. {c}" for i, c in enumerate(example.choices))
        question += ("\n\n" if dataset == "musr" else "\n") + options
    return f"{question}\n {instruction} {PAPER_LENGTH} {PAPER_THINK}"


def question_text(example: Example, style: str = "fcjax") -> str:
    """The question followed by its options: "A. ..." lines ("fcjax") or "1. ..." ("paper")."""
    if not example.choices:
        return example.question
    labels = (
        [str(i + 1) for i in range(len(example.choices))]
        if style == "paper"
        else list(letters(len(example.choices)))
    )
    options = "\n".join(f"{l}. {c}" for l, c in zip(labels, example.choices, strict=True))
    return f"{example.question}\n\n{options}"


def build_messages(
    example: Example,
    intervention: str = "blank",
    role: str = "user",
    extra_text: str | None = None,
    system_intervention: str = "blank",
    style: str = "fcjax",
) -> list[dict[str, str]]:
    """Chat messages for one example.

    ``intervention`` and ``system_intervention`` are names from `INTERVENTIONS` or paths to
    text files. With role="user" the intervention opens the user turn, before the question;
    with role="system" it is the system message. ``system_intervention`` is always the system
    message, so it combines with a user-turn intervention (the study's ``msh_perc``:
    system_intervention="ms_hedge", intervention="perception"). ``extra_text``, if given,
    ends the user turn.
    """
    if role not in ("user", "system"):
        raise ValueError(f"role must be 'user' or 'system', got {role!r}")
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt style must be one of {PROMPT_STYLES}, got {style!r}")
    if example.kind not in INSTRUCTIONS:
        raise ValueError(f"example {example.id}: unknown kind {example.kind!r}")
    texts = "paper" if style == "paper" else "fcjax"
    text = get_intervention(intervention, texts)
    system = get_intervention(system_intervention, texts)
    if text and system and role == "system":
        raise ValueError(
            "two system prompts: --intervention_role=system and --system_intervention are both "
            "set; put the intervention in the user turn or drop --system_intervention"
        )
    parts = [text] if text and role == "user" else []
    if style == "paper":
        parts.append(paper_user_text(example))
    else:
        parts += [question_text(example, style), INSTRUCTIONS[example.kind]]
    if extra_text:
        parts.append(extra_text)
    messages = [{"role": "user", "content": "\n\n".join(parts)}]
    system_text = system or (text if role == "system" else "")
    if system_text:
        messages.insert(0, {"role": "system", "content": system_text})
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
