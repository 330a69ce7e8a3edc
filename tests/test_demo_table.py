"""The CI check that README.md shows the table `./dev demo` printed (.ci/check_demo_table.py)."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_demo_table", ROOT / ".ci/check_demo_table.py")
check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check)

TABLE = """8 examples, accuracy 0.125
estimator   mean C     MFG    cMFG   cMFG*     ECE   Brier   AUROC
deepconf     0.443   0.543   0.516   0.561   0.318   0.211   0.857
probe        0.131   0.200   0.456   0.358   0.206   0.209   0.500
report: runs/demo/report.html"""

README = f"""# fcjax

## What a run prints and writes

On a 2-core CPU:

```
{TABLE}
```

Measured with `./dev demo`.
"""

PRINTED = f"""setup: creating .venv
generate: 8/8 examples (0.30/s) in 26.0s
report: 0.2s
{TABLE}
"""


def test_extracts_the_table_from_the_readme_and_from_the_output():
    assert check.extract_table(README) == TABLE.splitlines()
    assert check.extract_table(PRINTED) == TABLE.splitlines()
    assert check.extract_table("no table here\nreport: x") is None


def test_the_same_table_passes():
    assert check.compare(PRINTED, README) == []


def test_a_differing_number_fails_with_a_diff():
    changed = PRINTED.replace("0.131", "0.380")
    problems = check.compare(changed, README)
    assert problems and "differs" in problems[0]
    assert any(line.startswith("-probe        0.131") for line in problems)
    assert any(line.startswith("+probe        0.380") for line in problems)


def test_a_missing_row_or_table_fails():
    row = next(line for line in TABLE.splitlines() if line.startswith("deepconf"))
    dropped = PRINTED.replace(row + "\n", "")
    assert dropped != PRINTED
    assert check.compare(dropped, README)
    assert "no table" in check.compare("error: bad flags", README)[0]
    assert "README.md holds no demo table" in check.compare(PRINTED, "# fcjax\n")[0]


def test_the_table_is_what_the_runner_prints(tmp_path):
    """The extraction reads the runner's own format (``experiments.run.format_summary``)."""
    from experiments.run import format_summary

    s = {
        "n_examples": 8,
        "accuracy": 0.125,
        "estimators": {
            "deepconf": {k: 0.5 for k in ("mean_conf", "mfg", "cmfg", "cmfg_star", "ece")}
            | {"brier": 0.25, "auroc": None}
        },
    }
    (tmp_path / "summary.json").write_text(json.dumps(s))
    printed = "stage lines\n" + format_summary(tmp_path / "summary.json") + "\n"
    table = check.extract_table(printed)
    assert table is not None and table[0] == "8 examples, accuracy 0.125"
    assert table[-1] == f"report: {tmp_path / 'report.html'}"
    assert table[2].split() == ["deepconf", *["0.500"] * 5, "0.250", "-"]


def test_the_command_line_exits_1_on_a_difference(tmp_path):
    (tmp_path / "README.md").write_text(README)
    (tmp_path / "same.txt").write_text(PRINTED)
    (tmp_path / "other.txt").write_text(PRINTED.replace("0.857", "0.143"))
    assert check.main(["x", str(tmp_path / "same.txt"), str(tmp_path / "README.md")]) == 0
    assert check.main(["x", str(tmp_path / "other.txt"), str(tmp_path / "README.md")]) == 1
