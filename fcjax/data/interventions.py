"""Prompt interventions: text that asks a model to let its wording track its confidence.

The nine interventions follow METHOD.md section 6; the ideas are the study's, the wording
is fcjax's own. Each text can go inline in the user turn or serve as the system prompt
(see `fcjax.data.prompts.build_messages`). "blank" is the empty control.
"""

from __future__ import annotations

from pathlib import Path

# Verbal probability phrases with the numeric values the metacognitive prompt gives them
# (METHOD.md section 6, in its order). The lexicon scorer uses them as anchors.
CALIBRATED_PHRASES: dict[str, float] = {
    "almost certain": 0.9204,
    "highly likely": 0.8709,
    "very good chance": 0.8053,
    "we believe": 0.7508,
    "likely": 0.7091,
    "probably": 0.6868,
    "probable": 0.6762,
    "better than even": 0.5812,
    "about even": 0.5068,
    "probably not": 0.2468,
    "we doubt": 0.2237,
    "unlikely": 0.2118,
    "chances are slight": 0.1440,
    "little chance": 0.1285,
    "highly unlikely": 0.1076,
    "improbable": 0.1677,
    "almost no chance": 0.0651,
}


def _ms_hedge_text() -> str:
    table = "\n".join(f'- "{p}": {v:.4f}' for p, v in CALIBRATED_PHRASES.items())
    return (
        "You are a careful reasoner who keeps track of how sure you are. While you work, "
        "describe your confidence in each claim with one of the phrases below; the number "
        "next to a phrase is the probability it stands for. Choose the phrase whose number "
        "best matches how likely you think the claim is to be true, and use plain "
        "assertions only for things you are sure of.\n"
        f"{table}"
    )


INTERVENTIONS: dict[str, str] = {
    "blank": "",
    "basic": (
        "Whenever a step of your reasoning is uncertain, say so with hedging words such as "
        "'maybe' or 'I think'; state the steps you are sure of plainly."
    ),
    "genuine": (
        "Let the way you write each step show how confident you really are in it, "
        "neither more nor less."
    ),
    "human": (
        "Think the problem through the way a thoughtful person would, voicing natural "
        "doubts where you have them and sounding sure only where you are."
    ),
    "perception": (
        "As you reason, express confidence that comes from your own sense of how well you "
        "know each point, not from how a confident answer ought to sound."
    ),
    "self_monitoring": (
        "Keep watch over your own certainty as you go: point out the places where you "
        "become more sure and the places where you become less sure."
    ),
    "self_correction": (
        "If you change your mind while reasoning, say so explicitly and explain what made "
        "you reconsider before continuing."
    ),
    "evidence_gap": (
        "When you are not fully sure of a step, say what information or check would be "
        "needed to make you sure of it."
    ),
    "ms_hedge": _ms_hedge_text(),
}


# The published prompt lists the phrases in this order (CALIBRATED_PHRASES holds the values).
PAPER_PHRASE_ORDER: tuple[str, ...] = (
    "almost certain",
    "highly likely",
    "very good chance",
    "probable",
    "likely",
    "we believe",
    "probably",
    "better than even",
    "about even",
    "we doubt",
    "improbable",
    "unlikely",
    "probably not",
    "little chance",
    "almost no chance",
    "highly unlikely",
    "chances are slight",
)


def _paper_ms_hedge() -> str:
    table = ", ".join(f'"{p}": {CALIBRATED_PHRASES[p]:.4f}' for p in PAPER_PHRASE_ORDER)
    return (
        "You are a language model with keen metacognitive sensitivity and an exact sense of "
        "your own internal uncertainty. Every answer you give must use natural-language "
        "expressions that honestly reflect your intrinsic confidence that your answer is "
        "correct. Pick these expressions only from the set below; each one stands for a "
        "specific confidence level:\n"
        f"{{{table}}}.\n"
        "Use these phrases explicitly whenever you express uncertainty in your responses."
    )


# --protocol=paper: the published instructions, one for one, in fcjax's words
# (docs/PROTOCOL.md has the instruction-by-instruction table).
PAPER_INTERVENTIONS: dict[str, str] = {
    "blank": "",
    "basic": (
        "When a step of your thinking feels uncertain, express that uncertainty in words by "
        "hedging that step precisely."
    ),
    "genuine": (
        "Make your internal reasoning an honest mirror of your confidence. Inside your "
        "steps, use hedging language to mark where your evidence is thin or where your "
        "logic feels speculative."
    ),
    "human": (
        "Work through this task the way a person would, letting natural expressions of "
        "doubt or hesitation into your thinking whenever you reach a hard or ambiguous point."
    ),
    "perception": (
        "Throughout your reasoning, put into words how confident or uncertain you are, "
        "judged only by your OWN perception."
    ),
    "self_monitoring": (
        "Track how your confidence changes at every step of your reasoning. Use words to "
        "show where your certainty rises and where it falls, according to the evidence "
        "you find."
    ),
    "self_correction": (
        "Whenever you change your mind or fix an earlier step while thinking, say so. Mark "
        "the point where your logic shifts with a short hedge such as 'Hold on, I should "
        "rethink this'."
    ),
    "evidence_gap": (
        "When you sense you lack a key piece of information needed to be fully sure, show "
        "that in your reasoning. Point out the gaps in your knowledge with a hedge such as "
        "'I would be surer if I knew X'."
    ),
    "ms_hedge": _paper_ms_hedge(),
}
# the study's combined condition: ms_hedge as the system prompt, perception in the user turn
MSH_PERC = {"system_intervention": "ms_hedge", "intervention": "perception"}
INTERVENTION_SETS = ("fcjax", "paper")


def get_intervention(name_or_path: str, texts: str = "fcjax") -> str:
    """The text of a named intervention (``texts``: "fcjax" for ``INTERVENTIONS``, "paper"
    for ``PAPER_INTERVENTIONS``), or the contents of a text file given by path."""
    if texts not in INTERVENTION_SETS:
        raise ValueError(f"intervention texts must be one of {INTERVENTION_SETS}, got {texts!r}")
    named = PAPER_INTERVENTIONS if texts == "paper" else INTERVENTIONS
    if name_or_path in named:
        return named[name_or_path]
    path = Path(name_or_path)
    if path.is_file():
        text = path.read_text(encoding="utf-8").strip()
        if not text:
            raise ValueError(f"intervention file {path} is empty")
        return text
    raise ValueError(
        f"unknown intervention {name_or_path!r} (not a name, not a file); valid names: "
        f"{', '.join(INTERVENTIONS)}"
    )
