"""Stage ``report``: ``report.html`` and ``plots/`` (``experiments.report``; process 0)."""

from __future__ import annotations

from experiments.stages.context import Context


def run(ctx: Context) -> dict:
    from experiments.report import write_report

    write_report(ctx.run.path)
    return {}
