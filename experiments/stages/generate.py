"""Stage ``generate``: one sampled trace per example (or, with ``--traces``, each imported
trace teacher-forced by the model), stored in resumable parts.

Each process generates its share of the pending examples (``Context.my_parts``); rows are
seeded by example id, so the split and the batching leave the generations unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from absl import logging

import fcjax
from experiments.rundir import Progress, RunDir, RunError
from experiments.stages.context import Context
from fcjax.data import Example
from fcjax.data.traces import trace_info
from fcjax.engine.generate import Generation
from fcjax.engine.imported import imported_generations
from fcjax.text.chat import has_chat_template

# top log-probabilities stored per generated token
TOP_K = 5


class ResourceError(RuntimeError):
    """The device ran out of memory even for the smallest batch."""


def work(ctx: Context) -> int:
    """Generates this process's share of the pending examples, a part per batch."""
    s = ctx.s
    if not has_chat_template(ctx.lm.tokenizer):
        logging.warning(
            "%s has no chat template: prompts use the plain 'Role: text' format", s.model
        )
    # expected cost: prompt tokens (about 4 characters each) plus the generation budget
    mine = ctx.my_parts(
        "generate",
        ctx.examples(),
        key=lambda e: str(e.id),
        cost=lambda e: len(e.question) / 4 + s.max_new_tokens,
        size=s.batch_size,
    )
    progress = Progress("generate", sum(len(c) for _, c in mine))
    records = {r.id: r for r in ctx.trace_records()} if s.traces else {}
    for index, chunk in mine:
        if records:  # imported traces: teacher-forced, not sampled
            prompts, gens = imported_generations(
                ctx.lm, [records[e.id] for e in chunk], ctx.prompt, TOP_K, ctx.gen_batch
            )
            _check_finite(gens, chunk)
        else:
            prompts = [ctx.prompt(e) for e in chunk]
            gens = produce_generations(ctx, chunk, prompts, progress)
        ctx.run.write_part("generate", index, generation_columns(chunk, prompts, gens))
        progress.update(len(chunk))
    return progress.done


def merge(ctx: Context) -> dict:
    info = {
        "n_examples": len(ctx.examples()),
        "chat_template": has_chat_template(ctx.lm.tokenizer),
    }
    if ctx.s.traces:
        info["traces"] = trace_info(ctx.s.traces, ctx.trace_records())
    return info


def produce_generations(
    ctx: Context, examples: Sequence[Example], prompts: list[str], progress: Progress
) -> list[Generation]:
    """The generations of ``examples`` (their ``prompts`` given): sampled by the model in
    batches of ``ctx.gen_batch``, halved while a batch exhausts device memory."""
    params = fcjax.SamplingParams(
        temperature=ctx.s.temperature,
        max_new_tokens=ctx.s.max_new_tokens,
        seed=ctx.s.seed,
        logprobs=TOP_K,
    )
    while True:
        size, start = ctx.gen_batch, 0
        try:
            gens: list[Generation] = []
            for start in range(0, len(prompts), size):
                gens += fcjax.generate(
                    ctx.lm,
                    prompts[start : start + size],
                    params,
                    keys=[e.id for e in examples[start : start + size]],
                    batch_size=size,
                    progress=progress.tokens(min(size, len(prompts) - start)),
                )
            _check_finite(gens, examples)
            return gens
        except Exception as e:
            if not _out_of_memory(e):
                raise
            if size == 1:
                raise ResourceError(
                    f"out of device memory even at batch 1 (example {examples[start].id!r}, "
                    f"--max_new_tokens={ctx.s.max_new_tokens}): lower --max_new_tokens, "
                    f"use --dtype=bfloat16, a smaller model or more devices (--mesh)"
                ) from e
            ctx.gen_batch = max(1, min(size, len(prompts)) // 2)
            logging.warning(
                "out of device memory at batch %d; retrying with %d",
                min(size, len(prompts)),
                ctx.gen_batch,
            )


def generation_columns(
    examples: Sequence[Example], prompts: Sequence[str], gens: Sequence[Generation]
) -> dict[str, list]:
    """A generate part: one row per example (``stored_generations`` reads it back)."""
    return {
        "example_id": [str(e.id) for e in examples],
        "prompt": list(prompts),
        "prompt_ids": [g.prompt_ids for g in gens],
        "output_ids": [g.token_ids for g in gens],
        "text": [g.text for g in gens],
        "token_logprobs": [g.token_logprobs.tolist() for g in gens],
        "top_logprobs": [g.top_logprobs.reshape(-1).tolist() for g in gens],
        "top_ids": [np.asarray(g.top_ids).reshape(-1).tolist() for g in gens],
        "finish_reason": [g.finish_reason for g in gens],
    }


def stored_generations(run: RunDir) -> dict[str, tuple[str, Generation]]:
    """The stored (prompt, generation) by example id, as ``fcjax.generate`` returned them."""
    rows = run.read_parts("generate")
    if rows and "top_ids" not in rows:
        raise RunError(
            f"{run.parts_dir('generate')}: written by an older fcjax (no top_ids); "
            f"rerun with --redo=generate"
        )
    out = {}
    for i, eid in enumerate(rows.get("example_id", [])):
        lp = np.asarray(rows["token_logprobs"][i], np.float32)
        # [T, k]; an empty generation (EOS first) has T = 0
        top = np.asarray(rows["top_logprobs"][i], np.float32).reshape(len(lp), TOP_K)
        top_ids = np.asarray(rows["top_ids"][i], np.int32).reshape(len(lp), TOP_K)
        g = Generation(
            rows["text"][i],
            list(rows["output_ids"][i]),
            lp,
            top,
            top_ids,
            rows["finish_reason"][i],
            list(rows["prompt_ids"][i]),
        )
        out[str(eid)] = (rows["prompt"][i], g)
    return out


def _out_of_memory(error: Exception) -> bool:
    """True for an XLA RESOURCE_EXHAUSTED / out-of-memory runtime error."""
    import jax

    message = str(error)
    return isinstance(error, jax.errors.JaxRuntimeError) and (
        "RESOURCE_EXHAUSTED" in message or "out of memory" in message.lower()
    )


def _check_finite(gens: Sequence[Generation], examples: Sequence[Example]) -> None:
    for g, e in zip(gens, examples, strict=True):
        if g.token_logprobs.size and not np.all(np.isfinite(g.token_logprobs)):
            raise FloatingPointError(
                f"example {e.id!r}: the model produced non-finite log-probabilities (NaN/inf "
                f"logits); check the weights and dtype"
            )
