"""Tokenizers and chat formatting.

fcjax uses transformers' tokenizers as they are (from an HF directory or converted from a
GGUF), so token ids match the reference implementation exactly.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("fcjax")

# a chat conversation: [{"role": ..., "content": ...}, ...]
Messages = list[dict[str, str]]


def load_tokenizer(path: str | Path, gguf_file: str | None = None):
    """A transformers tokenizer from an HF directory, or from a GGUF file's vocabulary."""
    from transformers import AutoTokenizer

    path = Path(path)
    if gguf_file is not None:
        return AutoTokenizer.from_pretrained(str(path), gguf_file=gguf_file)
    return AutoTokenizer.from_pretrained(str(path))


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def plain_format(messages: Messages) -> str:
    """Fallback prompt for tokenizers without a chat template."""
    parts = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join(parts) + "\n\nAssistant:"


def apply_chat(tokenizer, messages: Messages, add_generation_prompt: bool = True) -> str:
    """Formats chat messages with the tokenizer's template (plain format if it has none)."""
    if tokenizer is None or not has_chat_template(tokenizer):
        log.warning("tokenizer has no chat template; using a plain 'Role: text' format")
        return plain_format(messages)
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


THINK_OPEN = "<think>"


def open_think(prompt: str, tokenizer) -> str:
    """Opens a reasoning model's turn with ``<think>`` when its chat template does not: the
    tokenizer knows a ``<think>`` token (a reasoning model) and the formatted prompt does not
    already end with it. Other prompts are returned unchanged."""
    vocab = tokenizer.get_vocab() if tokenizer is not None else {}
    if THINK_OPEN not in vocab or prompt.rstrip().endswith(THINK_OPEN):
        return prompt
    return f"{prompt}{THINK_OPEN}\n"
