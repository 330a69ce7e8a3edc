"""All five estimators end to end on SmolLM2-135M-Instruct (real weights) with small budgets:
every column present, one value per step, confidences in [0, 1] or NaN exactly where
documented (unselected sampling steps; agreement/forcing when the trace has no answer)."""

import numpy as np
import pytest

import fcjax
from fcjax.confidence import (
    EstimatorContext,
    build_trace,
    get_estimator,
    run_estimators,
    trace_confidence,
)
from fcjax.data import build_messages, load_dataset
from fcjax.engine.complete import chat_completer
from fcjax.text import select_steps

pytestmark = pytest.mark.real

NAMES = ["deepconf", "rcc", "forcing", "sampling", "agreement"]
COLUMNS = {
    "deepconf": ["conf_deepconf", "deepconf_raw"],
    "rcc": ["conf_rcc", "rcc_q"],
    "forcing": ["conf_forcing", "forcing_logprob"],
    "sampling": ["conf_sampling", "sampling_unparsed", "sampling_n"],
    "agreement": ["conf_agreement", "agreement_entropy"],
}
K, MAX_STEPS = 2, 2  # wiring, not statistics: the smallest budget that exercises every path


@pytest.fixture(scope="module")
def scored(smollm2):
    lm = smollm2
    examples = load_dataset("arithmetic", num_examples=2, difficulty=1)
    prompts = [lm.chat(build_messages(e)) for e in examples]
    params = fcjax.SamplingParams(temperature=0.6, max_new_tokens=96)
    gens = fcjax.generate(lm, prompts, params, keys=[e.id for e in examples])
    traces = [build_trace(lm, e, g) for e, g in zip(examples, gens, strict=True)]
    ctx = EstimatorContext(
        lm,
        # the judge's up to K x MAX_STEPS x 2 prompts in batches of 4: a pool under
        # COMPACT_FROM slots compiles no narrower decode chunks (test_engine checks that
        # batching does not change outputs; nothing here depends on it)
        chat_completer(lm, max_new_tokens=16, batch_size=4),
        k=K,
        max_steps=MAX_STEPS,
        max_new_tokens=16,
    )
    return lm, traces, run_estimators(traces, NAMES, ctx)


def test_traces_have_steps_and_hidden_rows(scored):
    lm, traces, _ = scored
    for t in traces:
        assert t.n_steps >= 1
        assert t.top_logprobs.shape == (len(t.output_ids), 5)
        for s in t.steps:
            assert t.text[s.start : s.end] == s.text
            assert 0 <= s.token_start < s.token_end <= len(t.output_ids)
        # filled by RCC: one row per prompt + output token, model width
        assert t.last_hidden.shape == (len(t.prompt_ids) + len(t.output_ids), lm.config.hidden_size)


def test_every_column_present_with_one_value_per_step(scored):
    _, traces, results = scored
    for t, cols in zip(traces, results, strict=True):
        assert set(cols) == {c for name in NAMES for c in COLUMNS[name]}
        for key, value in cols.items():
            assert value.shape == (t.n_steps,), key


def test_confidences_in_unit_interval_or_documented_nan(scored):
    _, traces, results = scored
    for t, cols in zip(traces, results, strict=True):
        selected = np.zeros(t.n_steps, bool)
        selected[select_steps(t.n_steps, MAX_STEPS, 0, key=t.example_id)] = True
        finite = {k: np.isfinite(v) for k, v in cols.items()}
        # every step scored by DeepConf and RCC
        assert finite["conf_deepconf"].all() and finite["conf_rcc"].all()
        # sampling: exactly the selected steps; K judge answers each
        np.testing.assert_array_equal(finite["conf_sampling"], selected)
        np.testing.assert_array_equal(cols["sampling_n"][selected], K)
        assert (
            (cols["sampling_unparsed"][selected] >= 0) & (cols["sampling_unparsed"][selected] <= K)
        ).all()
        # forcing and agreement need the trace's own answer
        has_answer = t.answer is not None
        assert finite["conf_forcing"].all() == has_answer
        np.testing.assert_array_equal(finite["conf_agreement"], selected & has_answer)
        np.testing.assert_array_equal(finite["agreement_entropy"], selected)
        if has_answer:
            assert (cols["forcing_logprob"] <= 0).all()
        for name in NAMES:
            conf = cols[f"conf_{name}"]
            ok = conf[np.isfinite(conf)]
            assert ((ok >= 0) & (ok <= 1)).all(), name
            tc = trace_confidence(conf, get_estimator(name).trace_reduce)
            assert np.isnan(tc) or 0 <= tc <= 1
        ent = cols["agreement_entropy"][selected]
        assert ((ent >= 0) & (ent <= 1)).all()
