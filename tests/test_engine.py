"""Engine: cached decoding, generate, branch, batching, EOS, buckets (tiny random models)."""

import dataclasses
import importlib

import jax
import numpy as np
import pytest
import torch
from tiny_models import build_tiny
from transformers import AutoModelForCausalLM

import fcjax
from fcjax.engine import decode as decode_lib
from fcjax.engine.generate import bucket, prefill_width, shrink_widths

FAMILIES = ["llama-gqa-untied", "qwen2-bias", "qwen3-qknorm"]
GREEDY = fcjax.SamplingParams(temperature=0.0, max_new_tokens=24, logprobs=5)


@pytest.fixture(scope="module", params=FAMILIES)
def family_dir(request, tmp_path_factory):
    return build_tiny(request.param, tmp_path_factory.mktemp(request.param), seed=3)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    model = fcjax.load(build_tiny("llama-tied-headdim", tmp_path_factory.mktemp("lm"), seed=5))
    return _without_eos(model)


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30]]


def test_cached_decoding_equals_full_forward(family_dir):
    """Every step's log-probabilities from the KV-cached loop equal a cache-free forward."""
    lm = _without_eos(fcjax.load(family_dir))
    for prompt, g in zip(PROMPTS, fcjax.generate(lm, PROMPTS, GREEDY), strict=True):
        full = np.asarray(prompt + g.token_ids)
        logits = lm.logits([full])[0].astype(np.float64)
        shifted = logits - logits.max(-1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
        rows = logp[len(prompt) - 1 : len(full) - 1]
        chosen = rows[np.arange(len(g.token_ids)), g.token_ids]
        np.testing.assert_allclose(g.token_logprobs, chosen, atol=1e-4)
        np.testing.assert_allclose(g.top_logprobs, -np.sort(-rows, axis=-1)[:, :5], atol=1e-4)


def _without_eos(lm):
    return dataclasses.replace(lm, config=dataclasses.replace(lm.config, eos_token_ids=()))


def test_greedy_generate_matches_transformers(family_dir):
    lm = _without_eos(fcjax.load(family_dir))
    ref = AutoModelForCausalLM.from_pretrained(family_dir, dtype=torch.float32).eval()
    for prompt, g in zip(PROMPTS, fcjax.generate(lm, PROMPTS, GREEDY), strict=True):
        out = ref.generate(
            torch.tensor([prompt]),
            max_new_tokens=24,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        assert g.token_ids == out[0, len(prompt) :].tolist()
        assert g.finish_reason == "length"


def test_batch_composition_does_not_change_outputs(lm):
    sampled = fcjax.SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=16, seed=7)
    for params in (GREEDY, sampled):
        together = fcjax.generate(lm, PROMPTS, params, keys=["a", "b", "c"])
        alone = [
            fcjax.generate(lm, [p], params, keys=[k])[0]
            for p, k in zip(PROMPTS, "abc", strict=True)
        ]
        reordered = fcjax.generate(lm, PROMPTS[::-1], params, keys=["c", "b", "a"])[::-1]
        for x, y, z in zip(together, alone, reordered, strict=True):
            assert x.token_ids == y.token_ids == z.token_ids
            np.testing.assert_allclose(x.token_logprobs, y.token_logprobs, atol=1e-5)


def _ragged(lm, *, seed: int, n: int, eos_share: int):
    """``n`` random prompts of 3-19 tokens, and ``lm`` with a random EOS set of one id in
    ``eos_share``, so sampled rows end at very different steps."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(1, 120, int(rng.integers(3, 20))).tolist() for _ in range(n)]
    vocab = lm.config.vocab_size
    eos = tuple(int(t) for t in rng.choice(vocab, vocab // eos_share, replace=False))
    return prompts, dataclasses.replace(
        lm, config=dataclasses.replace(lm.config, eos_token_ids=eos)
    )


def test_compaction_once_drained_does_not_change_outputs(lm, monkeypatch):
    """Rows of many lengths in a pool large enough to shrink once the queue has drained
    (the live context slots move into a narrower pool) give the tokens each row gives
    alone; the pool really shrank. Pools of 8 slots compact here (the threshold is a cost
    choice; the tokens must not depend on it)."""
    generate_lib = importlib.import_module("fcjax.engine.generate")  # the module
    from fcjax.engine.generate import CHUNK, EngineStats

    compact_from = 8
    monkeypatch.setattr(generate_lib, "COMPACT_FROM", compact_from)

    prompts, lm_eos = _ragged(lm, seed=0, n=20, eos_share=12)
    params = fcjax.SamplingParams(temperature=1.0, max_new_tokens=60, seed=2)
    stats = EngineStats()
    pooled = fcjax.generate(lm_eos, prompts, params, batch_size=compact_from * 2, stats=stats)
    lengths = [len(g.token_ids) for g in pooled]
    assert max(lengths) > 4 * min(lengths)  # rows end at very different steps
    assert stats.row_steps < 16 * CHUNK * stats.chunks  # some chunks ran on fewer slots
    small = fcjax.generate(lm_eos, prompts, params, batch_size=2)  # never compacts
    for a, b in zip(pooled, small, strict=True):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, atol=1e-5)
        np.testing.assert_array_equal(a.top_ids, b.top_ids)
    # branching: several rows per context slot move together (their own caches too)
    pairs = zip(prompts[:10], pooled[:10], strict=True)
    traces = [(p + g.token_ids, [len(p) // 2 + 1, len(p)]) for p, g in pairs]
    stats = EngineStats()
    many = fcjax.branch_many(lm_eos, traces, 2, params, keys=range(10), stats=stats)
    assert stats.row_steps < 16 * 4 * CHUNK * stats.chunks  # 16 contexts x 4 rows, shrunk
    for i, (ids, cuts) in enumerate(traces):
        alone = fcjax.branch(lm_eos, ids, cuts, 2, params, key=i)
        assert [[g.token_ids for g in c] for c in alone] == [
            [g.token_ids for g in c] for c in many[i]
        ]


def test_sampling_depends_on_seed_and_key(lm):
    p = dataclasses.replace(GREEDY, temperature=1.0)
    a = fcjax.generate(lm, [PROMPTS[0]], p, keys=["x"])[0].token_ids
    assert a == fcjax.generate(lm, [PROMPTS[0]], p, keys=["x"])[0].token_ids
    assert a != fcjax.generate(lm, [PROMPTS[0]], p, keys=["y"])[0].token_ids
    assert (
        a
        != fcjax.generate(lm, [PROMPTS[0]], dataclasses.replace(p, seed=1), keys=["x"])[0].token_ids
    )


def test_greedy_branch_equals_generate_from_explicit_prefix(family_dir):
    lm = _without_eos(fcjax.load(family_dir))
    trace = PROMPTS[0] + fcjax.generate(lm, [PROMPTS[0]], GREEDY)[0].token_ids
    cuts = [3, 9, 17, len(trace)]
    params = dataclasses.replace(GREEDY, max_new_tokens=10)
    branches = fcjax.branch(lm, trace, cuts, 2, params)
    for cut, outs in zip(cuts, branches, strict=True):
        ref = fcjax.generate(lm, [trace[:cut]], params)[0]
        assert len(outs) == 2
        for o in outs:
            assert o.token_ids == ref.token_ids
            np.testing.assert_allclose(o.token_logprobs, ref.token_logprobs, atol=1e-4)
            assert o.prompt_ids == trace[:cut]


def test_sampled_branches_reproducible_across_row_splits(lm):
    trace = PROMPTS[2] + list(range(40, 60))
    params = fcjax.SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=8, seed=3)
    a = fcjax.branch(lm, trace, [4, 11, 25], 4, params, key="ex-1")
    b = fcjax.branch(lm, trace, [4, 11, 25], 4, params, key="ex-1", max_rows=5)
    c = fcjax.branch(lm, trace, [11], 4, params, key="ex-1")
    ids = [[g.token_ids for g in outs] for outs in a]
    assert ids == [[g.token_ids for g in outs] for outs in b]
    assert ids[1] == [g.token_ids for g in c[0]]
    assert len({tuple(x) for x in ids[1]}) > 1  # the k samples differ from each other


def test_branch_many_equals_branch_per_trace(lm):
    """Traces of different lengths and cut counts decoded together give each trace the
    tokens ``branch`` gives it alone (rows seeded by example id, cut and sample)."""
    params = fcjax.SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=8, seed=3)
    traces = [
        (PROMPTS[2] + list(range(40, 60)), [4, 11, 25]),
        (PROMPTS[1] + list(range(70, 75)), [2]),
        (PROMPTS[0] + list(range(80, 120)), [5, 6, 30, 47]),
    ]
    keys = ["ex-1", "ex-2", 7]
    many = fcjax.branch_many(lm, traces, 3, params, keys=keys)
    split = fcjax.branch_many(lm, traces, 3, params, keys=keys, max_rows=8)  # other groups
    for (ids, cuts), key, got, got_split in zip(traces, keys, many, split, strict=True):
        alone = fcjax.branch(lm, ids, cuts, 3, params, key=key)
        assert len(got) == len(cuts) and all(len(g) == 3 for g in got)
        for a, b, c, cut in zip(alone, got, got_split, cuts, strict=True):
            assert [g.token_ids for g in a] == [g.token_ids for g in b] == [g.token_ids for g in c]
            assert all(g.prompt_ids == ids[:cut] for g in b)
            for x, y in zip(a, b, strict=True):
                np.testing.assert_allclose(x.token_logprobs, y.token_logprobs, atol=1e-5)


def test_generate_batches_by_length_and_returns_input_order(lm):
    """Prompts are batched by length; outputs come back in input order, equal to one batch."""
    prompts = [PROMPTS[2], PROMPTS[1], PROMPTS[0], PROMPTS[1][:2], PROMPTS[2][:9]]
    params = fcjax.SamplingParams(temperature=1.0, max_new_tokens=6, seed=2)
    keys = [f"k{i}" for i in range(len(prompts))]
    whole = fcjax.generate(lm, prompts, params, keys=keys)
    split = fcjax.generate(lm, prompts, params, keys=keys, batch_size=2)
    assert [g.prompt_ids for g in split] == [list(p) for p in prompts]
    assert [g.token_ids for g in split] == [g.token_ids for g in whole]


def test_eos_stops_rows_independently(lm):
    """Each row ends at its own first EOS; the EOS set is data, so another set reuses the
    programs the model without EOS compiled."""
    free = fcjax.generate(lm, PROMPTS, GREEDY)
    eos = free[0].token_ids[4]  # a token the first row emits at step 5
    cfg = dataclasses.replace(lm.config, eos_token_ids=(eos,))
    lm_eos = dataclasses.replace(lm, config=cfg)
    before = _programs()
    outs = fcjax.generate(lm_eos, PROMPTS, GREEDY)
    assert _programs() == before
    first = free[0].token_ids.index(eos)
    assert outs[0].finish_reason == "eos"
    assert outs[0].token_ids == free[0].token_ids[:first]
    for o, f in zip(outs[1:], free[1:], strict=True):
        cut = f.token_ids.index(eos) if eos in f.token_ids else len(f.token_ids)
        assert o.token_ids == f.token_ids[:cut]
        assert o.finish_reason == ("eos" if eos in f.token_ids else "length")


def _programs():
    return decode_lib.prefill_into._cache_size() + decode_lib.decode_chunk._cache_size()


def test_sampler_values_are_data_one_program_per_structure(lm):
    """Temperatures and top-p values are data: after the first call of a structure (sampled,
    with or without top-p), other values compile nothing, and still change the draws."""
    prompts = [PROMPTS[0], PROMPTS[2]]
    structures = {"plain": [(0.7, 1.0), (1.3, 1.0)], "nucleus": [(0.7, 0.9), (1.3, 0.97)]}
    for name, values in structures.items():  # (temperature, top-p) per call
        runs = []
        for i, (t, p) in enumerate(values):
            params = fcjax.SamplingParams(temperature=t, top_p=p, max_new_tokens=24, seed=1)
            before = _programs()
            runs.append([g.token_ids for g in fcjax.generate(lm, prompts, params)])
            assert i == 0 or _programs() == before, name
        assert runs[0] != runs[1], name


def test_prompt_lengths_compile_once_per_bucket(lm):
    """A call compiles one prefill and one decode program; later calls whose prompts fall in
    the same buckets (the cache's power of two, the prefill's eighth of it) compile none,
    whatever the exact lengths and max_new_tokens."""
    params = dataclasses.replace(GREEDY, max_new_tokens=5)
    before = _programs()
    fcjax.generate(lm, [list(range(1, 20)), list(range(1, 30))], params)
    assert _programs() - before <= 2
    before = _programs()
    for n in range(17, 33, 3):  # other lengths inside the 32 bucket
        other = dataclasses.replace(params, max_new_tokens=n % 7 + 9)  # all in the 16 bucket
        fcjax.generate(lm, [list(range(1, n + 1)), list(range(2, n // 2))], other)
    assert _programs() == before
    lengths = list(range(3, 43, 2))  # 20 different prompt lengths
    for n in lengths:
        fcjax.generate(lm, [list(range(1, n + 1))], params)
    buckets = {bucket(n) for n in lengths}
    assert _programs() - before <= 2 * len(buckets)


def test_prefill_and_shrink_widths_by_hand():
    assert [prefill_width(n, 128) for n in (1, 16, 17, 74, 80, 81, 128)] == [
        16, 16, 32, 80, 80, 96, 128
    ]  # fmt: skip
    assert [prefill_width(n, 32) for n in (3, 16, 17, 32)] == [16, 16, 32, 32]
    assert [prefill_width(n, 16) for n in (1, 16)] == [16, 16]
    assert [prefill_width(n, 4096) for n in (1, 512, 513, 3000)] == [512, 512, 1024, 3072]
    assert shrink_widths(32) == (24, 16, 12, 8) and shrink_widths(64) == (48, 32, 24, 16)
    assert shrink_widths(4) == (3, 2, 1)


def test_prefill_at_a_narrower_width_equals_the_whole_bucket(lm, monkeypatch):
    """Each group of contexts is prefilled at its longest context rounded up to an eighth of
    the cache (here one context per group: 16, 48 and 80 positions of a 128-position
    cache): the same tokens and log-probabilities as prefilling every group at the whole
    bucket, where the cache past the narrower width is zeros."""
    generate_lib = importlib.import_module("fcjax.engine.generate")  # the module
    monkeypatch.setattr(generate_lib, "PREFILL_TOKENS", 128)  # a group of one context
    widths, prefill = [], generate_lib.prefill_into

    def spy(graphdef, params, pool, tokens, *args):
        widths.append(tokens.shape[1])
        return prefill(graphdef, params, pool, tokens, *args)

    monkeypatch.setattr(generate_lib, "prefill_into", spy)
    rng = np.random.default_rng(4)
    prompts = [rng.integers(1, 120, n).tolist() for n in (70, 5, 40)]
    params = fcjax.SamplingParams(temperature=1.0, max_new_tokens=12, seed=3, logprobs=3)
    narrow = fcjax.generate(lm, prompts, params)
    assert sorted(widths) == [16, 48, 80]
    widths.clear()
    monkeypatch.setattr(generate_lib, "prefill_width", lambda longest, ctx_len: ctx_len)
    whole = fcjax.generate(lm, prompts, params)
    assert widths == [128] * 3
    for a, b in zip(narrow, whole, strict=True):
        assert a.token_ids == b.token_ids
        np.testing.assert_allclose(a.token_logprobs, b.token_logprobs, atol=1e-5)
        np.testing.assert_allclose(a.top_logprobs, b.top_logprobs, atol=1e-5)


def test_a_refill_prefills_only_the_contexts_it_admits(lm, monkeypatch):
    """The first admission fills the pool (8 rows of prefill); a refill between chunks
    prefills the few contexts it admits (rows: their power of two), and every row's tokens
    equal those of its prompt generated alone."""
    generate_lib = importlib.import_module("fcjax.engine.generate")  # the module
    rows, prefill = [], generate_lib.prefill_into

    def spy(graphdef, params, pool, tokens, lengths, *args):
        rows.append((tokens.shape[0], int((np.asarray(lengths) > 1).sum())))
        return prefill(graphdef, params, pool, tokens, lengths, *args)

    monkeypatch.setattr(generate_lib, "prefill_into", spy)
    prompts, lm_eos = _ragged(lm, seed=7, n=14, eos_share=10)
    params = fcjax.SamplingParams(temperature=1.0, max_new_tokens=30, seed=5)
    pooled = fcjax.generate(lm_eos, prompts, params, batch_size=8)
    assert rows[0] == (8, 8) and len(rows) > 2
    assert all(n == 1 << (used - 1).bit_length() for n, used in rows)  # every prompt > 1 token
    assert any(n < 8 for n, _ in rows[1:])
    for i, (p, g) in enumerate(zip(prompts, pooled, strict=True)):
        alone = fcjax.generate(lm_eos, [p], params, keys=[i])[0]
        assert g.token_ids == alone.token_ids
        np.testing.assert_allclose(g.token_logprobs, alone.token_logprobs, atol=1e-5)


def test_capture_batches_equal_full_hidden_states(lm):
    """Batched capture (several lengths in one padded forward) gives every sequence the
    hidden states a forward of that sequence alone gives, in input order."""
    seqs = [PROMPTS[2] + list(range(40, 70)), PROMPTS[1], PROMPTS[0] + [3, 4, 5]]
    positions = [[0, 7, 40], [2], [1, 5, 9]]
    caps = fcjax.capture(lm, seqs, positions, batch_size=2)
    alone = [
        fcjax.capture(lm, [s], [p], batch_size=1)[0] for s, p in zip(seqs, positions, strict=True)
    ]
    for seq, pos, cap, one in zip(seqs, positions, caps, alone, strict=True):
        ref = lm.hidden_states([seq])[:, 0]  # [L + 1, T, D]
        assert cap.states.shape == (len(pos), lm.config.num_layers + 1, lm.config.hidden_size)
        np.testing.assert_allclose(cap.states, ref[:, pos].transpose(1, 0, 2), atol=1e-5)
        np.testing.assert_allclose(cap.last_hidden, one.last_hidden, atol=1e-5)
        assert cap.last_hidden.shape == (len(seq), lm.config.hidden_size)


def test_max_new_tokens_and_bad_input(lm):
    g = fcjax.generate(lm, [PROMPTS[0]], dataclasses.replace(GREEDY, max_new_tokens=5))[0]
    assert len(g.token_ids) == 5 and g.top_logprobs.shape == (5, 5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        fcjax.SamplingParams(max_new_tokens=0)
    with pytest.raises(ValueError, match="cut"):
        fcjax.branch(lm, PROMPTS[0], [0], 2, GREEDY)
    with pytest.raises(ValueError, match="k must be"):
        fcjax.branch(lm, PROMPTS[0], [2], 0, GREEDY)
    with pytest.raises(ValueError, match="tokenizer"):
        fcjax.generate(lm, ["text needs a tokenizer"], GREEDY)


@pytest.mark.parametrize("plan", ["cpu", "default", "gpu"])
@pytest.mark.parametrize("scale", [0.3, 3.0, 12.0])
@pytest.mark.parametrize("shortlist", [16, 64, 4096])
def test_top_p_keeps_the_sorted_nucleus(scale, shortlist, plan):
    """The nucleus from the top-k shortlist (peaked rows) or from the radix search (flat rows;
    bisection on the CPU plan, 16-ary on the GPU's) is the one a float64 descending sort
    gives; flat rows differ from it by at most a boundary token (float32 sums in another
    order). ``ok`` says which rows the shortlist held."""
    import jax.numpy as jnp

    from fcjax.engine.sampling import PLANS, Sampler, kept_cut

    rng = np.random.default_rng(int(scale * 10) + shortlist)
    logits = (rng.standard_normal((6, 5000)) * scale).astype(np.float32)
    logits[0, :7] = -np.inf  # rows already cut by top-k
    logits[1, :3] = logits[1, 3]  # ties
    top = jax.lax.top_k(jnp.asarray(logits), shortlist)[0]
    cut, ok = kept_cut(jnp.asarray(logits), Sampler(1.0, 0.9, 0, 5), top, PLANS[plan])
    kept = logits >= np.asarray(cut)
    for row, keep, held in zip(logits.astype(np.float64), kept, np.asarray(ok)[:, 0], strict=True):
        order = np.argsort(-row, kind="stable")
        probs = np.exp(row[order] - row.max())
        probs /= probs.sum()
        n = int(np.searchsorted(np.cumsum(probs) - probs, 0.9, side="left"))
        expected = row >= row[order][n - 1]
        assert held == (expected.sum() < shortlist) or scale < 1
        if scale >= 1:
            np.testing.assert_array_equal(keep, expected)
        else:
            assert keep[order[0]] and abs(int(keep.sum()) - int(expected.sum())) <= 1


def test_example_keys_equal_in_their_low_31_bits_sample_differently(lm):
    """Keys are 64 bits: two example ids that a 31-bit key would merge draw other tokens."""
    p = dataclasses.replace(GREEDY, temperature=1.0)
    gens = fcjax.generate(lm, [PROMPTS[0]] * 3, p, keys=[5, 2**31 + 5, 2**40 + 5])
    assert len({tuple(g.token_ids) for g in gens}) == 3
