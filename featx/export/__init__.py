"""Deployment formats: a trained model as one ONNX file (with a parity check), features as a Parquet store.

    import featx
    res = featx.export_model("featx-out/head.skops", "model.onnx")      # -> ExportResult (res.parity, res.exporter)
    featx.export_features("featx-out/features.npz", "features.parquet")
    from featx.export.onnx_predictor import load_onnx_predictor      # numpy + onnxruntime only, no torch
    pred = load_onnx_predictor("model.onnx"); scores = pred.predict(uint8_batch)

Importing this package imports nothing heavy (no torch, onnx or pyarrow): the ONNX predictor must run on a machine
without torch, and the CLI's `--help` must stay fast.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "export_model": "featx.export.onnx_export",
    "ExportResult": "featx.export.onnx_export",
    "export_features": "featx.export.parquet",
    "read_features": "featx.export.parquet",
    "write_features": "featx.export.parquet",
    "load_onnx_predictor": "featx.export.onnx_predictor",
    "OnnxPredictor": "featx.export.onnx_predictor",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'featx.export' has no attribute {name!r}")
