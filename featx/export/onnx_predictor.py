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
SCORE_KINDS = ("probability", "decision")


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

    The metadata is checked against the graph before anything runs: one uint8 input of (batch, S, S, 3) with S the
    recorded crop size (8 to 2048 px), a score output with one column per class name, class names a list of distinct
    strings, a preprocessing recipe featx can apply. A failure of the session while it runs is an ArtifactError too.

    Args:
        path: str, bytes or PathLike; any name featx can write (bytes that are not UTF-8 included).
        threads: onnxruntime intra-op threads (None: onnxruntime's default, one per core).

    Raises:
        UsageError when onnxruntime is missing (names the extra), ArtifactError for a missing file, an ONNX file
        onnxruntime cannot load, one featx did not export, or one whose metadata disagrees with its graph.
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise UsageError("onnxruntime is not installed (running ONNX files); install it with: "
                         "pip install onnxruntime (or 'featx[export]')") from exc
    path = Path(os.fsdecode(path))
    shown = safe_str(str(path))
    if not path.is_file():
        raise ArtifactError(f"ONNX model {shown} does not exist" if not path.exists() else f"{shown} is not a file")
    try:
        # The bytes, not the name: onnxruntime takes names as UTF-8 str only, so a name holding other bytes (which
        # featx export writes like any other) could not be opened. featx writes one self-contained file.
        model = path.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"cannot read ONNX model {shown}: {exc.strerror or exc}") from exc
    try:
        sess = ort.InferenceSession(model, sess_options=_options(ort, threads), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for bad files
        raise ArtifactError(f"{shown} is not an ONNX model onnxruntime can load ({_first_line(exc)})") from exc
    meta = _featx_meta(sess, shown)
    size, in_name, n_out = _check_graph(sess, meta, shown)
    n_classes = len(meta["classes"])

    def run(pixels):
        x = _as_nhwc(pixels, size)
        if len(x) == 0:
            return [np.zeros((0, n_classes), np.float32)] + [np.zeros((0, 0), np.float32)] * (n_out - 1)
        try:
            out = sess.run(None, {in_name: x})
        except Exception as exc:  # a tampered graph (a huge ConstantOfShape...) fails here, not in the images
            raise ArtifactError(f"ONNX model {shown} failed in onnxruntime ({_first_line(exc)}); if it ran out of "
                                "memory, try a smaller --batch-size, else export the model again") from exc
        shape = tuple(np.shape(out[0]))
        if shape != (len(x), n_classes):
            raise ArtifactError(f"ONNX model {shown} returned scores of shape {shape} for {len(x)} images and "
                                f"{n_classes} class names; export the model again")
        return out

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
                         largest_activation=lambda: largest_activation(model, size, in_name))


def largest_activation(model, size: int, in_name: str) -> int:
    """Bytes of the largest node output of ``model`` (its bytes, or a path) at batch 1, from onnxruntime's profiler
    (a throwaway session).

    Measured (onnxruntime 1.32, CPU): peak memory grows by about 3x this per image at batch 256, the same order as
    torch (featx.features.engine.ACTIVATION_FACTOR = 4). 0 when onnxruntime cannot profile the model.
    """
    import onnxruntime as ort

    if not isinstance(model, bytes):
        model = Path(os.fsdecode(model)).read_bytes()
    try:
        with tempfile.TemporaryDirectory(prefix="featx-ort-") as tmp:
            opts = _options(ort, None)
            opts.enable_profiling = True
            opts.profile_file_prefix = os.path.join(tmp, "profile")
            sess = ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
            sess.run(None, {in_name: np.zeros((1, size, size, 3), np.uint8)})
            with open(sess.end_profiling(), encoding="utf-8") as fh:
                events = json.load(fh)
    except Exception as exc:  # an estimate for a memory cap: without it only the pixel buffers are counted
        log.debug("could not profile the ONNX model for its activation size: %s", exc)
        return 0
    sizes = (int(e.get("args", {}).get("output_size", 0)) for e in events if e.get("cat") == "Node")
    return max(sizes, default=0)


def _options(ort, threads: Optional[int]):
    opts = ort.SessionOptions()
    # fatal only: onnxruntime logs a failed node on stderr before raising; featx reports the error in one line
    opts.log_severity_level = 4
    if threads:
        opts.intra_op_num_threads = int(threads)
    return opts


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}" if text else type(exc).__name__


def _featx_meta(sess, shown: str) -> dict:
    """featx's metadata_props, JSON values parsed and checked; ArtifactError for an ONNX file featx did not export
    or one whose metadata was edited into something featx cannot use."""
    from ..data.preprocess import Preprocess

    props = dict(sess.get_modelmeta().custom_metadata_map)
    if props.get("featx.format") != FORMAT:
        raise ArtifactError(f"{shown} is an ONNX model but not one `featx export` wrote (no featx metadata); "
                            "featx needs its class names and preprocessing")
    version = props.get("featx.format_version", "0")
    if not version.isdigit():
        raise ArtifactError(f"{shown} has unusable featx metadata (format version {_brief(version)}); "
                            "export the model again")
    if int(version) > FORMAT_VERSION:
        raise ArtifactError(f"{shown} was exported by a newer featx (format {version}); upgrade featx")
    try:
        meta = {k[len("featx."):]: props[k] for k in props if k.startswith("featx.")}
        for key in ("classes", "preprocess", "input", "outputs", "provenance", "exporter", "parity", "calibration"):
            if key in meta:
                meta[key] = json.loads(meta[key])
        classes = meta["classes"]
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
            raise ValueError(f"class names must be a list of strings, not {_brief(classes)}")
        if len(set(classes)) != len(classes):
            raise ValueError("the class names repeat a name")
        if meta["score_kind"] not in SCORE_KINDS:
            raise ValueError(f"score kind {_brief(meta['score_kind'])} is not one of {', '.join(SCORE_KINDS)}")
        if not isinstance(meta["input"], dict) or not isinstance(meta["preprocess"], dict):
            raise ValueError("input and preprocess must be JSON objects")
        pre = Preprocess.from_dict(meta["preprocess"])
        pre.check()  # crop size within 8..2048 px, a known interpolation, three means and stds (as from_record)
        size = meta["input"]["size"]
        if size != pre.input_size:
            raise ValueError(f"the input size {_brief(size)} is not the preprocessing's crop size {pre.input_size}")
        for key in ("provenance", "exporter", "parity"):
            if not isinstance(meta.get(key, {}), dict):
                raise ValueError(f"{key} must be a JSON object")
        if meta.get("calibration") is not None and not isinstance(meta["calibration"], dict):
            raise ValueError("calibration must be a JSON object or null")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        what = f"no {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ArtifactError(f"{shown} has unusable featx metadata ({safe_str(what)}); export the model again") from exc
    return meta


def _check_graph(sess, meta: dict, shown: str) -> tuple:
    """The graph's input and outputs against the metadata -> (crop size, input name, number of outputs)."""
    size = int(meta["input"]["size"])
    inputs, outputs = sess.get_inputs(), sess.get_outputs()
    problem = None
    if len(inputs) != 1:
        problem = f"the graph takes {len(inputs)} inputs, not one batch of pixels"
    elif inputs[0].type != "tensor(uint8)":
        problem = f"the graph's input is {inputs[0].type}, not uint8 pixels"
    elif len(inputs[0].shape) != 4 or any(isinstance(d, int) and d != want
                                          for d, want in zip(inputs[0].shape[1:], (size, size, 3))):
        problem = (f"the graph takes pixels of shape {_dims(inputs[0].shape)}, but its metadata says "
                   f"(batch, {size}, {size}, 3)")
    elif not outputs or not 1 <= len(outputs) <= 2:
        problem = f"the graph has {len(outputs)} outputs, not scores (and features)"
    elif len(outputs[0].shape) != 2:
        problem = f"the graph's scores have shape {_dims(outputs[0].shape)}, not (batch, classes)"
    elif isinstance(outputs[0].shape[1], int) and outputs[0].shape[1] != len(meta["classes"]):
        problem = (f"the graph scores {outputs[0].shape[1]} classes, but its metadata names "
                   f"{len(meta['classes'])}")
    if problem:
        raise ArtifactError(f"{shown} does not match its own featx metadata: {problem}; export the model again")
    return size, inputs[0].name, len(outputs)


def _dims(shape) -> str:
    return "(" + ", ".join(str(d) if isinstance(d, int) else "batch" if i == 0 else "?"
                           for i, d in enumerate(shape)) + ")"


def _brief(value) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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
