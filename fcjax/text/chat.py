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
        return gguf_tokenizer(path / gguf_file)
    return AutoTokenizer.from_pretrained(str(path))


# llama.cpp's special-token ids -> the tokenizer's special-token attributes
_GGUF_SPECIAL = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


def gguf_tokenizer(path: str | Path, fields=None):
    """The tokenizer a GGUF's metadata describes, built with transformers' own GGUF converter
    as ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` builds it (same class, vocabulary,
    merges, special tokens and chat template), but read without transformers' GGUF reader,
    which imports torch (fcjax does not need it to run). ``fields``: the file's metadata
    fields (``fcjax.models.gguf_index.Index(path).fields``) when the caller has read them,
    else the ``gguf`` package reads them."""
    import gguf

    try:  # transformers 5's converter (4.x: its own reader, with torch)
        from transformers import TokenizersBackend
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            GGUF_TOKENIZER_MAPPING,
            convert_gguf_tokenizer,
        )
        from transformers.models.auto.tokenization_auto import (
            TOKENIZER_MAPPING_NAMES,
            tokenizer_class_from_name,
        )
    except ImportError:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(Path(path).parent), gguf_file=Path(path).name)

    if fields is None:
        fields = gguf.GGUFReader(str(path)).fields

    def value(key):
        return fields[key].contents() if key in fields else None

    groups = {
        group: {name: value(f"tokenizer.{key}") for key, name in names.items()}
        for group, names in GGUF_TOKENIZER_MAPPING.items()
    }
    vocab = {k: v for k, v in groups["tokenizer"].items() if v is not None}
    config = {k: v for k, v in groups["tokenizer_config"].items() if v is not None}
    if "tokens" not in vocab:
        raise ValueError(f"{path}: the GGUF has no tokenizer.ggml.tokens (no vocabulary)")
    if vocab.get("tokenizer_type") == "llama":  # llama.cpp adds BOS to sentencepiece by default
        config.setdefault("add_bos_token", True)
    for name, key in _GGUF_SPECIAL.items():
        token_id = value(f"tokenizer.ggml.{key}")
        config[name] = vocab["tokens"][token_id] if token_id is not None else None
    architecture = value("general.architecture")
    backend, extra = convert_gguf_tokenizer(architecture, vocab)
    class_name = TOKENIZER_MAPPING_NAMES.get(architecture)
    cls = tokenizer_class_from_name(class_name) if class_name else TokenizersBackend
    return cls(tokenizer_object=backend, name_or_path=str(Path(path).parent), **config, **extra)


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
