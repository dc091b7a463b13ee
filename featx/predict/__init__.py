"""Batch classification of image folders: predictions table (CSV/JSONL), evaluation when labelled, safe sorting.

    import featx
    res = featx.predict_folder("new_images/", model="featx-out/head.skops")       # -> PredictResult
    for row in res: print(row["path"], row["label"], row["confidence"])
    featx.predict_folder("inbox/", model="runs/finetune/exp", sort_into="sorted/", min_confidence=0.8)
    featx.predict_folder("inbox/", model="model.onnx")   # `featx export` output: onnxruntime, no torch needed
    featx.predict_folder("features/", model="head.skops")  # a feature store (npz, parquet, sharded): no network

Modules: `predictor` (any model artifact -> a Predictor), `tables` (the registry of table formats), `sort` (safe
sorting into class folders), `folder` (`predict_folder`, the steps of one run), `from_store` (a feature store scored by
a head, shard by shard). Evaluation goes through featx.report.
"""
from __future__ import annotations

from .folder import DEFAULT_OUTPUT_DIR, PredictResult, PredictSettings, predict_folder
from .from_store import is_feature_store, predict_store
from .predictor import Predictor, RuntimeDevice, artifact_kind, load_predictor, model_device
from .sort import MODES, UNCERTAIN, MoveJournal, SortAction, sort_images
from .tables import FORMATS, Layout, csv_header, table_format, write_rows, write_table

__all__ = [
    "predict_folder", "predict_store", "is_feature_store", "PredictResult", "PredictSettings", "DEFAULT_OUTPUT_DIR",
    "Predictor", "load_predictor", "artifact_kind", "model_device", "RuntimeDevice",
    "sort_images", "SortAction", "MoveJournal", "MODES", "UNCERTAIN",
    "FORMATS", "Layout", "csv_header", "table_format", "write_rows", "write_table",
]
