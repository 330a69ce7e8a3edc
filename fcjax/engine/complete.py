"""A local chat completer: chat-message lists in, reply strings out, run by fcjax's engine.

This is the ``complete`` callable the decisiveness judge and the consistency judge take, so
any loaded model can be the judge without a hosted API.
"""

from __future__ import annotations

from collections.abc import Callable

from fcjax.engine.generate import generate
from fcjax.engine.sampling import SamplingParams
from fcjax.models.lm import LM
from fcjax.text.chat import Messages


def chat_completer(
    lm: LM,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    seed: int = 0,
    batch_size: int = 32,
    top_p: float = 1.0,
) -> Callable[[list[Messages]], list[str]]:
    """Returns ``complete(list of message lists) -> list of replies``.

    Each message list is formatted with ``lm.chat`` (the model's chat template) and all are
    generated in batches of ``batch_size``. The default is greedy decoding; with
    ``temperature > 0`` each row is seeded by its formatted prompt text, so a prompt gets the
    same reply whatever else is in the call (``top_p`` < 1 samples from the nucleus).
    Replies are stripped of surrounding whitespace.
    """
    if lm.tokenizer is None:
        raise ValueError(f"chat_completer: model {lm.name!r} has no tokenizer")
    params = SamplingParams(
        temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed, logprobs=0
    )

    def complete(conversations: list[Messages]) -> list[str]:
        if not conversations:
            return []
        for i, messages in enumerate(conversations):
            if not isinstance(messages, list) or not all(
                isinstance(m, dict) and "role" in m and "content" in m for m in messages
            ):
                raise ValueError(
                    f"chat_completer: conversation {i} is not a list of "
                    "{'role', 'content'} messages"
                )
        prompts = [lm.chat(messages) for messages in conversations]
        gens = generate(lm, prompts, params, keys=prompts, batch_size=batch_size)
        return [g.text.strip() for g in gens]

    return complete
