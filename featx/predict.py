"""Batch classification of image folders: predictions table (CSV/JSONL), evaluation when labelled, safe sorting into folders.

    import featx
    res = featx.predict_folder("new_images/", model="featx-out/head.skops")       # -> PredictResult
    for row in res: print(row["path"], row["label"], row["confidence"])
    featx.predict_folder("inbox/", model="runs/finetune/exp", sort_into="sorted/", min_confidence=0.8)

Design notes (the why):
- Every prediction runs through the extraction engine (`featx.features.engine.iter_outputs`): the same workers,
  batching, device placement and OOM retry as `featx extract`, so classifying N images costs what extracting them does.
- A head rebuilds its backbone from the head's own provenance (weights hash checked, preprocessing restored verbatim),
  so the pixels and the network are exactly those of extraction time.
- A file that cannot be decoded gets a row with an empty label and the reason; it is never given another file's label.
- Sorting never overwrites and never leaves half files: each file is copied to a temp name inside the target folder
  and linked into place (an atomic "create if absent"); a byte-identical file already at a candidate name counts as
  "already sorted", so a re-run after an interruption completes the tree instead of duplicating it.
"""
from __future__ import annotations

import csv
import errno
import io
import json
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence

import numpy as np

from ._io import TMP_MARK, atomic_write, refuse_inside, safe_str, write_json
from .errors import ArtifactError, DataError, StrictModeError, UsageError

log = logging.getLogger("featx")

DEFAULT_OUTPUT_DIR = Path("featx-out")
FORMATS = ("csv", "jsonl")
MODES = ("copy", "link", "move")
UNCERTAIN = "_uncertain"  # folder for predictions below --min-confidence (a class of that name would share it)
GALLERY_SIZE = 24  # most confidently misclassified images shown in the gallery PNG
CONFIDENCE_KINDS = {"probability": "probability", "decision": "decision score"}
_HEADER_START = "path,label,confidence"  # how we recognise a CSV we wrote (and may overwrite)


@dataclass
class PredictSettings:
    """Everything `featx predict` can be told, with its default. Library keyword arguments map 1:1 onto these."""

    model: Optional[str] = None  # None: the head `featx fit` wrote last (featx-out/head.skops)
    output: Optional[str] = None  # None: featx-out/predictions.<format>; False (API only): write no table
    format: Optional[str] = None  # None: from the output suffix (.jsonl/.json -> jsonl), else csv
    top_k: int = 3  # top classes and scores per row; clipped to the number of classes
    device: str = "auto"  # auto = CUDA when present
    batch_size: Optional[int] = None  # None: 32 on CPU, 256 on CUDA (as `featx extract`)
    workers: Optional[int] = None  # decoding processes; None: CPU count, at most 8
    sort_into: Optional[str] = None  # copy (or link/move) each image into <sort_into>/<predicted class>/
    mode: str = "copy"  # copy | link (hard link, else symlink) | move; copy never touches the sources
    # Rows whose confidence is below this go to <sort_into>/_uncertain/. For a probability head: a probability in
    # [0, 1]. For an SVM/ridge head (decision scores): the top class's decision value, a signed distance from the
    # one-vs-rest boundary in standardised feature units (0 = on the boundary), so thresholds are not portable.
    min_confidence: Optional[float] = None
    dry_run: bool = False  # compute predictions and the sort plan, write and move nothing (no table, no folders)
    strict: bool = False  # after writing everything, fail (exit 6) if any image could not be read
    report_dir: Optional[str] = None  # labelled input: confusion/gallery PNGs; None: <output stem>.report/ beside it
    overwrite: bool = False  # allow replacing an existing output file that featx did not write
    weights: Optional[str] = None  # backbone weights file for a head whose backbone came from a local file

    def check(self) -> None:
        if self.format is not None and self.format not in FORMATS:
            raise UsageError(f"--format must be one of {', '.join(FORMATS)}, not {self.format!r}")
        if self.top_k < 0:
            raise UsageError(f"--top-k must be >= 0, got {self.top_k}")
        if self.mode not in MODES:
            raise UsageError(f"sort mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.min_confidence is not None and self.sort_into is None:
            raise UsageError("--min-confidence only applies when sorting; add --sort-into DIR")
        if self.min_confidence is not None and not np.isfinite(self.min_confidence):
            raise UsageError("--min-confidence must be a finite number")


# ------------------------------------------------------------------------------------------------ models
@dataclass
class _Predictor:
    """What predict needs from any model: pixels recipe, a batch function, how to turn outputs into scores."""

    preprocess: object
    network: object  # torch module to place on the device
    fn: Callable  # normalised float batch -> (N, K) tensor
    to_scores: Callable  # (N, K) numpy outputs -> (N, C) scores
    classes: List[str]
    score_kind: str  # "probability" | "decision"
    description: str
    kind: str  # "head" | "finetune" | "scratch"
    path: Optional[Path] = None


def load_predictor(model=None, *, weights=None, strict: bool = False) -> _Predictor:
    """Resolve ``--model``: a head file (.skops), a run folder / model.json / .safetensors of a trained model, or an
    already loaded ``Head`` / ``TrainedModel``. ``None`` means the head at fit's default path."""
    from .heads.store import DEFAULT_HEAD_PATH, Head

    try:
        from .training.checkpoint import TrainedModel
    except ImportError:  # pragma: no cover - training is an optional part of the install
        TrainedModel = ()

    if isinstance(model, Head):
        return _head_predictor(model, weights)
    if TrainedModel and isinstance(model, TrainedModel):
        return _trained_predictor(model, weights)
    if model is None:
        path = Path(DEFAULT_HEAD_PATH)
        if not path.exists():
            raise ArtifactError(f"no model given and no head at {path}; fit one with `featx fit`, or pass --model "
                                "(a head .skops file, or a run folder from `featx finetune` / `featx scratch`)")
    else:
        path = Path(model)
    if not path.exists():
        raise ArtifactError(f"model {safe_str(str(path))} does not exist")
    suffix = path.suffix.lower()
    if path.is_file() and suffix == ".skops":
        from .heads import load_head

        return _head_predictor(load_head(path, strict=strict), weights)
    if path.is_dir() or suffix in (".json", ".safetensors"):
        from .training import load_model

        return _trained_predictor(load_model(path, device="cpu"), weights)
    raise ArtifactError(f"{safe_str(str(path))} is not a model featx can predict with: give a head file (.skops) from "
                        "`featx fit`, or a run folder (or its model.json) from `featx finetune` / `featx scratch`")


def _head_predictor(head, weights) -> _Predictor:
    from .backbones import backbone_from_meta

    if not head.feature_meta.get("backbone"):
        raise ArtifactError(f"head {head.path or ''} records no backbone provenance; re-fit it with `featx fit`")
    bb = backbone_from_meta(head.feature_meta, weights=weights)
    head.check_compatible(bb.meta(), bb.feature_dim)
    return _Predictor(
        preprocess=bb.preprocess, network=bb.model, fn=bb.forward_features,
        to_scores=lambda feats: head.predict_scores(feats)[0], classes=list(head.classes),
        score_kind=head.score_kind, description=f"{head.kind} head on {bb.name} features", kind="head",
        path=head.path)


def _trained_predictor(tm, weights) -> _Predictor:
    import torch

    if weights is not None:
        raise UsageError("--weights applies to heads (it names the backbone weights); a trained model carries its own")
    net = tm.model

    def fn(x):
        return torch.softmax(net(x).float(), dim=1)

    return _Predictor(
        preprocess=tm.preprocess, network=net, fn=fn, to_scores=lambda p: np.asarray(p, dtype=np.float64),
        classes=[str(c) for c in tm.classes], score_kind="probability",
        description=f"{tm.kind or 'trained'} model {tm.name}", kind=tm.kind or "trained", path=tm.path)


# ------------------------------------------------------------------------------------------------ results
@dataclass
class SortAction:
    """One planned or performed file operation of ``--sort-into``."""

    source: Path
    folder: str  # class name or "_uncertain"
    dest: Optional[Path]  # final path (None if the plan could not place it)
    action: str  # copy | link | symlink | move
    status: str  # planned | done | already (identical file was there) | failed
    error: Optional[str] = None

    def to_dict(self) -> dict:
        return {"source": safe_str(str(self.source)), "folder": safe_str(self.folder),
                "dest": safe_str(str(self.dest)) if self.dest else None, "action": self.action,
                "status": self.status, "error": self.error}


@dataclass
class PredictResult:
    """Rows (one per image, input order) plus the summary. Iterates, indexes and has a length like ``rows``.

    Each row: ``path`` (relative to the image folder), ``label`` (None on error), ``confidence`` (the top score),
    ``top_k`` ([{"label", "score"}], best first), ``true_label`` (labelled input only), ``error`` (None if fine).
    """

    rows: list
    classes: list
    counts: dict  # predicted class -> number of images (every model class, zeros included)
    confidence_kind: str  # "probability" | "decision score"
    model: str
    model_kind: str
    n_images: int
    n_errors: int
    errors: list  # [{"path", "reason", "stage"}]
    device: str
    seconds: float  # the whole call, model loading included
    images_per_s: float  # decoding + network + head only (what scales with the number of images)
    output: Optional[Path] = None
    format: str = "csv"
    labelled: bool = False
    metrics: Optional[dict] = None  # classification_metrics over labelled rows that decoded
    split_metrics: dict = field(default_factory=dict)  # per split headline scores, when the folder has splits
    unknown_classes: list = field(default_factory=list)  # true classes the model was never taught
    report_dir: Optional[Path] = None
    confusion_png: Optional[Path] = None
    gallery_png: Optional[Path] = None
    sort_into: Optional[Path] = None
    sort_mode: Optional[str] = None
    min_confidence: Optional[float] = None
    sort_actions: list = field(default_factory=list)
    dry_run: bool = False
    warnings: list = field(default_factory=list)

    def __iter__(self):
        return iter(self.rows)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    @property
    def labels(self) -> list:
        return [r["label"] for r in self.rows]

    def sort_counts(self) -> dict:
        """{folder: {status: n}} of the sort plan/outcome."""
        out: dict = {}
        for a in self.sort_actions:
            out.setdefault(a.folder, {}).setdefault(a.status, 0)
            out[a.folder][a.status] += 1
        return out

    def to_dict(self) -> dict:
        """The ``--json`` summary (rows are in the output file, not here)."""
        from .report import summary

        d = {
            "output": str(self.output) if self.output else None,
            "format": self.format,
            "model": self.model,
            "model_kind": self.model_kind,
            "confidence_kind": self.confidence_kind,
            "n_images": self.n_images,
            "n_errors": self.n_errors,
            "counts": self.counts,
            "errors": self.errors,
            "device": self.device,
            "seconds": round(self.seconds, 3),
            "images_per_s": round(self.images_per_s, 2),
            "dry_run": self.dry_run,
            "warnings": self.warnings,
        }
        if self.labelled and self.metrics is not None:
            d["metrics"] = {**summary(self.metrics), "per_class": self.metrics["per_class"],
                            "classes": self.metrics["classes"], "confusion": self.metrics["confusion"]}
            d["split_metrics"] = self.split_metrics
            d["unknown_classes"] = self.unknown_classes
            d["report"] = {"dir": str(self.report_dir) if self.report_dir else None,
                           "confusion_png": str(self.confusion_png) if self.confusion_png else None,
                           "gallery_png": str(self.gallery_png) if self.gallery_png else None}
        if self.sort_into is not None:
            d["sort"] = {"into": str(self.sort_into), "mode": self.sort_mode, "min_confidence": self.min_confidence,
                         "counts": self.sort_counts(), "actions": [a.to_dict() for a in self.sort_actions]}
        return d


# ------------------------------------------------------------------------------------------------ predict
def predict_folder(
    images,
    model=None,
    *,
    output=None,
    format: Optional[str] = None,
    top_k: int = 3,
    device: str = "auto",
    batch_size: Optional[int] = None,
    workers: Optional[int] = None,
    sort_into=None,
    mode: str = "copy",
    min_confidence: Optional[float] = None,
    dry_run: bool = False,
    strict: bool = False,
    report_dir=None,
    overwrite: bool = False,
    weights=None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> PredictResult:
    """Classify every image under ``images`` and write one row per image (input order) to ``output``.

    Args:
        images: a folder. Flat = unlabeled; class subfolders (or train/ val/ test/ splits of them) = labelled, and then
            accuracy, balanced accuracy, per-class scores, a confusion matrix and a gallery of the most confidently
            misclassified images are produced as well (the PNGs in ``report_dir``).
        model: a head file from ``featx fit`` (default: ``featx-out/head.skops``), a run folder / ``model.json`` /
            ``.safetensors`` from ``featx finetune`` or ``featx scratch``, or a loaded ``Head`` / ``TrainedModel``.
        output: the table to write, atomically (default ``featx-out/predictions.csv``); ``False`` writes no table.
            An existing file that featx did not write is refused unless ``overwrite``.
        format: ``csv`` or ``jsonl`` (default: from the output suffix, else csv).
        top_k: classes and scores per row, best first.
        sort_into: also place each image into ``sort_into/<predicted class>/`` (``mode`` copy | link | move);
            images below ``min_confidence`` go to ``sort_into/_uncertain/``; unreadable images go nowhere.
            Existing files are never overwritten (``name_1.jpg``...); re-running completes an interrupted sort.
        dry_run: compute everything, write nothing (no table, no report, no folders); the plan is in ``sort_actions``.
        strict: raise StrictModeError (exit 6) after writing if any image could not be read.
        weights: the backbone weights file, for heads fitted on features from a local weights file.
        progress: callback(done_images, total_images).

    Raises:
        DataError (no images, only garbage), ArtifactError (model missing/unsafe/mismatched), WeightsError,
        UsageError (bad options, output inside the image folder), StrictModeError.
    """
    from .data.discover import discover
    from .devices import resolve_device

    t0 = time.perf_counter()
    s = PredictSettings(model=model, output=output, format=format, top_k=top_k, device=device, batch_size=batch_size,
                        workers=workers, sort_into=sort_into, mode=mode, min_confidence=min_confidence,
                        dry_run=dry_run, strict=strict, report_dir=report_dir, overwrite=overwrite, weights=weights)
    s.check()
    root = Path(images)
    folder = discover(root)
    fmt, out_path = _resolve_output(s.output, s.format)
    rep_dir = None
    if out_path is not None:
        refuse_inside(out_path, root, "output")
        _check_output(out_path, s.overwrite)
        rep_dir = Path(s.report_dir) if s.report_dir else out_path.with_name(out_path.stem + ".report")
    elif s.report_dir:
        rep_dir = Path(s.report_dir)
    if rep_dir is not None and folder.has_labels:
        refuse_inside(rep_dir, root, "report folder")
    sort_root = Path(s.sort_into) if s.sort_into is not None else None
    if sort_root is not None:
        refuse_inside(sort_root, root, "--sort-into folder")

    dev = resolve_device(s.device)
    pred = load_predictor(s.model, weights=s.weights, strict=s.strict)
    if pred.score_kind == "probability" and s.min_confidence is not None and not 0.0 <= s.min_confidence <= 1.0:
        raise UsageError(f"--min-confidence is a probability for this model; give a value in [0, 1], "
                         f"not {s.min_confidence}")
    if sort_root is not None:
        _check_sort_targets(sort_root, root, pred.classes)
    warnings = list(folder.warnings)

    t_run = time.perf_counter()
    scores, errors_at = _run(folder.records, pred, dev, s, progress, root)
    run_seconds = time.perf_counter() - t_run
    rows, counts, errors = _make_rows(folder, pred, scores, errors_at, s.top_k)
    n = len(rows)
    seconds = time.perf_counter() - t0
    res = PredictResult(
        rows=rows, classes=list(pred.classes), counts=counts, confidence_kind=CONFIDENCE_KINDS[pred.score_kind],
        model=pred.description, model_kind=pred.kind, n_images=n, n_errors=len(errors), errors=errors,
        device=str(dev), seconds=seconds, images_per_s=n / run_seconds if run_seconds > 0 else 0.0,
        output=out_path, format=fmt, labelled=folder.has_labels, dry_run=s.dry_run, warnings=warnings)

    if folder.has_labels:
        _evaluate(res, folder, pred)
        if res.unknown_classes:
            res.warnings.append(
                f"true classes the model does not know: {', '.join(safe_str(c) for c in res.unknown_classes)} "
                "(their images count as errors in the scores)")

    if sort_root is not None:
        res.sort_into, res.sort_mode, res.min_confidence = sort_root, s.mode, s.min_confidence
        res.sort_actions = sort_images(
            [(r.path, row) for r, row in zip(folder.records, rows)], sort_root, mode=s.mode,
            min_confidence=s.min_confidence, dry_run=s.dry_run)

    if not s.dry_run:
        if out_path is not None:
            write_rows(rows, out_path, fmt, labelled=folder.has_labels, top_k=_k(s.top_k, pred.classes))
        if folder.has_labels and rep_dir is not None and res.metrics is not None:
            _write_report(res, folder, rep_dir)

    if s.strict and errors:
        failed = [a for a in res.sort_actions if a.status == "failed"]
        where = f"; predictions for the rest were written to {out_path}" if out_path is not None and not s.dry_run else ""
        raise StrictModeError(f"{len(errors)} of {n} images could not be read (e.g. {errors[0]['path']}: "
                              f"{errors[0]['reason']}){where}" + (f"; {len(failed)} files failed to sort" if failed else ""))
    return res


def _k(top_k: int, classes) -> int:
    return min(top_k, len(classes))


def _resolve_output(output, fmt):
    """-> (format, path or None). ``output=False`` means no table."""
    if output is False:
        return fmt or "csv", None
    if output is None:
        fmt = fmt or "csv"
        return fmt, DEFAULT_OUTPUT_DIR / f"predictions.{fmt}"
    path = Path(output)
    if fmt is None:
        fmt = "jsonl" if path.suffix.lower() in (".jsonl", ".json", ".ndjson") else "csv"
    return fmt, path


def _check_output(path: Path, overwrite: bool) -> None:
    if path.is_dir():
        raise UsageError(f"output {safe_str(str(path))} is a folder; give a file path such as {path / 'predictions.csv'}")
    if not path.exists() or overwrite or _written_by_featx(path):
        return
    raise UsageError(f"{safe_str(str(path))} exists and is not a featx predictions file; refusing to overwrite it "
                     "(choose another -o, or pass --overwrite)")


def _written_by_featx(path: Path) -> bool:
    """True for an empty file or one whose first line is our CSV header or a JSONL row of ours."""
    try:
        with open(path, "rb") as fh:
            first = fh.readline(1 << 16)
    except OSError:
        return False
    if not first.strip():
        return path.stat().st_size == 0
    line = first.decode("utf-8", "replace").lstrip("\ufeff").strip()
    if line.startswith(_HEADER_START):
        return True
    try:
        obj = json.loads(line)
    except ValueError:
        return False
    return isinstance(obj, dict) and {"path", "label", "confidence"} <= set(obj)


def _run(records, pred: _Predictor, dev, s: PredictSettings, progress, root):
    """Run the model over every record through the extraction engine -> (scores N x C with NaN rows, errors)."""
    from .features.engine import GARBAGE_WINDOW, default_batch_size, iter_outputs, prepare_model

    n = len(records)
    scores = np.full((n, len(pred.classes)), np.nan, dtype=np.float64)
    errors_at: dict = {}
    bsize = s.batch_size or default_batch_size(dev)
    prepare_model(pred.network, dev)
    done = failed = 0
    if progress:
        progress(0, n)
    # Same decoder policy as extract (GPU JPEG decoding on CUDA, PIL elsewhere), so predict sees extract's pixels.
    stream = iter_outputs([r.path for r in records], pred.preprocess, pred.fn, device=dev, batch_size=bsize,
                          workers=s.workers, decoder="auto")
    for batch in stream:
        if len(batch.indices):
            scores[batch.indices] = pred.to_scores(batch.outputs)
        for i, reason, stage in batch.errors:
            errors_at[int(i)] = (reason, stage)
            log.debug("could not read %s: %s", records[i].relpath, reason)
        done += len(batch.indices) + len(batch.errors)
        failed += len(batch.errors)
        # A folder whose first files all fail is not an image folder: say so instead of grinding through it.
        if done >= min(GARBAGE_WINDOW, n) and failed == done:
            first = records[min(errors_at)]
            raise DataError(f"the first {done} files under {safe_str(str(root))} all failed to decode (e.g. "
                            f"{safe_str(first.relpath)}: {errors_at[min(errors_at)][0]}); is this an image folder?")
        if progress:
            progress(done, n)
    return scores, errors_at


def _make_rows(folder, pred: _Predictor, scores, errors_at, top_k: int):
    classes = pred.classes
    k = _k(top_k, classes)
    counts = {c: 0 for c in classes}
    rows, errors = [], []
    labelled = folder.has_labels
    # Stable descending order: ties go to the class listed first, as argmax would.
    order = np.argsort(-np.nan_to_num(scores, nan=-np.inf), axis=1, kind="stable") if len(classes) else None
    for i, rec in enumerate(folder.records):
        row = {"path": safe_str(rec.relpath)}
        if i in errors_at:
            reason, stage = errors_at[i]
            row.update(label=None, confidence=None, top_k=[], error=reason)
            errors.append({"path": row["path"], "reason": reason, "stage": stage})
        else:
            top = order[i, :max(k, 1)]
            best = classes[top[0]]
            row.update(label=best, confidence=float(scores[i, top[0]]),
                       top_k=[{"label": classes[j], "score": float(scores[i, j])} for j in top[:k]], error=None)
            counts[best] += 1
        if labelled:
            row["true_label"] = rec.label
        # keep the documented key order: path, label, confidence, top_k, [true_label], error
        rows.append({key: row[key] for key in ("path", "label", "confidence", "top_k", "true_label", "error")
                     if key in row})
    return rows, counts, errors


def _evaluate(res: PredictResult, folder, pred: _Predictor) -> None:
    from .report import classification_metrics, summary

    idx = [i for i, r in enumerate(res.rows) if r["error"] is None and r.get("true_label") is not None]
    y_true = [res.rows[i]["true_label"] for i in idx]
    y_pred = [res.rows[i]["label"] for i in idx]
    res.unknown_classes = sorted(set(y_true) - set(pred.classes))
    if not idx:
        res.warnings.append("no labelled image could be read; no scores")
        return
    res.metrics = classification_metrics(y_true, y_pred, pred.classes)
    if folder.has_splits:
        by_split: dict = {}
        for i in idx:
            by_split.setdefault(folder.records[i].split, []).append(i)
        for split in folder.split_names():
            if split in by_split:
                ii = by_split[split]
                m = classification_metrics([res.rows[i]["true_label"] for i in ii], [res.rows[i]["label"] for i in ii],
                                           pred.classes)
                res.split_metrics[split] = summary(m)


def _write_report(res: PredictResult, folder, rep_dir: Path) -> None:
    from .report import save_confusion_png, save_gallery_png, summary

    res.report_dir = rep_dir
    res.confusion_png = save_confusion_png(res.metrics, rep_dir / "confusion.png",
                                           title=f"predictions vs folder labels (accuracy {res.metrics['accuracy']:.3f}, "
                                                 f"n={res.metrics['n']})")
    wrong = [(i, r) for i, r in enumerate(res.rows)
             if r["error"] is None and r.get("true_label") is not None and r["label"] != r["true_label"]]
    wrong.sort(key=lambda t: -t[1]["confidence"])
    if wrong:
        items = [{"path": folder.records[i].path, "true": r["true_label"], "pred": r["label"],
                  "confidence": r["confidence"]} for i, r in wrong[:GALLERY_SIZE]]
        res.gallery_png = save_gallery_png(
            items, rep_dir / "misclassified.png",
            title=f"most confidently misclassified ({len(items)} of {len(wrong)}), true -> predicted ({res.confidence_kind})")
    write_json(rep_dir / "metrics.json", {
        "model": res.model, "confidence_kind": res.confidence_kind, **summary(res.metrics),
        "per_class": res.metrics["per_class"], "classes": res.metrics["classes"], "confusion": res.metrics["confusion"],
        "split_metrics": res.split_metrics, "unknown_classes": res.unknown_classes, "n_errors": res.n_errors,
        "misclassified": [{"path": r["path"], "true": r["true_label"], "pred": r["label"],
                           "confidence": r["confidence"]} for _, r in wrong],
    })


# ------------------------------------------------------------------------------------------------ writing
def _fmt_score(x) -> str:
    return "" if x is None else f"{x:.6g}"


def csv_header(top_k: int, labelled: bool) -> list:
    cols = ["path", "label", "confidence"]
    for j in range(1, top_k + 1):
        cols += [f"top{j}", f"top{j}_score"]
    if labelled:
        cols.append("true_label")
    return cols + ["error"]


def write_rows(rows: Sequence[dict], path, fmt: str = "csv", *, labelled: bool = False, top_k: int = 3) -> Path:
    """Write prediction rows atomically as CSV (header ``path,label,confidence,top1,top1_score,...,error``, plus
    ``true_label`` before ``error`` when labelled) or JSONL (one object per line). Always UTF-8, whatever the
    locale; undecodable bytes in file names were already replaced by U+FFFD."""
    path = Path(path)
    buf = io.StringIO()
    if fmt == "csv":
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(csv_header(top_k, labelled))
        for r in rows:
            line = [r["path"], r["label"] or "", _fmt_score(r["confidence"])]
            for j in range(top_k):
                t = r["top_k"][j] if j < len(r["top_k"]) else None
                line += [t["label"], _fmt_score(t["score"])] if t else ["", ""]
            if labelled:
                line.append(r.get("true_label") or "")
            line.append(r["error"] or "")
            w.writerow([safe_str(str(v)) for v in line])
    elif fmt == "jsonl":
        for r in rows:
            buf.write(json.dumps(r, ensure_ascii=False) + "\n")
    else:
        raise UsageError(f"format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    with atomic_write(path, "wb") as fh:
        fh.write(buf.getvalue().encode("utf-8"))
    return path


# ------------------------------------------------------------------------------------------------ sorting
def _folder_name(label: str) -> str:
    """A class name as one safe path component (a head from elsewhere could name a class '../x')."""
    name = safe_str(str(label)).replace("/", "_").replace("\\", "_").replace("\x00", "_")
    return name if name not in ("", ".", "..") else f"_{name or 'empty'}"


def _check_sort_targets(sort_root: Path, images_root: Path, classes) -> None:
    """Refuse a class folder that would be (or lie inside) the image folder, e.g. sorting into its parent."""
    for c in list(classes) + [UNCERTAIN]:
        refuse_inside(sort_root / _folder_name(c), images_root, f"--sort-into class folder for {c!r}")


def _candidates(name: str):
    stem, ext = os.path.splitext(name)
    if not stem:  # ".jpg": treat the whole thing as the stem
        stem, ext = name, ""
    yield name
    i = 1
    while True:
        yield f"{stem}_{i}{ext}"
        i += 1


def _same_file(a: Path, b: Path) -> bool:
    """b is a, a link to a, or byte-identical to a."""
    try:
        if os.path.samefile(a, b):
            return True
        if not os.path.isfile(b):
            return False
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    if sa.st_size != sb.st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def sort_images(items, sort_root, *, mode: str = "copy", min_confidence: Optional[float] = None,
                dry_run: bool = False) -> List[SortAction]:
    """Place images into ``sort_root/<label>/`` (or ``_uncertain/``) without ever overwriting anything.

    ``items``: ``(source path, row)`` pairs in a fixed order; rows with an error are skipped. For each image, names are
    tried in order ``name.jpg``, ``name_1.jpg``, ...: a free name is taken, a byte-identical file (or a link to the
    source) means it is already there, anything else is left alone. Because the order and this rule are fixed, an
    interrupted run re-run with the same inputs yields the same tree with no duplicates. ``dry_run`` only reads.
    """
    if mode not in MODES:
        raise UsageError(f"sort mode must be one of {', '.join(MODES)}, not {mode!r}")
    sort_root = Path(sort_root)
    claimed: set = set()  # names this run has taken (a dry run must not give two files one name)
    swept: set = set()
    actions: List[SortAction] = []
    for src, row in items:
        if row.get("error") is not None or row.get("label") is None:
            continue
        src = Path(src)
        uncertain = min_confidence is not None and row["confidence"] < min_confidence
        folder = UNCERTAIN if uncertain else _folder_name(row["label"])
        target = sort_root / folder
        if not dry_run and target not in swept:
            _sweep_temps(target)
            swept.add(target)
        act = SortAction(src, folder, None, "copy" if mode == "copy" else mode, "planned")
        try:
            _place(src, target, mode, act, claimed, dry_run)
        except OSError as exc:  # one unwritable file must not stop the other 9,999; it is listed as failed
            act.status, act.error = "failed", f"{type(exc).__name__}: {exc.strerror or exc}"
            log.warning("could not sort %s: %s", safe_str(str(src)), act.error)
        actions.append(act)
    return actions


def _sweep_temps(directory: Path) -> None:
    """Temp files a killed sort left behind (ours by their prefix) are removed before writing there again."""
    if directory.is_dir():
        for p in directory.glob(TMP_MARK + "*"):
            try:
                p.unlink()
            except OSError:
                pass


def _place(src: Path, target: Path, mode: str, act: SortAction, claimed: set, dry_run: bool) -> None:
    name = src.name
    for cand in _candidates(name):
        dest = target / cand
        if dest in claimed:
            continue
        if os.path.lexists(dest):
            if _same_file(src, dest):
                act.dest, act.status = dest, "already"
                claimed.add(dest)
                if mode == "move" and not dry_run and not _is_same_inode(src, dest):
                    # An earlier move copied the file across file systems but was stopped before removing the source.
                    os.unlink(src)
                return
            continue
        if dry_run:
            act.dest = dest
            claimed.add(dest)
            return
        target.mkdir(parents=True, exist_ok=True)
        placed = _put(src, dest, mode, act)
        if placed:
            act.dest, act.status = dest, "done"
            claimed.add(dest)
            return
        # someone created `dest` between our check and our write: try the next name


def _is_same_inode(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _put(src: Path, dest: Path, mode: str, act: SortAction) -> bool:
    """Create ``dest`` from ``src`` without overwriting; False when ``dest`` appeared meanwhile."""
    if mode == "link":
        try:
            os.link(src, dest)
            act.action = "link"
            return True
        except FileExistsError:
            return False
        except OSError:  # other file system, or links not supported: a symbolic link (absolute) instead
            try:
                os.symlink(os.path.abspath(src), dest)
            except FileExistsError:
                return False
            act.action = "symlink"
            return True
    if mode == "move":
        if os.path.lexists(dest):
            return False
        try:
            os.rename(src, dest)  # same file system: atomic, nothing copied
            return True
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
        # Across file systems: copy to a temp file there, verify it, put it in place, then remove the source.
        tmp = _copy_to_temp(src, dest.parent, dest.name)
        try:
            if os.path.getsize(tmp) != os.path.getsize(src) or not _same_file(src, tmp):
                raise OSError(errno.EIO, f"the copy of {src} at {dest.parent} does not match the source; source kept")
            if not _link_into_place(tmp, dest):
                return False
        finally:
            _unlink_quiet(tmp)
        os.unlink(src)
        return True
    tmp = _copy_to_temp(src, dest.parent, dest.name)
    try:
        return _link_into_place(tmp, dest)
    finally:
        _unlink_quiet(tmp)


def _copy_to_temp(src: Path, directory: Path, name: str) -> Path:
    tmp = directory / f"{TMP_MARK}{name}.{uuid.uuid4().hex[:8]}"
    try:
        shutil.copyfile(src, tmp)
        shutil.copystat(src, tmp)  # keep the photo's timestamps (sorting by date still works afterwards)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
    except BaseException:
        _unlink_quiet(tmp)
        raise
    return tmp


def _link_into_place(tmp: Path, dest: Path) -> bool:
    """Give the complete temp file its final name only if that name is free (link = atomic create-if-absent)."""
    try:
        os.link(tmp, dest)
        return True
    except FileExistsError:
        return False
    except OSError:  # file systems without hard links (FAT, some network shares): check, then rename
        if os.path.lexists(dest):
            return False
        os.replace(tmp, dest)
        return True


def _unlink_quiet(p) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass
