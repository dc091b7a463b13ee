"""`featx.compare()`: is transfer learning worth it on my images? Frozen-feature heads vs fine-tuning vs scratch CNNs.

Every method sees the same train/validation split (``featx.data.split``: the folder's val/, else one stratified,
seeded hold-out of train), so the table compares methods, not splits. The run folder ``runs/compare/<name>`` gets
``report.md``, ``accuracy.png``, ``results.json`` and the sub-runs (features + heads, the finetune run, the scratch
runs), each usable on its own with `featx predict`. With ``shots`` the same methods also run on k images per class
drawn from the training split, and ``learning_curve.png`` shows accuracy against images per class (``shots.py``).

Modules, each importing only those listed after it: ``core`` (the run), ``shots`` (subsets and the curve),
``methods`` (heads, fine-tuning, scratch; the budget), ``render`` (report.md, results.json, charts), ``types``
(settings, rows, the curve, the result: what the others pass between them).
"""
from __future__ import annotations

from .core import compare
from .types import CompareResult, CompareSettings, Curve, MethodResult, ShotRun

__all__ = ["compare", "CompareSettings", "CompareResult", "MethodResult", "Curve", "ShotRun"]
