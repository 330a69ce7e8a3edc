"""The CLIs' console (experiments/logs.py): quiet by default, everything with --verbosity."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # each test runs a CLI's console in another process

ROOT = Path(__file__).resolve().parents[1]

# a CLI's main: flags parsed, the console set up, then what a run logs and its progress
DRIVER = r"""
import io, logging, sys
from absl import app, flags
from absl import logging as absl_logging
from experiments import logs
from experiments.rundir import Progress

class Terminal(io.StringIO):
    def isatty(self):
        return True

def main(argv):
    term = Terminal() if argv[1:] == ["tty"] else None
    logs.quiet(term)
    absl_logging.info("orbax-like absl INFO record")
    logging.getLogger("jax._src.xla_bridge").info("Unable to initialize backend 'tpu'")
    logging.getLogger("matplotlib.font_manager").warning("Matplotlib is building the font cache")
    logging.getLogger("fcjax").info("fetching a model part")
    logging.getLogger("orbax").warning("a third-party warning")
    with logs.Stage("generate"):
        p = Progress("generate", 3)
        p.tokens(3)(10, 100)
        for _ in range(3):
            p.update()
    with logs.Stage("estimators"):
        for name in ("deepconf", "rcc"):
            p = Progress(f"estimator {name}", 2, "traces")
            p.update(2)
    with logs.Stage("segment"):
        pass
    with logs.Stage("metrics", skipped=True):
        pass
    if term is not None:
        sys.stderr.write("TERMINAL:" + repr(term.getvalue()))

app.run(main)
"""


def _run(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, *args],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def test_quiet_by_default_one_line_per_stage_warnings_kept():
    err = _run()
    lines = err.splitlines()
    for noise in ("orbax-like absl INFO", "Unable to initialize backend", "font cache"):
        assert noise not in err, noise
    assert any("a third-party warning" in line for line in lines)  # warnings still shown
    assert any("fetching a model part" in line for line in lines)  # fcjax's own INFO
    stage_lines = [line for line in lines if not line.startswith(("W", "I"))]
    assert len(stage_lines) == 4, err
    assert stage_lines[0].startswith("generate: 3/3 examples (")
    assert stage_lines[0].endswith("s") and "/s) in " in stage_lines[0]
    assert stage_lines[1].startswith("estimators: deepconf 2/2, rcc 2/2 traces in ")
    assert stage_lines[2].startswith("segment: done in ")
    assert stage_lines[3] == "metrics: complete, skipped"


def test_verbosity_shows_every_record_and_progress_as_info():
    err = _run("--verbosity=0")
    for record in ("orbax-like absl INFO", "Unable to initialize backend", "font cache"):
        assert record in err, record
    assert "generate: 3/3 examples (" in err and "ETA 0s" in err
    assert "skipped" not in err  # the stages themselves log their start and end


def test_a_terminal_gets_a_bar_with_rate_and_eta():
    err = _run("tty")
    term = err.split("TERMINAL:", 1)[1]
    assert "\\r\\x1b[K" in term  # redrawn in place
    assert "generate: [" in term and "ETA" in term
    assert "generate: 3/3 examples (" in term and "metrics: complete, skipped\\n" in term
