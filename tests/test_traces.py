"""Traces from any engine: teacher forcing, the record format, ``--traces`` and the
export/import round trip."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import build_tiny, tiny_run_settings

import fcjax
from experiments.export import export, export_rows
from experiments.run import run
from experiments.rundir import RunDir, RunError
from fcjax.data import DataError, load_dataset
from fcjax.data.traces import read_traces, scoring_kind, select_traces, write_traces
from fcjax.engine.imported import imported_generations
from fcjax.engine.scoring import force, force_many
from fcjax.store.tables import read_table

ESTIMATORS = ("deepconf", "rcc", "forcing", "probe", "sampling")
TEACHER_FORCED = ("deepconf", "rcc", "forcing", "probe")
# hand-made traces of the study's datasets: (record, prediction, correct, scorable, kind)
SCORED = [
    (
        {"dataset": "aime", "gold": "42", "text": "Add them.\n\nSo \\boxed{42}."},
        "42",
        True,
        True,
        "numeric",
    ),
    (
        {
            "dataset": "hle",
            "answer_type": "multipleChoice",
            "gold": "b",
            "text": "Hmm.\n\n\\boxed{B}",
        },
        "B",
        True,
        True,
        "letter",
    ),
    (
        {
            "dataset": "musr",
            "choices": ["the butler", "the cook"],
            "gold": "A",
            "text": "\\boxed{the cook}",
        },
        "the cook",
        False,
        True,
        "letter",
    ),
    (
        {"dataset": "legalbench", "gold": "Yes", "text": "I think\n\n\\boxed{No}"},
        "No",
        False,
        True,
        "yesno",
    ),
    (
        {"dataset": "legalbench", "gold": "No", "text": "\\boxed{unclear}"},
        "unclear",
        False,
        False,
        "yesno",
    ),
    (
        {"dataset": "math", "gold": "\\frac{1}{2}", "text": "Half.\n\n\\boxed{0.5}"},
        "0.5",
        True,
        True,
        "math",
    ),
    # no boxed answer: the last line (fcjax's rule); a numeric answer is always scorable
    ({"gold": "7", "text": "no answer here"}, "no answer here", False, True, "numeric"),
]


# --- teacher forcing ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny("qwen2-bias", tmp_path_factory.mktemp("qwen2"))


def test_force_matches_transformers(tiny_dir):
    from transformers import AutoModelForCausalLM

    lm = fcjax.load(str(tiny_dir), dtype="float32")
    ref = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    pairs = [
        (rng.integers(0, 128, 5).tolist(), rng.integers(0, 128, 37).tolist()),
        (rng.integers(0, 128, 11).tolist(), rng.integers(0, 128, 3).tolist()),
        ([7], []),
    ]
    gens = force_many(lm, pairs, top_k=5, batch_size=2)
    for (p, o), g in zip(pairs, gens, strict=True):
        assert g.prompt_ids == p and g.token_ids == o and g.finish_reason == "unknown"
        if not o:
            assert g.token_logprobs.shape == (0,) and g.top_logprobs.shape == (0, 5)
            continue
        with torch.no_grad():
            logits = ref(torch.tensor([p + o])).logits[0].double()
        logp = torch.log_softmax(logits, -1)[len(p) - 1 : len(p) - 1 + len(o)].numpy()
        want = logp[np.arange(len(o)), o]
        np.testing.assert_allclose(g.token_logprobs, want, atol=1e-4)
        top_ref = -np.sort(-logp, axis=-1)[:, :5]
        np.testing.assert_allclose(g.top_logprobs, top_ref, atol=1e-4)
        np.testing.assert_allclose(np.take_along_axis(logp, g.top_ids, axis=-1), top_ref, atol=1e-4)


def test_force_equals_the_sampled_generations_logprobs(tiny_dir):
    lm = fcjax.load(str(tiny_dir), dtype="float32")
    prompts = [[1, 2, 3, 4, 5], [9, 8, 7]]
    params = fcjax.SamplingParams(temperature=1.0, max_new_tokens=40, seed=3, logprobs=5)
    sampled = fcjax.generate(lm, prompts, params, keys=["a", "b"])
    for p, s in zip(prompts, sampled, strict=True):
        g = force(lm, p, s.token_ids, 5, text=s.text, finish_reason=s.finish_reason)
        assert len(s.token_ids) > 10 and g.token_ids == s.token_ids
        np.testing.assert_allclose(g.token_logprobs, s.token_logprobs, rtol=0, atol=1e-5)
        np.testing.assert_allclose(g.top_logprobs, s.top_logprobs, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(g.top_ids, s.top_ids)


def test_force_refuses_bad_input(tiny_dir):
    lm = fcjax.load(str(tiny_dir), dtype="float32")
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        force(lm, [], [1, 2])
    with pytest.raises(ValueError, match=r"outside 0\.\.127: \[128\]"):
        force(lm, [1], [2, 128])


# --- the record format ------------------------------------------------------------------------

GOOD = {"id": "q1", "question": "What is 2 + 2?", "gold": "4", "text": "It is 4."}


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "line 2: malformed JSON"),
        ("[1, 2]", "line 2: expected a JSON object"),
        (json.dumps({**GOOD, "id": "q2", "gold": None}), "line 2: missing field 'gold'"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "text"}), "missing field 'text'"),
        (json.dumps({**GOOD, "text": 3}), "line 2: field 'text' must be a string"),
        (json.dumps({**GOOD, "question": " "}), "line 2: field 'question' is empty"),
        (json.dumps({**GOOD, "gold": True}), "field 'gold' must be a string or number"),
        (json.dumps({**GOOD}), "line 2: field 'id' 'q1' repeats (t.jsonl line 1)"),
        (json.dumps({**GOOD, "id": "q2", "dataset": "gsm9k"}), "field 'dataset' 'gsm9k'"),
        (json.dumps({**GOOD, "id": "q2", "dataset": "aime", "gold": "x"}), "'gold' 'x' is not"),
        (
            json.dumps({**GOOD, "id": "q2", "dataset": "aime", "answer_type": "exactMatch"}),
            "field 'answer_type' is read for dataset 'hle' only",
        ),
        (
            json.dumps({**GOOD, "id": "q2", "dataset": "hle", "answer_type": "free"}),
            "field 'answer_type' 'free' unknown",
        ),
        (
            json.dumps({**GOOD, "id": "q2", "choices": ["a", "b"], "gold": "C"}),
            "field 'gold' 'C' is not an option letter (A-B)",
        ),
        (json.dumps({**GOOD, "id": "q2", "choices": "ab", "gold": "A"}), "field 'choices' must"),
        (
            json.dumps({**GOOD, "id": "q2", "dataset": "legalbench", "gold": "maybe"}),
            "field 'gold' 'maybe' is not Yes or No",
        ),
        (json.dumps({**GOOD, "id": "q2", "output_ids": [1, -2]}), "'output_ids' item 1"),
        (json.dumps({**GOOD, "id": "q2", "output_ids": [1, True]}), "'output_ids' item 1"),
        (json.dumps({**GOOD, "id": "q2", "finish_reason": "done"}), "'finish_reason' 'done'"),
        (json.dumps({**GOOD, "id": "q2", "prompt": ""}), "line 2: field 'prompt' is empty"),
    ],
)
def test_bad_record_names_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + line + "\n")
    with pytest.raises(DataError) as e:
        read_traces(path)
    assert str(e.value).startswith("t.jsonl line 2: ") and message in str(e.value)


def test_bad_parquet_row_names_its_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "t.parquet"
    rows = [{**GOOD, "dataset": None}, {**GOOD, "id": "q2", "gold": "x", "dataset": "aime"}]
    pq.write_table(pa.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match=r"^t.parquet row 2: field 'gold' 'x' is not a number"):
        read_traces(path)
    with pytest.raises(DataError, match="not a readable parquet table"):
        (tmp_path / "bad.parquet").write_bytes(b"PAR1 nope")
        read_traces(tmp_path / "bad.parquet")


def test_scorer_per_dataset_and_answer_type():
    assert scoring_kind("aime", None, "42", None) == "numeric"
    assert scoring_kind("hle", "multipleChoice", "B", None) == "letter"
    assert scoring_kind("hle", "exactMatch", "x^2", None) == "math"
    assert scoring_kind("supergpqa", None, "A", ["x", "y"]) == "letter"
    assert scoring_kind("musr", None, "B", None) == "letter"
    assert scoring_kind("legalbench", None, "No", None) == "yesno"
    assert scoring_kind("math", None, "12", None) == "math"  # fcjax's own kinds name themselves
    assert scoring_kind(None, None, "12", None) == "numeric"  # else inferred from the gold
    assert scoring_kind(None, None, "b", ["x", "y"]) == "letter"


def test_write_read_round_trip_jsonl_and_parquet(tmp_path):
    rows = [
        {**GOOD, "output_ids": [5, 6], "finish_reason": "eos", "model": "m"},
        {
            "id": "q2",
            "question": "Pick one",
            "gold": "b",
            "text": "",
            "choices": ["x", "y"],
            "dataset": "musr",
            "prompt": "user: Pick one",
        },
        {"id": "q3", "question": "Q?", "gold": "C", "text": "t", "dataset": "hle"},
        {**GOOD, "id": "q4", "gold": "C", "dataset": "hle", "answer_type": "multipleChoice"},
    ]
    write_traces(tmp_path / "t.jsonl", rows)
    write_traces(tmp_path / "t.parquet", rows)
    a, b = read_traces(tmp_path / "t.jsonl"), read_traces(tmp_path / "t.parquet")
    strip = lambda rs: [{**r.__dict__, "where": None} for r in rs]  # noqa: E731
    assert strip(a) == strip(b)
    assert a[1].gold == "B" and a[1].choices == ("x", "y") and a[1].kind == "letter"
    assert a[0].output_ids == (5, 6) and a[1].output_ids is None
    assert a[1].finish_reason == "unknown" and a[0].finish_reason == "eos"
    assert a[2].kind == "math"  # hle without answer_type: inferred from the gold
    assert a[1].example.source == "musr" and a[0].example.source == "t.jsonl"
    # HLE's answer type reaches the example (the paper protocol's prompt and scorer read it)
    assert a[3].example.answer_type == "multipleChoice" and a[3].example.kind == "letter"


def test_subset_is_the_datasets_rule(tmp_path):
    rows = [
        {"id": f"q{i}", "question": f"{i} + 1?", "gold": str(i + 1), "text": "x"} for i in range(30)
    ]
    write_traces(tmp_path / "t.jsonl", rows)
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(
            json.dumps({"id": r["id"], "question": r["question"], "answer": r["gold"]}) + "\n"
            for r in rows
        )
    )
    for n, seed in ((7, 0), (7, 5), (30, 1), (40, 0), (3, None)):
        want = [e.id for e in load_dataset(path=data, num_examples=n, seed=seed)]
        assert [r.id for r in select_traces(tmp_path / "t.jsonl", n, seed)] == want


def test_traces_flag_checked_at_start_up(tmp_path):
    from absl import flags as absl_flags

    import experiments.run as run_cli

    flags = run_cli.FLAGS
    good = tmp_path / "t.jsonl"
    write_traces(good, [GOOD])
    try:
        for args, message in (
            ([f"--traces={tmp_path / 'none.jsonl'}"], "--traces: file"),
            ([f"--traces={good}", f"--data_path={good}"], "--traces and --data_path"),
        ):
            flags.unparse_flags()
            with pytest.raises(absl_flags.IllegalFlagValueError, match=message):
                flags(["run", "--out=/tmp/unused", *args])  # refused as the flags are parsed
        flags.unparse_flags()
        flags(["run", "--out=/tmp/unused", f"--traces={good}"])
        config = run_cli.settings_from_flags().config()
        assert config["traces"] == str(good) and len(config["traces_sha256"]) == 64
        flags.unparse_flags()
        flags(["run", "--out=/tmp/unused"])
        assert "traces" not in run_cli.settings_from_flags().config()  # old config.json match
    finally:
        flags.unparse_flags()


# --- --traces end to end ----------------------------------------------------------------------


def settings(model, **kw):
    return tiny_run_settings(model, **{"estimators": ESTIMATORS, "bootstrap": 20, **kw})


@pytest.fixture(scope="module")
def original(tiny_chat, tmp_path_factory):
    out = tmp_path_factory.mktemp("original")
    run(settings(tiny_chat), str(out))
    return out


@pytest.fixture(scope="module")
def exported(original, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "traces.jsonl"
    assert export(original, str(path)) == 6
    return path


@pytest.mark.integration
def test_export_writes_the_runs_traces(original, exported):
    ex = read_table(original / "examples.parquet")
    records = read_traces(exported)
    assert [r.id for r in records] == list(ex["example_id"])
    for i, r in enumerate(records):
        assert r.text == ex["text"][i] and r.prompt == ex["prompt"][i]
        assert list(r.output_ids) == list(ex["output_ids"][i]) and r.gold == ex["gold"][i]
        assert r.kind == ex["kind"][i] and r.finish_reason == ex["finish_reason"][i]
        assert r.model == json.loads((original / "config.json").read_text())["model"]
    parquet = exported.with_suffix(".parquet")
    cmd = [sys.executable, "-m", "experiments.export", f"--run={original}", f"--out={parquet}"]
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root}
    done = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "6 traces written" in done.stdout, done.stderr[-2000:]
    strip = lambda rs: [{**r.__dict__, "where": None} for r in rs]  # noqa: E731
    assert strip(read_traces(parquet)) == strip(records)


@pytest.mark.integration
def test_import_of_an_export_reproduces_the_run(tiny_chat, original, exported, tmp_path):
    """Per-step teacher-forced numbers to 1e-5, scoring and segmentation exactly."""
    out = tmp_path / "imported"
    run(settings(tiny_chat, traces=str(exported), max_new_tokens=1, temperature=0.0), str(out))
    ea, eb = read_table(original / "examples.parquet"), read_table(out / "examples.parquet")
    for col in ("example_id", "question", "gold", "kind", "choices", "prediction", "correct"):
        assert list(map(str, ea[col])) == list(map(str, eb[col])), col
    for col in ("scorable", "n_steps", "prompt", "prompt_ids", "output_ids", "text"):
        assert list(map(str, ea[col])) == list(map(str, eb[col])), col
    assert list(eb["finish_reason"]) == list(ea["finish_reason"])
    sa, sb = read_table(original / "steps.parquet"), read_table(out / "steps.parquet")
    for col in ("example_id", "step", "char_start", "char_end", "token_start", "token_end"):
        assert list(map(str, sa[col])) == list(map(str, sb[col])), col
    assert len(sa["step"]) > 6
    for name in TEACHER_FORCED:
        assert np.isfinite(np.asarray(sa[f"conf_{name}"], float)).sum() > 6, name
    # every per-step number to 1e-5: conf_E, faith_E and the raw values (the random model's
    # DeepConf saturates at 1, deepconf_raw does not; forcing_logprob, rcc_q), and sampling,
    # which branches from the trace's own prefixes seeded by example id: the same draws
    floats = [k for k in sa if np.asarray(sa[k]).dtype.kind == "f"]
    assert {"deepconf_raw", "forcing_logprob", "rcc_q", "conf_sampling"} <= set(floats)
    assert sorted(sa) == sorted(sb)
    for k in floats:
        np.testing.assert_allclose(sb[k], sa[k], rtol=0, atol=1e-5, err_msg=k)
    # the generations are teacher-forced, not copied: equal to the sampled ones within 1e-5
    gen_a, gen_b = RunDir(original).read_parts("generate"), RunDir(out).read_parts("generate")
    for key in ("token_logprobs", "top_logprobs"):
        a = np.concatenate([np.asarray(v, np.float32) for v in gen_a[key]])
        b = np.concatenate([np.asarray(v, np.float32) for v in gen_b[key]])
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5, err_msg=key)
        assert not np.array_equal(a, b)  # (generation and forcing sum in other orders)
    assert gen_a["top_ids"] == gen_b["top_ids"]
    config = json.loads((out / "config.json").read_text())
    assert config["traces"] == str(exported) and len(config["traces_sha256"]) == 64
    info = RunDir(out).info("generate")["traces"]
    assert info["sha256"] == config["traces_sha256"] and info["studied"] == 6
    assert info["models"] == [str(tiny_chat)] and info["with_output_ids"] == 6
    summary_a = json.loads((original / "summary.json").read_text())
    summary_b = json.loads((out / "summary.json").read_text())
    assert summary_a["accuracy"] == summary_b["accuracy"]
    assert summary_a["n_examples"] == summary_b["n_examples"]


@pytest.mark.integration
def test_text_only_records_are_tokenized_with_the_model_and_prompted_by_the_run(
    tiny_chat, original, exported, tmp_path
):
    rows = export_rows(original, output_ids=False)
    for r in rows:
        del r["prompt"]
    path = tmp_path / "text_only.jsonl"
    write_traces(path, rows)
    out = tmp_path / "run"
    s = settings(tiny_chat, traces=str(path), num_examples=4)
    run(s, str(out), stop_after="segment")
    ea, eb = read_table(original / "examples.parquet"), read_table(out / "examples.parquet")
    chosen = [r.id for r in select_traces(path, 4, 1)]
    assert list(eb["example_id"]) == chosen
    lm = fcjax.load(str(tiny_chat), dtype="float32")
    by_id = {e: i for i, e in enumerate(ea["example_id"])}
    for j, eid in enumerate(eb["example_id"]):
        i = by_id[eid]
        assert eb["prompt"][j] == ea["prompt"][i]  # built from the question as the run did
        assert eb["text"][j] == ea["text"][i]
        assert list(eb["output_ids"][j]) == lm.encode(ea["text"][i])
        assert eb["finish_reason"][j] == "eos" or eb["finish_reason"][j] == ea["finish_reason"][i]
    # the forced generation of a text-only record equals force() on the model's tokens
    rec = select_traces(path, 4, 1)[0]
    prompts, gens = imported_generations(lm, [rec], lambda e: "unused", 5, 1)
    ids = lm.encode(rec.text)
    want = force(lm, lm.encode(prompts[0]), ids, 5)
    np.testing.assert_array_equal(gens[0].token_logprobs, want.token_logprobs)
    # another trace file in the same run directory is a changed setting
    rows[0]["text"] += " more"
    write_traces(path, rows)
    with pytest.raises(RunError, match=r"traces_sha256.*--redo=generate"):
        run(s, str(out))


def test_each_record_is_scored_by_its_dataset(tiny_chat, tmp_path):
    rows = [
        {"id": f"r{i}", "question": f"Question {i}?", **record}
        for i, (record, *_) in enumerate(SCORED)
    ]
    path = tmp_path / "scored.jsonl"
    write_traces(path, rows)
    out = tmp_path / "run"
    run(settings(tiny_chat, traces=str(path), num_examples=50), str(out), stop_after="segment")
    ex = read_table(out / "examples.parquet")
    assert list(ex["example_id"]) == [r["id"] for r in rows]
    assert list(ex["text"]) == [r["text"] for r in rows]
    for i, (_, prediction, correct, scorable, kind) in enumerate(SCORED):
        got = (ex["prediction"][i], bool(ex["correct"][i]), bool(ex["scorable"][i]), ex["kind"][i])
        assert got == (prediction, correct, scorable, kind), rows[i]
    assert ex["choices"][2] == ["the butler", "the cook"] and ex["choices"][0] is None
    st = read_table(out / "steps.parquet")
    assert list(st["example_id"]).count("r0") == 2  # "Add them." / "So \boxed{42}."


@pytest.mark.integration
def test_bad_tokens_refused_before_anything_is_written(tiny_chat, original, tmp_path):
    rows = export_rows(original)
    rows[2]["output_ids"] = [*rows[2]["output_ids"], 10**6]
    path = tmp_path / "bad.jsonl"
    write_traces(path, rows)
    out = tmp_path / "run"
    with pytest.raises(DataError, match=r"^bad.jsonl line 3: field 'output_ids' has ids outside"):
        run(settings(tiny_chat, traces=str(path)), str(out))
    assert not (out / "config.json").exists() and not (out / "stages").exists()
    rows[2]["output_ids"] = rows[3]["output_ids"]  # valid ids, another trace's
    write_traces(path, rows)
    if rows[2]["text"] != rows[3]["text"]:
        with pytest.raises(DataError, match="line 3: field 'output_ids' does not decode"):
            run(settings(tiny_chat, traces=str(path)), str(out))
