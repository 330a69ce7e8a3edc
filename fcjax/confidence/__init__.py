"""Intrinsic confidence estimators, one module each, behind one plug-in contract (base)."""

from fcjax.confidence.agreement import AnswerAgreement, semantic_entropy
from fcjax.confidence.base import (
    REGISTRY,
    Estimator,
    EstimatorContext,
    EstimatorError,
    available_estimators,
    get_estimator,
    register,
    run_estimators,
)
from fcjax.confidence.consistency_judge import (
    UNPARSED_VALUE,
    build_consistency_prompt,
    consistency_score,
    parse_verdict,
)
from fcjax.confidence.deepconf import DeepConf
from fcjax.confidence.forcing import AnswerForcing
from fcjax.confidence.rcc import RCC
from fcjax.confidence.sampling import SamplingConsistency
from fcjax.confidence.trace import Trace, TraceError, build_trace, prefix_tokens
from fcjax.metrics.summary import trace_confidence

__all__ = [
    "RCC",
    "REGISTRY",
    "UNPARSED_VALUE",
    "AnswerAgreement",
    "AnswerForcing",
    "DeepConf",
    "Estimator",
    "EstimatorContext",
    "EstimatorError",
    "SamplingConsistency",
    "Trace",
    "TraceError",
    "available_estimators",
    "build_consistency_prompt",
    "build_trace",
    "consistency_score",
    "get_estimator",
    "parse_verdict",
    "prefix_tokens",
    "register",
    "run_estimators",
    "semantic_entropy",
    "trace_confidence",
]
