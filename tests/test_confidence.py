"""Confidence estimators: hand-worked DeepConf/RCC cases, the plug-in contract, teacher-forced
scoring, and the forcing / sampling / agreement plumbing on a tiny random model (no real
weights; the judge is a unit-test fake)."""

import dataclasses
import math

import jax
import numpy as np
import pytest
from tiny_models import build_tiny

import fcjax
import fcjax.confidence.agreement as agreement_mod
import fcjax.confidence.rcc as rcc_mod
import fcjax.confidence.sampling as sampling_mod
from fcjax.confidence import (
    REGISTRY,
    DeepConf,
    Estimator,
    EstimatorContext,
    EstimatorError,
    Trace,
    build_trace,
    get_estimator,
    register,
    run_estimators,
    semantic_entropy,
    trace_confidence,
)
from fcjax.confidence.forcing import PLAIN_CUE
from fcjax.confidence.rcc import rcc_steps, smooth, step_q
from fcjax.data import Example
from fcjax.engine import scoring
from fcjax.engine.complete import chat_completer
from fcjax.engine.generate import Generation
from fcjax.engine.scoring import score_after_cuts
from fcjax.text import Step


class CharTokenizer:
    """One token per ASCII character (id = code point), enough for a 128-token tiny model."""

    eos_token_id = None
    chat_template = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(int(i)) for i in ids)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    lm = fcjax.load(build_tiny("llama-gqa-untied", tmp_path_factory.mktemp("conf"), seed=1))
    return dataclasses.replace(lm, tokenizer=CharTokenizer())


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _padded_logits(lm, seqs):
    """lm.logits of right-padded sequences in one call (causal: padding after a position
    does not change its logits)."""
    width = max(len(x) for x in seqs)
    return lm.logits([list(x) + [0] * (width - len(x)) for x in seqs])


def make_trace(spans, top_logprobs, prompt_len=2, hidden=None, answer="5", ex_id="t"):
    """A Trace with steps at token spans [(start, end), ...]; text is one char per token."""
    top = np.asarray(top_logprobs, np.float32)
    n = top.shape[0]
    steps = [Step(i, a, b, "x" * (b - a), a, b) for i, (a, b) in enumerate(spans)]
    return Trace(
        example_id=ex_id,
        prompt_ids=list(range(1, prompt_len + 1)),
        output_ids=[10] * n,
        text="x" * n,
        token_logprobs=top[:, 0],
        top_logprobs=top,
        steps=steps,
        answer=answer,
        correct=None,
        kind="numeric",
        last_hidden=hidden,
    )


# ----------------------------------------------------------------------------- DeepConf


def test_deepconf_by_hand():
    # c_t = -mean(top-k logprobs): [-0.5,-1.5] -> 1, [-1,-3] -> 2, [-2,-4] -> 3, [-0.1,-7.9] -> 4
    top = [[-0.5, -1.5], [-1.0, -3.0], [-2.0, -4.0], [-0.1, -7.9], [-40.0, -120.0]]
    # step 0 = tokens 0,1 -> raw 1.5; step 1 = tokens 1..3 (token 1 shared) -> raw 3.0;
    # step 2 = token 4 -> raw 80, clipped to conf 1.
    trace = make_trace([(0, 2), (1, 4), (4, 5)], top)
    cols = get_estimator("deepconf", top_k=2).score([trace], EstimatorContext(lm=None))[0]
    np.testing.assert_allclose(cols["deepconf_raw"], [1.5, 3.0, 80.0], rtol=1e-6)
    np.testing.assert_allclose(cols["conf_deepconf"], [1.5 / 8, 3.0 / 8, 1.0], rtol=1e-6)
    # a different scale is a parameter: raw / 4
    cols4 = get_estimator("deepconf", scale=4.0, top_k=2).score([trace], EstimatorContext(None))
    np.testing.assert_allclose(cols4[0]["conf_deepconf"][:2], [1.5 / 4, 3.0 / 4], rtol=1e-6)
    # only the first top_k columns count: a third column of -100 is ignored with top_k=2,
    # and with the default top_k=5 two columns are too few
    wider = make_trace([(0, 2), (1, 4), (4, 5)], np.c_[top, np.full(5, -100.0)])
    cols3 = get_estimator("deepconf", top_k=2).score([wider], EstimatorContext(None))[0]
    np.testing.assert_allclose(cols3["deepconf_raw"], cols["deepconf_raw"])
    with pytest.raises(EstimatorError, match="needs 5"):
        get_estimator("deepconf").score([trace], EstimatorContext(None))


def test_deepconf_ignores_non_finite_logprobs():
    # a row [-1, -inf] has one finite entry: c = 1; the step mean over [1, 3] is 2
    trace = make_trace([(0, 2)], [[-1.0, -np.inf], [-2.0, -4.0]])
    cols = get_estimator("deepconf", top_k=2).score([trace], EstimatorContext(lm=None))[0]
    np.testing.assert_allclose(cols["deepconf_raw"], [2.0])


# ----------------------------------------------------------------------------- RCC


def _rcc_case():
    """Hidden rows (d = 2, so A = dot / sqrt 2) and p_t for four steps, worked by hand."""
    l3 = math.log(3.0)
    r2 = math.sqrt(2.0)
    rows = [
        [1, 0],
        [0, 1],  # prompt
        [r2 * l3, 0],
        [0, r2 * l3],  # step 0: tokens 0, 1
        [2, 0],
        [0, 0],
        [0, 0],  # step 1: tokens 2, 3, 4
        [0, 0],
        [0, 0],
        [0, 0],  # step 2: tokens 5, 6, 7
        [1, 1],  # step 3: token 8
    ]
    p = [0.9, 0.5, 0.6, 0.3, 0.3, 0.8, 0.8, 0.8, 0.4]
    spans = [(0, 2), (2, 5), (5, 8), (8, 9)]
    top = np.log(np.asarray(p))[:, None]
    return np.asarray(rows, np.float64), top, spans


def test_rcc_by_hand():
    hidden, top, spans = _rcc_case()
    trace = make_trace(spans, top, prompt_len=2, hidden=hidden)
    q, big_p = rcc_steps(hidden, trace)
    # step 0: prompt row [1,0] scores [ln3, 0] -> softmax [3/4, 1/4] -> picks token 0;
    #   row [0,1] scores [0, ln3] -> picks token 1; r = [0.9, 0.5] -> q = 0.7
    # step 1: prev row [sqrt2 ln3, 0] scores [2 ln3, 0, 0] -> [9/11, 1/11, 1/11] -> token 2;
    #   prev row [0, sqrt2 ln3] scores [0, 0, 0] -> 1/3 each, nothing >= 0.5 -> r = 0;
    #   r = [0.6, 0] -> q = mean of the non-zero entries = 0.6 (not 0.3)
    # step 2: every score 0 -> 1/3 each -> W = 0 -> q = 0
    # step 3: one token, softmax over one entry = 1 -> r = [0.4, 0.4, 0.4] -> q = 0.4
    np.testing.assert_allclose(q, [0.7, 0.6, 0.0, 0.4], atol=1e-12)
    # P1 = 0.7; P2 = 0.4*0.6 + 0.6*0.7 = 0.66; P3 = 0 + 0.6*0.66 = 0.396;
    # P4 = 0.4*0.4 + 0.6*0.396 = 0.3976
    np.testing.assert_allclose(big_p, [0.7, 0.66, 0.396, 0.3976], atol=1e-12)
    cols = get_estimator("rcc").score([trace], EstimatorContext(lm=None))[0]
    np.testing.assert_allclose(cols["rcc_q"], q)
    np.testing.assert_allclose(cols["conf_rcc"], big_p)
    # mu is a parameter: with mu = 0.9 step 0's 3/4 no longer passes -> q = 0
    _, p_hi = rcc_steps(hidden, trace, mu=0.9)
    assert p_hi[0] == 0.0


def test_rcc_smoothing_recursion_and_delta():
    q = np.array([1.0, 0.0, 0.0, 0.5])
    # delta = 0.4: 1, 0.6, 0.36, 0.4*0.5 + 0.6*0.36 = 0.416
    np.testing.assert_allclose(smooth(q, 0.4), [1.0, 0.6, 0.36, 0.416])
    # delta = 1 keeps q unchanged
    np.testing.assert_allclose(smooth(q, 1.0), q)


def test_rcc_q_is_zero_when_nothing_passes_mu():
    # three step tokens with equal scores: every softmax entry is 1/3 < 0.5
    e_prev = np.array([[1.0, 2.0], [3.0, -1.0]])
    e_step = np.zeros((3, 2))
    assert step_q(e_prev, e_step, np.array([0.9, 0.9, 0.9]), mu=0.5) == 0.0


def test_rcc_checks_hidden_rows():
    hidden, top, spans = _rcc_case()
    trace = make_trace(spans, top, prompt_len=2, hidden=hidden[:-1])
    with pytest.raises(EstimatorError, match="hidden rows"):
        get_estimator("rcc").score([trace], EstimatorContext(lm=None))


# ----------------------------------------------------------------------------- contract


def test_registry_errors_list_valid_names():
    with pytest.raises(EstimatorError, match=r"deepconf.*forcing.*rcc.*sampling"):
        get_estimator("nope")
    with pytest.raises(EstimatorError, match=r"EstimatorContext\.k"):
        EstimatorContext(lm=None, k=0)


@pytest.fixture
def fake_estimators():
    """Two registered fake estimators (removed afterwards)."""

    @dataclasses.dataclass(frozen=True)
    class Half(Estimator):
        name = "half_test"
        length_error: bool = False

        def score(self, traces, ctx):
            out = []
            for t in traces:
                n = t.n_steps + (1 if self.length_error else 0)
                out.append({"conf_half_test": np.full(n, 0.5), "half_raw": np.arange(n)})
            return out

    @dataclasses.dataclass(frozen=True)
    class Bad(Estimator):
        name = "bad_test"
        trace_reduce = "last"

        def score(self, traces, ctx):
            return [
                {"conf_bad_test": np.full(t.n_steps, 1.5), "half_raw": np.zeros(t.n_steps)}
                for t in traces
            ]

    register(Half)
    register(Bad)
    yield Half, Bad
    REGISTRY.pop("half_test")
    REGISTRY.pop("bad_test")


def test_run_estimators_merges_columns(fake_estimators):
    half, bad = fake_estimators
    traces = [
        make_trace([(0, 1), (1, 2)], [[-1.0], [-2.0]], ex_id="a"),
        make_trace([(0, 2)], [[-1.0], [-3.0]], ex_id="b"),
    ]
    ctx = EstimatorContext(lm=None)
    cols = run_estimators(traces, ["half_test", DeepConf(top_k=1)], ctx)
    assert set(cols[0]) == {"conf_half_test", "half_raw", "conf_deepconf", "deepconf_raw"}
    np.testing.assert_allclose(cols[0]["conf_deepconf"], [1 / 8, 2 / 8])
    np.testing.assert_allclose(cols[1]["conf_deepconf"], [2 / 8])
    np.testing.assert_array_equal(cols[1]["half_raw"], [0])
    with pytest.raises(EstimatorError, match="shape"):
        run_estimators(traces, [half(length_error=True)], ctx)
    with pytest.raises(EstimatorError, match="outside"):
        run_estimators(traces, ["bad_test"], ctx)
    # a column written twice is an error (half_raw from both)
    bad_ok = dataclasses.make_dataclass("BadOk", [], bases=(bad,), frozen=True)
    bad_ok.score = lambda self, ts, c: [
        {"conf_bad_test": np.zeros(t.n_steps), "half_raw": np.zeros(t.n_steps)} for t in ts
    ]
    with pytest.raises(EstimatorError, match="half_raw"):
        run_estimators(traces, ["half_test", bad_ok()], ctx)
    with pytest.raises(EstimatorError, match="already registered"):
        register(dataclasses.make_dataclass("Other", [], bases=(half,), frozen=True))


def test_trace_confidence_reductions():
    v = [0.2, np.nan, 0.6, 0.7]
    assert trace_confidence(v, "mean") == pytest.approx(0.5)
    assert trace_confidence(v, "last") == pytest.approx(0.7)
    assert trace_confidence([0.2, 0.6, np.nan], "last") == pytest.approx(0.6)
    assert math.isnan(trace_confidence([np.nan, np.inf], "mean"))
    assert math.isnan(trace_confidence([], "last"))
    with pytest.raises(ValueError, match="median"):
        trace_confidence(v, "median")
    assert get_estimator("rcc").trace_reduce == "last"
    assert get_estimator("forcing").trace_reduce == "last"
    assert get_estimator("deepconf").trace_reduce == "mean"
    assert get_estimator("sampling").trace_reduce == "mean"


# ----------------------------------------------------------------------------- scoring


# (256, 2**24, 1024): every sequence in one call, every width in one program; (2, 1, 0): a
# call per sequence and per 2 cuts, a program per width
@pytest.mark.parametrize(("cut_rows", "scores", "merge"), [(256, 1 << 24, 1024), (2, 1, 0)])
def test_score_after_cuts_matches_full_logits(tiny_lm, monkeypatch, cut_rows, scores, merge):
    """Continuations teacher-forced against one prefill of the shared sequence (one
    ``Decoder.extend`` pass over its cache up to each cut) equal the logits of prefix +
    continuation as one causal forward, for cuts anywhere (1, mid, the end), continuations
    of different lengths (one empty), sequences of different lengths."""
    monkeypatch.setattr(scoring, "CUT_ROWS", cut_rows)
    monkeypatch.setattr(scoring, "SCORES", scores)
    monkeypatch.setattr(scoring, "MERGE_TOKENS", merge)
    rng = np.random.default_rng(0)
    sequences = [rng.integers(1, 120, n).tolist() for n in (23, 5, 40)]
    branches = [
        [(1, [7, 8, 9]), (12, [3]), (23, [4, 5, 6, 7, 8, 9, 10, 11, 12, 13]), (12, [])],
        [(5, [2, 2])],
        [(c, rng.integers(1, 120, 1 + c % 5).tolist()) for c in (3, 9, 17, 30, 38, 40)],
    ]
    # a cue scored from its 3rd token, and one whose first scored token is past its end
    branches[0] += [(20, [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], 2), (4, [9, 9], 2)]
    got = score_after_cuts(tiny_lm, sequences, branches)
    pairs = [
        (seq[:cut], cont, first)
        for seq, b in zip(sequences, branches, strict=True)
        for cut, cont, *rest in b
        for first in [rest[0] if rest else 0]
    ]
    logp = _log_softmax(_padded_logits(tiny_lm, [p + c for p, c, _ in pairs]))
    flat = [lp for per_seq in got for lp in per_seq]
    assert [len(x) for x in flat] == [len(c) - first for _, c, first in pairs]
    for row, ((pre, cont, first), lp) in enumerate(zip(pairs, flat, strict=True)):
        want = [logp[row, len(pre) + j - 1, cont[j]] for j in range(first, len(cont))]
        np.testing.assert_allclose(lp, want, atol=1e-5)
    with pytest.raises(ValueError, match=r"branch 0: first scored token 3 outside 0\.\.2"):
        score_after_cuts(tiny_lm, [[1, 2, 3]], [[(2, [1, 1], 3)]])
    with pytest.raises(ValueError, match=r"sequence 0 branch 1: cut 6 outside 1\.\.5"):
        score_after_cuts(tiny_lm, [[1, 2, 3, 4, 5]], [[(5, [1]), (6, [1])]])
    with pytest.raises(ValueError, match="cut 0 outside"):
        score_after_cuts(tiny_lm, [[1, 2]], [[(0, [1])]])
    with pytest.raises(ValueError, match=r"sequence 0 branch 0 has token ids outside 0\.\.127"):
        score_after_cuts(tiny_lm, [[1, 2]], [[(1, [500])]])


def test_score_after_cuts_compiles_one_program_for_a_few_rows_of_any_width(tiny_lm, monkeypatch):
    """A few continuations of 2 to 40 tokens (cues and answers of any length) share one
    padded width: one program traced, not one per width bucket (16, 64); with no merging
    (``MERGE_TOKENS=0``) two sequences' widths (8, 64) are two programs. Sequences of
    190-200 and 290-300 tokens, length buckets no other test here scores."""
    traced = []

    def listen(event, duration, **kwargs):
        name = str(kwargs.get("fun_name", ""))
        if event.endswith("jaxpr_trace_duration") and "after_cuts" in name:
            traced.append(name)

    jax.monitoring.register_event_duration_secs_listener(listen)
    rng = np.random.default_rng(1)

    def branches_of(lengths):
        return [(c, rng.integers(1, 120, n).tolist(), n - 1) for c, n in lengths]

    sequences = [rng.integers(1, 120, n).tolist() for n in (200, 190)]
    branches = [branches_of(((100, 6), (150, 13))), branches_of(((50, 2), (60, 40)))]
    try:
        got = score_after_cuts(tiny_lm, sequences, branches)
        assert len(traced) == 1
        monkeypatch.setattr(scoring, "MERGE_TOKENS", 0)
        longer = [rng.integers(1, 120, n).tolist() for n in (300, 290)]
        score_after_cuts(tiny_lm, longer, [branches_of(((100, 6),)), branches_of(((9, 40),))])
        assert len(traced) == 3
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert [[len(x) for x in per_seq] for per_seq in got] == [[1, 1], [1, 1]]


# ----------------------------------------------------------------------------- tiny-model plumbing

TEXT = "First, 2 + 3 = 5.\n\nSo the total is 5.\n\nFinal answer: \\boxed{5}"
EXAMPLE = Example("ex1", "What is 2 + 3?", None, "5", "numeric", "test")


def _trace(lm, text=TEXT, example=EXAMPLE):
    ids = lm.encode(text)
    prompt = lm.encode("User: What is 2 + 3?\n\nAssistant:")
    gen = Generation(
        text,
        ids,
        np.zeros(len(ids)),
        np.zeros((len(ids), 5)),
        np.zeros((len(ids), 5), np.int32),
        "eos",
        prompt,
    )
    return build_trace(lm, example, gen)


def test_build_trace_steps_and_answer(tiny_lm):
    trace = _trace(tiny_lm)
    assert [s.text for s in trace.steps] == [
        "First, 2 + 3 = 5.",
        "So the total is 5.",
        "Final answer: \\boxed{5}",
    ]
    # one token per character: token spans equal char spans
    for s in trace.steps:
        assert (s.token_start, s.token_end) == (s.start, s.end)
    assert trace.answer == "5" and trace.correct is True and trace.kind == "numeric"
    wrong = _trace(tiny_lm, example=dataclasses.replace(EXAMPLE, answer="6"))
    assert wrong.correct is False


def test_forcing_equals_independent_logprobs(tiny_lm):
    trace = _trace(tiny_lm)
    cols = get_estimator("forcing").score([trace], EstimatorContext(lm=tiny_lm))[0]
    cue, ans = tiny_lm.encode(PLAIN_CUE), tiny_lm.encode("5")
    seqs = [trace.prompt_ids + trace.output_ids[: s.token_end] + cue + ans for s in trace.steps]
    logps = _log_softmax(_padded_logits(tiny_lm, seqs))
    for i, seq in enumerate(seqs):
        lp = [logps[i, len(seq) - len(ans) + j - 1, t] for j, t in enumerate(ans)]
        np.testing.assert_allclose(cols["forcing_logprob"][i], sum(lp), atol=1e-4)
        np.testing.assert_allclose(cols["conf_forcing"][i], np.exp(np.mean(lp)), rtol=1e-4)
    none = dataclasses.replace(trace, answer=None)
    cols = get_estimator("forcing").score([none], EstimatorContext(lm=tiny_lm))[0]
    assert np.isnan(cols["conf_forcing"]).all() and np.isnan(cols["forcing_logprob"]).all()


def test_rcc_captures_a_part_in_one_forward(tiny_lm, monkeypatch):
    """The part's traces go through one batched capture (not a forward per trace, each its
    own program per length bucket), with the columns each trace gets when scored alone."""
    long = TEXT.replace("So the total", "Counting again, two plus three gives five. " * 4 + "So")
    texts = [TEXT, long]  # 94 and 256 tokens with the prompt: two length buckets
    calls = []
    real = rcc_mod.capture

    def spy(lm, sequences, *args, **kwargs):
        calls.append(len(sequences))
        return real(lm, sequences, *args, **kwargs)

    monkeypatch.setattr(rcc_mod, "capture", spy)
    rcc = get_estimator("rcc")
    ctx = EstimatorContext(lm=tiny_lm)
    together = rcc.score([_trace(tiny_lm, t) for t in texts], ctx)
    assert calls == [2]
    alone = [rcc.score([_trace(tiny_lm, t)], ctx)[0] for t in texts]
    assert calls == [2, 1, 1]
    for a, b in zip(together, alone, strict=True):
        assert len(a["conf_rcc"]) >= 2
        for column in ("conf_rcc", "rcc_q"):
            np.testing.assert_allclose(a[column], b[column], atol=1e-6)


def test_sampling_plumbing_with_fake_judge(tiny_lm, monkeypatch):
    trace = _trace(tiny_lm)
    calls, judged = [], []
    real_branch = sampling_mod.branch_many

    def spy_branch(lm, traces, k, params, keys):
        calls.append(([(list(i), list(c)) for i, c in traces], k, params, list(keys)))
        return real_branch(lm, traces, k, params, keys=keys)

    verdict = {0: "Yes", 1: "**No**, it does not.", 2: "I cannot tell."}

    def judge(prompts):
        judged.append(prompts)
        out = []
        for p in prompts:
            assertion = p[0]["content"].split("Statement:\n", 1)[1].split("\n\n")[0]
            out.append(verdict[[s.text for s in trace.steps].index(assertion)])
        return out

    monkeypatch.setattr(sampling_mod, "branch_many", spy_branch)
    ctx = EstimatorContext(lm=tiny_lm, judge_complete=judge, k=3, max_steps=2, max_new_tokens=8)
    twin = dataclasses.replace(trace, example_id="ex2")
    cols, cols_twin = get_estimator("sampling").score([trace, twin], ctx)
    # one branch call and one judge call for both traces; cuts = prompt + output tokens
    # before each selected step (first, last)
    assert len(calls) == 1 and len(judged) == 1
    (ids, cuts), (twin_ids, _) = calls[0][0]
    k, params, keys = calls[0][1:]
    assert ids == twin_ids == trace.prompt_ids + trace.output_ids and k == 3
    assert keys == ["ex1", "ex2"]
    assert cuts == [
        trace.prompt_len + trace.steps[0].start,
        trace.prompt_len + trace.steps[2].start,
    ]
    assert params.stop == ("\n\n",) and params.temperature == 0.8 and params.top_p == 0.95
    # Yes -> 0 -> conf 1; unparsable -> 0.5; step 1 not selected -> NaN everywhere.
    # Step 0's only unparsed answers are empty paragraphs (not sent to the judge); both traces'
    # step-0 prompts are in the one judge call.
    sent_0 = sum(trace.steps[0].text in p[0]["content"] for p in judged[0])
    assert sent_0 == 6 - cols["sampling_unparsed"][0] - cols_twin["sampling_unparsed"][0]
    assert cols["conf_sampling"][0] == pytest.approx(1.0 - 0.5 * cols["sampling_unparsed"][0] / 3)
    assert cols["conf_sampling"][2] == pytest.approx(0.5)
    assert cols["sampling_unparsed"][2] == 3
    np.testing.assert_array_equal(cols["sampling_n"][[0, 2]], [3, 3])
    assert np.isnan(cols["conf_sampling"][1]) and np.isnan(cols["sampling_n"][1])
    # the twin was scored from the same single branch and judge calls
    assert np.isfinite(cols_twin["conf_sampling"][[0, 2]]).all()
    assert np.isnan(cols_twin["conf_sampling"][1])
    with pytest.raises(EstimatorError, match="judge_complete"):
        get_estimator("sampling").score([trace], EstimatorContext(lm=tiny_lm))


def _fake_branch(texts):
    def branch_many(lm, traces, k, params, keys):
        assert k == len(texts) and len(keys) == len(traces)
        gen = [
            Generation(t, [], np.zeros(0), np.zeros((0, 0)), np.zeros((0, 0)), "stop")
            for t in texts
        ]
        return [[list(gen) for _ in cuts] for _, cuts in traces]

    return branch_many


def test_sampling_empty_paragraph_counts_unparsed(tiny_lm, monkeypatch):
    trace = _trace(tiny_lm)
    monkeypatch.setattr(sampling_mod, "branch_many", _fake_branch(["", "  ", "the sum is 5"]))
    judged = []
    ctx = EstimatorContext(
        lm=tiny_lm, judge_complete=lambda p: judged.extend(p) or ["Yes"] * len(p), k=3, max_steps=20
    )
    cols = get_estimator("sampling").score([trace], ctx)[0]
    # per step: two empty paragraphs (0.5 each) and one Yes (0): conf = 1 - 1/3
    np.testing.assert_allclose(cols["conf_sampling"], [2 / 3] * 3)
    np.testing.assert_array_equal(cols["sampling_unparsed"], [2, 2, 2])
    assert len(judged) == 3 and "Context:\nthe sum is 5" in judged[0][0]["content"]


def test_sampling_keeps_continuations_and_verdicts(tiny_lm, monkeypatch):
    """ctx.store receives one record per continuation: the judged paragraph, the reply and
    the verdict (1 consistent, 0 not, NaN unparsable or empty), in step and sample order."""
    trace = _trace(tiny_lm)
    texts = ["first idea\n\nnever judged", "", "second idea"]
    monkeypatch.setattr(sampling_mod, "branch_many", _fake_branch(texts))
    replies = iter(["Yes", "No.", "maybe", "yes", "no", "yes"])
    kept = []
    ctx = EstimatorContext(
        lm=tiny_lm,
        judge_complete=lambda p: [next(replies) for _ in p],
        k=3,
        max_steps=20,
        keep=lambda name, rows: kept.append((name, rows)),
    )
    cols = get_estimator("sampling").score([trace], ctx)[0]
    [(name, rows)] = kept
    assert name == "sampling" and set(rows) == set(sampling_mod.SAMPLE_COLUMNS)
    assert rows["step"] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert rows["sample"] == [0, 1, 2] * 3 and rows["example_id"] == ["ex1"] * 9
    assert rows["paragraph"] == ["first idea", "", "second idea"] * 3
    assert rows["reply"] == ["Yes", None, "No.", "maybe", None, "yes", "no", None, "yes"]
    np.testing.assert_array_equal(
        rows["consistent"], [1, np.nan, 0, np.nan, np.nan, 1, 0, np.nan, 1]
    )
    # the verdicts are the ones the confidence was computed from: 1 - mean(No=1, other=0.5)
    np.testing.assert_allclose(cols["conf_sampling"], [1 - 1.5 / 3, 1 - 1.0 / 3, 1 - 1.5 / 3])


def test_agreement_and_semantic_entropy(tiny_lm, monkeypatch):
    assert semantic_entropy(["a", "a", "a", "a"]) == 0.0
    assert semantic_entropy(["a", "b", "c", "d"]) == pytest.approx(1.0)
    # [a, a, b, b]: H = ln 2, normalised by ln 4 -> 0.5
    assert semantic_entropy(["a", "a", "b", "b"]) == pytest.approx(0.5)
    trace = _trace(tiny_lm)
    texts = ["so \\boxed{5}", "it is \\boxed{5.0}", "\\boxed{6}", ""]
    monkeypatch.setattr(sampling_mod, "branch_many", _fake_branch(texts))
    ctx = EstimatorContext(lm=tiny_lm, k=4, max_steps=20)
    cols = get_estimator("agreement").score([trace], ctx)[0]
    # 5 and 5.0 agree with the trace's answer 5 -> 2/4
    np.testing.assert_allclose(cols["conf_agreement"], [0.5] * 3)
    # clusters {5: 2, 6: 1, none: 1}: H = 0.5 ln2 + 2 * 0.25 ln4 = 1.5 ln2; / ln4 = 0.75
    np.testing.assert_allclose(cols["agreement_entropy"], [0.75] * 3)
    none = dataclasses.replace(trace, answer=None)
    cols = get_estimator("agreement").score([none], ctx)[0]
    assert np.isnan(cols["conf_agreement"]).all()
    np.testing.assert_allclose(cols["agreement_entropy"], [0.75] * 3)
    assert agreement_mod.same_answer("the answer is 5", "5", "numeric")


def test_chat_completer_formats_and_generates(tiny_lm):
    complete = chat_completer(tiny_lm, max_new_tokens=6)
    convs = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "2+2?"}]]
    replies = complete(convs)
    greedy = fcjax.SamplingParams(temperature=0.0, max_new_tokens=6, logprobs=0)
    want = [
        g.text.strip() for g in fcjax.generate(tiny_lm, [tiny_lm.chat(c) for c in convs], greedy)
    ]
    assert replies == want
    assert complete([]) == []
    with pytest.raises(ValueError, match="conversation 0"):
        complete([["not a message"]])
