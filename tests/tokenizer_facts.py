"""What a tokenizer does, as JSON-able facts (no torch: a subprocess without it imports this)."""

TEXTS = [
    "The quick brown fox jumps over the lazy dog. 48 / 2 = 24 clips; so the answer is 72.",
    "  leading spaces,\ttabs\nand lines",
    "ünïcödé ∑ 数学 🙂",
    "<|im_end|> 3.14e-5",
]


def tokenizer_facts(tokenizer) -> dict:
    chat = [{"role": "user", "content": "Is 7 prime?"}]
    return {
        "class": type(tokenizer).__name__,
        "ids": [tokenizer(t, add_special_tokens=True)["input_ids"] for t in TEXTS],
        "decoded": [tokenizer.decode(tokenizer(t)["input_ids"]) for t in TEXTS],
        "special": [
            tokenizer.bos_token,
            tokenizer.eos_token,
            tokenizer.pad_token,
            tokenizer.unk_token,
            tokenizer.eos_token_id,
        ],
        "chat": tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        if tokenizer.chat_template
        else None,
        "vocab": len(tokenizer),
    }
