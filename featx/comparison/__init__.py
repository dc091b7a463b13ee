"""`featx.compare()`: is transfer learning worth it on my images? Frozen-feature heads vs fine-tuning vs scratch CNNs.

Every method sees the same train/validation split (``featx.data.split``: the folder's val/, else one stratified,
seeded hold-out of train), so the table compares methods, not splits. The run folder ``runs/compare/<name>`` gets
``report.md``, ``accuracy.png``, ``results.json`` and the sub-runs (features + heads, the finetune run, the scratch
runs), each usable on its own with `featx predict`. With ``shots`` the same methods also run on k images per class
drawn from the training split, and ``learning_curve.png`` shows accuracy against images per class (``shots.py``).

Modules: ``core`` (settings, results, the run), ``methods`` (heads, fine-tuning, scratch; the budget),
``shots`` (subsets and the curve), ``render`` (report.md, results.json, charts).
"""
from __future__ import annotations

from .core import CompareResult, CompareSettings, MethodResult, compare
from .shots import Curve, ShotRun

__all__ = ["compare", "CompareSettings", "CompareResult", "MethodResult", "Curve", "ShotRun"]
