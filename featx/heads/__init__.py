"""Heads on frozen features: sklearn pipelines, CV search, torch solvers, calibration, the safe head file."""
from __future__ import annotations

from .fit import FitResult, FitSettings, fit_head
from .pipelines import HEADS, SPECS, make_estimator
from .store import DEFAULT_HEAD_PATH, TRUSTED_TYPES, Head, load_head, save_head

__all__ = [
    "HEADS",
    "SPECS",
    "DEFAULT_HEAD_PATH",
    "TRUSTED_TYPES",
    "FitResult",
    "FitSettings",
    "Head",
    "fit_head",
    "load_head",
    "save_head",
    "make_estimator",
]
