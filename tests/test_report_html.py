"""The HTML report's content without a browser: self-contained, the embedded data equal to
the tables, counts as a table, error bars only where the summary has intervals, and the
number of traces written on every reliability and cMFG* bin."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from synthetic_run import ESTIMATORS, write_synthetic_run

from experiments.report import write_report
from fcjax.metrics import cmfg_star, reliability_bins
from fcjax.store.tables import read_table


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    with_ci = write_synthetic_run(base / "ci", n_examples=15)
    plain = write_synthetic_run(base / "plain", n_examples=15, ci=False)
    (plain / "sampling_samples.parquet").unlink()
    return {
        name: write_report(path).read_text() for name, path in (("ci", with_ci), ("plain", plain))
    }, base


def _data(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="fcjax-data">(.*?)</script>', page, re.S)
    assert m
    return json.loads(m.group(1))


def test_page_is_self_contained(runs):
    pages, _ = runs
    for page in pages.values():
        assert "<link" not in page and " src=" not in page and "@import" not in page
        urls = set(re.findall(r"https?://[^\s\"'<>)]+", page))
        assert urls <= {"http://www.w3.org/2000/svg"}, urls
        assert page.count("<figure>") == page.count("<figcaption>") >= 6


def test_embedded_data_equals_the_tables(runs):
    pages, base = runs
    data = _data(pages["ci"])
    ex = read_table(base / "ci" / "examples.parquet")
    st = read_table(base / "ci" / "steps.parquet")
    assert data["examples"]["id"] == list(ex["example_id"])
    assert data["examples"]["n_steps"] == list(ex["n_steps"])
    # steps grouped by example: example i's rows start at step0[i]; texts survive </script>
    assert sum(data["examples"]["n_steps"]) == len(st["step"])
    assert any("</script>" in t for t in data["steps"]["text"])
    for i, eid in enumerate(data["examples"]["id"]):
        a = data["examples"]["step0"][i]
        rows = np.flatnonzero(np.asarray(st["example_id"]) == eid)
        assert data["steps"]["text"][a : a + len(rows)] == [st["text"][r] for r in rows]
        for name in ESTIMATORS:
            got = np.array(data["steps"]["conf"][name][a : a + len(rows)], dtype=float)
            np.testing.assert_allclose(got, np.round(st[f"conf_{name}"][rows], 4), atol=1e-12)
    kept = read_table(base / "ci" / "sampling_samples.parquet")
    samples = data["samples"]
    assert len(samples["row"]) == len(kept["step"]) and samples["row"] == sorted(samples["row"])
    assert "samples" not in _data(pages["plain"])


def test_error_bars_only_with_intervals(runs):
    pages, _ = runs
    # six metric panels (MFG, cMFG, cMFG*, ECE, Brier, AUROC) x five estimators
    assert pages["ci"].count('class="ci"') == 6 * len(ESTIMATORS)
    assert pages["plain"].count('class="ci"') == 0
    assert "AUROC p" in pages["ci"] and "AUROC p" not in pages["plain"]


def test_counts_are_a_table(runs):
    pages, base = runs
    summary = json.loads((base / "ci" / "summary.json").read_text())
    page = pages["ci"]
    assert '"no_answer"' not in page.split('id="fcjax-data"')[0]
    want = summary["counts"]["no_answer"]
    assert re.search(rf"<td>traces with no extracted answer</td><td>{want}</td>", page)


def test_bins_show_their_trace_counts(runs):
    pages, base = runs
    page = pages["ci"]
    ex = read_table(base / "ci" / "examples.parquet")
    figures = page.split("<figure>")
    rel = next(f for f in figures if "Reliability diagrams" in f)
    star = next(f for f in figures if "cMFG* bins" in f)
    rel_panels = rel.split("<svg")[1:]
    star_panels = star.split("<svg")[1:]
    for name, rp, sp in zip(ESTIMATORS, rel_panels, star_panels, strict=True):
        c = np.asarray(ex[f"conf_{name}"], float)
        f = np.asarray(ex[f"faith_{name}"], float)
        counts = [int(x) for x in re.findall(r">n=(\d+)<", rp)]
        # brute force: traces per tenth of [0, 1] (1.0 in the last)
        ok = c[np.isfinite(c)]
        want = [int(np.sum((ok >= j / 10) & ((ok < (j + 1) / 10) | (j == 9)))) for j in range(10)]
        assert counts == [k for k in want if k]
        ok2 = np.isfinite(c) & np.isfinite(f)
        _, bins = cmfg_star(f[ok2], c[ok2], return_bins=True)
        labels = [int(x) for x in re.findall(r'font-size="7"[^>]*>(\d+)<', sp)]
        assert labels == bins["count"].tolist() and sum(labels) == ok2.sum()
    b = reliability_bins(np.array([0.05, 0.15, 0.15, 1.0, np.nan]), np.array([1, 0, 1, 1, 0.0]))
    assert b["count"].tolist() == [1, 2, 0, 0, 0, 0, 0, 0, 0, 1]
    np.testing.assert_allclose(b["accuracy"][[0, 1, 9]], [1, 0.5, 1])
    assert np.isnan(b["accuracy"][2])


def test_compare_page_with_a_run_without_tables(runs, tmp_path):
    from experiments.report import compare

    _, base = runs
    bare = tmp_path / "bare"
    bare.mkdir()
    summary = json.loads((base / "ci" / "summary.json").read_text())
    summary["estimators"]["deepconf"]["cmfg_star"] += 0.25
    (bare / "summary.json").write_text(json.dumps(summary))
    page = compare([base / "ci", bare], tmp_path / "cmp").read_text()
    data = _data(page)
    assert data["compare"] and data["labels"] == ["ci", "bare"] and data["runs"][1] is None
    assert data["runs"][0]["examples"]["id"] == _data(runs[0]["ci"])["examples"]["id"]
    assert "No tables (examples.parquet, steps.parquet) in: bare" in page
    # the difference column: deepconf cMFG* is 0.25 higher in the second run (green)
    assert "<td class='up'>+0.250</td>" in page


def test_reliability_bins_refuse_what_ece_refuses():
    """The report's reliability bars and ECE read the same bins: a confidence outside [0, 1]
    is refused by both instead of being clipped into the last bar."""
    from fcjax.metrics import ece

    for fn in (ece, reliability_bins):
        with pytest.raises(ValueError, match=r"\[0, 1\]|outside"):
            fn(np.array([0.2, 1.3]), np.array([1.0, 0.0]))


def test_png_plots_are_the_pages_figures(runs, tmp_path):
    """plots/<figure>.png is written for each figure of the run page, from the same panels."""
    import shutil

    from experiments.report import run_plots
    from experiments.report_figures import run_figure_list
    from experiments.report_html import run_data
    from fcjax.store.fs import location

    run = tmp_path / "run"
    shutil.copytree(runs[1] / "ci", run)
    summary = json.loads((run / "summary.json").read_text())
    figures = run_figure_list(summary, run_data(location(run), summary), location(run))
    names = run_plots(location(run))
    assert names == [f"{f.name}.png" for f in figures]
    for name in names:
        assert (run / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_paired_table_scores_tied_confidences_in_the_base_runs_order(tmp_path):
    """cMFG* of tied confidences depends on the traces' order; the paired table scores both
    runs in the base run's example order, so each column is cMFG* over the run as it stands
    (here that differs from the value in sorted-id order, the old behaviour)."""
    import shutil

    from experiments.report import paired_table
    from fcjax.store.tables import update_columns

    base = write_synthetic_run(tmp_path / "base", n_examples=20)
    ex = read_table(base / "examples.parquet")
    rng = np.random.default_rng(3)
    c = rng.choice([0.25, 0.5, 0.75], size=20)  # K = 2 sampling: few distinct values
    f = rng.uniform(size=20)
    ids = np.array([f"x{19 - i:02d}" for i in range(20)])  # sorted ids: the reverse order
    update_columns(
        base / "examples.parquet", {"conf_sampling": c, "faith_sampling": f, "example_id": ids}
    )
    other = tmp_path / "other"
    shutil.copytree(base, other)
    scored = np.asarray(ex.get("scorable", np.ones(20, bool)), bool)
    keep = scored & np.isfinite(f)
    want = cmfg_star(f[keep], c[keep])
    by_id = np.argsort(ids[keep], kind="stable")
    assert abs(want - cmfg_star(f[keep][by_id], c[keep][by_id])) > 1e-3  # order matters here
    line = next(
        ln
        for ln in paired_table(base, other, reps=20).splitlines()
        if ln.startswith("| sampling | cMFG* |")
    )
    cells = [x.strip() for x in line.strip("|").split("|")]
    assert cells[3] == cells[4] == f"{want:.3f}" and cells[5] == "+0.000"
