"""Probes on step hidden states (linear and MLP, Optax): the streaming trainer the probe
stage uses (``probes.trainer``), the earlier in-memory trainer (``train_probes``,
``crossfit``), statistics, transfer across runs, Orbax checkpoints, and the ``probe``
confidence estimator (registered with ``fcjax.confidence`` on import)."""

from probes.checkpoint import Probe, load_probe, save_probe
from probes.crossfit import CrossfitResult, crossfit, fit_with_selection, group_folds
from probes.estimator import ProbeEstimator
from probes.model import (
    ProbeConfig,
    ProbeError,
    ProbeFit,
    ProbeParams,
    Standardizer,
    TooFewLabels,
    predict_proba,
    train_probes,
)

__all__ = [
    "CrossfitResult",
    "Probe",
    "ProbeConfig",
    "ProbeError",
    "ProbeEstimator",
    "ProbeFit",
    "ProbeParams",
    "Standardizer",
    "TooFewLabels",
    "crossfit",
    "fit_with_selection",
    "group_folds",
    "load_probe",
    "predict_proba",
    "save_probe",
    "train_probes",
]
