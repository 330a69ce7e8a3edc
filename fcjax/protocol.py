"""Protocols: every behaviour where fcjax's defaults and the published study differ.

``--protocol=paper`` reproduces the study (docs/PROTOCOL.md lists what still differs);
``--protocol=fcjax`` keeps fcjax's own choices. The judges (prompts, models, parsing) are
the same under both.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Protocol:
    """One protocol's choices.

    prompt_style: ``fcjax.data.prompts.PROMPT_STYLES`` ("paper": options numbered 1..n,
    answer boxed after thinking, 20-30 paragraphs). answer_rule: which ``\\boxed{}`` is the
    answer ("last" or "first"). numbered_choices: multiple-choice answers are option numbers.
    open_think: a reasoning model's turn is opened with ``<think>`` when its chat template
    does not do it. cmfg_binning: ``fcjax.metrics`` cMFG bins ("closed" or "reference").
    """

    name: str
    prompt_style: str
    answer_rule: str
    numbered_choices: bool
    open_think: bool
    cmfg_binning: str


PROTOCOLS: dict[str, Protocol] = {
    "fcjax": Protocol("fcjax", "fcjax", "last", False, False, "closed"),
    "paper": Protocol("paper", "paper", "first", True, True, "reference"),
}


def get_protocol(name: str) -> Protocol:
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; valid: {', '.join(PROTOCOLS)}")
    return PROTOCOLS[name]
