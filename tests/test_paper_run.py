"""experiments.run under --protocol=paper on a tiny random model: the runner wires the
published subset, prompts, segmentation, step draw, judges and trajectory bins."""

import json

import numpy as np
import pytest
from tiny_models import build_tiny_chat

from experiments.run import run
from experiments.stages import Settings
from fcjax.data.datasets import load_jsonl, paper_subset
from fcjax.metrics.trajectory import trajectory_bin
from fcjax.store.tables import read_table
from fcjax.text.steps import paper_selection

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def paper_run(tmp_path_factory):
    model = build_tiny_chat(tmp_path_factory.mktemp("tinychat"))
    data = tmp_path_factory.mktemp("data") / "aime_small.jsonl"
    rows = [
        {"id": f"q{i}", "question": f"What is {i} + {i}?", "answer": str(2 * i), "source": "AIME"}
        for i in range(12)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path_factory.mktemp("run")
    settings = Settings(
        model=str(model),
        judge_model=str(model),
        decisiveness_model=str(model),
        data_path=str(data),
        num_examples=5,
        max_new_tokens=40,
        temperature=1.0,
        estimators=("deepconf", "rcc", "sampling"),
        k=2,
        max_steps=2,
        branch_new_tokens=8,
        decisiveness="judge",
        judge_batch=3,
        batch_size=16,
        seed=1,
        protocol="paper",
    )
    run(settings, str(out))
    return out, load_jsonl(data)


def test_paper_run_subset_prompt_and_scoring(paper_run):
    out, rows = paper_run
    ex = read_table(out / "examples.parquet")
    assert list(ex["example_id"]) == [rows[i].id for i in paper_subset(len(rows), 5, 42)]
    for prompt in ex["prompt"]:
        assert "integer from 0 to 999" in prompt and "(paragraphs). <think>\n" in prompt
    summary = json.loads((out / "summary.json").read_text())
    assert summary["protocol"] == "paper"
    scorable = np.asarray(ex["scorable"], bool)
    correct = np.asarray(ex["correct"], float)
    want = correct[scorable].mean() if scorable.any() else None
    assert summary["accuracy"] == (None if want is None else pytest.approx(want))
    notes = summary["counts"]["protocol_notes"]
    assert len(notes) == 2 and "Qwen/Qwen2.5-1.5B-Instruct" in notes[0]


def test_paper_run_steps_draw_and_bins(paper_run):
    out, _ = paper_run
    ex = read_table(out / "examples.parquet")
    steps = read_table(out / "steps.parquet")
    bins = trajectory_bin(np.asarray(steps["position"], float), closed="right")
    assert list(steps["trajectory_bin"]) == bins.tolist()
    chosen = paper_selection(list(ex["example_id"]), list(ex["n_steps"]), 2, 42)
    sampled = np.isfinite(np.asarray(steps["conf_sampling"], float))
    got: dict[str, list[int]] = {}
    for eid, step, s in zip(steps["example_id"], steps["step"], sampled, strict=True):
        if s:
            got.setdefault(str(eid), []).append(int(step))
    assert got == {k: v for k, v in chosen.items() if v}
    assert "decisiveness_judge" in steps
