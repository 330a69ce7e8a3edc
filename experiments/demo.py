"""Demo: load SmolLM2-135M-Instruct from its PyPI wheel and answer a built-in question.

    python -m experiments.demo [--model=smollm2-135m-instruct] [--max_new_tokens=128]

Prints the question, the greedy answer, the extracted final answer, whether it is correct,
the reasoning steps with their DeepConf-style token confidence, and decoding speed.
"""

from __future__ import annotations

import time

import numpy as np
from absl import app, flags

import fcjax
from fcjax.data import arithmetic
from fcjax.data.prompts import build_messages
from fcjax.text import extract_answer, score_answer, split_steps, token_char_offsets, token_spans

FLAGS = flags.DEFINE_string("model", "smollm2-135m-instruct", "registry name or path")
MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "generation budget")
DIFFICULTY = flags.DEFINE_integer("difficulty", 1, "built-in arithmetic difficulty (1-5)")


def main(argv):
    del argv
    t0 = time.perf_counter()
    lm = fcjax.load(FLAGS.value)
    print(
        f"loaded {lm.name} ({lm.config.family}, {lm.config.num_layers} layers) "
        f"in {time.perf_counter() - t0:.1f}s"
    )
    example = arithmetic.generate(num_examples=1, difficulty=DIFFICULTY.value, seed=0)[0]
    prompt = lm.chat(build_messages(example))
    params = fcjax.SamplingParams(temperature=0.0, max_new_tokens=MAX_NEW.value)
    fcjax.generate(lm, [prompt], fcjax.SamplingParams(temperature=0.0, max_new_tokens=2))
    t1 = time.perf_counter()
    g = fcjax.generate(lm, [prompt], params, keys=[example.id])[0]
    dt = time.perf_counter() - t1
    pred = extract_answer(g.text)
    print(f"\nQ: {example.question}\n\nA: {g.text}\n")
    print(
        f"final answer: {pred!r}  gold: {example.answer!r}  "
        f"correct: {score_answer(pred, example.answer, example.kind)}"
    )
    steps = token_spans(token_char_offsets(lm.tokenizer, g.token_ids), split_steps(g.text))
    for s in steps:
        if s.token_start is None:
            continue
        c = -g.top_logprobs[s.token_start : s.token_end].mean()
        print(f"  step {s.index}: deepconf={min(max(c / 8, 0), 1):.3f}  {s.text[:70]!r}")
    n = len(g.token_ids)
    print(
        f"\n{n} tokens in {dt:.2f}s ({n / dt:.1f} tokens/s, finish={g.finish_reason}, "
        f"mean logprob {np.mean(g.token_logprobs):.3f})"
    )


if __name__ == "__main__":
    app.run(main)
