"""The stage registry: what each stage owns, its removal on --redo, the split of a stage's
items over processes; and (with a tiny model) a redo with another seed equal to a fresh run."""

import json

import numpy as np
import pytest
from rundir_compare import assert_same_tables

from experiments.cluster import Processes
from experiments.config import AFFECTS, STAGES, Settings
from experiments.rundir import RunDir, RunError
from experiments.stages import REGISTRY, SPECS, part_owner
from experiments.stages.context import Context
from fcjax.store.hidden import read_hidden
from fcjax.store.tables import read_table, write_json_atomic, write_table_atomic


class Pretend(Processes):
    """Process ``index`` of ``count``, run in turn in this process: barriers and exchanges
    are no-ops."""

    def barrier(self, name):
        pass

    def exchange(self, name, payload):
        return [payload] * self.count


def test_every_stage_has_its_code_and_owned_outputs_are_consistent():
    from probes.train import FEATURES

    assert tuple(s.name for s in REGISTRY) == STAGES and set(AFFECTS.values()) <= set(STAGES)
    for st in REGISTRY:
        code = st.module()
        if st.split:
            assert callable(code.work) and callable(code.merge), st.name
        else:
            assert callable(code.run), st.name
    # the hidden stage owns the store of every probe feature kind
    assert {FEATURES[k] for k in FEATURES} <= set(SPECS["hidden"].files)
    assert part_owner("estimators_sampling_kept").name == "estimators"
    with pytest.raises(ValueError, match="belong to no stage"):
        part_owner("nonsense")


def _fake_finished_run(path) -> RunDir:
    """A run directory holding an output of every stage (no model involved)."""
    rd = RunDir(path)
    write_table_atomic(path / "examples.parquet", {"example_id": ["a", "b"], "correct": [1, 0]})
    write_table_atomic(path / "steps.parquet", {"example_id": ["a", "b"], "step": [0, 0]})
    rd.write_part("generate", 0, {"example_id": ["a", "b"]})
    rd.write_part("estimators_sampling", 0, {"example_id": ["a"], "step": [0]})
    rd.add_columns("estimators", "steps.parquet", {"conf_sampling": [0.5, 0.25]})
    write_table_atomic(path / "sampling_samples.parquet", {"example_id": ["a"]})
    for d in ("hidden", "hidden_mean", "probes", "plots"):
        write_json_atomic(path / d / "x.json", {})
    rd.add_columns("probes", "steps.parquet", {"conf_probe": [0.1, 0.2]})
    rd.add_columns("decisiveness", "steps.parquet", {"decisiveness": [1.0, 0.0]})
    rd.add_columns("metrics", "examples.parquet", {"faith_sampling": [0.5, 0.5]})
    write_json_atomic(path / "summary.json", {})
    (path / "report.html").write_text("<html>")
    for s in STAGES:
        rd.mark(s, {})
    return rd


def test_redo_removes_every_output_of_the_redone_stages(tmp_path):
    """--redo=estimators: the generate parts and segment's tables stay; every later stage's
    files (hidden/ and hidden_mean/ alike), parts, markers and columns are gone."""
    rd = _fake_finished_run(tmp_path)
    assert all(rd.started(s) for s in STAGES)
    rd.invalidate_from("estimators")
    assert [s for s in STAGES if rd.done(s)] == ["generate", "segment"]
    assert [s for s in STAGES if rd.started(s)] == ["generate", "segment"]
    for name in ("hidden", "hidden_mean", "probes", "plots", "summary.json", "report.html"):
        assert not (tmp_path / name).exists(), name
    assert not (tmp_path / "sampling_samples.parquet").exists()
    assert not (tmp_path / "stages" / "estimators_sampling").exists()
    assert rd.part_items("generate") == {"a", "b"}
    assert sorted(read_table(tmp_path / "steps.parquet")) == ["example_id", "step"]
    assert sorted(read_table(tmp_path / "examples.parquet")) == ["correct", "example_id"]
    rd.invalidate_from("generate")
    assert not any(rd.started(s) for s in STAGES)
    assert not (tmp_path / "steps.parquet").exists()


def test_outputs_are_written_by_their_owner_only(tmp_path):
    rd = RunDir(tmp_path)
    write_table_atomic(tmp_path / "steps.parquet", {"step": [0]})
    with pytest.raises(RunError, match=r"stage hidden adds no columns to steps\.parquet"):
        rd.add_columns("hidden", "steps.parquet", {"x": [1.0]})
    with pytest.raises(ValueError, match="belong to no stage"):
        rd.write_part("stray", 0, {"example_id": ["a"]})
    # a crash between the record and the write still leaves the column to remove
    rd.add_columns("metrics", "steps.parquet", {"faith_x": [1.0]})
    assert rd.recorded_columns("metrics") == {"steps.parquet": ["faith_x"]}


def test_items_are_split_over_processes_first_then_batched(tmp_path):
    """6 items, 2 processes, parts of 16: each process gets items (3 of equal cost each);
    a part is named by its first item's position; written items are not pending again."""
    settings = Settings(batch_size=16)
    items = [f"q{i}" for i in range(6)]
    ctxs = [Context(RunDir(tmp_path, i), settings, Pretend(i, 2)) for i in range(2)]
    shares = [c.my_parts("generate", items, str, lambda _: 1.0, 16) for c in ctxs]
    assert all(len(parts) == 1 and len(parts[0][1]) == 3 for parts in shares)
    got = sorted(x for parts in shares for _, chunk in parts for x in chunk)
    assert got == items
    for parts in shares:
        index, chunk = parts[0]
        assert items[index] == chunk[0]
    # process 1's part is written; a rerun splits only the 3 items left, both get work
    index, chunk = shares[1][0]
    ctxs[1].run.write_part("generate", index, {"example_id": chunk})
    again = [c.my_parts("generate", items, str, lambda _: 1.0, 2) for c in ctxs]
    left = sorted(x for parts in again for _, chunk in parts for x in chunk)
    assert left == sorted(set(items) - set(chunk)) and all(again)
    names = {i for parts in again for i, _ in parts} | {index}
    assert len(names) == sum(len(p) for p in again) + 1  # no part name used twice


# --- with a tiny model ----------------------------------------------------------------------


def _settings(model, data, **kw) -> Settings:
    base = dict(
        model=str(model),
        judge_model=str(model),
        data_path=str(data),
        num_examples=4,
        max_new_tokens=24,
        temperature=1.0,
        estimators=("deepconf", "probe"),
        folds=2,
        decisiveness="lexicon",
        batch_size=4,
        bootstrap=0,
        probe_features="mean",
    )
    return Settings(**{**base, **kw})


@pytest.mark.integration
def test_redo_generate_with_another_seed_equals_a_fresh_run(tmp_path):
    """--probe_features=mean, then --redo=generate with another seed: the step means in
    hidden_mean/ and the probe layer table are those of a fresh run with that seed (the
    examples are the same ids, so stale states would be kept as already stored)."""
    from tiny_models import build_tiny_chat

    from experiments.run import run

    model = build_tiny_chat(tmp_path / "model")
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {"id": f"q{i}", "question": f"What is {i} + {i + 3}?", "answer": str(2 * i + 3)}
            )
            + "\n"
            for i in range(4)
        )
    )
    redone, fresh = tmp_path / "redone", tmp_path / "fresh"
    run(_settings(model, data, seed=1), str(redone), stop_after="probes")
    before = read_hidden(redone / "hidden_mean")
    run(_settings(model, data, seed=2), str(redone), redo="generate", stop_after="probes")
    run(_settings(model, data, seed=2), str(fresh), stop_after="probes")
    (ia, sa), (ib, sb) = read_hidden(redone / "hidden_mean"), read_hidden(fresh / "hidden_mean")
    keys_a = list(zip(ia["example_id"], ia["step"].tolist(), strict=True))
    keys_b = list(zip(ib["example_id"], ib["step"].tolist(), strict=True))
    assert sorted(keys_a) == sorted(keys_b) and keys_a
    rows_b = {k: i for i, k in enumerate(keys_b)}
    np.testing.assert_array_equal(sa, sb[[rows_b[k] for k in keys_a]])
    assert not np.array_equal(before[1][: len(sb)], sb[: len(before[1])])  # the seed mattered
    assert_same_tables(redone / "probes", fresh / "probes", "layers.parquet", atol=0)
    assert_same_tables(redone, fresh, "steps.parquet", atol=0)
