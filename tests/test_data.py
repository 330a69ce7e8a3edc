"""fcjax.data: JSONL validation, shared datasets, arithmetic generator, prompts."""

from __future__ import annotations

import dataclasses
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from fcjax.data import arithmetic, datasets, interventions, prompts
from fcjax.data.datasets import DataError, Example, load_dataset, load_jsonl

GOOD = {"id": "q1", "question": "What is 2+2?", "choices": None, "answer": "4", "source": "t"}
MC = {"id": "q2", "question": "Pick one.", "choices": ["x", "y", "z"], "answer": "B"}


def write(tmp_path: Path, lines: list[str], name: str = "set.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def row(**kw) -> str:
    return json.dumps({**GOOD, **kw})


# ----------------------------------------------------------------------------- load_jsonl


def test_load_jsonl_good_rows_and_blank_lines(tmp_path):
    path = write(
        tmp_path,
        [row(), "", "   ", json.dumps(MC), json.dumps({**GOOD, "id": "q3", "answer": "Yes"})],
    )
    ex = load_jsonl(path)
    assert [e.id for e in ex] == ["q1", "q2", "q3"]
    assert [e.kind for e in ex] == ["numeric", "letter", "yesno"]
    assert ex[1].choices == ("x", "y", "z") and ex[1].answer == "B"
    assert ex[0].choices is None and ex[0].source == "t"
    assert ex[1].source == "set.jsonl"  # no source field: the file name


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        load_jsonl(tmp_path / "nope.jsonl")


def test_empty_file(tmp_path):
    path = write(tmp_path, ["", "  "], name="empty.jsonl")
    with pytest.raises(DataError, match=r"empty\.jsonl.*empty file"):
        load_jsonl(path)


def test_malformed_json_names_line(tmp_path):
    path = write(tmp_path, [row(), row(id="b"), "", "{not json"], name="gsm8k.jsonl")
    with pytest.raises(DataError, match=r"gsm8k\.jsonl line 4: malformed JSON \(Expecting"):
        load_jsonl(path)


def test_not_an_object(tmp_path):
    path = write(tmp_path, [row(), "[1, 2]"])
    with pytest.raises(DataError, match=r"set\.jsonl line 2: expected a JSON object, got list"):
        load_jsonl(path)


@pytest.mark.parametrize("field", ["id", "question", "answer"])
def test_missing_field(tmp_path, field):
    bad = {k: v for k, v in GOOD.items() if k != field}
    path = write(tmp_path, [row(id="a"), json.dumps(bad)])
    with pytest.raises(DataError, match=rf"set\.jsonl line 2: missing field '{field}'"):
        load_jsonl(path)


@pytest.mark.parametrize("field", ["id", "question", "answer"])
def test_null_field_is_missing(tmp_path, field):
    path = write(tmp_path, [row(id="a"), json.dumps({**GOOD, "id": "b", field: None})])
    with pytest.raises(DataError, match=rf"^set\.jsonl line 2: missing field '{field}'$"):
        load_jsonl(path)


def test_not_utf8_names_the_file(tmp_path):
    path = tmp_path / "binary.jsonl"
    path.write_bytes(b'\xff\xfe{"id": "a"}\n')
    with pytest.raises(DataError, match=r"binary\.jsonl: not UTF-8 text"):
        load_jsonl(path)


def test_empty_question(tmp_path):
    path = write(tmp_path, [row(question="  \n")])
    with pytest.raises(DataError, match=r"set\.jsonl line 1: field 'question' is empty"):
        load_jsonl(path)


@pytest.mark.parametrize("answer", ["D", "AB", "1"])
def test_answer_letter_outside_choices(tmp_path, answer):
    path = write(tmp_path, [row(), json.dumps({**MC, "answer": answer})])
    with pytest.raises(DataError, match=r"set\.jsonl line 2: field 'answer' .* not a letter"):
        load_jsonl(path)


def test_duplicate_ids_name_both_lines(tmp_path):
    path = write(tmp_path, [row(id="a"), row(id="b"), "", row(id="a")])
    with pytest.raises(DataError, match=r"set\.jsonl line 4: field 'id' 'a' duplicates line 1"):
        load_jsonl(path)


def test_declared_kind_must_fit(tmp_path):
    path = write(tmp_path, [row(), row(id="b", answer="x^2")])
    with pytest.raises(DataError, match=r"line 2: field 'answer' 'x\^2' is not a number"):
        load_jsonl(path, kind="numeric")
    with pytest.raises(DataError, match=r"line 1: field 'choices' is null"):
        load_jsonl(path, kind="letter")


# ----------------------------------------------------------------------------- shared sets

EXPECTED = {
    "gsm8k": (1000, "numeric"),
    "math500": (500, "math"),
    "aime": (933, "numeric"),
    "lsat_ar": (230, "letter"),
    "lsat_lr": (510, "letter"),
    "strategyqa": (1000, "yesno"),
    "logical_deduction_three": (300, "letter"),
    "logical_deduction_five": (500, "letter"),
    "logical_deduction_seven": (700, "letter"),
    "legalbench": (954, "yesno"),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_shared_datasets(name):
    count, kind = EXPECTED[name]
    ex = load_dataset(name)
    assert len(ex) == count
    assert {e.kind for e in ex} == {kind}
    assert len({e.id for e in ex}) == count
    for e in ex:
        if kind == "letter":
            assert e.answer in "ABCDEFG"[: len(e.choices)]
        else:
            assert e.choices is None
    if name.startswith("logical_deduction"):
        n_obj = {"three": 3, "five": 5, "seven": 7}[name.rsplit("_", 1)[1]]
        assert {len(e.choices) for e in ex} == {n_obj}


def test_data_dir_env(tmp_path, monkeypatch):
    write(tmp_path, [row()], name="gsm8k_test.jsonl")
    monkeypatch.setenv("FCJAX_DATA", str(tmp_path))
    assert [e.id for e in load_dataset("gsm8k")] == ["q1"]
    monkeypatch.setenv("FCJAX_DATA", str(tmp_path / "missing"))
    with pytest.raises(DataError, match="FCJAX_DATA"):
        load_dataset("gsm8k")


def test_subset_seeded_and_ordered():
    full = load_dataset("strategyqa")
    a = load_dataset("strategyqa", num_examples=50, seed=3)
    b = load_dataset("strategyqa", num_examples=50, seed=3)
    c = load_dataset("strategyqa", num_examples=50, seed=4)
    assert a == b and a != c and len(a) == 50
    pos = [full.index(e) for e in a]
    assert pos == sorted(pos)
    assert load_dataset("strategyqa", num_examples=5, seed=None) == full[:5]


def test_unknown_name_and_bad_args(tmp_path):
    with pytest.raises(ValueError, match=r"unknown dataset 'nope'; valid names: .*gsm8k"):
        load_dataset("nope")
    with pytest.raises(ValueError, match="exactly one"):
        load_dataset()
    path = write(tmp_path, [row()])
    assert load_dataset(path=path)[0].answer == "4"


def test_hub_sets_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    for name in datasets.HUB_SETS:
        with pytest.raises(DataError, match=rf"{name}.*needs the `datasets` package"):
            load_dataset(name)


def fake_hub(monkeypatch, load):
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load))


def test_hub_unreachable_is_clear(monkeypatch):
    def load(repo, config, split):
        raise ConnectionError("offline")

    fake_hub(monkeypatch, load)
    with pytest.raises(DataError, match=r"could not load cais/hle .*ConnectionError: offline"):
        load_dataset("hle_text")


def test_hub_row_mapping(monkeypatch):
    rows = {
        "murder_mysteries": [
            {"narrative": "N.", "question": "Who?", "choices": "['Ann', 'Bob']", "answer_index": 1},
        ],
        "object_placements": [],
        "team_allocation": [],
    }
    fake_hub(monkeypatch, lambda repo, config, split: rows[split])
    (ex,) = load_dataset("musr")
    assert ex.question == "N.\n\nQuestion: Who?" and ex.choices == ("Ann", "Bob")
    assert ex.answer == "B" and ex.kind == "letter"

    hle = [
        {"id": "a", "question": "Q1", "image": "", "answer": "7"},
        {"id": "b", "question": "Q2", "image": "data:...", "answer": "1"},
        {"id": "c", "question": "Q3", "answer": "B", "answer_type": "multipleChoice"},
    ]
    fake_hub(monkeypatch, lambda repo, config, split: hle)
    kept = load_dataset("hle_text")
    assert [e.id for e in kept] == ["hle-a", "hle-c"]  # image rows dropped
    assert [e.answer_type for e in kept] == ["exactMatch", "multipleChoice"]


# ----------------------------------------------------------------------------- arithmetic


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4, 5])
def test_arithmetic_gold_matches_expression(difficulty):
    level = arithmetic.LEVELS[difficulty]
    rng = np.random.default_rng(difficulty)
    for _ in range(200):
        question, answer, expression = arithmetic.generate_problem(rng, difficulty)
        assert eval(expression, {"__builtins__": {}}) == answer  # independent recomputation
        assert isinstance(answer, int) and answer >= 0
        assert expression.count("(") == level.n_ops
        numbers = [
            int(t) for t in expression.replace("(", " ").replace(")", " ").split() if t.isdigit()
        ]
        assert all(str(n) in question for n in numbers)
        assert max(numbers) <= max(level.max_operand, level.max_factor)
        used = {op for op, sym in (("mul", " * "), ("div", " // ")) if sym in expression}
        assert used <= set(level.ops)


def test_arithmetic_difficulty_one_is_single_small_add_or_sub():
    for e in arithmetic.generate(50, 1, seed=0):
        nums = [int(t.strip(".")) for t in e.question.split() if t.strip(".").isdigit()]
        assert len(nums) == 2 and max(nums) <= 10
        assert int(e.answer) in (nums[0] + nums[1], nums[0] - nums[1])


def test_arithmetic_deterministic_and_stable_ids():
    a = arithmetic.generate(20, 2, seed=0)
    assert a == arithmetic.generate(20, 2, seed=0)
    assert arithmetic.generate(5, 2, seed=0) == a[:5]  # index-stable, not count-dependent
    b = arithmetic.generate(20, 2, seed=1)
    assert [e.question for e in a] != [e.question for e in b]
    assert a[7].id == "arith-d2-s0-0007" and b[7].id == "arith-d2-s1-0007"
    assert all(e.kind == "numeric" and e.choices is None for e in a)
    assert len({e.question for e in arithmetic.generate(100, 3)}) > 90
    via_registry = load_dataset("arithmetic", num_examples=20, seed=0, difficulty=2)
    assert via_registry == a


def test_arithmetic_templates_vary():
    nouns = {t.noun for t in arithmetic.THEMES}
    seen = {n for e in arithmetic.generate(100, 1) for n in nouns if n in e.question}
    assert len(seen) >= 4


def test_arithmetic_bad_difficulty():
    with pytest.raises(ValueError, match="difficulty must be one of"):
        arithmetic.generate(3, 9)


# ----------------------------------------------------------------------------- prompts


def mc_example() -> Example:
    return Example("m", "Which?", ("red", "blue"), "B", "letter", "t")


def test_build_messages_inline_and_system():
    ex = mc_example()
    text = interventions.INTERVENTIONS["self_monitoring"]
    (user,) = prompts.build_messages(ex, "self_monitoring", role="user")
    assert user["role"] == "user"
    assert "Which?\n\nA. red\nB. blue" in user["content"]
    assert "Final answer: <letter>" in user["content"]
    assert user["content"].startswith(text + "\n\nWhich?")  # the intervention comes first

    system, user2 = prompts.build_messages(ex, "self_monitoring", role="system")
    assert system == {"role": "system", "content": text}
    assert text not in user2["content"] and "A. red" in user2["content"]

    (blank,) = prompts.build_messages(ex)  # blank: no intervention, no system message
    assert blank["content"] == user2["content"]


def test_build_messages_kinds_and_extra_text(tmp_path):
    ex = Example("n", "What is 1+1?", None, "2", "numeric", "t")
    (m,) = prompts.build_messages(ex, extra_text="Be brief.")
    assert "\\boxed{}" in m["content"] and m["content"].endswith("Be brief.")
    assert "A." not in m["content"]
    custom = tmp_path / "my.txt"
    custom.write_text("  Say how sure you are.\n")
    (m2,) = prompts.build_messages(ex, str(custom))
    assert m2["content"].startswith("Say how sure you are.\n\nWhat is 1+1?")
    with pytest.raises(ValueError, match="role"):
        prompts.build_messages(ex, role="assistant")


def test_format_plain():
    msgs = prompts.build_messages(mc_example(), "genuine", role="system")
    text = prompts.format_plain(msgs)
    assert text.startswith("System: " + interventions.INTERVENTIONS["genuine"])
    assert "\n\nUser: Which?" in text and text.endswith("\n\nAssistant:")


def test_interventions_registry(tmp_path):
    names = [
        "blank",
        "basic",
        "genuine",
        "human",
        "perception",
        "self_monitoring",
        "self_correction",
        "evidence_gap",
        "ms_hedge",
    ]
    assert list(interventions.INTERVENTIONS) == names
    assert interventions.get_intervention("blank") == ""
    assert all(interventions.get_intervention(n) for n in names[1:])
    ms = interventions.get_intervention("ms_hedge")
    for phrase, value in interventions.CALIBRATED_PHRASES.items():
        assert f'"{phrase}": {value:.4f}' in ms
    assert interventions.CALIBRATED_PHRASES["almost certain"] == 0.9204
    assert interventions.CALIBRATED_PHRASES["improbable"] == 0.1677
    assert len(interventions.CALIBRATED_PHRASES) == 17
    with pytest.raises(ValueError, match=r"unknown intervention 'hedgy'.*valid names: blank"):
        interventions.get_intervention("hedgy")
    empty = tmp_path / "e.txt"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        interventions.get_intervention(str(empty))


def test_data_dir_not_found(tmp_path, monkeypatch):
    monkeypatch.delenv("FCJAX_DATA", raising=False)
    monkeypatch.setattr(datasets, "__file__", str(tmp_path / "a" / "b" / "datasets.py"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"data directory not found .*set FCJAX_DATA"):
        load_dataset("aime")


def test_paper_prompt_multiple_choice_exactly():
    ex = Example("m", "Which colour is the sky?", ("red", "blue", "green"), "B", "letter", "t")
    (m,) = prompts.build_messages(ex, style="paper")
    assert m == {
        "role": "user",
        "content": (
            "Which colour is the sky?\n1. red\n2. blue\n3. green\n "
            "Give your answer as one of the answer options, 1-3. Put it in \\boxed{}, after "
            "thinking. Use no more than 20-30 steps (paragraphs). <think>\n"
        ),
    }
    musr = dataclasses.replace(ex, source="TAUR-Lab/MuSR")  # two newlines before the options
    assert prompts.build_messages(musr, style="paper")[0]["content"].startswith(
        "Which colour is the sky?\n\n1. red\n"
    )


def test_paper_prompt_per_dataset_instruction():
    """AIME: an integer 0-999, step by step; yes/no; HLE multiple choice vs exact match;
    every prompt ends with the length cap and a literal "<think>" line."""
    cases = {
        ("42", "numeric", "aime_1983_2024.jsonl", None): ("integer from 0 to 999", "step by step"),
        ("Yes", "yesno", "legalbench_yesno.jsonl", None): ("Reply Yes or No",),
        ("B", "math", "cais/hle", "multipleChoice"): ("only the letter or number",),
        ("7", "math", "cais/hle", "exactMatch"): ("Answer briefly",),
    }
    for (gold, kind, source, answer_type), needles in cases.items():
        ex = Example("x", "Q?", None, gold, kind, source, answer_type)
        (m,) = prompts.build_messages(ex, "basic", style="paper")
        text = m["content"]
        assert text.startswith(interventions.PAPER_INTERVENTIONS["basic"] + "\n\nQ?\n ")
        assert text.endswith("Use no more than 20-30 steps (paragraphs). <think>\n")
        for needle in needles:
            assert needle in text, (source, needle)
    ex = Example("n", "What is 6 * 7?", None, "42", "numeric", "t")
    with pytest.raises(ValueError, match="style"):
        prompts.build_messages(ex, style="other")


def test_system_and_user_interventions_combine():
    """--system_intervention=ms_hedge --intervention=perception: the published msh_perc."""
    ex = Example("q", "Is water wet?", None, "Yes", "yesno", "t")
    system, user = prompts.build_messages(
        ex, "perception", system_intervention="ms_hedge", style="paper"
    )
    paper = interventions.PAPER_INTERVENTIONS
    assert system == {"role": "system", "content": paper["ms_hedge"]}
    assert user["role"] == "user"
    assert user["content"].startswith(paper["perception"] + "\n\nIs water")
    assert paper["ms_hedge"] not in user["content"]
    # a system intervention alone; two system prompts are refused
    system, user = prompts.build_messages(ex, system_intervention="ms_hedge")
    assert system["role"] == "system" and user["content"].startswith("Is water wet?")
    with pytest.raises(ValueError, match="two system prompts"):
        prompts.build_messages(ex, "perception", role="system", system_intervention="ms_hedge")
