"""Datasets, prompts and prompt interventions."""

from fcjax.data.arithmetic import generate_problem
from fcjax.data.datasets import DATASETS, DataError, Example, load_dataset, load_jsonl
from fcjax.data.interventions import CALIBRATED_PHRASES, INTERVENTIONS, get_intervention
from fcjax.data.prompts import build_messages, format_plain

__all__ = [
    "CALIBRATED_PHRASES",
    "DATASETS",
    "INTERVENTIONS",
    "DataError",
    "Example",
    "build_messages",
    "format_plain",
    "generate_problem",
    "get_intervention",
    "load_dataset",
    "load_jsonl",
]
