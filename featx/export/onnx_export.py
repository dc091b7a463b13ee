"""`featx export MODEL -o model.onnx`: one ONNX graph per model, kept only if onnxruntime agrees with featx on real images.

Flow: check the output and the check images -> load the model (head + its backbone, or a trained run) as one torch graph
(`featx.export.graph`) -> torch.onnx dynamo exporter (opset 18), else the TorchScript exporter (opset 17) -> metadata
-> parity: onnxruntime (CPU) vs featx's own pipeline on the same uint8 pixels, at batch 1 and odd batch sizes ->
only then the file is written (atomically). A failed check writes nothing.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .._io import OutputLock, atomic_write, check_outputs, safe_str, sha256_file
from ..errors import ArtifactError, DataError, UsageError
from ._deps import available, require

log = logging.getLogger("featx")

FORMAT = "featx.onnx"
FORMAT_VERSION = 1
DEFAULT_MODEL_OUTPUT = Path("featx-out") / "model.onnx"
EXPORTERS = ("auto", "dynamo", "torchscript")
DYNAMO_OPSET = 18  # the dynamo exporter's floor; onnxruntime >= 1.14 runs it
TORCHSCRIPT_OPSET = 17  # the highest opset the TorchScript exporter supports
TOLERANCE = 1e-3  # max |onnxruntime - featx| on probabilities / scores (fp32 on the CPU)
ODD_BATCH = 7  # the parity check runs images in batches of this odd size, plus batch 1 (dynamic batch axis)
REF_BATCH = 16  # featx's own pass over the check images
INPUT_NAME = "pixels"


@dataclass
class ExportResult:
    """What `featx export` made and how well onnxruntime agreed with featx (see ``parity``)."""

    output: Path
    source: str
    kind: str  # head | finetune | scratch
    description: str
    classes: list
    score_kind: str  # probability | decision
    input_size: int
    with_features: bool
    exporter: dict  # name, opset, fallback_reason
    parity: dict  # images, max_abs_diff, top1_agreement, batch_sizes, ...
    bytes: int = 0
    seconds: float = 0.0
    outputs: list = field(default_factory=list)
    calibration: Optional[dict] = None  # a calibrated head's {"method": "temperature", "temperature": T}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["output"] = safe_str(str(self.output))
        d["seconds"] = round(self.seconds, 2)
        return d


def onnx_written_by_featx(path: Path) -> bool:
    """Recogniser for check_outputs: an ONNX file whose producer_name is "featx".

    Protobuf writes fields in field-number order, so ir_version (1) then producer_name (2) open the file: the
    first bytes tell, without parsing a model of many megabytes.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
    except OSError:
        return False
    return b"\x12\x05featx" in head[:16]


def export_model(model, output=DEFAULT_MODEL_OUTPUT, *, check=None, check_limit: int = 64,
                 with_features: bool = False, exporter: str = "auto", weights=None,
                 overwrite: bool = False) -> ExportResult:
    """Export ``model`` (a head file, a run folder / model.json / .safetensors, or a loaded Head / TrainedModel)
    to one ONNX file: uint8 NHWC pixels at the recorded size in, class probabilities (decision scores for SVM and
    ridge heads fitted without ``--calibrate``; a calibrated head's temperature is inside the graph) out, optionally
    the features as a second output.

    Args:
        check: a folder of images for the parity check (default: the photos shipped in ``featx/export/check_images``).
        check_limit: at most this many of its images, evenly spread over the sorted list (0 = all).
        exporter: ``auto`` (dynamo, else TorchScript), ``dynamo`` or ``torchscript``.
        weights: the backbone weights file, for heads fitted on features from a local weights file.

    Raises:
        UsageError (options, missing extras, heads that do not export), DataError (no readable check image),
        ArtifactError (model unreadable, a calibration record featx did not write, export failed, parity failed),
        OutputError.
    """
    t0 = time.perf_counter()
    for mod in ("onnx", "onnxruntime"):
        require(mod)
    if exporter not in EXPORTERS:
        raise UsageError(f"--exporter must be one of {', '.join(EXPORTERS)}, not {exporter!r}")
    if exporter == "dynamo":
        require("onnxscript")
    if check_limit < 0:
        raise UsageError(f"--check-limit must be >= 0, got {check_limit}")
    output = Path(output)
    if output.suffix.lower() != ".onnx":
        raise UsageError(f"the output of a model export is an ONNX file; give a path ending in .onnx, not {output}")
    check_outputs({output: onnx_written_by_featx}, overwrite=overwrite)
    check_paths, check_root = _check_images(check, check_limit)
    with OutputLock(output):
        exp, source = _load_source(model, weights=weights, with_features=with_features)
        try:
            pixels, names, skipped = _decode(check_paths, check_root, exp.preprocess)
            outputs = ["probabilities" if exp.score_kind == "probability" else "scores"]
            outputs += ["features"] if with_features else []
            proto, info = to_onnx(exp.graph, exp.preprocess.input_size, outputs, exporter)
            _set_metadata(proto, exp, info, with_features)
            parity = check_parity(proto, exp, pixels, names, skipped, check_root)
        finally:
            exp.release()
        _set_props(proto, {"featx.parity": json.dumps(parity)})
        data = proto.SerializeToString()
        with atomic_write(output, "wb") as fh:
            fh.write(data)
    return ExportResult(output=output, source=source["path"], kind=exp.kind, description=exp.description,
                        classes=exp.classes, score_kind=exp.score_kind, input_size=exp.preprocess.input_size,
                        with_features=with_features, exporter=info, parity=parity, bytes=len(data),
                        seconds=time.perf_counter() - t0, outputs=[o.name for o in proto.graph.output],
                        calibration=exp.calibration)


# -- inputs ----------------------------------------------------------------------------------------------------------
def _load_source(model, *, weights, with_features: bool):
    """-> (Exportable, {"path", "sha256"}) for anything `featx predict --model` accepts."""
    from ..heads.store import Head, load_head
    from ..training.checkpoint import TrainedModel, load_model
    from .graph import head_exportable, trained_exportable

    if isinstance(model, Head):
        src = model.path
        head = model
    elif isinstance(model, TrainedModel):
        src, head = model.path, None
    else:
        src = Path(model)
        if not src.exists():
            raise ArtifactError(f"model {safe_str(str(src))} does not exist")
        head = load_head(src) if src.is_file() and src.suffix.lower() == ".skops" else None
        if head is None and not (src.is_dir() or src.suffix.lower() in (".json", ".safetensors")):
            raise ArtifactError(f"{safe_str(str(src))} is not a model featx can export: give a head file (.skops) from "
                                "`featx fit`, or a run folder (or its model.json) from `featx finetune` / `featx scratch`")
        if head is None:
            model = load_model(src, device="cpu")
    if head is not None:
        exp = head_exportable(head, weights=weights, with_features=with_features)
    else:
        if weights is not None:
            raise UsageError("--weights applies to heads (it names the backbone weights); a trained model carries its own")
        exp = trained_exportable(model, with_features=with_features)
        src = model.path  # the weights file that was loaded
    file = Path(src) if src is not None else None
    source = {"path": safe_str(str(file)) if file else None,
              "sha256": sha256_file(file) if file is not None and file.is_file() else None}
    exp.provenance["source"] = source
    return exp, source


def bundled_examples() -> Path:
    """The parity check's default images: 12 ants/bees photos shipped inside the package (package data), so that
    `featx export` works from an installed featx as from a source checkout. Real photos, not synthetic ones: a
    graph that drifts on natural image statistics must fail here. (The images a head was fitted on are not used:
    they may be gone, far away, or thousands.)"""
    return Path(__file__).resolve().parent / "check_images"


def _check_images(check, limit: int) -> tuple:
    """-> (image paths, root) for the parity check: evenly spread over the sorted folder, at most ``limit``."""
    from ..data.discover import discover

    if check is None:
        root = bundled_examples()
        if not root.is_dir():
            raise UsageError("no --check images given and featx's bundled check images are missing (an install "
                             "without its package data); pass --check IMAGES, a folder of images like the ones the "
                             "model will see")
    else:
        root = Path(check)
    folder = discover(root)  # DataError for a missing or empty folder
    paths = [r.path for r in folder.records]
    if limit and len(paths) > limit:
        idx = np.unique(np.linspace(0, len(paths) - 1, limit).round().astype(int))
        paths = [paths[i] for i in idx]
    return paths, root


def _decode(paths, root: Path, preprocess) -> tuple:
    """-> (uint8 N x S x S x 3, relative names, skipped [{path, reason}]) through featx's own CPU pixel path."""
    from ..data.jpeg_batch import pil_pixels

    arrays, names, skipped = [], [], []
    for p in paths:
        rel = safe_str(str(Path(p).relative_to(root))) if Path(p).is_relative_to(root) else safe_str(str(p))
        px, reason, _stage = pil_pixels(p, preprocess)
        if px is None:
            skipped.append({"path": rel, "reason": reason})
        else:
            arrays.append(px)
            names.append(rel)
    if not arrays:
        raise DataError(f"none of the {len(paths)} check images under {safe_str(str(root))} could be read "
                        f"(e.g. {skipped[0]['path']}: {skipped[0]['reason']}); pass --check with a folder of images")
    return np.stack(arrays), names, skipped


# -- export ----------------------------------------------------------------------------------------------------------
def to_onnx(graph, size: int, names: list, exporter: str = "auto") -> tuple:
    """-> (onnx ModelProto, {"name", "opset", "fallback_reason"}): dynamo first (unless told otherwise), TorchScript
    when it fails or fixes the batch axis (pytorch #157621)."""
    import torch

    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)  # batch 2: torch.export specialises a batch of 1
    reason = None
    if exporter in ("auto", "dynamo"):
        if not available("onnxscript"):
            reason = "onnxscript is not installed (pip install 'featx[export]')"
        else:
            try:
                proto = _quietly(_dynamo, graph, example, names)
                if _batch_axis_dynamic(proto):
                    return proto, {"name": "dynamo", "opset": _opset(proto), "fallback_reason": None}
                reason = "the dynamo exporter fixed the batch axis"
            except Exception as exc:  # the exporter raises many types; the reason is recorded and printed
                reason = f"{type(exc).__name__}: {_first_line(exc)}"
            if exporter == "dynamo":
                raise ArtifactError(f"the dynamo exporter failed ({reason}); try --exporter torchscript")
        log.info("dynamo exporter failed (%s); using the TorchScript exporter", reason)
    try:
        proto = _quietly(_torchscript, graph, example, names)
    except Exception as exc:
        first = f"dynamo: {reason}; " if reason else ""
        raise ArtifactError(f"the model could not be exported to ONNX ({first}torchscript: {type(exc).__name__}: "
                            f"{_first_line(exc)})") from exc
    if not _batch_axis_dynamic(proto):
        raise ArtifactError("the TorchScript exporter fixed the batch axis of the ONNX graph; please report this")
    return proto, {"name": "torchscript", "opset": _opset(proto), "fallback_reason": reason}


def _quietly(fn, *args):
    """Run an exporter without its progress prints on stdout (stdout carries --json) or its warnings."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return fn(*args)


def _dynamo(graph, example, names):
    import torch

    prog = torch.onnx.export(graph, (example,), None, dynamo=True, opset_version=DYNAMO_OPSET,
                             input_names=[INPUT_NAME], output_names=names,
                             dynamic_shapes={"pixels": {0: torch.export.Dim("batch")}}, verbose=False)
    return prog.model_proto


def _torchscript(graph, example, names):
    import onnx
    import torch

    buf = io.BytesIO()
    torch.onnx.export(graph, (example,), buf, dynamo=False, opset_version=TORCHSCRIPT_OPSET,
                      input_names=[INPUT_NAME], output_names=names,
                      dynamic_axes={n: {0: "batch"} for n in [INPUT_NAME, *names]}, do_constant_folding=True)
    return onnx.load_from_string(buf.getvalue())


def _batch_axis_dynamic(proto) -> bool:
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    return bool(dims) and not dims[0].HasField("dim_value")


def _opset(proto) -> int:
    return max(int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx"))


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else "")[:300]


def _set_props(proto, props: dict) -> None:
    keep = [(p.key, p.value) for p in proto.metadata_props if p.key not in props]
    del proto.metadata_props[:]
    for k, v in [*keep, *props.items()]:
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v


def _set_metadata(proto, exp, info: dict, with_features: bool) -> None:
    """featx's provenance in metadata_props (string -> JSON string), and "featx" as the producer."""
    from .. import __version__

    proto.producer_name, proto.producer_version = "featx", __version__
    proto.doc_string = f"featx export: {exp.description}"
    outputs = [o.name for o in proto.graph.output]
    _set_props(proto, {
        "featx.format": FORMAT,
        "featx.format_version": str(FORMAT_VERSION),
        "featx.kind": exp.kind,
        "featx.description": exp.description,
        "featx.classes": json.dumps(exp.classes),
        "featx.score_kind": exp.score_kind,
        "featx.preprocess": json.dumps(exp.preprocess.to_dict()),
        "featx.input": json.dumps({"name": proto.graph.input[0].name, "dtype": "uint8", "layout": "NHWC",
                                   "size": exp.preprocess.input_size, "normalised_inside": True}),
        "featx.outputs": json.dumps({"scores": outputs[0], "features": outputs[1] if with_features else None,
                                     "score_kind": exp.score_kind}),
        "featx.exporter": json.dumps(info),
        "featx.provenance": json.dumps(exp.provenance, default=str),
        # the probabilities are softmax(logits / T): stated on its own so a reader need not dig in the provenance
        "featx.calibration": json.dumps(exp.calibration),
    })


# -- parity ----------------------------------------------------------------------------------------------------------
def check_parity(proto, exp, pixels: np.ndarray, names: list, skipped: list, root: Path) -> dict:
    """onnxruntime (CPU) vs featx on the same pixels; ArtifactError (nothing written) if they disagree."""
    import torch

    ort = require("onnxruntime")
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    ref_s, ref_f = [], []
    for s in range(0, len(pixels), REF_BATCH):
        sc, ft = exp.reference(torch.from_numpy(pixels[s:s + REF_BATCH]))
        ref_s.append(np.asarray(sc, dtype=np.float64))
        ref_f.append(ft)
    ref_scores = np.concatenate(ref_s)
    ref_feats = np.concatenate(ref_f) if exp.graph.with_features else None

    n = len(pixels)
    batches = [[0]] + [list(range(s, min(s + ODD_BATCH, n))) for s in range(0, n, ODD_BATCH)]
    if not any(len(b) > 1 and len(b) % 2 for b in batches):  # an odd batch above 1, from repeated images if few
        batches.append([i % n for i in range(3)])
    max_diff, feat_diff, wrong = 0.0, 0.0, set()
    for idx in batches:
        outs = sess.run(None, {sess.get_inputs()[0].name: pixels[idx]})
        got = outs[0].astype(np.float64)
        # NaN compares False against any limit: count a non-finite difference as infinitely large
        max_diff = max(max_diff, float(np.nan_to_num(np.abs(got - ref_scores[idx]), nan=np.inf).max()))
        wrong.update(i for i, a, b in zip(idx, got.argmax(1), ref_scores[idx].argmax(1)) if a != b)
        if ref_feats is not None:
            scale = max(float(np.abs(ref_feats).max()), 1e-12)
            diff = np.nan_to_num(np.abs(outs[1] - ref_feats[idx]), nan=np.inf)
            feat_diff = max(feat_diff, float(diff.max()) / scale)
    res = {
        "images": n, "skipped": len(skipped), "folder": safe_str(str(root)),
        "batch_sizes": sorted({len(b) for b in batches}), "tolerance": TOLERANCE,
        "max_abs_diff": max_diff, "top1_agreement": 1.0 - len(wrong) / n,
        "top1_disagree": [names[i] for i in sorted(wrong)][:20],
        "features_max_rel_diff": feat_diff if ref_feats is not None else None,
        "runtime": f"onnxruntime {ort.__version__} CPUExecutionProvider",
    }
    res["passed"] = bool(not wrong and max_diff <= TOLERANCE and feat_diff <= TOLERANCE)
    if not res["passed"]:
        what = []
        if wrong:
            what.append(f"top-1 differs on {len(wrong)} of {n} images (e.g. {names[min(wrong)]})")
        if max_diff > TOLERANCE:
            what.append(f"max |score difference| {max_diff:.3g} > {TOLERANCE:g}")
        if feat_diff > TOLERANCE:
            what.append(f"features differ by {feat_diff:.3g} (relative) > {TOLERANCE:g}")
        raise ArtifactError(f"parity check failed, nothing was written: onnxruntime and featx disagree on "
                            f"{safe_str(str(root))}: {'; '.join(what)}. Try the other --exporter, or report this")
    return res
