"""`predict_folder`: classify a folder of images into a table, evaluate when labelled, sort into folders on request.

The steps, in order (each a function below):
1. `_plan_outputs`: every path the run will write (table, report files, sort folder), refused if inside the images;
2. `_claim`: each of them checked up front (absent or written by featx, writable) and the table and sort folder
   locked for the run's life, so a second run on the same outputs fails at once and nothing runs for an output
   that cannot be written;
3. `load_predictor` (predictor.py), then `_classify`: every image through the extraction engine (`iter_outputs`:
   the same workers, batching, device placement and OOM retry as `featx extract`, and the same engine choice,
   `featx.runtime`: onnxruntime on the CPU by default), or, for an exported ONNX model,
   through `featx.data.numpy_pixels` and onnxruntime (same decoder, batches, rows and skips; torch never imported);
   an oversized --batch-size is capped to what memory holds, as extract does;
4. `_make_rows`, `_evaluate` (featx.report metrics), `_sort` (sort.py), `_write` (tables.py + featx.report);
5. `_raise_for_failures`: a failed sort exits 7 (OutputError), unreadable images under --strict exit 6, both after
   everything that could be written was.
A file that cannot be decoded gets a row with an empty label and the reason; it is never given another file's label.
What discovery could not read (a folder without permission, a path too long, a file reached through a link from
another class) has no row: it is listed in ``skipped`` and the summary, and --strict refuses it before any work,
as `featx extract` does.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

from .._io import (OutputLock, check_outputs, check_writable_folder, claim_outputs, refuse_inside, safe_str,
                   written_by_featx)
from ..data.preprocess import check_image_size
from ..errors import DataError, FeatxError, OutputError, StrictModeError, UsageError, interruptible
from .predictor import Predictor, load_predictor, model_device
from .sort import EARLIER, MODES, MoveJournal, SortAction, check_sort_targets, sort_counts, sort_images
from .tables import FORMATS, ROW_KEYS, Layout, is_featx_table, resolve_format, score_column, write_table

log = logging.getLogger("featx")

DEFAULT_OUTPUT_DIR = Path("featx-out")
RESUME_HINT = ("nothing is half-written (the table and reports are written whole or not at all); re-run the same "
               "command: a sort resumes where it stopped, and files an interrupted --move already moved are reported")


@dataclass
class PredictSettings:
    """Everything `featx predict` can be told, with its default. Library keyword arguments map 1:1 onto these."""

    model: Optional[str] = None  # None: the head `featx fit` wrote last (featx-out/head.skops); or a run, an .onnx
    output: Optional[str] = None  # None: featx-out/predictions.<format>; False (API only): write no table
    format: Optional[str] = None  # None: from the output suffix (.jsonl/.json -> jsonl), else csv
    top_k: int = 3  # top classes and scores per row; clipped to the number of classes
    device: str = "auto"  # auto = CUDA when present
    batch_size: Optional[int] = None  # None: 32 on CPU, 256 on CUDA; capped to what RAM holds (as `featx extract`)
    workers: Optional[int] = None  # decoding processes; None: CPU count, at most 8
    sort_into: Optional[str] = None  # copy (or link/move) each image into <sort_into>/<predicted class>/
    mode: str = "copy"  # copy | link (hard link, else symlink) | move; copy never touches the sources
    # Rows whose probability is below this go to <sort_into>/_uncertain/: a number in [0, 1]. Refused for a model
    # whose scores are not probabilities (SVM/ridge heads without `featx fit --calibrate`): a decision score is a
    # signed distance from a boundary, and no threshold on it means "sure".
    min_confidence: Optional[float] = None
    dry_run: bool = False  # compute predictions and the sort plan, write and move nothing (no table, no folders)
    # after writing everything, fail (exit 6) if any image could not be read; stop sorting at the first failure
    strict: bool = False
    report_dir: Optional[str] = None  # labelled input: confusion/gallery PNGs; None: <output stem>.report/ beside it
    overwrite: bool = False  # allow replacing existing output files that featx did not write
    weights: Optional[str] = None  # backbone weights file for a head whose backbone came from a local file
    # Only confirms the model's recorded crop size (another size is refused): a head's features and a trained
    # network's weights mean something only at the preprocessing they were made with.
    image_size: Optional[Union[int, str]] = None  # or "auto": the model's own, as None
    # auto | torch | onnx: how the network runs (featx.runtime; auto = onnxruntime on the CPU, torch on CUDA); an
    # exported .onnx model always runs in onnxruntime
    runtime: str = "auto"
    threads: Optional[int] = None  # onnxruntime's threads; None: the cores this process may use

    def check(self) -> None:
        if self.format is not None and self.format not in FORMATS:
            raise UsageError(f"--format must be one of {', '.join(FORMATS)}, not {self.format!r}")
        if self.top_k < 0:
            raise UsageError(f"--top-k must be >= 0, got {self.top_k}")
        if self.mode not in MODES:
            raise UsageError(f"sort mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if self.batch_size is not None and self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {self.batch_size}")
        if isinstance(self.image_size, str) and self.image_size.strip().lower() == "auto":
            self.image_size = None  # auto = the model's own: predict always uses the recorded preprocessing
        if self.image_size is not None:
            check_image_size(self.image_size)
        if self.min_confidence is not None and self.sort_into is None:
            raise UsageError("--min-confidence only applies when sorting; add --sort-into DIR")
        if self.min_confidence is not None and not np.isfinite(self.min_confidence):
            raise UsageError("--min-confidence must be a finite number")
        from ..runtime import RUNTIMES, resolve_threads

        if str(self.runtime or "auto").lower() not in RUNTIMES:
            raise UsageError(f"--runtime must be one of {', '.join(RUNTIMES)}, not {self.runtime!r}")
        if self.threads is not None:
            resolve_threads(self.threads)


@dataclass
class PredictResult:
    """Rows (one per image, input order) plus the summary. Iterates, indexes and has a length like ``rows``.

    Each row: ``path`` (relative to the image folder), ``label`` (None on error), ``confidence`` (the top score),
    ``top_k`` ([{"label", "score"}], best first), ``true_label`` (labelled input only), ``sorted_to`` and
    ``sort_status`` (when sorting), ``error`` (None if fine).
    """

    rows: list
    classes: list
    counts: dict  # predicted class -> number of images (every model class, zeros included)
    confidence_kind: str  # "probability" | "decision score"
    model: str
    model_kind: str
    n_images: int
    n_errors: int
    errors: list  # [{"path", "reason", "stage"}]: images that could not be read (each has an error row)
    device: str
    seconds: float  # the whole call, model loading included
    images_per_s: float  # decoding + network + head only (what scales with the number of images)
    output: Optional[Path] = None
    format: str = "csv"
    labelled: bool = False
    metrics: Optional[dict] = None  # classification_metrics over labelled rows that decoded
    split_metrics: dict = field(default_factory=dict)  # per split headline scores, when the folder has splits
    unknown_classes: list = field(default_factory=list)  # true classes the model was never taught
    # images the model was trained or selected on (by content; issue 24.2): scored apart, left out of ``metrics``
    seen_metrics: Optional[dict] = None
    seen_paths: list = field(default_factory=list)
    report_dir: Optional[Path] = None
    confusion_png: Optional[Path] = None
    gallery_png: Optional[Path] = None
    sort_into: Optional[Path] = None
    sort_mode: Optional[str] = None
    min_confidence: Optional[float] = None
    sort_actions: list = field(default_factory=list)
    earlier_moves: list = field(default_factory=list)  # rows of files an interrupted earlier --move had moved
    dry_run: bool = False
    warnings: list = field(default_factory=list)
    # what discovery did not read (unreadable or too deep folders, paths too long, a file reached twice through
    # links): [{"path", "reason", "stage": "discover"}], no rows; the same list `featx extract` records
    skipped: list = field(default_factory=list)
    runtime: str = "torch"  # the engine that ran the network: "torch" | "onnxruntime" (featx.runtime)
    # seconds inside images_per_s, where the engine measures them (`featx.features.engine.iter_outputs`'s stats:
    # network_s, decode_s, resize_s, input_wait_s on the CPU runtime); not in to_dict
    timings: dict = field(default_factory=dict)

    def __iter__(self):
        return iter(self.rows)

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    @property
    def labels(self) -> list:
        return [r["label"] for r in self.rows]

    @property
    def n_classified(self) -> int:
        return self.n_images - self.n_errors

    def sort_counts(self) -> dict:
        """{folder: {status: n}} of the sort plan/outcome."""
        return sort_counts(self.sort_actions)

    @property
    def already_sorted(self) -> bool:
        """Nothing left to classify: an earlier --move, stopped after its last move, had sorted every image (they
        are in ``earlier_moves`` and the table)."""
        return self.n_images == 0 and bool(self.earlier_moves)

    def removed_duplicates(self) -> list:
        """--move actions whose source was removed because an identical file was already at the destination."""
        return [a for a in self.sort_actions if a.status == "already" and a.note]

    def to_dict(self) -> dict:
        """The ``--json`` summary (rows are in the output file, not here)."""
        from ..report import summary

        d = {
            "output": str(self.output) if self.output else None, "format": self.format, "model": self.model,
            "model_kind": self.model_kind, "confidence_kind": self.confidence_kind, "n_images": self.n_images,
            "n_classified": self.n_classified, "n_errors": self.n_errors, "counts": self.counts,
            "errors": self.errors, "n_skipped": len(self.skipped), "skipped": self.skipped, "device": self.device,
            "seconds": round(self.seconds, 3), "images_per_s": round(self.images_per_s, 2), "dry_run": self.dry_run,
            "runtime": self.runtime,
            "warnings": self.warnings,
        }
        if self.labelled and self.metrics is not None:
            d["metrics"] = {**summary(self.metrics), "per_class": self.metrics["per_class"],
                            "classes": self.metrics["classes"], "confusion": self.metrics["confusion"]}
            d["split_metrics"] = self.split_metrics
            d["seen_in_training"] = {"n": len(self.seen_paths), "metrics": self.seen_metrics}
            d["unknown_classes"] = self.unknown_classes
            d["report"] = {"dir": str(self.report_dir) if self.report_dir else None,
                           "confusion_png": str(self.confusion_png) if self.confusion_png else None,
                           "gallery_png": str(self.gallery_png) if self.gallery_png else None}
        if self.sort_into is not None:
            d["sort"] = {"into": str(self.sort_into), "mode": self.sort_mode, "min_confidence": self.min_confidence,
                         "counts": self.sort_counts(), "actions": [a.to_dict() for a in self.sort_actions],
                         "earlier_moves": [{"path": r["path"], "dest": r["sorted_to"]} for r in self.earlier_moves],
                         "already_sorted": self.already_sorted}
        return d


@dataclass
class _Plan:
    """Where a run writes: decided, checked and locked before any work."""

    root: Path
    fmt: str
    table: Optional[Path]
    report_dir: Optional[Path]  # labelled folders only
    sort_root: Optional[Path]

    def outputs(self) -> dict:
        """{path: recogniser} of every file the run may write (the sort folder is handled on its own)."""
        from ..report import evaluation_files

        files = {self.table: is_featx_table} if self.table is not None else {}
        if self.report_dir is not None:
            from ..report_html import html_is_ours

            files.update({p: None for p in evaluation_files(self.report_dir).values()})
            files[self.report_dir / "report.html"] = html_is_ours
        return files


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
    image_size: Optional[int] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    runtime: str = "auto",
    threads: Optional[int] = None,
) -> PredictResult:
    """Classify every image under ``images`` and write one row per image (input order) to ``output``.

    Args:
        images: a folder. Flat = unlabeled; class subfolders (or train/ val/ test/ splits of them) = labelled, and then
            accuracy, balanced accuracy, per-class scores, a confusion matrix and a gallery of the most confidently
            misclassified images are produced as well (the PNGs in ``report_dir``).
            Or images named one by one: an image file, a list of them, or a list file (``@list.txt`` or a ``.txt``
            file, one path a line): unlabelled rows with paths relative to the folder holding them all
            (`featx.data.filelist`).
            Or a featx feature store (an ``.npz`` / ``.parquet`` or a sharded folder that `featx extract` wrote,
            told apart by `featx.features.formats`' recognisers): its stored features are scored by the head with no
            network built, a sharded store shard by shard in bounded memory (`featx.predict.from_store`); same
            table and, when the store has labels, the same evaluation. Only a head can score features, fitted on the
            same backbone, weights, layer and crop size; ``sort_into`` / ``min_confidence``, ``weights`` and
            ``runtime`` other than auto are refused, ``image_size`` only confirms the store's, ``device`` / ``workers`` / ``threads`` are
            ignored and ``batch_size`` is the rows scored at once.
        model: a head file from ``featx fit`` (default: ``featx-out/head.skops``), a run folder / ``model.json`` /
            ``.safetensors`` from ``featx finetune`` or ``featx scratch``, an ``.onnx`` file from ``featx export``
            (runs in onnxruntime on the CPU; torch is not needed), or a loaded ``Head`` / ``TrainedModel`` /
            ``OnnxPredictor``.
        output: the table to write, atomically (default ``featx-out/predictions.csv``); ``False`` writes no table.
            Every file written (table, report files) must be absent or written by featx, unless ``overwrite``.
        format: ``csv`` or ``jsonl`` (default: from the output suffix, else csv).
        top_k: classes and scores per row, best first.
        sort_into: also place each image into ``sort_into/<predicted class>/`` (``mode`` copy | link | move);
            images below ``min_confidence`` go to ``sort_into/_uncertain/``; unreadable images go nowhere.
            Existing files are never overwritten (``name_1.jpg``...); re-running completes an interrupted sort.
        dry_run: compute everything, write nothing (no table, no report, no folders); the plan is in ``sort_actions``.
        strict: raise StrictModeError (exit 6) after writing if any image could not be read, and before any work
            if discovery skipped a folder or file (``skipped``); stop sorting at the first file that cannot be sorted.
        weights: the backbone weights file, for heads fitted on features from a local weights file.
        image_size: optional; must equal the crop size the model was made at (predict always uses the model's own).
        progress: callback(done_images, total_images).
        runtime: auto | torch | onnx (`featx.runtime`): auto runs the network in onnxruntime on the CPU (a graph
            built once, cached and checked against torch) and in torch on CUDA; the result's ``runtime`` says which
            ran. threads: onnxruntime's threads (default: the cores this process may use).

    Raises:
        DataError (no images, only garbage), ArtifactError (model missing/unsafe/mismatched), WeightsError,
        UsageError (bad options, output inside the image folder, a file featx did not write in the way),
        OutputError (an output cannot be written or is in use; files that could not be sorted), StrictModeError.
        OutputError and StrictModeError raised after the run carry the finished result as ``.result``.
    """
    from .from_store import is_feature_store  # a featx feature store: scored by the head alone (from_store.py)

    if is_feature_store(images):
        from .from_store import predict_store

        return predict_store(images, model, output=output, format=format, top_k=top_k, device=device,
                             batch_size=batch_size, workers=workers, sort_into=sort_into, mode=mode,
                             min_confidence=min_confidence, dry_run=dry_run, strict=strict, report_dir=report_dir,
                             overwrite=overwrite, weights=weights, image_size=image_size, progress=progress,
                             runtime=runtime, threads=threads)
    t0 = time.perf_counter()
    s = PredictSettings(model=model, output=output, format=format, top_k=top_k, device=device, batch_size=batch_size,
                        workers=workers, sort_into=sort_into, mode=mode, min_confidence=min_confidence,
                        dry_run=dry_run, strict=strict, report_dir=report_dir, overwrite=overwrite, weights=weights,
                        image_size=image_size, runtime=runtime, threads=threads)
    s.check()
    from ..data.filelist import discover_files, is_file_source

    named = is_file_source(images)  # image files named one by one (or a list file), not a folder
    folder = discover_files(images) if named else _discover(Path(images), s)
    root = folder.root if named else Path(images)
    plan = _plan_outputs(s, root, folder.has_labels, named=[r.path for r in folder.records] if named else None)
    with interruptible(RESUME_HINT), _claim(plan, s):
        if s.strict and folder.skipped:  # known before any work, as in extract: fail before loading a model
            raise _strict_skips(folder.skipped)
        dev = model_device(s.model, s.device)  # onnxruntime's CPU for an ONNX model: torch is not imported
        pred = load_predictor(s.model, weights=s.weights, strict=s.strict, image_size=s.image_size)
        _check_against_model(pred, plan, s)
        if folder.records:
            timings: dict = {}
            scores, errors_at, run_seconds, note, ran = _classify(folder.records, pred, dev, s, progress, root,
                                                                  timings)
        else:  # a finished --move emptied the folder (see _discover): its images are in the journal, not here
            scores, errors_at, run_seconds, note, ran = np.empty((0, len(pred.classes))), {}, 0.0, None, None
        res = _result(folder, pred, scores, errors_at, s, plan, str(dev), run_seconds)
        res.runtime = ran
        res.timings = {k: round(float(v), 3) for k, v in timings.items()} if folder.records else {}
        res.warnings += [note] if note else []
        res.seconds = time.perf_counter() - t0
        if folder.has_labels and folder.records:
            _evaluate(res, folder, pred)
        journal = _sort(res, folder, plan, s) if plan.sort_root is not None else None
        if not s.dry_run:
            _write(res, folder, plan, min(s.top_k, len(pred.classes)))
            if journal is not None:  # every move is in the table now (or in res for output=False)
                journal.finish()
    _raise_for_failures(res, s)
    return res


def _discover(root: Path, s: PredictSettings):
    """discover(root), except that a folder a --move emptied is no error while the sort folder's journal lists the
    moved images: that run was stopped after its last move, before its table, and this run reports them (its
    images were already sorted) and removes the journal, instead of saying "no images found"."""
    from ..data.discover import discover

    try:
        return discover(root)
    except DataError as exc:
        none_found = exc
    if s.sort_into is None or s.mode != "move":
        raise none_found
    folder = discover(root, allow_empty=True)  # a missing or unreadable folder still fails here, as before
    if folder.records or not MoveJournal(s.sort_into, root).earlier():
        raise none_found
    return folder


def _plan_outputs(s: PredictSettings, root: Path, labelled: bool, named: Optional[list] = None) -> _Plan:
    """Resolve the table, report and sort paths; refuse any that lies inside the image folder (for images named one
    by one, ``named``: only the table being one of them; a later run reads the same names, not the folder)."""
    if s.output is False:
        table = None
        fmt = resolve_format(None, s.format)
    elif s.output is None:
        fmt = resolve_format(None, s.format)
        table = DEFAULT_OUTPUT_DIR / f"predictions.{fmt}"
    else:
        table = Path(s.output)
        fmt = resolve_format(table, s.format)
    report = Path(s.report_dir) if s.report_dir else table.with_name(table.stem + ".report") if table else None
    plan = _Plan(root=root, fmt=fmt, table=table, report_dir=report if labelled else None,
                 sort_root=Path(s.sort_into) if s.sort_into is not None else None)
    if named is not None:
        if plan.table is not None and plan.table.resolve() in {Path(p).resolve() for p in named}:
            raise UsageError(f"the output {safe_str(str(plan.table))} is one of the images; choose another -o")
        checked = ((plan.sort_root, "--sort-into folder"),)
    else:
        checked = ((plan.table, "output"), (plan.report_dir, "report folder"), (plan.sort_root, "--sort-into folder"))
    for path, what in checked:
        if path is not None:
            refuse_inside(path, root, what)
    return plan


@contextlib.contextmanager
def _claim(plan: _Plan, s: PredictSettings):
    """Check every output up front and, unless dry-running, lock the table and the sort folder for the run."""
    if plan.table is not None and plan.table.is_dir():
        raise UsageError(f"output {safe_str(str(plan.table))} is a folder; give a file path such as "
                         f"{safe_str(str(plan.table / ('predictions.' + plan.fmt)))}")
    if plan.table is not None and not s.overwrite and not written_by_featx(plan.table, is_featx_table):
        raise UsageError(f"{safe_str(str(plan.table))} exists and is not a featx predictions file; refusing to "
                         "overwrite it (choose another -o, or pass --overwrite)")
    outputs = plan.outputs()
    if plan.sort_root is not None:
        check_writable_folder(plan.sort_root)  # a file there, a read-only folder: refused before any work
    with contextlib.ExitStack() as stack:
        if s.dry_run or not outputs:  # nothing will be written: check only, take no lock
            check_outputs(outputs, overwrite=s.overwrite)
        else:
            stack.enter_context(claim_outputs(outputs, overwrite=s.overwrite))
        if plan.sort_root is not None and not s.dry_run:
            stack.enter_context(OutputLock(plan.sort_root))
        if plan.sort_root is not None and s.mode == "move":  # never appended to through a link (after the lock:
            MoveJournal(plan.sort_root, plan.root).check()  # no featx run is writing it now)
        yield


def _check_against_model(pred: Predictor, plan: _Plan, s: PredictSettings) -> None:
    if pred.score_kind != "probability" and s.min_confidence is not None:
        # a decision score has no scale a threshold means anything on: 0.9 sent 11 of 12 images to _uncertain
        again = "" if pred.needs_torch else " and export it again"  # an ONNX model: the head is inside it
        raise UsageError(f"--min-confidence needs probabilities, but this model ({pred.description}) gives decision "
                         f"scores; refit the head with `featx fit --calibrate`{again} to get probabilities")
    if s.min_confidence is not None and not 0.0 <= s.min_confidence <= 1.0:
        raise UsageError(f"--min-confidence is a probability for this model; give a value in [0, 1], "
                         f"not {s.min_confidence}")
    if plan.sort_root is not None:
        check_sort_targets(plan.sort_root, plan.root, pred.classes, uncertain=s.min_confidence is not None)


def _classify(records, pred: Predictor, dev, s: PredictSettings, progress, root, timings: Optional[dict] = None):
    """Run the model over every record -> (scores N x C with NaN rows for failures, {index: (reason, stage)},
    seconds spent, a note when the batch size was capped, the engine that ran the network)."""
    from ..features.engine import GARBAGE_WINDOW
    from ..runtime import network_for, runtime_of

    t = time.perf_counter()
    n = len(records)
    scores = np.full((n, len(pred.classes)), np.nan, dtype=np.float64)
    errors_at: dict = {}
    pred.to(dev)
    bsize, note = _batch_size(pred, dev, s, n)
    fn = None
    if pred.needs_torch:
        fn = network_for(pred.forward, pred.network, pred.preprocess, dev, runtime=s.runtime, threads=s.threads,
                         what=pred.what)
    done = failed = 0
    if progress:
        progress(0, n)
    for idx, batch_scores, errors in _score_batches([r.path for r in records], pred, fn, dev, s, bsize, timings):
        if len(idx):
            scores[idx] = batch_scores
        for i, reason, stage in errors:
            errors_at[int(i)] = (safe_str(str(reason)), stage)
            log.debug("could not read %s: %s", safe_str(records[i].relpath), reason)
        done += len(idx) + len(errors)
        failed += len(errors)
        # A folder whose first files all fail is not an image folder: say so instead of grinding through it.
        if done >= min(GARBAGE_WINDOW, n) and failed == done:
            first = records[min(errors_at)]
            raise DataError(f"the first {done} files under {safe_str(str(root))} all failed to decode (e.g. "
                            f"{safe_str(first.relpath)}: {errors_at[min(errors_at)][0]}); is this an image folder?")
        if progress:
            progress(done, n)
    return scores, errors_at, time.perf_counter() - t, note, "onnxruntime" if fn is None else runtime_of(fn)


def _batch_size(pred: Predictor, dev, s: PredictSettings, n: int):
    """-> (batch size, note or None): the request (default 32 CPU, 256 CUDA), capped to what RAM holds like extract."""
    from ..devices import default_workers
    from ..features.engine import cap_batch_size, default_batch_size

    return cap_batch_size(s.batch_size or default_batch_size(dev), pred.network, pred.preprocess, dev,
                          workers=default_workers(s.workers), n_images=n, largest_activation=pred.largest_activation)


def _score_batches(paths: list, pred: Predictor, fn, dev, s: PredictSettings, bsize: int,
                   timings: Optional[dict] = None):
    """(positions, their scores, [(position, reason, stage)]) per batch, in input order. A torch model runs through
    the extraction engine; an ONNX model gets the same batches of the same PIL pixels from featx.data.numpy_pixels."""
    if pred.needs_torch:
        from ..features.engine import iter_outputs

        # Same decoder policy as extract (GPU JPEG decoding on CUDA, PIL elsewhere), so predict sees extract's pixels.
        for b in iter_outputs(paths, pred.preprocess, fn, device=dev, batch_size=bsize, workers=s.workers,
                              decoder="auto", stats=timings):
            yield b.indices, (pred.to_scores(b.outputs) if len(b.indices) else None), b.errors
        return
    from ..data.numpy_pixels import iter_numpy_pixels

    batches = [list(range(i, min(i + bsize, len(paths)))) for i in range(0, len(paths), bsize)]
    for idx, pixels, errors in iter_numpy_pixels(paths, pred.preprocess, batches=batches, workers=s.workers):
        yield idx, (pred.score_pixels(pixels) if pixels is not None else None), errors


def _result(folder, pred: Predictor, scores, errors_at, s: PredictSettings, plan: _Plan, device: str,
            run_seconds: float) -> PredictResult:
    rows, counts, errors = _make_rows(folder, pred.classes, scores, errors_at, s.top_k)
    n = len(rows)
    return PredictResult(
        rows=rows, classes=list(pred.classes), counts=counts, confidence_kind=pred.confidence_kind,
        model=pred.description, model_kind=pred.kind, n_images=n, n_errors=len(errors), errors=errors,
        device=device, seconds=0.0, images_per_s=n / run_seconds if run_seconds > 0 else 0.0,
        output=plan.table, format=plan.fmt, labelled=folder.has_labels, dry_run=s.dry_run,
        warnings=[w for w in folder.warnings if w not in set(folder.skip_warnings)],  # skips are listed on their own
        skipped=[{**k, "path": safe_str(k["path"]), "reason": safe_str(str(k["reason"]))} for k in folder.skipped])


def _make_rows(folder, classes, scores, errors_at, top_k: int):
    """One row per record in the documented key order; every name made printable (file names and class folders may
    hold bytes that are not UTF-8)."""
    k = min(top_k, len(classes))
    counts = {c: 0 for c in classes}
    rows, errors = [], []
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
        if folder.has_labels:
            row["true_label"] = safe_str(rec.label) if rec.label is not None else None
        rows.append(_ordered(row))
    return rows, counts, errors


def _ordered(row: dict) -> dict:
    return {key: row[key] for key in ROW_KEYS if key in row}


def _evaluate(res: PredictResult, folder, pred: Predictor) -> None:
    from ..report import classification_metrics, summary

    missing = [pip for mod, pip in (("sklearn", "scikit-learn"), ("matplotlib", "matplotlib"))
               if importlib.util.find_spec(mod) is None]
    if missing:  # a deployment install (ONNX, no torch) may lack them: the predictions still count, so write them
        res.warnings.append(f"no scores or report against the folder labels: {' and '.join(missing)} not installed "
                            f"(pip install {' '.join(missing)})")
        return
    idx = [i for i, r in enumerate(res.rows) if r["error"] is None and r.get("true_label") is not None]
    y_true = [res.rows[i]["true_label"] for i in idx]
    y_pred = [res.rows[i]["label"] for i in idx]
    res.unknown_classes = sorted(set(y_true) - set(pred.classes))
    if res.unknown_classes:
        res.warnings.append(f"true classes the model does not know: {', '.join(res.unknown_classes)} "
                            "(their images count as errors in the scores)")
    if not idx:
        res.warnings.append("no labelled image could be read; no scores")
        return
    idx = _set_seen_apart(res, folder, pred, idx)
    if not idx:
        return
    y_true = [res.rows[i]["true_label"] for i in idx]
    y_pred = [res.rows[i]["label"] for i in idx]
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


def _set_seen_apart(res: PredictResult, folder, pred: Predictor, idx: list) -> list:
    """Score the images the model was trained or selected on apart (matched by file content, featx.data.seen);
    -> the rows left for the headline. A model that records no such images gets a warning instead."""
    from ..data.seen import match
    from ..report import classification_metrics, summary

    record, how = pred.seen, "file content"
    if record is None and pred.kind in ("finetune", "scratch") and pred.path is not None:
        from ..data.seen import old_run_record

        record, how = old_run_record(Path(pred.path).parent), "path only: the run records no file hashes"
    found = match(record, [folder.records[i].path for i in idx], [res.rows[i]["path"] for i in idx])
    if found is None:
        if pred.needs_torch:  # a head or run made before featx recorded its images (an ONNX export carries none)
            res.warnings.append(f"this {pred.kind} model records no training images (made by an older featx): "
                                "images it was trained or chosen on cannot be told apart here, and scores on them "
                                "overstate its accuracy; fit or train it again to record them")
        return idx
    for what in found.get("unrecorded", []):  # the model's record is partial: some seen images may be counted
        res.warnings.append(f"this model's record of its training images is incomplete ({what}): images it was "
                            "trained or chosen on may be in the scores, which then overstate its accuracy")
    seen = [i for i, s in zip(idx, found["seen"]) if s]
    if not seen:
        return idx
    seen_set = set(seen)
    rest = [i for i in idx if i not in seen_set]
    res.seen_paths = [res.rows[i]["path"] for i in seen]
    res.seen_metrics = summary(classification_metrics([res.rows[i]["true_label"] for i in seen],
                                                      [res.rows[i]["label"] for i in seen], pred.classes))
    by_path = f", {found['by_path']} of them by path" if found["by_path"] and how == "file content" else ""
    res.warnings.append(f"{len(seen)} of the {len(idx)} labelled images were used to train or choose this model "
                        f"(matched by {how}{by_path}): they are scored apart as 'seen in training' and the "
                        f"scores cover the other {len(rest)} only")
    if not rest:
        res.warnings.append("every labelled image was seen in training: no score on unseen images")
    return rest


def _sort(res: PredictResult, folder, plan: _Plan, s: PredictSettings) -> Optional[MoveJournal]:
    """Sort (or plan) every readable image; record the outcome in each row. Returns the --move journal, if any."""
    res.sort_into, res.sort_mode, res.min_confidence = plan.sort_root, s.mode, s.min_confidence
    journal = MoveJournal(plan.sort_root, plan.root) if s.mode == "move" else None
    if journal is not None:
        res.earlier_moves = [_ordered({**e["row"], "sorted_to": safe_str(e["dest"]), "sort_status": EARLIER})
                             for e in journal.earlier()]
    try:
        res.sort_actions = sort_images(
            [(r.path, row) for r, row in zip(folder.records, res.rows)], plan.sort_root, mode=s.mode,
            min_confidence=s.min_confidence, dry_run=s.dry_run, stop_on_failure=s.strict,
            journal=None if s.dry_run else journal)
    finally:
        if journal is not None:
            journal.close()
    acted = {a.index: a for a in res.sort_actions}
    for i, row in enumerate(res.rows):
        a: Optional[SortAction] = acted.get(i)
        status = a.describe() if a else "" if row["error"] is not None else "not attempted"
        row.update(sorted_to=safe_str(str(a.dest)) if a and a.dest else "", sort_status=status)
        res.rows[i] = _ordered(row)
    return journal


def _write(res: PredictResult, folder, plan: _Plan, top_k: int) -> None:
    if plan.table is not None:
        # files an interrupted earlier --move took out of the image folder get their rows back, in path order
        rows = sorted(res.rows + res.earlier_moves, key=lambda r: r["path"]) if res.earlier_moves else res.rows
        write_table(rows, plan.table, plan.fmt,
                    Layout(top_k=top_k, labelled=folder.has_labels, sorted=plan.sort_root is not None,
                           score=score_column(res.confidence_kind)))
    if plan.report_dir is not None and res.metrics is not None:
        _write_report(res, folder, plan.report_dir)


def _write_report(res: PredictResult, folder, rep_dir: Path) -> None:
    from ..report import save_evaluation

    seen = set(res.seen_paths)  # images the model was trained or chosen on are not in the scores, nor here
    scored = [(i, r) for i, r in enumerate(res.rows)
              if r["error"] is None and r.get("true_label") is not None and r["path"] not in seen]
    mistakes = [{"path": r["path"], "file": folder.records[i].path, "true": r["true_label"], "pred": r["label"],
                 "confidence": r["confidence"]} for i, r in scored if r["label"] != r["true_label"]]
    files = save_evaluation(
        rep_dir, res.metrics, mistakes, info={"model": res.model, "confidence_kind": res.confidence_kind},
        extra={"split_metrics": res.split_metrics, "unknown_classes": res.unknown_classes, "n_errors": res.n_errors,
               "seen_in_training": {"n": len(res.seen_paths), "metrics": res.seen_metrics,
                                    "paths": res.seen_paths}},
        score_name=res.confidence_kind, what="predictions vs folder labels")
    res.report_dir, res.confusion_png, res.gallery_png = rep_dir, files["confusion"], files["gallery"]
    from ..report_html import evaluation_page  # report.html: the confusion matrix with its images, sortable

    evaluation_page(rep_dir / "report.html", res.metrics,
                    [{"path": r["path"], "file": folder.records[i].path, "true": r["true_label"], "pred": r["label"],
                      "confidence": r["confidence"]} for i, r in scored],
                    title=f"featx predict: {res.model} on {folder.root}", score_name=res.confidence_kind,
                    notes=res.warnings)


def _strict_skips(skipped: list) -> StrictModeError:
    first = skipped[0]
    return StrictModeError(f"--strict: {len(skipped)} file(s) or folder(s) could not be read (first: "
                           f"{safe_str(first['path'])}: {first['reason']}); nothing was predicted")


def _raise_for_failures(res: PredictResult, s: PredictSettings) -> None:
    """After everything was written: files that could not be sorted (exit 7), then --strict and unreadable (exit 6)."""
    written = (f"; predictions for the rest were written to {safe_str(str(res.output))}"
               if res.output is not None and not res.dry_run else "")
    failed = [a for a in res.sort_actions if a.status == "failed"]
    exc: Optional[FeatxError] = None
    if failed:
        sortable = sum(r["error"] is None for r in res.rows)
        stopped = (f"; --strict stopped the sort at the first failure ({sortable - len(res.sort_actions)} not "
                   "attempted)" if s.strict else "")
        unread = f"; {res.n_errors} images could not be read" if res.n_errors else ""
        exc = OutputError(f"{len(failed)} of {sortable} images could not be sorted into {safe_str(str(res.sort_into))} "
                          f"(e.g. {safe_str(str(failed[0].source))}: {failed[0].error}){stopped}{written}{unread}")
    elif s.strict and res.errors:
        e0 = res.errors[0]
        exc = StrictModeError(f"{len(res.errors)} of {res.n_images} images could not be read (e.g. {e0['path']}: "
                              f"{e0['reason']}){written}")
    if exc is not None:
        exc.result = res  # the CLI prints the summary before the error line
        raise exc
