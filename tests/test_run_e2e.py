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
from child_env import child_env
from tiny_models import TINY_RUN_ESTIMATORS, cli_flags, tiny_run_settings

from experiments.config import STAGES
from experiments.report import PAIRED
from experiments.run import run
from experiments.rundir import RunDir, RunError
from fcjax.metrics import bootstrap_intervals
from fcjax.metrics.bootstrap import FAITHFULNESS
from fcjax.store.tables import read_table

pytestmark = pytest.mark.integration

ESTIMATORS = TINY_RUN_ESTIMATORS
settings = tiny_run_settings


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
    # the sampling estimator's continuations: sampling_n records per scored step
    kept = read_table(finished / "sampling_samples.parquet")
    n = np.nan_to_num(np.asarray(st["sampling_n"], float)).astype(int)
    got = {}
    for eid, step in zip(kept["example_id"], kept["step"], strict=True):
        got[(eid, int(step))] = got.get((eid, int(step)), 0) + 1
    want = {(e, int(s)): k for e, s, k in zip(st["example_id"], st["step"], n, strict=True) if k}
    assert got == want and want


def _no_constants(token):
    raise AssertionError(f"summary.json holds the non-JSON token {token}")


# --- independent, brute-force versions of the summary's figures (METHOD.md section 5) ---


def _bf_mean(values):
    values = [v for v in values if np.isfinite(v)]
    return sum(values) / len(values) if values else float("nan")


def _bf_bin(c, bins=10):
    return min(int(c * bins), bins - 1)  # [k/10, (k+1)/10), the last bin closed at 1


def _bf_cmfg(f, c, bins=10):
    per_bin = [[fi for fi, ci in zip(f, c, strict=True) if _bf_bin(ci) == k] for k in range(bins)]
    return sum(sum(b) / len(b) if b else 0.5 for b in per_bin) / bins


def _bf_cmfg_star(f, c, bins=10):
    pairs = sorted(zip(c, f, strict=True), key=lambda p: p[0])
    n, m = len(pairs), min(bins, len(pairs))
    sizes = [n // m + (1 if j < n % m else 0) for j in range(m)]
    groups, start = [], 0
    for size in sizes:
        groups.append(pairs[start : start + size])
        start += size
    lo = [g[0][0] for g in groups]
    hi = [g[-1][0] for g in groups]
    num = den = 0.0
    for j, g in enumerate(groups):
        lower = lo[j] if j == 0 else (hi[j - 1] + lo[j]) / 2
        upper = hi[j] if j == m - 1 else (hi[j] + lo[j + 1]) / 2
        mean_f = sum(p[1] for p in g) / len(g)
        num, den = num + (upper - lower) * mean_f, den + (upper - lower)
    return num / den if den > 0 else sum(sum(p[1] for p in g) / len(g) for g in groups) / m


def _bf_ece(c, y, bins=10):
    total = 0.0
    for k in range(bins):
        rows = [i for i in range(len(c)) if _bf_bin(c[i]) == k]
        total += abs(sum(y[i] for i in rows) - sum(c[i] for i in rows))
    return total / len(c)


def _bf_auroc(c, y):
    pos = [ci for ci, yi in zip(c, y, strict=True) if yi == 1]
    neg = [ci for ci, yi in zip(c, y, strict=True) if yi == 0]
    if not pos or not neg:
        return None
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


TRACE_RULE = {"deepconf": "mean", "sampling": "mean", "rcc": "last", "forcing": "last"}
TRACE_RULE["probe"] = "last"


def test_faithfulness_and_summary_match_a_brute_force_recomputation(finished):
    """Every per-step, per-trace and summary figure, recomputed row by row from the tables
    with independent brute-force code (not the fcjax.metrics functions under test)."""
    ex = read_table(finished / "examples.parquet")
    st = read_table(finished / "steps.parquet")
    # strict JSON: no NaN/Infinity tokens anywhere
    summary = json.loads((finished / "summary.json").read_text(), parse_constant=_no_constants)
    ids = [str(e) for e in ex["example_id"]]
    correct = [float(v) for v in ex["correct"]]
    scorable = [bool(v) for v in ex["scorable"]]  # unscorable traces are left out of summaries
    assert summary["counts"]["unscorable"] == scorable.count(False)
    assert summary["n_examples"] == len(ids) == 6
    assert summary["accuracy"] == pytest.approx(sum(correct) / len(correct))
    rows = {e: [i for i, s in enumerate(st["example_id"]) if str(s) == e] for e in ids}
    d = [float(v) for v in st["decisiveness"]]
    for e in ESTIMATORS:
        c = [float(v) for v in st[f"conf_{e}"]]
        f = [1 - abs(di - ci) for di, ci in zip(d, c, strict=True)]  # NaN stays NaN
        np.testing.assert_allclose(st[f"faith_{e}"], f, err_msg=e)
        trace_c, trace_f = [], []
        for x in ids:
            scored = [c[i] for i in sorted(rows[x], key=lambda i: st["step"][i])]
            scored = [v for v in scored if np.isfinite(v)]
            if TRACE_RULE[e] == "mean":
                trace_c.append(sum(scored) / len(scored) if scored else float("nan"))
            else:
                trace_c.append(scored[-1] if scored else float("nan"))
            trace_f.append(_bf_mean([f[i] for i in rows[x]]))
        np.testing.assert_allclose(ex[f"conf_{e}"], trace_c, err_msg=e)
        np.testing.assert_allclose(ex[f"faith_{e}"], trace_f, err_msg=e)
        has_c = [i for i in range(len(ids)) if np.isfinite(trace_c[i]) and scorable[i]]
        both = [i for i in has_c if np.isfinite(trace_f[i])]
        assert len(both) >= 3, (e, both)  # enough traces that every figure is checked
        m = summary["estimators"][e]
        ff, cc = [trace_f[i] for i in both], [min(max(trace_c[i], 0), 1) for i in both]
        assert m["n_traces"] == len(both)
        assert m["mfg"] == pytest.approx(sum(ff) / len(ff))
        assert m["cmfg"] == pytest.approx(_bf_cmfg(ff, cc))
        assert m["cmfg_star"] == pytest.approx(_bf_cmfg_star(ff, cc))
        cy = [trace_c[i] for i in has_c], [correct[i] for i in has_c]
        brier = sum((a - b) ** 2 for a, b in zip(*cy, strict=True)) / len(has_c)
        assert m["ece"] == pytest.approx(_bf_ece(*cy))
        assert m["brier"] == pytest.approx(brier)
        want = _bf_auroc(*cy)
        assert m["auroc"] == (None if want is None else pytest.approx(want))
        assert m["mean_conf"] == pytest.approx(sum(cy[0]) / len(has_c))
        # 95% intervals: the library's bootstrap on the tables' trace columns, same seed
        cis = bootstrap_intervals(
            np.where(scorable, trace_f, np.nan),
            np.clip(trace_c, 0, 1),
            np.where(scorable, correct, np.nan),
            seed=1,
        )
        for k in ("mfg", "cmfg", "cmfg_star", "ece", "brier", "auroc"):
            assert m[f"{k}_ci95"] == pytest.approx(cis[f"{k}_ci95"]), (e, k)
            if m[f"{k}_ci95"] is not None:
                assert m[f"{k}_ci95"][0] <= m[f"{k}_ci95"][1]
        assert m["auroc_p"] == pytest.approx(cis["auroc_p"])
    assert summary["counts"]["steps"] == len(d)
    assert summary["counts"]["no_steps"] == sum(int(n) == 0 for n in ex["n_steps"])


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


@pytest.mark.slow
def test_sigkill_mid_stage_then_rerun_equals_uninterrupted(tiny_chat, finished, tmp_path):
    cmd = [sys.executable, "-m", "experiments.run", f"--out={tmp_path}"]
    cmd += cli_flags(settings(tiny_chat))
    env = child_env()
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


def test_file_url_out_equals_a_plain_path(tiny_chat, finished, tmp_path):
    """``--out=file:///...`` through the CLI (every file through ``fcjax.store.fs``): exactly
    the tables, hidden states, probe table, probe checkpoint and summary of the run into a
    plain path, nothing written relative to the working directory, and a rerun on the URL
    finds every stage done."""
    from rundir_compare import assert_same_hidden

    from probes.checkpoint import load_probe

    out = tmp_path / "run dir"  # quoted as %20 in the URL
    url, cwd = out.as_uri(), tmp_path / "cwd"
    cwd.mkdir()
    env = child_env()
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    cmd = [sys.executable, "-m", "experiments.run", f"--out={url}"]
    cmd += cli_flags(settings(tiny_chat))
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"report: {url}/report.html" in done.stdout
    # quiet console (experiments/logs.py): no INFO records, one line per stage, in order
    assert not [line for line in done.stderr.splitlines() if line[:1] == "I"], done.stderr
    heads = [line.split(":")[0] for line in done.stderr.splitlines()]
    assert [h for h in heads if h in STAGES] == list(STAGES), done.stderr
    assert list(cwd.iterdir()) == []
    _assert_same_run(finished, out)
    assert_same_hidden(finished, out, atol=0)
    a, b = (read_table(r / "probes" / "layers.parquet") for r in (finished, out))
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)
    pa_, pb = load_probe(finished / "probes" / "ckpt"), load_probe(f"{url}/probes/ckpt")
    assert (pa_.layer, pa_.layers) == (pb.layer, pb.layers)
    for k, v in pa_.arrays().items():
        np.testing.assert_array_equal(v, pb.arrays()[k], err_msg=k)
    assert sorted(p.name for p in (out / "plots").glob("*.png")) == sorted(
        p.name for p in (finished / "plots").glob("*.png")
    )
    assert (out / "report.html").stat().st_size > 0 and not (out / ".lock").exists()
    markers = {p: p.stat().st_mtime_ns for p in (out / "stages").glob("*.done")}
    assert len(markers) == len(STAGES)
    rd = run(settings(tiny_chat), url)
    assert str(rd.path) == url
    assert {p: p.stat().st_mtime_ns for p in markers} == markers  # nothing redone


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


def test_resume_with_another_batch_size_keeps_part_boundaries(tiny_chat, finished, tmp_path):
    """A generate stage killed after its first part (batch 4), resumed with --batch_size=8:
    examples 4-5 (part 4, named by its first example) are generated again, 0-3 kept."""
    run(settings(tiny_chat), str(tmp_path), stop_after="generate")
    rd = RunDir(tmp_path)
    parts = tmp_path / "stages" / "generate"
    assert sorted(p.name for p in parts.glob("part-*")) == [
        "part-000000.parquet",
        "part-000004.parquet",
    ]
    kept = (parts / "part-000000.parquet").stat().st_mtime_ns
    (parts / "part-000004.parquet").unlink()
    rd.marker("generate").unlink()  # as a kill between the two parts leaves it
    run(settings(tiny_chat, batch_size=8), str(tmp_path), stop_after="segment")
    assert (parts / "part-000000.parquet").stat().st_mtime_ns == kept
    got = read_table(tmp_path / "examples.parquet")
    want = read_table(finished / "examples.parquet")
    assert list(got["example_id"]) == list(want["example_id"])
    assert list(map(list, got["output_ids"])) == list(map(list, want["output_ids"]))


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
            if line.startswith("| ") and not line.startswith("| estimator")
        )
    }
    n, base, shifted, diff, ci = rows[("deepconf", "MFG")]
    f = np.where(np.asarray(ex["scorable"], bool), f, np.nan)  # unscorable traces left out
    assert float(shifted) == pytest.approx(np.nanmean(f) - 0.25, abs=5e-4)
    assert int(n) == int(np.isfinite(f).sum())
    assert diff == "-0.250*" and ci == "[-0.250, -0.250]"
    assert float(base) == pytest.approx(np.nanmean(f), abs=5e-4)
    assert rows[("deepconf", "Brier")][3] == "+0.000"
    # each run's column is its summary's value, cMFG* included: traces of tied confidence
    # (sampling's at most 2K + 1 values) keep the run's example order, as in the summary
    summary = json.loads((finished / "summary.json").read_text())["estimators"]
    keys = {label: key for key, label in PAIRED if key in FAITHFULNESS}
    checked = 0
    for name, label in rows:
        if name != "deepconf" and label in keys and name in summary:
            want = summary[name][keys[label]]
            assert rows[(name, label)][1:3] == [f"{want:.3f}"] * 2, (name, label)
            checked += 1
    assert checked >= 3
    # an unscorable trace in either run leaves its question out, as in the summaries
    scorable = np.asarray(ex["scorable"], bool)
    first = int(np.flatnonzero(scorable & np.isfinite(f))[0])
    scorable[first] = False
    update_columns(other / "examples.parquet", {"scorable": scorable})
    table = paired_table(finished, other, reps=50)
    line = next(ln for ln in table.splitlines() if ln.startswith("| deepconf | MFG |"))
    assert int(line.split("|")[3]) == int(np.isfinite(f).sum()) - 1


def test_hidden_mean_features_in_float16_match_a_brute_force_forward(tiny_chat, finished, tmp_path):
    """--probe_features=mean --hidden_dtype=float16: each stored row is the mean over the
    step's tokens of the full forward's hidden_states (float16-rounded), and the probe stage
    trains on them."""
    import shutil

    import fcjax
    from fcjax.store.hidden import HiddenReader

    shutil.copytree(finished, tmp_path / "r")
    out = tmp_path / "r"
    run(settings(tiny_chat, probe_features="mean", hidden_dtype="float16"), str(out), redo="hidden")
    reader = HiddenReader(out / "hidden_mean")
    assert reader.meta.dtype == "float16"
    states = reader.read()
    ex = read_table(out / "examples.parquet")
    st = read_table(out / "steps.parquet")
    lm = fcjax.load(str(tiny_chat))
    seqs = {
        str(e): list(p) + list(o)
        for e, p, o in zip(ex["example_id"], ex["prompt_ids"], ex["output_ids"], strict=True)
    }
    offsets = {str(e): len(p) for e, p in zip(ex["example_id"], ex["prompt_ids"], strict=True)}
    spans = {
        (str(e), int(s)): (a, b)
        for e, s, a, b in zip(
            st["example_id"], st["step"], st["token_start"], st["token_end"], strict=True
        )
    }
    checked = 0
    index = zip(reader.index["example_id"], reader.index["step"], strict=True)
    for i, (eid, step) in enumerate(index):
        a, b = spans[(eid, int(step))]
        full = np.asarray(lm.hidden_states(np.array([seqs[eid]])))[:, 0]  # [L + 1, T, D]
        want = full[:, offsets[eid] + a : offsets[eid] + b].mean(1)
        np.testing.assert_allclose(states[i], want, rtol=2e-3, atol=2e-3)
        checked += 1
    assert checked == len(reader.index["row"]) > 0
    probes_info = RunDir(out).info("probes")
    assert probes_info["features"] == "mean"
