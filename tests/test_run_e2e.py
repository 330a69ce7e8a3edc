"""The experiment runner end to end: the run-directory contract, resume, lock, config."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from tiny_models import build_tiny_chat, cli_flags

from experiments.run import run
from experiments.rundir import RunDir, RunError
from experiments.stages import Settings
from fcjax.metrics import auroc, bootstrap_intervals, brier, cmfg, cmfg_star, ece, mfg
from fcjax.store.tables import read_table

ESTIMATORS = ("deepconf", "rcc", "sampling", "forcing", "probe")


@pytest.fixture(scope="module")
def tiny_chat(tmp_path_factory):
    return build_tiny_chat(tmp_path_factory.mktemp("tinychat"))


def settings(model, **kw):
    base = dict(
        model=str(model),
        judge_model=str(model),
        num_examples=6,
        max_new_tokens=40,
        temperature=1.0,
        estimators=ESTIMATORS,
        k=2,
        max_steps=2,
        branch_new_tokens=8,
        folds=2,
        decisiveness="lexicon",
        batch_size=4,
        seed=1,
    )
    return Settings(**{**base, **kw})


@pytest.fixture(scope="module")
def finished(tiny_chat, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    run(settings(tiny_chat), str(out))
    return out


def test_contract_files_and_columns(finished):
    for name in ("examples.parquet", "steps.parquet", "summary.json", "report.html", "config.json"):
        assert (finished / name).exists(), name
    assert list((finished / "plots").glob("*.png"))
    assert (finished / "hidden" / "COMPLETE").exists()
    ex = read_table(finished / "examples.parquet")
    st = read_table(finished / "steps.parquet")
    for col in (
        "example_id",
        "question",
        "gold",
        "prediction",
        "correct",
        "n_steps",
        "prompt",
        "prompt_ids",
        "output_ids",
        "text",
    ):
        assert col in ex, col
    for col in ("example_id", "step", "char_start", "char_end", "text", "position", "decisiveness"):
        assert col in st, col
    for e in ESTIMATORS:
        assert f"conf_{e}" in ex and f"faith_{e}" in ex and f"conf_{e}" in st, e
        assert f"faith_{e}" in st, e
    assert len(ex["example_id"]) == 6
    # spans index the stored text
    texts = dict(zip(ex["example_id"], ex["text"], strict=True))
    for eid, a, b, t in zip(
        st["example_id"], st["char_start"], st["char_end"], st["text"], strict=True
    ):
        assert texts[eid][int(a) : int(b)] == t


def _no_constants(token):
    raise AssertionError(f"summary.json holds the non-JSON token {token}")


def test_faithfulness_and_summary_recomputed_from_tables(finished):
    ex = read_table(finished / "examples.parquet")
    st = read_table(finished / "steps.parquet")
    # strict JSON: no NaN/Infinity tokens anywhere
    summary = json.loads((finished / "summary.json").read_text(), parse_constant=_no_constants)
    d = np.asarray(st["decisiveness"], float)
    eids = np.asarray(st["example_id"]).astype(str)
    correct = np.asarray(ex["correct"], float)
    scored = np.asarray(ex["scorable"], bool)  # unscorable traces are left out of summaries
    assert summary["counts"]["unscorable"] == int((~scored).sum())
    assert summary["n_examples"] == len(correct)
    assert summary["accuracy"] == pytest.approx(correct.mean())
    for e in ESTIMATORS:
        c = np.asarray(st[f"conf_{e}"], float)
        f = np.asarray(st[f"faith_{e}"], float)
        ok = np.isfinite(c) & np.isfinite(d)
        np.testing.assert_allclose(f[ok], 1 - np.abs(d[ok] - c[ok]))
        assert np.isnan(f[~ok]).all()
        trace_f = np.asarray(ex[f"faith_{e}"], float)
        trace_c = np.asarray(ex[f"conf_{e}"], float)
        for i, eid in enumerate(np.asarray(ex["example_id"]).astype(str)):
            fs = f[eids == eid]
            fs = fs[np.isfinite(fs)]
            if fs.size:
                assert trace_f[i] == pytest.approx(fs.mean())
            else:
                assert np.isnan(trace_f[i])
        m = summary["estimators"][e]
        okt = np.isfinite(trace_c) & np.isfinite(trace_f) & scored
        if okt.any():
            assert m["mfg"] == pytest.approx(mfg(trace_f[okt]))
            assert m["cmfg"] == pytest.approx(cmfg(trace_f[okt], trace_c[okt]))
            assert m["cmfg_star"] == pytest.approx(cmfg_star(trace_f[okt], trace_c[okt]))
        okc = np.isfinite(trace_c) & scored
        if okc.any():
            assert m["ece"] == pytest.approx(ece(trace_c[okc], correct[okc]))
            assert m["brier"] == pytest.approx(brier(trace_c[okc], correct[okc]))
            want = auroc(trace_c[okc], correct[okc])
            assert (m["auroc"] is None) == (not np.isfinite(want))
        # 95% intervals: the library's bootstrap on the tables' trace columns, same seed
        cis = bootstrap_intervals(
            np.where(scored, trace_f, np.nan),
            np.clip(trace_c, 0, 1),
            np.where(scored, correct, np.nan),
            seed=1,
        )
        for k in ("mfg", "cmfg", "cmfg_star", "ece", "brier", "auroc"):
            assert m[f"{k}_ci95"] == pytest.approx(cis[f"{k}_ci95"]), (e, k)
            if m[f"{k}_ci95"] is not None:
                assert m[f"{k}_ci95"][0] <= m[f"{k}_ci95"][1]
        assert m["auroc_p"] == pytest.approx(cis["auroc_p"])
    # deepconf trace confidence is the mean of its steps, rcc the last step's
    c = np.asarray(st["conf_deepconf"], float)
    r = np.asarray(st["conf_rcc"], float)
    for i, eid in enumerate(np.asarray(ex["example_id"]).astype(str)):
        if (eids == eid).any():
            assert ex["conf_deepconf"][i] == pytest.approx(np.nanmean(c[eids == eid]))
            assert ex["conf_rcc"][i] == pytest.approx(r[eids == eid][-1])


def _tables(path: Path):
    ex = read_table(path / "examples.parquet")
    st = read_table(path / "steps.parquet")
    summary = json.loads((path / "summary.json").read_text())
    summary.pop("stage_wall_s")
    return ex, st, summary


def _assert_same_run(a: Path, b: Path):
    ea, sa, ja = _tables(a)
    eb, sb, jb = _tables(b)
    assert ja == jb
    for x, y in ((ea, eb), (sa, sb)):
        assert sorted(x) == sorted(y)
        for k in x:
            vx, vy = x[k], y[k]
            if isinstance(vx, np.ndarray) and vx.dtype.kind == "f":
                np.testing.assert_array_equal(vx, vy, err_msg=k)
            else:
                assert list(map(str, vx)) == list(map(str, vy)), k


def test_resume_between_stages_equals_uninterrupted(tiny_chat, finished, tmp_path):
    run(settings(tiny_chat), str(tmp_path), stop_after="estimators")
    assert RunDir(tmp_path).done("estimators") and not RunDir(tmp_path).done("metrics")
    run(settings(tiny_chat), str(tmp_path))
    _assert_same_run(finished, tmp_path)


def test_sigkill_mid_stage_then_rerun_equals_uninterrupted(tiny_chat, finished, tmp_path):
    cmd = [sys.executable, "-m", "experiments.run", f"--out={tmp_path}"]
    cmd += cli_flags(settings(tiny_chat))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # wait until generation has written its first part, then kill mid-generation
    deadline = time.time() + 300
    parts = tmp_path / "stages" / "generate"
    while time.time() < deadline and not list(parts.glob("part-*.parquet")):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not RunDir(tmp_path).done("generate")
    assert (tmp_path / ".lock").exists()  # left behind by the killed process
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    _assert_same_run(finished, tmp_path)


def test_second_process_refused_and_stale_lock_taken_over(tmp_path):
    rd = RunDir(tmp_path)
    rd.lock()
    other = subprocess.run(
        [
            sys.executable,
            "-c",
            (
                "from experiments.rundir import RunDir; import sys\n"
                f"RunDir({str(tmp_path)!r}).lock()"
            ),
        ],
        capture_output=True,
        text=True,
    )
    assert other.returncode != 0
    assert "lock" in other.stderr and str(os.getpid()) in other.stderr
    rd.unlock()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".lock").write_text(
        json.dumps({"pid": dead.pid, "host": __import__("socket").gethostname()})
    )
    RunDir(tmp_path).lock()  # stale: taken over


def test_changed_flags_refused_then_redo(tiny_chat, finished, tmp_path):
    import shutil

    shutil.copytree(finished, tmp_path / "r")
    out = tmp_path / "r"
    with pytest.raises(RunError, match=r"--k: 2 -> 3.*--redo=estimators"):
        run(settings(tiny_chat, k=3), str(out))
    with pytest.raises(RunError, match="--max_new_tokens"):
        run(settings(tiny_chat, max_new_tokens=41), str(out))
    run(settings(tiny_chat, estimators=("deepconf",)), str(out), redo="estimators")
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["estimators"]) == ["deepconf"]
    assert RunDir(out).info("generate") == RunDir(finished).info("generate")


def test_redo_hidden_with_new_layers_rebuilds_the_store(tiny_chat, finished, tmp_path):
    import shutil

    from fcjax.store.hidden import read_hidden

    shutil.copytree(finished, tmp_path / "r")
    out = tmp_path / "r"
    run(settings(tiny_chat, layers=(0, 2)), str(out), redo="hidden")
    _, states = read_hidden(out / "hidden")
    assert states.shape[1] == 2
    _, full = read_hidden(finished / "hidden")
    np.testing.assert_array_equal(states, full[:, [0, 2]])


def test_compare_prints_every_figure_side_by_side(finished, tmp_path):
    """`experiments.report --runs=A,B`: one column per run, each number the summary's."""
    from experiments.report import compare

    other = tmp_path / "other"
    other.mkdir()
    summary = json.loads((finished / "summary.json").read_text())
    changed = {**summary, "accuracy": 0.125, "config": {**summary["config"], "intervention": "x"}}
    (other / "summary.json").write_text(json.dumps(changed))
    page = compare([finished, other], tmp_path / "cmp")
    assert page.exists() and (tmp_path / "cmp" / "compare.png").exists()
    table = [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in (tmp_path / "cmp" / "compare.txt").read_text().splitlines()
    ]
    assert table[0] == ["", finished.name, "other"]
    rows = {label: values for label, *values in table[2:]}
    assert rows["accuracy"] == [f"{summary['accuracy']:.3f}", "0.125"]
    assert rows["intervention"] == [summary["config"]["intervention"], "x"]
    for name, values in summary["estimators"].items():
        if values["cmfg_star"] is not None:
            assert rows[f"{name} cMFG*"] == [f"{values['cmfg_star']:.3f}"] * 2
    pair = next(iter(summary["agreement"]))
    assert f"spearman {pair.replace('|', ' ~ ')}" in rows
    assert f"{summary['stage_wall_s']['generate']:.3f}" in rows["wall s generate"]


def test_paired_differences_table(finished, tmp_path):
    """`experiments.report --runs=A,B` paired table: B - A on shared questions, with the
    library's paired bootstrap; a constant shift of F shows as that shift with a 0-width
    interval marked as excluding 0, an unchanged metric as 0 unmarked."""
    import shutil

    from experiments.report import paired_table
    from fcjax.store.tables import update_columns

    other = tmp_path / "shifted"
    shutil.copytree(finished, other)
    ex = read_table(other / "examples.parquet")
    f = np.asarray(ex["faith_deepconf"], float)
    update_columns(other / "examples.parquet", {"faith_deepconf": f - 0.25})
    table = paired_table(finished, other, reps=200)
    rows = {
        tuple(cells[:2]): cells[2:]
        for cells in (
            [c.strip() for c in line.strip("|").split("|")]
            for line in table.splitlines()
            if line.startswith("| deepconf")
        )
    }
    n, base, shifted, diff, ci = rows[("deepconf", "MFG")]
    f = np.where(np.asarray(ex["scorable"], bool), f, np.nan)  # unscorable traces left out
    assert float(shifted) == pytest.approx(np.nanmean(f) - 0.25, abs=5e-4)
    assert int(n) == int(np.isfinite(f).sum())
    assert diff == "-0.250*" and ci == "[-0.250, -0.250]"
    assert float(base) == pytest.approx(np.nanmean(f), abs=5e-4)
    assert rows[("deepconf", "Brier")][3] == "+0.000"
    # an unscorable trace in either run leaves its question out, as in the summaries
    scorable = np.asarray(ex["scorable"], bool)
    first = int(np.flatnonzero(scorable & np.isfinite(f))[0])
    scorable[first] = False
    update_columns(other / "examples.parquet", {"scorable": scorable})
    table = paired_table(finished, other, reps=50)
    line = next(ln for ln in table.splitlines() if ln.startswith("| deepconf | MFG |"))
    assert int(line.split("|")[3]) == int(np.isfinite(f).sum()) - 1
