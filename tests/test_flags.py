"""``experiments.run`` flags: every bound and choice checked by absl validators when the
command line is parsed, errors naming the flag and what it allows, before any work."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from absl import flags
from child_env import child_env

from experiments import run as run_cli
from experiments.config import FIELDS, Settings
from experiments.rundir import RunError
from fcjax.models.decoder import DECODE_ATTENTION

ROOT = Path(__file__).resolve().parents[1]
FIELD = {f.name: f for f in FIELDS}


@pytest.fixture
def parse():
    """Parses experiments.run flags in-process (absl validators included); restores them."""
    values = run_cli.FLAGS

    def parse(*args: str):
        values.unparse_flags()
        return values(["run", "--out=/tmp/unused", *args])

    yield parse
    values.unparse_flags()


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--branch_top_p=0", r"--branch_top_p must be in \(0, 1\], got 0\.0"),
        ("--branch_top_p=1.5", r"--branch_top_p must be in \(0, 1\], got 1\.5"),
        ("--temperature=-0.1", r"--temperature must be >= 0, got -0\.1"),
        ("--branch_temperature=-1", r"--branch_temperature must be >= 0, got -1\.0"),
        ("--difficulty=9", r"--difficulty must be in \[1, 5\], got 9"),
        ("--k=0", r"--k must be >= 1, got 0"),
        ("--dtype=float64", r"--dtype=float64: value should be one of <float32\|bfloat16>"),
        (
            "--decode_attention=cuda",
            "--decode_attention=cuda: value should be one of <"
            + r"\|".join(DECODE_ATTENTION)
            + ">",
        ),
        (
            "--hidden_dtype=int8",
            r"--hidden_dtype=int8: value should be one of <bfloat16\|float16\|float32>",
        ),
        (
            "--segmenter=words",
            r"--segmenter=words: value should be one of <paragraph\|cue\|tokens\|paper>",
        ),
        ("--probe_family=linear,tree", r"--probe_family: unknown 'tree'; valid: linear, mlp"),
        ("--layers=1,x", r"--layers must be a comma-separated list of integers"),
        ("--estimators=deepconf,nope", r"--estimators: unknown 'nope'; valid: .*probe.*rcc"),
        ("--redo=nope", r"--redo: unknown stage 'nope'; valid: generate, segment, "),
        ("--intervention=nope", r"--intervention: unknown 'nope' \(and not a file\)"),
    ],
)
def test_bad_value_refused_when_parsed_naming_flag_and_allowed_values(parse, flag, message):
    with pytest.raises(flags.IllegalFlagValueError, match=message):
        parse(flag)


def test_good_bounds_accepted(parse):
    parse("--branch_top_p=1", "--temperature=0", "--branch_temperature=0", "--difficulty=5")
    s = run_cli.settings_from_flags()
    assert (s.branch_top_p, s.temperature, s.difficulty) == (1.0, 0.0, 5)


def test_command_line_lists_every_bad_flag_and_exits_2(parse, capsys):
    run_cli.FLAGS.unparse_flags()
    with pytest.raises(SystemExit) as e:
        run_cli.parse_flags(["run", "--out=x", "--k=0", "--branch_top_p=2", "--dataset=nope"])
    assert e.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "error: bad flags:"
    assert "  --k must be >= 1, got 0" in lines
    assert "  --branch_top_p must be in (0, 1], got 2.0" in lines
    assert any(line.startswith("  --dataset: unknown 'nope'; valid: ") for line in lines)


def test_choice_lists_are_the_librarys():
    from fcjax.data.arithmetic import LEVELS
    from fcjax.metrics._arrays import BINNINGS
    from fcjax.models.decoder import DECODE_ATTENTION
    from fcjax.protocol import PROTOCOLS
    from fcjax.store.hidden import DTYPES
    from fcjax.text.steps import SplitMethod
    from probes.train import FEATURES, LABELS
    from probes.trainer import FAMILIES

    def choices(name):
        return tuple(FIELD[name].metadata["choices"])

    assert choices("decode_attention") == tuple(DECODE_ATTENTION)
    assert choices("hidden_dtype") == tuple(DTYPES)
    assert choices("protocol") == tuple(PROTOCOLS)
    assert choices("segmenter") == typing.get_args(SplitMethod)
    assert choices("probe_label") == tuple(LABELS)
    assert choices("probe_family") == tuple(FAMILIES)
    assert set(choices("probe_features")) == set(FEATURES)
    assert choices("cmfg_binning") == ("", *BINNINGS)
    assert (FIELD["difficulty"].metadata["minimum"], FIELD["difficulty"].metadata["maximum"]) == (
        min(LEVELS),
        max(LEVELS),
    )


def test_library_run_refuses_bad_settings_before_touching_out(tmp_path):
    out = tmp_path / "run"
    bad = dataclasses.replace(
        Settings(), branch_top_p=0.0, temperature=-1.0, dtype="float64", estimators=("x",)
    )
    assert bad.errors() == [
        "--dtype must be one of 'float32', 'bfloat16', got 'float64'",
        "--temperature must be >= 0, got -1.0",
        "--estimators: unknown 'x'; valid: agreement, deepconf, forcing, probe, rcc, sampling",
        "--branch_top_p must be in (0, 1], got 0.0",
    ]
    with pytest.raises(RunError, match=r"(?s)bad settings:.*--temperature must be >= 0"):
        run_cli.run(bad, str(out))
    assert not out.exists()


@pytest.mark.integration
def test_bad_branch_top_p_fails_before_generation_writes_anything(tmp_path):
    """Otherwise good flags: without the check, generation would run and write its parts,
    and the bad value would surface when the estimators stage starts."""
    out = tmp_path / "run"
    env = child_env()
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    args = ["--model=random:tiny", "--num_examples=2", "--max_new_tokens=4"]
    args += ["--estimators=deepconf,sampling", "--decisiveness=lexicon", "--branch_top_p=0"]
    done = subprocess.run(
        [sys.executable, "-m", "experiments.run", f"--out={out}", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert "--branch_top_p must be in (0, 1], got 0.0" in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()
