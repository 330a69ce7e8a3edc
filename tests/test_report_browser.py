"""The HTML reports opened in a real headless Chromium (Debian's ``chromium`` package; .ci/run
installs it): the page loads without console messages, lists one row per example, and
``#ex=ID`` opens that trace with the step values of the tables. The page reports what it
rendered in ``#fcjax-selfcheck``, read back with ``--dump-dom``.

Set ``FCJAX_BROWSER_RUNS=DIR1,DIR2`` to also check the reports of finished real runs.
"""

from __future__ import annotations

import html.parser
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from synthetic_run import ESTIMATORS, write_synthetic_run

from experiments.report import compare, write_report
from fcjax.store.tables import read_table

pytestmark = pytest.mark.integration  # a real browser, in another process

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def _browser() -> str | None:
    path = os.environ.get("FCJAX_CHROMIUM")
    return path or next((p for p in map(shutil.which, CANDIDATES) if p), None)


BROWSER = _browser()
needs_browser = pytest.mark.skipif(
    BROWSER is None,
    reason="no Chromium found (apt-get install chromium; .ci/run installs it where apt works)",
)


def open_page(url: str, tmp_path: Path) -> tuple[str, dict, list[str]]:
    """(DOM after scripts ran, the page's self-check, console messages) from headless Chromium."""
    profile = tmp_path / f"profile{time.monotonic_ns()}"
    cmd = [
        BROWSER,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=10000",
        "--window-size=1280,2000",
        "--dump-dom",
        url,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    m = re.search(r'<pre id="fcjax-selfcheck"[^>]*>(.*?)</pre>', proc.stdout, re.S)
    assert m, "the page wrote no self-check (its script did not run)"
    return proc.stdout, json.loads(html.unescape(m.group(1))), console


class Rows(html.parser.HTMLParser):
    """Collects the list rows (``tr[data-key]``) and the opened trace's step rows: each
    step's cells as (title, data-v)."""

    def __init__(self):
        super().__init__()
        self.keys: list[str] = []
        self.steps: list[list[tuple[str, str | None]]] = []
        self.samples = 0
        self._in_step = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr" and "data-key" in a:
            self.keys.append(a["data-key"])
        if tag == "tr":
            self._in_step = a.get("class") == "step"
            if self._in_step:
                self.steps.append([])
        if tag == "td" and self._in_step and "v" in (a.get("class") or "").split():
            self.steps[-1].append((a.get("title", ""), a.get("data-v")))
        if tag == "li" and a.get("class") == "sample":
            self.samples += 1


def parse(dom: str) -> Rows:
    rows = Rows()
    rows.feed(dom)
    return rows


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = write_synthetic_run(tmp_path_factory.mktemp("synthetic") / "a", n_examples=12)
    write_report(path)
    return path


@needs_browser
def test_report_lists_examples_and_opens_a_trace_with_its_values(run, tmp_path):
    eid = "q00003"
    dom, check, console = open_page((run / "report.html").as_uri() + f"#ex={eid}", tmp_path)
    assert console == [] and check["errors"] == [], (console, check["errors"])
    assert check["ready"] and check["mode"] == "run"
    # no horizontal scrolling in a 1280 px window (less its vertical scrollbar)
    assert check["page_width"] <= check["view_width"] and check["view_width"] > 1200
    examples = read_table(run / "examples.parquet")
    rows = parse(dom)
    assert rows.keys == list(examples["example_id"])  # one row per example, in file order
    steps = read_table(run / "steps.parquet")
    mine = np.flatnonzero(np.asarray(steps["example_id"]) == eid)
    assert check["opened"] == eid and check["steps_rendered"] == len(mine) == len(rows.steps)
    # each step row shows D, then C and F of every estimator, with the tables' values
    for r, cells in zip(mine, rows.steps, strict=True):
        want = [("D", steps["decisiveness"][r])]
        for name in ESTIMATORS:
            want += [
                (f"C {name}", steps[f"conf_{name}"][r]),
                (f"F {name}", steps[f"faith_{name}"][r]),
            ]
        assert len(cells) == len(want)
        for (title, value), (label, expect) in zip(cells, want, strict=True):
            if np.isnan(expect):
                assert value is None and title == f"{label}: no value"
            else:
                shown = np.round(expect, 4)
                assert title == f"{label} = {shown:.4f}" and float(value) == shown
    kept = read_table(run / "sampling_samples.parquet")
    n_kept = sum(e == eid for e in kept["example_id"])
    assert n_kept > 0 and rows.samples == n_kept == check["samples_rendered"]
    # a missing id says so instead of failing
    _, check, console = open_page((run / "report.html").as_uri() + "#ex=nope", tmp_path)
    assert console == [] and check["errors"] == [] and check["opened"] is None


@needs_browser
def test_list_sorts_and_filters_from_the_url(run, tmp_path):
    """#sort=deepconf.C&dir=desc&show=wrong: wrong traces only, highest confidence first,
    traces without a value last; #find= filters by id or question text."""
    ex = read_table(run / "examples.parquet")
    conf = np.round(np.asarray(ex["conf_deepconf"], float), 4)
    wrong = [i for i, c in enumerate(ex["correct"]) if not c]
    want = sorted(wrong, key=lambda i: (bool(np.isnan(conf[i])), -np.nan_to_num(conf[i]), i))
    url = (run / "report.html").as_uri() + "#sort=deepconf.C&dir=desc&show=wrong"
    dom, check, console = open_page(url, tmp_path)
    assert console == [] and check["errors"] == []
    assert parse(dom).keys == [ex["example_id"][i] for i in want]
    assert check["list_total"] == len(wrong) < len(ex["example_id"])
    dom, check, _ = open_page((run / "report.html").as_uri() + "#find=q0001&sort=steps", tmp_path)
    ids = [e for e in ex["example_id"] if "q0001" in e]
    n = dict(zip(ex["example_id"], ex["n_steps"], strict=True))
    assert parse(dom).keys == sorted(ids, key=lambda e: (n[e], ids.index(e)))


@needs_browser
def test_report_of_200_questions_loads_and_pages(tmp_path):
    # ~20 steps each, 10 sampled continuations of ~30 words on each of the first 20 steps
    path = write_synthetic_run(
        tmp_path / "big", n_examples=200, max_steps=23, k=10, sampled_steps=20, paragraph_words=30
    )
    t = time.perf_counter()
    write_report(path)
    build_s = time.perf_counter() - t
    page = path / "report.html"
    dom, check, console = open_page(page.as_uri() + "#ex=q00150", tmp_path)
    assert console == [] and check["errors"] == []
    n_steps = len(read_table(path / "steps.parquet", ["step"])["step"])
    assert check["examples"] == check["list_total"] == 200
    assert check["list_rows"] == len(parse(dom).keys) == 50  # one page of the list in the DOM
    assert check["opened"] == "q00150" and check["steps_rendered"] >= 17
    assert check["samples_rendered"] == 10 * min(check["steps_rendered"], 20)
    assert "not embedded" not in page.read_text()  # every continuation fits the budget
    assert check["page_width"] <= check["view_width"]
    print(
        f"\n200-question report: {n_steps} steps, {page.stat().st_size / 1e6:.2f} MB, "
        f"built in {build_s:.1f} s, script ready {check['load_ms']:.0f} ms after it started, "
        f"{check['nav_ms']:.0f} ms after navigation start"
    )


@needs_browser
def test_compare_page_shows_changed_questions_side_by_side(run, tmp_path):
    other = write_synthetic_run(tmp_path / "b", n_examples=12, seed=1, flip=0.4, ci=False)
    page = compare([run, other], tmp_path / "cmp")
    ex_a = read_table(run / "examples.parquet")
    ex_b = read_table(other / "examples.parquet")
    flipped = [
        e
        for e, a, b in zip(ex_a["example_id"], ex_a["correct"], ex_b["correct"], strict=True)
        if a != b
    ]
    assert flipped
    eid = flipped[0]
    dom, check, console = open_page(page.as_uri() + f"#q={eid}", tmp_path)
    assert console == [] and check["errors"] == []
    assert check["mode"] == "compare" and check["runs"] == 2 and check["examples"] == 12
    assert check["flipped"] == len(flipped)
    assert parse(dom).keys == list(ex_a["example_id"])
    n = [
        int(np.sum(np.asarray(read_table(r / "steps.parquet")["example_id"]) == eid))
        for r in (run, other)
    ]
    assert check["opened"] == eid and check["steps_rendered"] == sum(n)
    assert check["page_width"] <= check["view_width"]


@needs_browser
@pytest.mark.parametrize(
    "run_dir", [p for p in os.environ.get("FCJAX_BROWSER_RUNS", "").split(",") if p] or [None]
)
def test_report_of_a_real_run(run_dir, tmp_path):
    """The report of a finished real run (FCJAX_BROWSER_RUNS), e.g. the README demo."""
    if run_dir is None:
        pytest.skip("FCJAX_BROWSER_RUNS names no finished run")
    src = Path(run_dir)
    dst = tmp_path / src.name
    for name in (
        "summary.json",
        "examples.parquet",
        "steps.parquet",
        "sampling_samples.parquet",
        "probes/layers.parquet",
    ):
        if (src / name).exists():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src / name, dst / name)
    write_report(dst)
    examples = read_table(dst / "examples.parquet")
    eid = next(e for e, n in zip(examples["example_id"], examples["n_steps"], strict=True) if n)
    dom, check, console = open_page((dst / "report.html").as_uri() + f"#ex={eid}", tmp_path)
    assert console == [] and check["errors"] == []
    assert parse(dom).keys == list(examples["example_id"])[:50]
    assert check["opened"] == eid and check["steps_rendered"] > 0 and check["step_values"] > 0
    assert check["page_width"] <= check["view_width"]
