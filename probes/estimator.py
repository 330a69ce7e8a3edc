"""Linear-probe confidence from hidden states at step ends (METHOD.md 4.4).

In a run, ``experiments.run`` computes ``conf_probe`` by cross-fitting (stages ``hidden`` and
``probes``, see ``probes.train``), so every step is scored by a probe that never saw its
question. This estimator scores *new* traces with a probe saved by an earlier run
(``DIR/probes/ckpt``): it captures the probe's layer at each step's last token. It registers
as ``"probe"`` with ``fcjax.confidence`` when ``probes`` is imported.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fcjax.confidence.base import Columns, Estimator, EstimatorContext, EstimatorError, register
from fcjax.confidence.trace import Trace
from probes.checkpoint import load_probe


@register
class ProbeEstimator(Estimator):
    name = "probe"
    trace_reduce = "last"

    def __init__(self, checkpoint: str | None = None):
        self.checkpoint = checkpoint

    def score(self, traces: Sequence[Trace], ctx: EstimatorContext) -> list[Columns]:
        if self.checkpoint is None:
            raise EstimatorError(
                "probe: pass checkpoint=DIR/probes/ckpt of a trained probe (in a run, the "
                "cross-fitted probe comes from the 'hidden' and 'probes' stages)"
            )
        from fcjax.engine.capture import capture

        probe = load_probe(self.checkpoint)
        if probe.features != "end":
            raise EstimatorError(
                f"probe: {self.checkpoint} uses {probe.features!r} features; this estimator "
                "captures step-end states only (score such runs with probes.train)"
            )
        ends = [[len(tr.prompt_ids) + s.token_end - 1 for s in tr.steps] for tr in traces]
        seqs = [tr.prompt_ids + tr.output_ids for tr in traces]
        caps = capture(ctx.lm, seqs, ends, [probe.layer_id])  # batched over the traces
        out = []
        for cap, e in zip(caps, ends, strict=True):
            conf = probe.predict_proba(cap.states[:, 0]) if e else np.zeros(0)
            out.append({self.column: np.asarray(conf, np.float64)})
            ctx.report(self.name, len(out), len(traces))
        return out
