"""Console output of the experiment CLIs: quiet unless ``--verbosity`` asks for more.

Quiet (``quiet()`` called by a CLI's ``main`` when ``--verbosity`` was not given): log
records below WARNING are off (orbax's, absl's, JAX's "Unable to initialize backend",
matplotlib's font cache), except the ``fcjax`` logger's (a model download says so), and so
are transformers' advisory warnings; other warnings still show. Each stage prints one line
when it ends, with its counts, rate and wall time; while it runs, a bar with counts, rate
and ETA is redrawn in place where stderr is a terminal, and elsewhere a progress line is
printed every ``QUIET_EVERY`` seconds of a long
stage. With ``--verbosity=N`` (or outside a CLI): absl's levels as given, every library's
records included, and progress as INFO records every few seconds.
"""

from __future__ import annotations

import logging as std_logging
import os
import sys
import time
from typing import Any

from absl import flags, logging

# seconds between the progress lines of a long stage when stderr is not a terminal
QUIET_EVERY = 60.0
# seconds between redraws of the bar on a terminal
BAR_EVERY = 0.2
BAR_WIDTH = 20

_quiet = False
_stage: Stage | None = None
_bar_shown = False
_shown_at = 0.0  # when progress was last shown (quiet)


def quiet(stream=None) -> bool:
    """Quiets the console unless ``--verbosity`` was given; returns whether it did. Call it
    in ``main``, once flags are parsed (``stream``: where progress goes, default stderr)."""
    global _quiet, _stream
    _stream = stream
    if flags.FLAGS["verbosity"].present:
        return False
    _quiet = True
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")  # e.g. "PyTorch was not found"
    logging.set_verbosity(logging.WARNING)
    std_logging.getLogger("fcjax").setLevel(std_logging.INFO)
    std_logging.getLogger("matplotlib.font_manager").setLevel(std_logging.ERROR)
    logging.get_absl_handler().addFilter(_ClearBar())
    return True


def is_quiet() -> bool:
    return _quiet


def reset() -> None:
    """Back to the verbose default (for tests)."""
    global _quiet, _stage
    _quiet, _stage = False, None
    logging.get_absl_handler().filters[:] = [
        f for f in logging.get_absl_handler().filters if not isinstance(f, _ClearBar)
    ]


_stream = None


def _out():
    return _stream or sys.stderr


def _tty() -> bool:
    isatty = getattr(_out(), "isatty", None)
    return bool(isatty and isatty())


class _ClearBar(std_logging.Filter):
    """Removes the bar before a log record is printed, so the record gets its own line."""

    def filter(self, record) -> bool:
        _clear_bar()
        return True


def _clear_bar() -> None:
    global _bar_shown
    if _bar_shown:
        _out().write("\r\x1b[K")
        _out().flush()
        _bar_shown = False


def _line(text: str) -> None:
    _clear_bar()
    _out().write(text + "\n")
    _out().flush()


def _bar(text: str) -> None:
    global _bar_shown
    _out().write("\r\x1b[K" + text)
    _out().flush()
    _bar_shown = True


class Stage:
    """One stage's console line (a context manager around the stage): quiet, it prints the
    stage's counts, rate and wall time when the stage ends; verbose, nothing (the stage
    logs its own start and end)."""

    def __init__(self, name: str, skipped: bool = False):
        self.name, self.skipped = name, skipped
        self.progress: list[Any] = []  # the stage's Progress objects, in order

    def __enter__(self) -> Stage:
        global _stage
        _stage, self.start = self, time.perf_counter()
        return self

    def __exit__(self, kind, value, tb) -> None:
        global _stage
        _stage = None
        if not _quiet:
            return
        if kind is not None:
            _clear_bar()
            return
        if self.skipped:
            _line(f"{self.name}: complete, skipped")
            return
        wall = time.perf_counter() - self.start
        _line(f"{self.name}: {self.counts() or 'done '}in {wall:.1f}s")

    def counts(self) -> str:
        ps = self.progress
        if not ps:
            return ""
        if len(ps) == 1:
            p = ps[0]
            rate = p.done / max(time.perf_counter() - p.start, 1e-9)
            return f"{p.done}/{p.total} {p.unit} ({rate:.2f}/s) "
        # several (e.g. one per estimator): each by its label's last word
        each = ", ".join(f"{p.stage.split()[-1]} {p.done}/{p.total}" for p in ps)
        return f"{each} {ps[0].unit} "


def progress(p, tokens: str = "", final: bool = False) -> None:
    """Shows ``p`` (an ``experiments.rundir.Progress``): its done/total, rate and ETA, and
    ``tokens`` (the current call's tokens, while a model call runs). Throttled by ``p.last``;
    ``final``: its last update."""
    now = time.perf_counter()
    if _stage is not None and p not in _stage.progress:
        _stage.progress.append(p)
    rate = p.done / max(now - p.start, 1e-9)
    eta = (p.total - p.done) / rate if rate > 0 else float("inf")
    if not _quiet:
        if now - p.last >= p.every or (final and not tokens):
            p.last = now
            logging.info("%s", _text(p, rate, eta, tokens))
        return
    global _shown_at
    if _tty():
        if not _bar_shown or now - _shown_at >= BAR_EVERY:
            _shown_at = now
            _bar(_text(p, rate, eta, tokens, bar=True))
    elif now - max(_shown_at, p.start) >= QUIET_EVERY and not final:
        _shown_at = now
        _line(_text(p, rate, eta, tokens))


def _text(p, rate: float, eta: float, tokens: str, bar: bool = False) -> str:
    head = f"{p.stage}: "
    if bar:
        filled = int(BAR_WIDTH * p.done / p.total) if p.total else BAR_WIDTH
        head += f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] "
    text = f"{head}{p.done}/{p.total} {p.unit} ({rate:.2f}/s, ETA {_eta(eta)})"
    return f"{text}, {tokens}" if tokens else text


def _eta(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.0f}min"
