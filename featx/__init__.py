"""featx: pretrained CNN features, linear heads, fine-tuning and scratch baselines for folders of images.

Public API (imported lazily so that `featx --help` does not pay for importing torch)::

    import featx
    bb = featx.create_backbone("efficientnet_lite0")
    res = featx.extract_features("images/", "features.npz")
    fs = featx.load_features("features.npz")
    fit = featx.fit_head(fs, head="logistic", output="head.skops")
    head = featx.load_head("head.skops")
    rows = featx.predict_folder("new_images/", model="head.skops")
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "FeatxError": "featx.errors",
    "create_backbone": "featx.backbones",
    "list_backbones": "featx.backbones",
    "Preprocess": "featx.data.preprocess",
    "discover_images": "featx.data.discover",
    "load_rgb": "featx.data.decode",
    "FeatureSet": "featx.features.store",
    "load_features": "featx.features.store",
    "save_features": "featx.features.store",
    "extract_features": "featx.features.engine",
    "fit_head": "featx.heads",
    "load_head": "featx.heads",
    "predict_folder": "featx.predict",
    "finetune": "featx.training",
    "train_scratch": "featx.training",
    "load_model": "featx.training",
    "compare": "featx.comparison",
    "export_model": "featx.export.onnx_export",
    "export_features": "featx.export.parquet",
    "audit": "featx.audit",
}

__all__ = ["__version__", *_API]


def __getattr__(name):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'featx' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
