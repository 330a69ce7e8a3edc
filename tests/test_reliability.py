"""Reliability of the runner: clear errors for bad inputs, model behaviour recorded, out of
memory retried, crashes lose nothing, and results independent of batching and devices.

One uninterrupted run (``baseline``) of a tiny random Llama with SmolLM2's real tokenizer is
the reference that the crash, batch-size, device-count and out-of-memory runs must equal.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from child_env import child_env, xla_flags
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import cli_flags

import fcjax
from experiments.run import run
from experiments.rundir import STAGES, RunDir, RunError
from experiments.stages import ResourceError, Settings
from fcjax.data import build_messages, load_dataset
from fcjax.engine.generate import Generation
from fcjax.store.hidden import read_hidden
from fcjax.store.tables import read_table
from fcjax.text import extract_answer
from fcjax.text.answers import score_answer
from fcjax.text.chat import plain_format

ROOT = Path(__file__).resolve().parents[1]
BASE = dict(
    num_examples=4,
    max_new_tokens=24,
    temperature=1.0,
    estimators=("deepconf", "sampling", "probe"),
    k=2,
    max_steps=2,
    branch_new_tokens=8,
    folds=2,
    decisiveness="judge",
    judge_batch=4,
    batch_size=2,
    seed=1,
)


def make_settings(model, **kw) -> Settings:
    return Settings(**{**BASE, "model": str(model), "judge_model": str(model), **kw})


def subprocess_env(cache: Path, **extra: str) -> dict[str, str]:
    """The test's environment on one device, with the persistent compilation cache ``cache``
    (every program stored: tests/conftest.py), so the subprocesses compile each program once."""
    return child_env(JAX_COMPILATION_CACHE_DIR=str(cache), **extra)


def run_cli(args: list[str], env: dict[str, str], timeout: float = 600):
    return subprocess.run(
        [sys.executable, "-m", "experiments.run", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def snapshot(path: Path) -> dict[str, bytes]:
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path)): p.read_bytes() for p in files}


def _flat(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flat(v, f"{prefix}/{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _flat(v, f"{prefix}/{i}")
    else:
        yield prefix, tree


def assert_same_run(a: Path, b: Path, rtol: float = 0.0, ignore_config=()) -> None:
    """Tables, summary (minus wall times) and hidden-state arrays are equal: bit for bit, or
    floats within ``rtol``; ids, texts and counts always exactly."""
    for name in ("examples.parquet", "steps.parquet"):
        ta, tb = read_table(a / name), read_table(b / name)
        assert sorted(ta) == sorted(tb), name
        for k in ta:
            va, vb = ta[k], tb[k]
            if isinstance(va, np.ndarray) and va.dtype.kind == "f":
                np.testing.assert_allclose(va, vb, rtol=rtol, atol=0, err_msg=f"{name}:{k}")
            else:
                assert list(map(str, va)) == list(map(str, vb)), f"{name}:{k}"
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (a, b))
    for s in (sa, sb):
        s.pop("stage_wall_s")
        for key in ignore_config:
            s["config"].pop(key)
    fa, fb = dict(_flat(sa)), dict(_flat(sb))
    assert sorted(fa) == sorted(fb)
    for k, x in fa.items():
        if isinstance(x, float) and isinstance(fb[k], float) and rtol:
            assert fb[k] == pytest.approx(x, rel=rtol, nan_ok=True), k
        else:
            assert x == fb[k] or (x != x and fb[k] != fb[k]), k  # NaN == NaN here
    (ia, xa), (ib, xb) = read_hidden(a / "hidden"), read_hidden(b / "hidden")
    for k in ia:
        assert list(map(str, ia[k])) == list(map(str, ib[k])), k
    assert xa.shape == xb.shape and xa.size > 0
    np.testing.assert_allclose(xa, xb, rtol=rtol, atol=0)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def jax_cache() -> Path:
    """The session's persistent compilation cache (tests/conftest.py), shared by the
    subprocesses so that they compile each program once across sessions."""
    return Path(os.environ["JAX_COMPILATION_CACHE_DIR"])


@pytest.fixture(scope="module")
def nan_model(tiny_chat, tmp_path_factory) -> Path:
    """The tiny model with one NaN embedding row: tied to the output layer, it makes every
    next-token distribution NaN."""
    from safetensors.numpy import load_file, save_file

    out = tmp_path_factory.mktemp("nanmodel")
    shutil.copytree(tiny_chat, out, dirs_exist_ok=True)
    weights = load_file(out / "model.safetensors")
    weights["model.embed_tokens.weight"][7] = np.nan
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module", autouse=True)
def background(request, tmp_path_factory):
    """Starts the subprocess-only work of the selected tests at once (the CLI error cases,
    the crash sequence, the 8-device run), so it overlaps the in-process runs; each test
    waits for its own result. Returns {job: Future}."""
    selected = {
        item.originalname for item in request.session.items if item.module is request.module
    }
    wanted = {
        "cli": "test_cli_user_error" in selected,
        "crash": "test_sigkill_in_every_stage_then_rerun_equals_uninterrupted" in selected,
        "devices": "test_eight_devices_give_the_same_results" in selected,
    }
    jobs: dict = {}
    if not any(wanted.values()):
        yield jobs
        return
    tiny = request.getfixturevalue("tiny_chat")
    cache = request.getfixturevalue("jax_cache")
    pool = ThreadPoolExecutor(3)
    if wanted["cli"]:
        nan = request.getfixturevalue("nan_model")
        jobs["cli"] = pool.submit(cli_cases, tiny, nan, cache, tmp_path_factory.mktemp("cli"))
    if wanted["crash"]:
        jobs["crash"] = pool.submit(crash_sequence, tiny, cache, tmp_path_factory.mktemp("crash"))
    if wanted["devices"]:
        out = tmp_path_factory.mktemp("devices")
        env = subprocess_env(cache, XLA_FLAGS=xla_flags(devices=8))
        args = [f"--out={out}", *cli_flags(make_settings(tiny))]
        jobs["devices"] = pool.submit(lambda: (run_cli(args, env), out))
    yield jobs
    pool.shutdown(wait=True)


@pytest.fixture(scope="module")
def baseline(tiny_chat, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("baseline")
    run(make_settings(tiny_chat), str(out))
    return out


# ----------------------------------------------------------------------------- 2. no template


@pytest.mark.integration
def test_tokenizer_without_chat_template_falls_back(tiny_chat, tmp_path, caplog):
    model = tmp_path / "model"
    shutil.copytree(tiny_chat, model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    s = make_settings(model, estimators=("deepconf",), decisiveness="lexicon")
    with caplog.at_level("WARNING"):
        run(s, str(tmp_path / "out"))
    runner_warning = f"{model} has no chat template: prompts use the plain 'Role: text' format"
    assert runner_warning in [r.getMessage() for r in caplog.records]
    assert RunDir(tmp_path / "out").info("generate")["chat_template"] is False
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["n_examples"] == 4
    ex = read_table(tmp_path / "out" / "examples.parquet")
    examples = load_dataset(name="arithmetic", num_examples=4, seed=s.seed)
    want = [plain_format(build_messages(e, intervention="blank")) for e in examples]
    assert list(ex["prompt"]) == want
    assert all(p.startswith("User: ") and p.endswith("\n\nAssistant:") for p in want)


# ----------------------------------------------------------------------------- 3. behaviour


@pytest.mark.integration
def test_model_behaviour_is_recorded_not_fatal(tiny_chat, tmp_path, monkeypatch):
    """An empty trace (no steps, no answer), truncated traces and unparsable judge replies
    are counted in the summary; the run completes."""
    real = fcjax.generate
    examples = load_dataset(name="arithmetic", num_examples=4, seed=1)
    empty_id = examples[2].id

    def generate(lm, prompts, params, *, keys, **kw):
        gens = real(lm, prompts, params, keys=keys, **kw)
        for i, key in enumerate(keys):
            if key == empty_id:
                g = gens[i]
                gens[i] = Generation(
                    "",
                    [],
                    np.zeros(0, np.float32),
                    g.top_logprobs[:0],
                    g.top_ids[:0],
                    "eos",
                    g.prompt_ids,
                )
        return gens

    monkeypatch.setattr(fcjax, "generate", generate)
    out = tmp_path / "out"
    run(make_settings(tiny_chat, estimators=("deepconf",)), str(out))
    ex = read_table(out / "examples.parquet")
    st_ = read_table(out / "steps.parquet")
    summary = json.loads((out / "summary.json").read_text())
    counts, info = summary["counts"], RunDir(out).info("decisiveness")
    row = list(ex["example_id"]).index(empty_id)
    assert ex["n_steps"][row] == 0 and ex["prediction"][row] is None and ex["text"][row] == ""
    assert empty_id not in set(st_["example_id"])
    assert counts["no_steps"] == int((np.asarray(ex["n_steps"]) == 0).sum()) >= 1
    assert counts["no_answer"] == sum(p is None for p in ex["prediction"]) >= 1
    assert counts["truncated"] == sum(f == "length" for f in ex["finish_reason"]) >= 1
    assert counts["steps"] == len(st_["step"]) > 0
    # the random model's judge replies are gibberish, never a JSON list: each is read by the
    # fallback parser or gives no score, and both are counted
    n_missing = int(np.isnan(np.asarray(st_["decisiveness_judge"], float)).sum())
    assert counts["decisiveness_missing"] == n_missing == info["judge_missing_steps"]
    n_replies = info["judge_fallback_batches"] + info["judge_failed_batches"]
    _, per_trace = np.unique(np.asarray(st_["example_id"]).astype(str), return_counts=True)
    assert n_replies == int(np.ceil(per_trace / 4).sum()) >= 1  # batches of judge_batch=4
    assert counts["decisiveness_fallback"] == info["judge_fallback_batches"]
    assert counts["decisiveness_failed"] == info["judge_failed_batches"]
    assert counts["decisiveness_judge"] == str(tiny_chat)
    assert summary["n_examples"] == 4


# ----------------------------------------------------------------------------- 4. memory


def _oom(n: int):
    import jax

    return jax.errors.JaxRuntimeError(
        f"RESOURCE_EXHAUSTED: Out of memory while trying to allocate {n} bytes."
    )


@pytest.mark.integration
def test_out_of_memory_batch_is_halved_and_results_unchanged(
    tiny_chat, baseline, tmp_path, monkeypatch, caplog
):
    real, sizes = fcjax.generate, []

    def generate(lm, prompts, params, **kw):
        sizes.append(len(prompts))
        if len(prompts) > 2:
            raise _oom(1 << 30)
        return real(lm, prompts, params, **kw)

    monkeypatch.setattr(fcjax, "generate", generate)
    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        run(make_settings(tiny_chat, batch_size=4), str(out), stop_after="segment")
    assert sizes == [4, 2, 2]  # the whole chunk failed once, then two halves
    messages = [r.getMessage() for r in caplog.records]
    assert "out of device memory at batch 4; retrying with 2" in messages
    a, b = RunDir(baseline).read_parts("generate"), RunDir(out).read_parts("generate")
    assert sorted(a) == sorted(b)
    for k in a:
        assert list(map(str, a[k])) == list(map(str, b[k])), k
    ea, eb = read_table(baseline / "examples.parquet"), read_table(out / "examples.parquet")
    for k in eb:
        assert list(map(str, ea[k])) == list(map(str, eb[k])), k


def test_out_of_memory_at_batch_one_is_a_clear_error(tiny_chat, tmp_path, monkeypatch, caplog):
    def generate(lm, prompts, params, **kw):
        raise _oom(1 << 40)

    monkeypatch.setattr(fcjax, "generate", generate)
    with caplog.at_level("WARNING"), pytest.raises(ResourceError) as err:
        run(make_settings(tiny_chat), str(tmp_path))
    first = load_dataset(name="arithmetic", num_examples=4, seed=1)[0].id
    assert str(err.value).startswith(
        f"out of device memory even at batch 1 (example {first!r}, --max_new_tokens=24): "
        "lower --max_new_tokens"
    )
    messages = [r.getMessage() for r in caplog.records]
    assert "out of device memory at batch 2; retrying with 1" in messages
    assert not RunDir(tmp_path).done("generate")


def test_other_runtime_errors_are_not_retried(tiny_chat, tmp_path, monkeypatch):
    import jax

    calls = []

    def generate(lm, prompts, params, **kw):
        calls.append(len(prompts))
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    monkeypatch.setattr(fcjax, "generate", generate)
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        run(make_settings(tiny_chat), str(tmp_path))
    assert calls == [2]


# ----------------------------------------------------------------------------- 6. batch size


@pytest.mark.integration
def test_batch_size_does_not_change_results(tiny_chat, baseline, tmp_path):
    run(make_settings(tiny_chat, batch_size=8), str(tmp_path))
    assert_same_run(baseline, tmp_path, ignore_config=("batch_size",))


# ----------------------------------------------------------------------------- 1. CLI errors

DATA = {
    "malformed.jsonl": '{"id": "a", "question": "1+1?", "answer": "2"}\n'
    '{"id": "b", "question": "2+2?" "answer": "4"}\n',
    "no_question.jsonl": '{"id": "a", "question": "1+1?", "answer": "2"}\n'
    '{"id": "b", "answer": "4"}\n',
    "no_answer.jsonl": '{"id": "a", "question": "1+1?"}\n',
    "empty_question.jsonl": '{"id": "a", "question": "  ", "answer": "2"}\n',
    "bad_letter.jsonl": '{"id": "a", "question": "Pick one.", "choices": ["x", "y", "z"], '
    '"answer": "E"}\n',
    "duplicate.jsonl": '{"id": "a", "question": "1+1?", "answer": "2"}\n\n'
    '{"id": "a", "question": "2+2?", "answer": "4"}\n',
    "empty.jsonl": "",
}

# bad flag values, all in one process: each is listed on its own line of one error
FLAG_ERRORS = {
    "dataset_unknown": (
        "--dataset=nope",
        r"^  --dataset: unknown 'nope'; valid: .*\barithmetic\b.*\bgsm8k\b",
    ),
    "intervention_unknown": (
        "--intervention=nope",
        r"^  --intervention: unknown 'nope' \(and not a file\); valid: blank, basic, .*ms_hedge$",
    ),
    "estimator_unknown": (
        "--estimators=deepconf,nope",
        r"^  --estimators: unknown 'nope'; valid: .*deepconf.*sampling",
    ),
    "stage_unknown": (
        "--redo=nope",
        r"^  --redo: unknown stage 'nope'; valid: generate, segment, estimators, hidden, probes, "
        r"decisiveness, metrics, report$",
    ),
    "k_zero": ("--k=0", r"^  --k must be >= 1, got 0$"),
    "max_new_tokens_zero": ("--max_new_tokens=0", r"^  --max_new_tokens must be >= 1, got 0$"),
}

# case -> (flags, regex the stderr must match); {d}: the data dir, {m}: the models dir
CASES = {
    "data_missing": (
        ["--data_path={d}/missing.jsonl"],
        r"error: \S*missing\.jsonl: file not found",
    ),
    "data_malformed": (
        ["--data_path={d}/malformed.jsonl"],
        r"error: malformed\.jsonl line 2: malformed JSON",
    ),
    "data_no_question": (
        ["--data_path={d}/no_question.jsonl"],
        r"error: no_question\.jsonl line 2: missing field 'question'",
    ),
    "data_no_answer": (
        ["--data_path={d}/no_answer.jsonl"],
        r"error: no_answer\.jsonl line 1: missing field 'answer'",
    ),
    "data_empty_question": (
        ["--data_path={d}/empty_question.jsonl"],
        r"error: empty_question\.jsonl line 1: field 'question' is empty",
    ),
    "data_bad_letter": (
        ["--data_path={d}/bad_letter.jsonl"],
        r"error: bad_letter\.jsonl line 1: field 'answer' 'E' is not a letter of its 3 "
        r"choices \(A-C\)",
    ),
    "data_duplicate_id": (
        ["--data_path={d}/duplicate.jsonl"],
        r"error: duplicate\.jsonl line 3: field 'id' 'a' duplicates line 1",
    ),
    "data_empty_file": (["--data_path={d}/empty.jsonl"], r"error: \S*empty\.jsonl: empty file"),
    "data_not_utf8": (["--data_path={d}/binary.jsonl"], r"error: \S*binary\.jsonl: not UTF-8"),
    "model_unknown": (
        ["--model=no-such-model-7b"],
        r"error: unknown model 'no-such-model-7b': not a registry name "
        r"\(smollm2-135m-instruct, qwen2\.5-coder-1\.5b-instruct\)",
    ),
    "model_dir_empty": (
        ["--model={m}/empty"],
        r"error: \S*empty: neither an HF model directory \(config\.json \+ \*\.safetensors\)",
    ),
    "model_no_weights": (
        ["--model={m}/config_only"],
        r"error: \S*config_only: no \*\.safetensors weights found",
    ),
    "bad_flags": ([flag for flag, _ in FLAG_ERRORS.values()], r"^error: bad flags:$"),
    "mesh_not_dividing": (
        ["--mesh=data:3"],
        r"error: mesh 'data:3' needs 3 devices, but 1 are visible",
    ),
    "nan_logits": (
        ["--model={m}/nan", "--num_examples=2", "--max_new_tokens=4", "--estimators=deepconf"],
        r"error: example '[^']+': the model produced non-finite log-probabilities \(NaN/inf",
    ),
}
# reruns over a copy of the finished baseline: nothing in it may change
FINISHED_CASES = {
    "finished_bad_flag": (["--k=0"], r"--k must be >= 1, got 0"),
    "finished_redo_bad_data": (
        ["--redo=generate", "--data_path={d}/no_question.jsonl"],
        r"error: no_question\.jsonl line 2: missing field 'question'",
    ),
    "finished_redo_unknown_model": (
        ["--redo=generate", "--model=no-such-model-7b"],
        r"error: unknown model 'no-such-model-7b'",
    ),
}


def _data_and_models(tiny: Path, nan_model: Path, root: Path) -> tuple[Path, Path]:
    d, m = root / "data", root / "models"
    if not d.exists():
        d.mkdir()
        for name, text in DATA.items():
            (d / name).write_text(text)
        (d / "binary.jsonl").write_bytes(b'\xff\xfe{"id": "a"}\n')
        (m / "empty").mkdir(parents=True)
        (m / "config_only").mkdir()
        shutil.copy(tiny / "config.json", m / "config_only" / "config.json")
        (m / "nan").symlink_to(nan_model)
    return d, m


def run_cases(cases: dict, tiny: Path, root: Path, cache: Path, setup=None) -> dict:
    """Runs each case as its own ``python -m experiments.run`` (two at a time); returns
    {case: (completed process, run-dir files before, files after)}."""
    d, m = root / "data", root / "models"
    jobs = {}
    for case, (flags, _) in cases.items():
        out = root / "runs" / case
        if setup is not None:
            setup(out)
        flags = [f.format(d=d, m=m) for f in flags]
        jobs[case] = (out, [f"--out={out}", *cli_flags(make_settings(tiny)), *flags])
    before = {case: snapshot(out) if out.exists() else {} for case, (out, _) in jobs.items()}
    env = subprocess_env(cache)
    with ThreadPoolExecutor(2) as pool:
        done = dict(zip(jobs, pool.map(lambda j: run_cli(j[1], env), jobs.values()), strict=True))
    return {
        case: (done[case], before[case], snapshot(out) if out.exists() else {})
        for case, (out, _) in jobs.items()
    }


def cli_cases(tiny: Path, nan_model: Path, cache: Path, root: Path) -> dict:
    _data_and_models(tiny, nan_model, root)
    return run_cases(CASES, tiny, root, cache)


@pytest.mark.integration
@pytest.mark.parametrize("case", sorted(CASES) + sorted(FLAG_ERRORS))
def test_cli_user_error(background, case):
    pattern = FLAG_ERRORS[case][1] if case in FLAG_ERRORS else CASES[case][1]
    proc, _, after = background["cli"].result()["bad_flags" if case in FLAG_ERRORS else case]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert re.search(pattern, proc.stderr, re.MULTILINE), proc.stderr[-3000:]
    if case != "nan_logits":  # bad inputs are found before the run directory is written
        assert "config.json" not in after and not any(k.startswith("stages/") for k in after)


@pytest.fixture(scope="module")
def finished_cases(tiny_chat, nan_model, baseline, jax_cache, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("finished")
    _data_and_models(tiny_chat, nan_model, root)
    return run_cases(
        FINISHED_CASES, tiny_chat, root, jax_cache, setup=lambda out: shutil.copytree(baseline, out)
    )


@pytest.mark.integration
@pytest.mark.parametrize("case", sorted(FINISHED_CASES))
def test_cli_user_error_keeps_finished_run(finished_cases, case):
    proc, before, after = finished_cases[case]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert re.search(FINISHED_CASES[case][1], proc.stderr), proc.stderr[-3000:]
    assert "summary.json" in before and "stages/generate.done" in before
    assert after == before  # byte-identical, nothing added or removed


# ----------------------------------------------------------------------------- 5. crashes

# Runs experiments.run in a process that SIGKILLs itself when the file matched by
# FCJAX_TEST_KILL ("before|after", path regex, nth match) is renamed into place: the
# process dies the moment that file appears ("after") or with only its temp file on disk
# ("before", a torn write). A polling killer aims at the same moments, but races the run.
KILL_DRIVER = r"""
import os, re, signal
when, pattern, nth = os.environ["FCJAX_TEST_KILL"].split("|")
real_replace, seen = os.replace, [0]
def replace(src, dst, *args, **kwargs):
    if re.search(pattern, os.fspath(dst)):
        seen[0] += 1
        if seen[0] == int(nth):
            if when == "after":
                real_replace(src, dst, *args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst, *args, **kwargs)
os.replace = replace
from absl import app
from experiments.run import main
app.run(main)
"""

# (stage killed, when, file): one process per line, in order, over one run directory
KILLS = [
    ("generate", "after", r"stages/generate/part-000000\.parquet$"),
    # a second part: part-N, N the position of its first trace (not 0)
    ("estimators", "before", r"stages/estimators_sampling/part-(?!000000)\d{6}\.parquet$"),
    ("hidden", "before", r"hidden/index\.parquet$"),
    ("decisiveness", "after", r"stages/decisiveness/part-(?!000000)\d{6}\.parquet$"),
    ("metrics", "before", r"/summary\.json$"),
    ("report", "before", r"/report\.html$"),
]


def _mid_stage_evidence(stage: str, out: Path) -> bool:
    """What the kill left on disk shows that it struck inside ``stage``."""
    if stage == "generate":
        parts = sorted(p.name for p in (out / "stages" / "generate").glob("*.parquet"))
        return parts == ["part-000000.parquet"]
    if stage == "estimators":  # a torn write: the temp file, not the part
        part_dir = out / "stages" / "estimators_sampling"
        parts = sorted(p.name for p in part_dir.glob("*.parquet"))
        return bool(list(part_dir.glob(".part-*.tmp"))) and parts == ["part-000000.parquet"]
    if stage == "hidden":  # states written, their index not yet
        return (out / "hidden" / "states").exists() and not (out / "hidden/index.parquet").exists()
    if stage == "decisiveness":
        parts = sorted(p.name for p in (out / "stages" / "decisiveness").glob("*.parquet"))
        return len(parts) == 2 and parts[0] == "part-000000.parquet"
    if stage == "metrics":  # faithfulness columns written, summary not
        return (
            "faith_deepconf" in read_table(out / "steps.parquet")
            and not (out / "summary.json").exists()
        )
    return not (out / "report.html").exists()


def crash_sequence(tiny: Path, cache: Path, out: Path) -> tuple[list[dict], object, Path]:
    """Kills the same command at every point of KILLS in turn, then runs it to the end;
    returns what was seen after each kill and the last process."""
    args = [f"--out={out}", *cli_flags(make_settings(tiny))]
    rd, seen = RunDir(out), []
    for stage, when, pattern in KILLS:
        proc = subprocess.run(
            [sys.executable, "-c", KILL_DRIVER, *args],
            cwd=ROOT,
            env=subprocess_env(cache, FCJAX_TEST_KILL=f"{when}|{pattern}|1"),
            capture_output=True,
            text=True,
            timeout=600,
        )
        seen.append(
            {
                "stage": stage,
                "returncode": proc.returncode,
                "stderr": proc.stderr[-3000:],
                "lock_left": (out / ".lock").exists(),
                "done": [s for s in STAGES if rd.done(s)],
                "evidence": proc.returncode == -signal.SIGKILL and _mid_stage_evidence(stage, out),
            }
        )
        if proc.returncode != -signal.SIGKILL:
            break
    return seen, run_cli(args, subprocess_env(cache)), out


@pytest.mark.slow
def test_sigkill_in_every_stage_then_rerun_equals_uninterrupted(background, baseline):
    seen, final, out = background["crash"].result()
    assert [s["stage"] for s in seen] == [stage for stage, _, _ in KILLS], seen[-1]
    for s in seen:
        assert s["returncode"] == -signal.SIGKILL, (s["stage"], s["stderr"])
        assert s["lock_left"], s["stage"]  # the dead process could not clean up
        # the kill struck inside its stage: every earlier stage had finished, it had not
        assert s["done"] == list(STAGES[: STAGES.index(s["stage"])]), s
        assert s["evidence"], s["stage"]
    assert final.returncode == 0, final.stderr[-3000:]
    assert RunDir(out).done("report") and not (out / ".lock").exists()
    assert_same_run(baseline, out)


# ----------------------------------------------------------------------------- 6b. 8 devices


@pytest.mark.slow
def test_eight_devices_give_the_same_results(background, baseline):
    """Same tokens, texts, steps, hidden states and decisions; the engine's log-probabilities
    may differ in the last bit (float32 rounding of other per-device shapes), so floats are
    compared to 1e-6 relative."""
    proc, out = background["devices"].result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(baseline, out, rtol=1e-6)


# ----------------------------------------------------------------------------- 7. properties

_PLAIN = st.text(
    alphabet=st.characters(blacklist_characters="{}\\<>", blacklist_categories=("Cs",)),
    max_size=60,
)
_ANSWER = st.text(
    alphabet=st.characters(blacklist_characters="{}\\<>", blacklist_categories=("Cs",)),
    min_size=1,
    max_size=20,
).filter(lambda s: s.strip())


@settings(max_examples=200, deadline=None)
@given(_PLAIN, _ANSWER, _PLAIN)
def test_last_boxed_answer_is_extracted(before: str, answer: str, after: str) -> None:
    text = f"{before}\\boxed{{wrong}}{before}\\boxed{{{answer}}}{after}"
    assert extract_answer(text) == answer.strip()
    # text after </think> is searched first
    assert extract_answer(f"\\boxed{{{answer}}}</think>{before}\\boxed{{x}}") == "x"


@settings(max_examples=200, deadline=None)
@given(st.integers(-(10**8), 10**8), _PLAIN)
def test_numeric_answer_roundtrip_scores_right(n: int, prefix: str) -> None:
    for shown in (str(n), f"{n:,}", f"{n}.0", f"${n:,}"):
        text = f"{prefix}\nThe answer is \\boxed{{{shown}}}"
        assert score_answer(extract_answer(text), str(n), "numeric"), shown
    assert not score_answer(str(n + 1), str(n), "numeric")
    assert not score_answer(None, str(n), "numeric")


def test_large_integers_one_apart_are_different() -> None:
    assert not score_answer("1000000000", "999999999", "numeric")
    assert score_answer("1,000,000,000", "1000000000", "numeric")


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 26), st.data())
def test_letter_scoring_accepts_only_the_gold_letter(n: int, data) -> None:
    choices = [f"option number {i}" for i in range(n)]
    gold = data.draw(st.integers(0, n - 1))
    pred = data.draw(st.integers(0, n - 1))
    letter = chr(ord("A") + pred)
    form = data.draw(st.sampled_from(["{}", "({})", "{})", "Answer: {}", "**{}**"]))
    expected = pred == gold
    assert score_answer(form.format(letter), chr(ord("A") + gold), "letter", choices) is expected
    assert score_answer(choices[pred], chr(ord("A") + gold), "letter", choices) is expected


@settings(max_examples=100, deadline=None)
@given(st.sampled_from(["yes", "no", "true", "false"]), st.sampled_from(["Yes", "No"]), st.data())
def test_yesno_scoring_ignores_case_and_emphasis(word: str, gold: str, data) -> None:
    shown = "".join(
        c.upper() if data.draw(st.booleans(), label=f"upper {i}") else c for i, c in enumerate(word)
    )
    form = data.draw(st.sampled_from(["{}", "**{}**", "{}.", "The answer is {}"]))
    expected = (word in ("yes", "true")) == (gold == "Yes")
    assert score_answer(form.format(shown), gold, "yesno") is expected


def test_changed_flags_refused_only_when_their_stage_has_outputs(tmp_path):
    """A run stopped after `segment` may go on with other estimator settings (nothing made
    with the old ones exists); a changed segmenter refuses, naming the flag."""
    rd = RunDir(tmp_path)
    old = make_settings("m").config()
    rd.save_config(old)
    rd.mark("generate", {})
    rd.mark("segment", {})
    assert rd.check_config({**old, "k": old["k"] + 1}, None) is None
    with pytest.raises(RunError, match="--segmenter"):
        rd.check_config({**old, "segmenter": "tokens"}, None)
    rd.write_part("estimators_deepconf", 0, {"x": [1.0]})  # a half-done stage counts
    with pytest.raises(RunError, match="--k: 2 -> 3"):
        rd.check_config({**old, "k": 3}, None)
    assert rd.check_config({**old, "k": 3}, "estimators") == "estimators"
