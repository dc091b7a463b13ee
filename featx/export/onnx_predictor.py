"""Run a `featx export` ONNX file with onnxruntime: numpy and onnxruntime only (no torch), for deployment machines.

    from featx.export.onnx_predictor import load_onnx_predictor
    pred = load_onnx_predictor("model.onnx")
    scores = pred.predict(pixels)     # uint8 (N, S, S, 3) or (N, 3, S, S) -> (N, len(pred.classes)) float64

The pixels are the resized, centre-cropped uint8 images described by ``pred.preprocess`` (the recipe recorded at
export: ``featx.data.preprocess.Preprocess.from_dict(pred.preprocess).resize_crop(img)`` makes them); normalisation
happens inside the graph. This module must not import torch, and imports nothing from featx that does.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .._io import safe_str
from ..errors import ArtifactError, UsageError

log = logging.getLogger("featx")

FORMAT = "featx.onnx"  # same value as featx.export.onnx_export.FORMAT (not imported: that module imports torch)
FORMAT_VERSION = 1


@dataclass
class OnnxPredictor:
    """An exported featx model, ready to score pixel batches."""

    path: Path
    classes: list
    preprocess: dict  # the Preprocess recipe recorded at export (Preprocess.from_dict reads it)
    score_kind: str  # "probability" | "decision" (SVM / ridge heads), as `featx predict` reports them
    kind: str  # head | finetune | scratch
    description: str
    input_size: int
    predict: Callable  # uint8 NHWC or NCHW batch -> (N, C) float64 scores
    features: Optional[Callable] = None  # uint8 batch -> (N, D) float32, when exported --with-features
    provenance: dict = field(default_factory=dict)  # what the model was made from (head / model.json, backbone, source)
    exporter: dict = field(default_factory=dict)
    parity: dict = field(default_factory=dict)
    calibration: Optional[dict] = None  # {"method": "temperature", "temperature": T} for a calibrated head
    # () -> bytes of the largest node output for one image, measured by onnxruntime's profiler (featx predict caps
    # an oversized --batch-size with it, as it does for torch models with forward hooks)
    largest_activation: Optional[Callable[[], int]] = field(default=None, repr=False)


def load_onnx_predictor(path, *, threads: Optional[int] = None) -> OnnxPredictor:
    """Open ``path`` (written by ``featx export``) in an onnxruntime CPU session.

    Args:
        threads: onnxruntime intra-op threads (None: onnxruntime's default, one per core).

    Raises:
        UsageError when onnxruntime is missing (names the extra), ArtifactError for a missing file, an ONNX file
        onnxruntime cannot load, or one featx did not export.
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise UsageError("onnxruntime is not installed (running ONNX files); install it with: "
                         "pip install onnxruntime (or 'featx[export]')") from exc
    path = Path(path)
    shown = safe_str(str(path))
    if not path.is_file():
        raise ArtifactError(f"ONNX model {shown} does not exist" if not path.exists() else f"{shown} is not a file")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: onnxruntime's warnings are not the user's business
    if threads:
        opts.intra_op_num_threads = int(threads)
    try:
        sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for bad files
        raise ArtifactError(f"{shown} is not an ONNX model onnxruntime can load ({type(exc).__name__}: "
                            f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''})") from exc
    meta = _featx_meta(sess, shown)
    size = int(meta["input"]["size"])
    in_name = sess.get_inputs()[0].name
    n_out = len(sess.get_outputs())

    def run(pixels):
        x = _as_nhwc(pixels, size)
        if len(x) == 0:
            return [np.zeros((0, len(meta["classes"])), np.float32)] + [np.zeros((0, 0), np.float32)] * (n_out - 1)
        return sess.run(None, {in_name: x})

    def predict(pixels) -> np.ndarray:
        return np.asarray(run(pixels)[0], dtype=np.float64)

    def features(pixels) -> np.ndarray:
        return np.asarray(run(pixels)[1], dtype=np.float32)

    return OnnxPredictor(path=path, classes=meta["classes"], preprocess=meta["preprocess"],
                         score_kind=meta["score_kind"], kind=meta.get("kind", ""),
                         description=meta.get("description", ""), input_size=size, predict=predict,
                         features=features if n_out > 1 else None, provenance=meta.get("provenance", {}),
                         exporter=meta.get("exporter", {}), parity=meta.get("parity", {}),
                         calibration=meta.get("calibration"),
                         largest_activation=lambda: largest_activation(path, size, in_name))


def largest_activation(path, size: int, in_name: str) -> int:
    """Bytes of the largest node output of ``path`` at batch 1, from onnxruntime's profiler (a throwaway session).

    Measured (onnxruntime 1.32, CPU): peak memory grows by about 3x this per image at batch 256, the same order as
    torch (featx.features.engine.ACTIVATION_FACTOR = 4). 0 when onnxruntime cannot profile the model.
    """
    import onnxruntime as ort

    try:
        with tempfile.TemporaryDirectory(prefix="featx-ort-") as tmp:
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            opts.enable_profiling = True
            opts.profile_file_prefix = os.path.join(tmp, "profile")
            sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
            sess.run(None, {in_name: np.zeros((1, size, size, 3), np.uint8)})
            with open(sess.end_profiling(), encoding="utf-8") as fh:
                events = json.load(fh)
    except Exception as exc:  # an estimate for a memory cap: without it only the pixel buffers are counted
        log.debug("could not profile %s for its activation size: %s", safe_str(str(path)), exc)
        return 0
    sizes = (int(e.get("args", {}).get("output_size", 0)) for e in events if e.get("cat") == "Node")
    return max(sizes, default=0)


def _featx_meta(sess, shown: str) -> dict:
    """featx's metadata_props, JSON values parsed; ArtifactError for an ONNX file featx did not export."""
    props = dict(sess.get_modelmeta().custom_metadata_map)
    if props.get("featx.format") != FORMAT:
        raise ArtifactError(f"{shown} is an ONNX model but not one `featx export` wrote (no featx metadata); "
                            "featx needs its class names and preprocessing")
    if int(props.get("featx.format_version", "0")) > FORMAT_VERSION:
        raise ArtifactError(f"{shown} was exported by a newer featx (format {props['featx.format_version']}); "
                            "upgrade featx")
    try:
        meta = {k[len("featx."):]: props[k] for k in props if k.startswith("featx.")}
        for key in ("classes", "preprocess", "input", "outputs", "provenance", "exporter", "parity", "calibration"):
            if key in meta:
                meta[key] = json.loads(meta[key])
        meta["classes"] = [str(c) for c in meta["classes"]]
        meta["input"]["size"], meta["score_kind"]  # noqa: B018 - required keys
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{shown} has unreadable featx metadata ({type(exc).__name__}: {exc})") from exc
    return meta


def _as_nhwc(pixels, size: int) -> np.ndarray:
    """uint8 (N, S, S, 3) or (N, 3, S, S) -> contiguous (N, S, S, 3); anything else is a UsageError."""
    x = np.asarray(pixels)
    if x.dtype != np.uint8:
        raise UsageError(f"the ONNX model takes uint8 pixels (resized and cropped, not normalised), got {x.dtype}")
    if x.ndim == 4 and x.shape[1:] == (size, size, 3):
        return np.ascontiguousarray(x)
    if x.ndim == 4 and x.shape[1:] == (3, size, size):
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    raise UsageError(f"the ONNX model takes a batch of shape (N, {size}, {size}, 3) or (N, 3, {size}, {size}), "
                     f"got {tuple(x.shape)}")
