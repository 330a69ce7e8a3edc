"""Probes on step hidden states (linear and MLP, Optax).

``probes.trainer`` trains every layer and weight-decay candidate at once on minibatches
streamed from a row source (``probes.sources``: an array or a TensorStore dump);
``probes.streamfit`` selects weight decay, epochs and layer on an inner split, calibrates
(Platt) and cross-fits by question; ``probes.train`` is the run's probe stage and transfer
across runs; ``probes.stats`` the per-layer table; ``probes.checkpoint`` Orbax checkpoints;
``probes.common`` the shared errors, folds and log-loss. Importing ``probes`` registers the
``probe`` confidence estimator with ``fcjax.confidence``.
"""

from probes.checkpoint import Probe, ProbeParams, load_probe, save_probe
from probes.common import ProbeError, TooFewLabels, group_folds
from probes.estimator import ProbeEstimator
from probes.streamfit import Selected, SourceCrossfit, crossfit_source, fit_select
from probes.trainer import FAMILIES, Standardizer, TrainConfig

__all__ = [
    "FAMILIES",
    "Probe",
    "ProbeError",
    "ProbeEstimator",
    "ProbeParams",
    "Selected",
    "SourceCrossfit",
    "Standardizer",
    "TooFewLabels",
    "TrainConfig",
    "crossfit_source",
    "fit_select",
    "group_folds",
    "load_probe",
    "save_probe",
]
