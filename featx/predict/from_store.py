"""`featx predict STORE -m head.skops`: score the features a store already holds with a head, no network built.

A user who extracted features for a million images (on a cluster, `featx extract --shard I/N`) classifies them
without running the backbone again. The store is any featx feature store (`featx.features.formats`: a single
``.npz``, a ``.parquet``, or a sharded folder with ``manifest.json``), recognised by the registry's recognisers.

What it writes is what `predict_folder` writes for images: the same table (`tables.py`: path, label, score column,
top-k, true_label when the store has labels, error), the same evaluation (`featx.report`) and the same
``PredictResult``. Differences, and why:

- only a head (``.skops``) can score features; a fine-tuned / scratch run or an ``.onnx`` model needs pixels, and the
  head must have been fitted on features of the same backbone, weights, layer and preprocessing (crop size included):
  UsageError naming both fingerprints otherwise;
- a sharded store is scored shard by shard from its memory-mapped ``.npy`` files, in blocks of ``batch_size`` rows;
  the table is written while scoring, into one temp file renamed over the output at the end (`_io.atomic_write`),
  and ``PredictResult.rows`` reads the paths back from the store when asked, so memory stays bounded by a shard,
  not by the store (a 1M-row store works). ``.npz`` / ``.parquet`` stores are single files read whole, as
  `load_features` reads them;
- ``path`` is the row's path in the store: relative to the folder the features were extracted from (the store's
  ``meta["root"]``). Images the head recorded as seen in training are scored apart as for images: by file content
  when that folder is on this machine (and the store has at most ``featx.data.seen.MAX_FILES`` rows: hashing reads
  every image, which is what predicting from a store avoids), else by the recorded paths only, with a warning;
- rows whose features hold NaN/Inf get an error row (no label), like an unreadable image; images extraction could
  not read (``meta["skipped"]``) have no row and are listed in ``skipped``; --strict refuses either as for images;
- --sort-into is refused (no image file is placed); --weights and --runtime torch/onnx are refused (no backbone runs,
  a silent ignore would mislead); --image-size only confirms the store's crop size; --device, --workers and
  --threads are ignored (they tune decoding and the network; the head scores on the CPU); --batch-size is the
  number of rows scored at once.
"""
from __future__ import annotations

import heapq
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .._io import atomic_write, safe_str
from ..errors import ArtifactError, UsageError, interruptible

BLOCK_ROWS = 4096  # rows scored at once (default --batch-size): 21 MB of 1,280 float32 features; sklearn makes ~3
# working copies of a block (scaler, products), measured: 8,192 rows peaked 60 MB higher on the 100k store
# Labelled rows whose (path, true, predicted, score) the report keeps: every row up to this many, else the most
# confidently misclassified ones (report.html shows ROW_CAP rows anyway; metrics.json lists them).
REPORT_ITEMS = 20_000
STAGE = "features"  # the `stage` of an error row: the stored features, not decoding
NONFINITE = "the stored features hold NaN or Inf; re-extract this image"


# -- recognising a store ----------------------------------------------------------------------------------------------
def is_feature_store(source) -> bool:
    """True when ``source`` (one path) is a featx feature store rather than images: a file that the npz or Parquet
    recogniser of `featx.features.formats` accepts (or named ``.npz`` / ``.parquet``: the store reader then says why
    it cannot read it, instead of decoding it as an image), or a folder whose ``manifest.json`` (or a worker's part
    manifest) featx wrote. A folder of images that merely holds a file named manifest.json is images."""
    from ..features import formats

    if isinstance(source, (list, tuple)):
        return len(source) == 1 and is_feature_store(source[0])
    if not isinstance(source, (str, bytes, os.PathLike)) or os.fsdecode(source).startswith("@"):
        return False
    p = Path(os.fsdecode(source))
    if p.is_dir():
        sharded = formats.recogniser("sharded")
        return sharded(p) or any(sharded(q) for q in p.glob("manifest-part-*-of-*.json"))
    if not p.is_file():
        return False
    if p.name == formats.MANIFEST:
        return formats.recogniser("sharded")(p)
    if p.suffix.lower() in (formats.FORMATS["npz"].suffix, formats.FORMATS["parquet"].suffix):
        return True
    try:  # the first bytes first: an image never pays for opening a zip or importing pyarrow
        with open(p, "rb") as fh:
            magic = fh.read(4)
    except OSError:
        return False
    return ((magic == b"PK\x03\x04" and formats.recogniser("npz")(p))
            or (magic == b"PAR1" and formats.recogniser("parquet")(p)))


# -- the store as blocks of rows --------------------------------------------------------------------------------------
@dataclass
class _Source:
    """A store opened for reading: its meta and, per part (a shard, or the whole single-file store), a function
    giving the features (memory-mapped for a shard) and one giving the rows (paths, labels, splits)."""

    path: Path
    n: int
    dim: int
    classes: list
    meta: dict
    parts: list  # [(n rows, features() -> array, rows() -> {"paths", "labels", "splits"})]
    sharded: bool

    @property
    def root(self) -> Optional[Path]:
        """The image folder the rows' paths are relative to, when it is a folder on this machine."""
        root = self.meta.get("root")
        return Path(root) if isinstance(root, str) and root and Path(root).is_dir() else None


def _open(path: Path) -> _Source:
    from ..features import formats
    from ..features.store import load_features

    fmt = formats.format_of(path)
    if fmt != "sharded":
        fs = load_features(path)  # one file: read whole, its layout and paths checked
        rows = {"paths": np.asarray(fs.paths, dtype=object), "labels": fs.labels, "splits": fs.splits}
        return _Source(path, len(fs), fs.features.shape[1], list(fs.classes), dict(fs.meta),
                       [(len(fs), lambda: fs.features, lambda: rows)], sharded=False)
    from ..features.sharded import open_sharded

    st = open_sharded(path)
    where = safe_str(str(path))

    def rows(i):
        from ..features.store import check_paths

        r = st.rows(i)
        check_paths(r["paths"].tolist(), f"{where} (shard {i})")  # per shard: the store is never read whole
        return r

    parts = [(int(s["n"]), (lambda i=i: st.features(i)), (lambda i=i: rows(i))) for i, s in enumerate(st.shards)]
    return _Source(st.folder, st.n, st.dim, list(st.classes), dict(st.meta), parts, sharded=True)


# -- rows, kept compact and built when read ---------------------------------------------------------------------------
@dataclass
class _Part:
    lo: int
    n: int
    rows: Callable[[], dict]
    top: np.ndarray  # n x max(k, 1) class indices, best first
    top_scores: np.ndarray  # n x max(k, 1) float64
    errors: dict  # local row -> reason


class StoreRows(Sequence):
    """``PredictResult.rows`` of a store: one row dict per stored row, in store order, built when read. It keeps the
    top-k indices and scores (a few bytes a row) and reads each part's paths back from the store on demand, so a
    million rows do not sit in memory as dicts."""

    def __init__(self, classes: list, k: int, labelled: bool):
        self.classes, self.k, self.labelled = classes, k, labelled
        self.parts: list = []
        self._cached = (None, None)

    def __len__(self) -> int:
        return sum(p.n for p in self.parts)

    def _rows_of(self, j: int) -> dict:
        if self._cached[0] != j:
            self._cached = (j, self.parts[j].rows())
        return self._cached[1]

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(i)
        for j, p in enumerate(self.parts):
            if i < p.lo + p.n:
                return self.build(p, self._rows_of(j), i - p.lo)
        raise IndexError(i)  # pragma: no cover - the sizes add up

    def __iter__(self):
        for j, p in enumerate(self.parts):
            rows = self._rows_of(j)
            for i in range(p.n):
                yield self.build(p, rows, i)

    def build(self, p: _Part, rows: dict, i: int) -> dict:
        """The row `predict_folder` writes for an image, in the same key order (tables.ROW_KEYS)."""
        row = {"path": safe_str(str(rows["paths"][i]))}
        if i in p.errors:
            row.update(label=None, confidence=None, top_k=[])
        else:
            t, s = p.top[i], p.top_scores[i]
            row.update(label=self.classes[t[0]], confidence=float(s[0]),
                       top_k=[{"label": self.classes[c], "score": float(v)} for c, v in zip(t[:self.k], s[:self.k])])
        if self.labelled:
            true = rows["labels"][i]
            row["true_label"] = safe_str(str(true)) if true is not None and str(true) != "" else None
        row["error"] = p.errors.get(i)
        return row


# -- the run ----------------------------------------------------------------------------------------------------------
@dataclass
class _Eval:
    """What the evaluation needs, a few bytes per labelled row: class codes, seen flags, splits."""

    names: dict = field(default_factory=dict)  # true class name -> code
    true: list = field(default_factory=list)
    pred: list = field(default_factory=list)
    seen: list = field(default_factory=list)
    split: list = field(default_factory=list)
    seen_paths: list = field(default_factory=list)
    by_path: int = 0
    items: list = field(default_factory=list)  # heap of (confidence, -n, item): the most confident mistakes
    correct: list = field(default_factory=list)  # the first REPORT_ITEMS rows predicted right
    n_items: int = 0

    def code(self, name: str) -> int:
        return self.names.setdefault(name, len(self.names))


def predict_store(store, model=None, *, output=None, format: Optional[str] = None, top_k: int = 3,
                  device: str = "auto", batch_size: Optional[int] = None, workers: Optional[int] = None,
                  sort_into=None, mode: str = "copy", min_confidence: Optional[float] = None, dry_run: bool = False,
                  strict: bool = False, report_dir=None, overwrite: bool = False, weights=None,
                  image_size: Optional[int] = None, progress: Optional[Callable[[int, int], None]] = None,
                  runtime: str = "auto", threads: Optional[int] = None):
    """Score every row of the feature store ``store`` with the head ``model`` -> ``PredictResult`` (see the module
    docstring; `predict_folder` calls this for a store, with the same arguments)."""
    from .folder import RESUME_HINT, PredictSettings, _claim, _plan_outputs, _raise_for_failures, _strict_skips

    t0 = time.perf_counter()
    shown = safe_str(str(store))
    if sort_into is not None:
        raise UsageError(f"--sort-into places image files; {shown} is a feature store (no images to place): predict "
                         f"its images' folder to sort them, or drop --sort-into")
    if weights is not None:
        raise UsageError(f"--weights names backbone weights for images; {shown} is a feature store, scored by the head "
                         "alone with no backbone built: drop --weights")
    if min_confidence is not None:
        raise UsageError("--min-confidence applies to sorting images, and a feature store is not sorted: drop it")
    if str(runtime or "auto").lower() != "auto":
        raise UsageError(f"--runtime {runtime}: no network runs for a feature store ({shown}); the head scores the "
                         "stored features. Drop --runtime")
    s = PredictSettings(model=model, output=output, format=format, top_k=top_k, batch_size=batch_size,
                        dry_run=dry_run, strict=strict, report_dir=report_dir, overwrite=overwrite,
                        image_size=image_size)
    s.check()
    src = _open(Path(os.fsdecode(store)))
    head = _load_head(s.model, strict)
    _check_provenance(head, src, s.image_size)
    labelled = _labelled(src)
    plan = _plan_outputs(s, src.path, labelled)
    skipped = [{**k, "path": safe_str(str(k.get("path"))), "reason": safe_str(str(k.get("reason")))}
               for k in (src.meta.get("skipped") or []) if isinstance(k, dict)]
    with interruptible(RESUME_HINT), _claim(plan, s):
        if s.strict and skipped:  # images extraction could not read: known before any work, as for a folder
            raise _strict_skips(skipped)
        res, ev = _score(src, head, plan, s, labelled, progress)
        res.skipped = skipped
        res.seconds = time.perf_counter() - t0
        if labelled:
            _evaluate(res, ev, head)
            if plan.report_dir is not None and res.metrics is not None and not s.dry_run:
                _report(res, ev, src, plan.report_dir)
    _raise_for_failures(res, s)
    return res


def _load_head(model, strict: bool):
    """The head at ``model``; a model that needs pixels (a run, an .onnx export) is refused with what to do."""
    from ..heads.store import Head, load_head
    from .predictor import _default_model, artifact_kind

    model = _default_model() if model is None else model
    kind = artifact_kind(model)
    if kind != "head":
        what = {"trained": "a fine-tuned / scratch run", "onnx": "an exported .onnx model"}[kind]
        raise UsageError(f"{safe_str(str(model))} is {what}, which needs pixels; only a head (.skops from `featx fit`) "
                         "can score stored features. Predict the images themselves: featx predict IMAGES -m MODEL")
    return model if isinstance(model, Head) else load_head(Path(model), strict=strict)


def _check_provenance(head, src: _Source, image_size: Optional[int]) -> None:
    """The head's features and the store's must come from the same backbone, weights, layer and preprocessing."""
    from ..features.store import provenance_fingerprint, provenance_key

    store = safe_str(str(src.path))
    try:
        head.check_compatible(src.meta, dim=src.dim)
    except ArtifactError as exc:
        raise UsageError(f"{store}: {exc}") from None
    if image_size is not None:
        pp = provenance_key(src.meta).get("preprocess") or {}
        size = pp.get("input_size") if isinstance(pp, dict) else None
        if size is None or int(size) != int(image_size):
            raise UsageError(f"--image-size {image_size}: the features in {store} were extracted at "
                             f"{size if size is not None else 'an unrecorded'} px (fingerprint "
                             f"{provenance_fingerprint(src.meta)}) and cannot be changed; drop --image-size")


def _labelled(src: _Source) -> bool:
    if not src.parts:
        return False
    return src.parts[0][2]().get("labels") is not None


def _score(src: _Source, head, plan, s, labelled: bool, progress):
    """Score every part in blocks, writing the table as it goes -> (PredictResult, _Eval)."""
    import contextlib

    from .folder import PredictResult
    from .tables import Layout, score_column

    classes = [safe_str(str(c)) for c in head.classes]
    k = min(s.top_k, len(classes))
    score_kind = head.score_kind
    confidence_kind = "probability" if score_kind == "probability" else "decision score"
    rows = StoreRows(classes, k, labelled)
    ev = _Eval()
    counts = {c: 0 for c in classes}
    errors: list = []
    seen_match = _seen_matcher(head, src, labelled)
    bsize = s.batch_size or BLOCK_ROWS
    layout = Layout(top_k=k, labelled=labelled, sorted=False, score=score_column(confidence_kind))
    write = plan.table is not None and not s.dry_run
    report = plan.report_dir is not None and not s.dry_run  # keep the rows a report lists only when one is written
    t_run = time.perf_counter()
    done = 0
    if progress:
        progress(0, src.n)
    with contextlib.ExitStack() as stack:
        sink = _TableSink(stack.enter_context(atomic_write(plan.table, "wb")), plan.fmt, layout) if write else None
        for n, features, read_rows in src.parts:
            x = features()
            top = np.zeros((n, max(k, 1)), dtype=np.int32)
            top_scores = np.zeros((n, max(k, 1)), dtype=np.float64)
            part_errors: dict = {}
            for lo in range(0, n, bsize):
                block = np.asarray(x[lo:lo + bsize], dtype=np.float32)
                ok = np.isfinite(block).all(axis=1)
                for i in np.flatnonzero(~ok):
                    part_errors[lo + int(i)] = NONFINITE
                if ok.any():
                    scores, _ = head.predict_scores(block[ok] if not ok.all() else block)
                    # the order _make_rows uses for images: stable descending, ties to the class listed first
                    order = np.argsort(-np.nan_to_num(scores, nan=-np.inf), axis=1, kind="stable")[:, :max(k, 1)]
                    where = lo + np.flatnonzero(ok)
                    top[where] = order
                    top_scores[where] = np.take_along_axis(scores, order, axis=1)
                del block
                _release(x, lo, min(lo + bsize, n))
                done += min(bsize, n - lo)
                if progress:
                    progress(done, src.n)
            del x  # unmap this shard before the next: its pages leave the process
            part = _Part(len(rows), n, read_rows, top, top_scores, part_errors)
            rows.parts.append(part)
            r = read_rows()
            for lo in range(0, n, bsize):  # row dicts a block at a time: a shard's worth would be ~1 kB a row
                built = [rows.build(part, r, i) for i in range(lo, min(lo + bsize, n))]
                for row in built:
                    if row["error"] is None:
                        counts[row["label"]] += 1
                    else:
                        errors.append({"path": row["path"], "reason": row["error"], "stage": STAGE})
                if sink is not None:
                    sink.write(built)
                if labelled:
                    _collect(ev, built, r, lo, src, seen_match, keep_items=report)
                del built
            del r
        if sink is not None:
            sink.close()
    run_seconds = time.perf_counter() - t_run
    res = PredictResult(
        rows=rows, classes=classes, counts=counts, confidence_kind=confidence_kind,
        model=f"{head.kind} head on stored features of {head.feature_meta.get('backbone')}", model_kind="head",
        n_images=src.n, n_errors=len(errors), errors=errors, device="cpu", seconds=0.0,
        images_per_s=src.n / run_seconds if run_seconds > 0 else 0.0, output=plan.table, format=plan.fmt,
        labelled=labelled, dry_run=s.dry_run, runtime="stored features")
    res.warnings += seen_match.warnings if seen_match is not None else []
    return res, ev


def _release(x, lo: int, hi: int) -> None:
    """Tell the kernel the pages of rows lo..hi of a memory-mapped shard are done with (MADV_DONTNEED): they are
    clean file pages, read again from the file if ever touched, and without this a 65,536-row shard's 335 MB stay in
    the process's resident set until the shard is unmapped. A plain array (npz / Parquet store) is left alone."""
    import mmap

    mm = getattr(x, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return
    base = len(mm) - x.nbytes  # the array ends where the mapping ends; before it, the page-aligned header part
    row = x.strides[0]
    start = (base + lo * row) // mmap.PAGESIZE * mmap.PAGESIZE
    end = min(base + hi * row, len(mm)) // mmap.PAGESIZE * mmap.PAGESIZE  # whole pages only: the next block's
    if end > start:                                                       # first rows may share the last page
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)
        except (OSError, ValueError):  # an advice, never a failure
            pass


class _TableSink:
    """One table written block by block into an open temp file: each block rendered by the format's own function
    (tables.FORMATS), the preamble it repeats (the CSV header) kept only once."""

    def __init__(self, fh, fmt: str, layout):
        from .tables import FORMATS

        self.fh, self.render, self.layout = fh, FORMATS[fmt].render, layout
        self.preamble = self.render([], layout)
        self.started = False

    def write(self, rows: list) -> None:
        data = self.render(rows, self.layout)
        if self.started and self.preamble and data.startswith(self.preamble):
            data = data[len(self.preamble):]
        self.fh.write(data)
        self.started = True

    def close(self) -> None:
        if not self.started:
            self.fh.write(self.preamble)


class _SeenMatcher:
    """featx.data.seen.match per part: by content when the store's images are here (and few enough to hash), else
    by the recorded paths only."""

    def __init__(self, record: Optional[dict], root: Optional[Path], by_content: bool):
        self.record, self.root, self.by_content = record, root, by_content
        self.warnings: list = []

    def __call__(self, paths: list):
        from ..data.seen import match

        if self.by_content:
            return match(self.record, [self.root / p for p in paths], paths)
        paths_only = {k: v for k, v in self.record.items() if k not in ("trained", "selected")}
        return match(paths_only, [None] * len(paths), paths)


def _seen_matcher(head, src: _Source, labelled: bool) -> Optional[_SeenMatcher]:
    from ..data.seen import HASH, MAX_FILES

    if not labelled:
        return None
    record = head.meta.get("seen")
    if not record or record.get("hash") != HASH:
        m = _SeenMatcher(None, None, False)
        m.warnings.append("this head records no training images (made by an older featx): images it was trained or "
                          "chosen on cannot be told apart here, and scores on them overstate its accuracy; fit it "
                          "again to record them")
        return m
    hashed = any(isinstance(record.get(r), str) and record.get(r) for r in ("trained", "selected"))
    by_content = hashed and src.root is not None and src.n <= MAX_FILES
    m = _SeenMatcher(record, src.root, by_content)
    if hashed and not by_content:
        why = (f"the folder its rows come from ({safe_str(str(src.meta.get('root')))}) is not on this machine"
               if src.root is None else f"{src.n:,} rows are more than featx hashes ({MAX_FILES:,})")
        m.warnings.append(f"this head records its training images by content, but {why}: they are matched by their "
                          "recorded paths only, so images it was trained or chosen on may be in the scores, which "
                          "then overstate its accuracy")
    for what in (record[k] for k in ("trained_unrecorded", "selected_unrecorded") if record.get(k)):
        m.warnings.append(f"this model's record of its training images is incomplete ({what}): images it was "
                          "trained or chosen on may be in the scores, which then overstate its accuracy")
    return m


def _collect(ev: _Eval, built: list, r: dict, lo: int, src: _Source, seen_match, keep_items: bool) -> None:
    """Add a block of labelled, scored rows (``built``: a part's rows from ``lo``) to the evaluation (codes, seen
    flags, splits, report items)."""
    idx = [i for i, row in enumerate(built) if row["error"] is None and row.get("true_label") is not None]
    if not idx:
        return
    seen = np.zeros(len(idx), dtype=bool)
    if seen_match is not None and seen_match.record is not None:
        found = seen_match([str(r["paths"][lo + i]) for i in idx])
        if found is not None:
            seen = found["seen"]
            ev.by_path += int(found["by_path"])
    splits = r.get("splits")
    root = src.root
    for i, was_seen in zip(idx, seen):
        row = built[i]
        ev.true.append(ev.code(row["true_label"]))
        ev.pred.append(ev.code(row["label"]))
        ev.seen.append(bool(was_seen))
        ev.split.append(str(splits[lo + i]) if splits is not None else "")
        if was_seen:
            ev.seen_paths.append(row["path"])
            continue
        if not keep_items:
            continue
        item = {"path": row["path"], "file": str(root / str(r["paths"][lo + i])) if root else row["path"],
                "true": row["true_label"], "pred": row["label"], "confidence": row["confidence"]}
        ev.n_items += 1
        if item["true"] != item["pred"]:
            entry = (item["confidence"], -ev.n_items, item)  # keep the most confident mistakes
            if len(ev.items) < REPORT_ITEMS:
                heapq.heappush(ev.items, entry)
            else:
                heapq.heappushpop(ev.items, entry)
        elif len(ev.correct) < REPORT_ITEMS:
            ev.correct.append(item)


def _evaluate(res, ev: _Eval, head) -> None:
    """Headline, split and seen-in-training scores, as `predict_folder` gives them for a labelled folder."""
    from ..report import classification_metrics, summary

    if not ev.true:
        res.warnings.append("no labelled row could be scored; no scores")
        return
    names = np.array(list(ev.names), dtype=object)
    true, pred = names[np.asarray(ev.true)], names[np.asarray(ev.pred)]
    seen = np.asarray(ev.seen, dtype=bool)
    res.unknown_classes = sorted(set(true.tolist()) - set(res.classes))
    if res.unknown_classes:
        res.warnings.append(f"true classes the model does not know: {', '.join(res.unknown_classes)} "
                            "(their images count as errors in the scores)")
    if seen.any():
        res.seen_paths = ev.seen_paths
        res.seen_metrics = summary(classification_metrics(true[seen], pred[seen], res.classes))
        via = f", {ev.by_path} of them by path" if ev.by_path else ""
        res.warnings.append(f"{int(seen.sum())} of the {len(seen)} labelled images were used to train or choose this "
                            f"model (matched by the head's record of them{via}): they are scored apart as 'seen in "
                            f"training' and the scores cover the other {int((~seen).sum())} only")
        if seen.all():
            res.warnings.append("every labelled image was seen in training: no score on unseen images")
            return
    res.metrics = classification_metrics(true[~seen], pred[~seen], res.classes)
    split = np.asarray(ev.split, dtype=object)[~seen]
    if split.size and (split != "").any():
        from ..features.store import _split_order  # train, val, test first, as a folder's splits

        for name in sorted(set(split.tolist()) - {""}, key=_split_order):
            m = split == name
            res.split_metrics[name] = summary(classification_metrics(true[~seen][m], pred[~seen][m], res.classes))


def _report(res, ev: _Eval, src: _Source, rep_dir: Path) -> None:
    """confusion.png, misclassified.png, metrics.json and report.html, as for a labelled folder; the listed images are
    every scored row up to REPORT_ITEMS, else the REPORT_ITEMS most confidently misclassified."""
    from ..report import save_evaluation
    from ..report_html import evaluation_page

    mistakes = [it for _, _, it in sorted(ev.items, key=lambda e: (-e[0], -e[1]))]
    n_wrong = res.metrics["n"] - int(np.trace(np.asarray(res.metrics["confusion"])))
    complete = ev.n_items <= REPORT_ITEMS
    items = mistakes + ev.correct if complete else mistakes
    notes = list(res.warnings)
    if not complete:
        notes.append(f"{ev.n_items:,} rows were scored: this page lists the {len(mistakes):,} most confidently "
                     f"misclassified of {n_wrong:,} (the whole table is in {safe_str(str(res.output))})")
    files = save_evaluation(
        rep_dir, res.metrics, mistakes, info={"model": res.model, "confidence_kind": res.confidence_kind,
                                              "features": safe_str(str(src.path))},
        extra={"split_metrics": res.split_metrics, "unknown_classes": res.unknown_classes, "n_errors": res.n_errors,
               "n_misclassified": n_wrong, "misclassified_listed": len(mistakes),
               "seen_in_training": {"n": len(res.seen_paths), "metrics": res.seen_metrics,
                                    "paths": res.seen_paths}},
        score_name=res.confidence_kind, what="predictions vs stored labels")
    res.report_dir, res.confusion_png, res.gallery_png = rep_dir, files["confusion"], files["gallery"]
    evaluation_page(rep_dir / "report.html", res.metrics, items,
                    title=f"featx predict: {res.model} on {safe_str(str(src.path))}", score_name=res.confidence_kind,
                    notes=notes)


__all__ = ["is_feature_store", "predict_store", "StoreRows", "BLOCK_ROWS"]
