"""fit_head: split by featx's one rule, tune by CV, fit the head, score it, optionally calibrate it, save it."""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..data.split import VAL_NAMES, plan_split
from ..errors import ArtifactError, DataError, UsageError
from ..features.store import (FeatureSet, check_feature_dim, check_finite, load_features, provenance_fingerprint,
                              provenance_key)
from ..report import classification_metrics, summary
from .pipelines import HEADS, SPECS, c_to_param, check_head_name, estimator_params, make_estimator, value_label
from .search import cross_validate_one, grid_search, resolve_folds
from .store import Head, feature_provenance, is_head_file, library_versions

log = logging.getLogger(__name__)

TORCH_KINDS = ("logistic", "svm", "mlp")  # heads with a torch solver (mlp has no other)
PRECOMPUTED_MAX_ROWS = 6000  # svm-rbf: precomputed kernel up to here (n^2 float64 = 288 MB), libsvm's own beyond
# svm: n * d from which the torch solver replaces liblinear. Below, liblinear's whole CV search takes about a second
# (0.8 CPU-s on 245 x 1,280 ants/bees features) while importing and first using torch costs ~4 CPU-s; above, liblinear
# grows to minutes (benchmarks/bench_heads.py).
SVM_TORCH_MIN = 1_000_000
# Below this many training rows in the smallest class, features are centred but not divided by a per-feature standard
# deviation: estimated from a few rows it is noise that the head then trusts. Logistic C=1 on k images per class,
# 10 seeded draws (benchmarks/bench_fewshot_scaling.py): hymenoptera lite0 features, standardised vs centred, k=1
# 0.50 vs 0.66, k=5 0.71 vs 0.87, k=20 0.90 vs 0.92; sklearn digits k=1 0.56 vs 0.65, k=20 0.921 vs 0.927, k=50
# 0.954 vs 0.955 (equal from about there on).
FEW_ROWS = 30


@dataclass
class FitSettings:
    """Every knob of ``featx fit`` on one screen (CLI flags map 1:1 onto these)."""

    head: str = "logistic"  # one of HEADS, or "all" to fit each and keep the best on validation
    C: Optional[float] = None  # fixed regularisation (ridge gets alpha = 1/(2C)); None = CV grid search
    k: Optional[int] = None  # fixed k for knn; None = CV grid search
    class_weight: Optional[str] = None  # "balanced" reweights classes inversely to their frequency
    val_split: float = 0.2  # held-out fraction of train when the features carry no val split and no --val is given
    cv: int = 5  # folds for the search (>= 2), lowered to the smallest class count; 0 switches CV off
    seed: int = 0  # seeds the hold-out (featx.data.split: the same images as finetune), CV folds, SVMs and the mlp
    device: str = "auto"  # torch heads (svm, mlp; logistic for large sets): auto = CUDA when present
    backend: str = "auto"  # "sklearn", "torch" (logistic, svm, mlp), "stream" (featx.heads.large), or auto (_backend)
    n_jobs: Optional[int] = None  # CV fits in parallel (joblib); None = 1, -1 = all cores
    # n * d above which "auto" fits the logistic head in torch on CUDA: ~20M (e.g. 16k x 1280) is where sklearn's
    # lbfgs starts taking tens of seconds while a GPU full-batch solve stays around a second.
    torch_auto_threshold: int = 20_000_000
    max_widen: int = 3  # extra grid values tried beyond an edge before giving up (warns if still at the edge)
    grid: Optional[Sequence] = None  # override the default grid of the tuned parameter (tests use short ones)
    calibrate: bool = False  # temperature scaling on the validation split -> probabilities for every head
    overwrite: bool = False  # replace outputs featx did not write
    exclude: Optional[str] = None  # a featx audit CSV or a list of paths to leave out (featx.heads.exclude)


@dataclass
class FitResult:
    """What ``fit_head`` returns: the head, its validation scores and how it was chosen."""

    head: Head
    scores: dict  # split name -> full metrics dict (see featx.report.classification_metrics)
    cv: Optional[dict]  # {param, metric, folds, grid, best, mean, std, per_value, ...}; None when CV was off
    path: Optional[Path] = None
    report_dir: Optional[Path] = None
    training: dict = field(default_factory=dict)  # n, fit_seconds, backend, device, training-data accuracy
    validation: str = ""  # how the validation rows were chosen, in words
    results: list = field(default_factory=list)  # head="all": every head's FitResult, best first
    report_path: Optional[Path] = None
    calibration: Optional[dict] = None  # --calibrate: temperature, ECE before/after per split with reliability bins
    # head="all": how the kept head was chosen ({how, metric, rows, scores: kind -> selection score}); None for one head
    selection: Optional[dict] = None
    # split -> metrics of the kept head on rows that did not choose it (the honest headline); None: ``scores`` are
    headline: Optional[dict] = None

    @property
    def held_out(self) -> dict:
        """split -> metrics on rows that neither trained nor chose this head: what to report as its score."""
        return self.headline if self.headline is not None else self.scores

    @property
    def kind(self) -> str:
        return self.head.kind

    @property
    def selection_split(self) -> Optional[str]:
        """The split that ranks heads: val when present, else the first evaluated split."""
        if "val" in self.scores:
            return "val"
        return next(iter(self.scores), None)

    @property
    def score(self) -> float:
        s = self.scores.get(self.selection_split or "", {})
        return float(s.get("accuracy", float("nan")))

    def to_dict(self) -> dict:
        """The ``--json`` summary: head, params, cv, and per evaluated split accuracy/balanced_accuracy/macro_f1/n."""
        cv = None
        if self.cv:
            cv = {k: v for k, v in self.cv.items() if k != "per_value"}
            cv["per_value"] = [dict(r) for r in self.cv.get("per_value", [])]
        d = {
            "head": self.head.kind,
            "params": dict(self.head.meta.get("params", {})),
            "class_weight": self.head.meta.get("class_weight"),
            "score_kind": self.head.score_kind,
            "backend": self.training.get("backend"),
            "device": self.training.get("device"),
            "cv": cv,
            "validation": self.validation,
            "scores": {name: summary(m) for name, m in self.scores.items()},
            "selection_split": self.selection_split,
            "selection": self.selection,
            "held_out": {name: summary(m) for name, m in self.held_out.items()},
            "training": dict(self.training),
            "calibration": self.head.calibration,
            "classes": self.head.classes,
            "features": {"backbone": self.head.feature_meta.get("backbone"),
                         "fingerprint": self.head.feature_meta.get("fingerprint")},
            "path": str(self.path) if self.path else None,
            "report": str(self.report_path) if self.report_path else None,
        }
        if self.results:
            d["results"] = [r.to_dict() for r in self.results]
        return d


@dataclass
class _Plan:
    train: FeatureSet
    evals: dict  # name -> FeatureSet (labelled)
    how: str
    excluded: Optional[dict] = None  # --exclude: what was left out (featx.heads.exclude.apply_exclusions)


# ------------------------------------------------------------------------------------------------ public entry


def fit_head(features, head: str = "logistic", *, output=None, C: Optional[float] = None, k: Optional[int] = None,
             class_weight: Optional[str] = None, val_split: float = 0.2, val=None, cv: int = 5, seed: int = 0,
             device: str = "auto", backend: str = "auto", n_jobs: Optional[int] = None, report_dir=None,
             grid: Optional[Sequence] = None, calibrate: bool = False, overwrite: bool = False,
             exclude=None) -> FitResult:
    """Fit a classification head on extracted features and score it on data it did not see.

    Args:
        features: a FeatureSet or the path of a features file (``featx extract`` output). Must be labelled.
        head: one of ``HEADS`` (any case) or ``"all"`` (fit each; the result lists them in ``.results``, best first,
            and the best is saved at ``output``, each one also as ``<stem>-<kind>.skops`` beside it).
        output: head file to write (skops). ``None`` writes nothing (the CLI passes ``featx-out/head.skops``).
        C, k: fix the regularisation strength / number of neighbours instead of searching a CV grid.
        class_weight: ``"balanced"`` for imbalanced classes (CV then ranks by balanced accuracy).
        val_split, val: validation rows follow featx.data.split (the same images ``featx finetune`` holds out): the
            features' own val split; else ``val`` features if given; else a stratified seeded ``val_split`` hold-out
            of train. A ``test`` split is only scored, never used to choose anything.
        cv: folds of the stratified CV search, 2 or more (lowered to the smallest class count); 0 turns CV off.
        device, backend: the mlp runs in torch (CUDA when present), the svm too from n x d >= 1M (liblinear below,
            or with ``backend="sklearn"``); the logistic head runs in torch with ``backend="torch"``, with
            ``device="cuda"``, or automatically for large sets when CUDA is present. ``backend="stream"`` (logistic,
            svm, linear), automatic from ``featx.heads.large.STREAM_MIN`` values (n x d, 2^28 = 1 GiB of float32), reads the
            store chunk by chunk and needs ``C`` or ``cv=0`` (featx.heads.large); the other heads are refused at that
            size unless a backend is named. Every head is saved as an ordinary sklearn pipeline.
        report_dir: where ``<stem>.report.json`` and the PNGs go (default: beside the head).
        calibrate: fit a temperature on the validation split: every head then gives probabilities; ECE before and
            after goes in the report, a reliability diagram beside the confusion matrices.
        overwrite: replace outputs that exist and were not written by featx.
        exclude: a `featx audit` CSV or a text file of paths (relative to the extracted folder): those images are
            left out of training and validation (duplicates.csv: all but the first of each group; see
            featx.heads.exclude). The report records how many, per split.

    Raises:
        UsageError for bad options, DataError for unusable labels, ArtifactError for unreadable or mismatched files,
        OutputError when an output cannot be written or another featx run is writing it.
    """
    s = FitSettings(head=head, C=C, k=k, class_weight=class_weight, val_split=val_split, cv=cv, seed=seed,
                    device=device, backend=backend, n_jobs=n_jobs, grid=grid, calibrate=calibrate,
                    overwrite=overwrite, exclude=exclude)
    _validate(s)
    from . import large  # above large.STREAM_MIN values (or --backend stream): the store is read chunk by chunk

    if large.chosen(s, large.store_size(features)):
        return large.fit_streaming(features, s, output=output, report_dir=report_dir, val=val)
    fs = _as_features(features, "features")
    if large.chosen(s, (len(fs), fs.dim)):  # a single-file store, read whole: the fit itself still streams
        return large.fit_streaming(fs, s, output=output, report_dir=report_dir, val=val)
    excluded = None
    if s.exclude is not None:
        from .exclude import apply_exclusions

        fs, excluded = apply_exclusions(fs, s.exclude)
        if len(fs) == 0:
            raise DataError(f"--exclude {s.exclude} leaves no images to fit on")
    val_fs = _as_features(val, "validation features") if val is not None else None
    plan = _plan(fs, val_fs, s)
    plan.excluded = excluded
    output = _resolve_output(output, s.overwrite)
    rdir = Path(report_dir) if report_dir is not None else (output.parent if output is not None else None)
    files = _output_files(output, rdir, plan, s)
    if s.calibrate:  # too few validation rows: refused before any fitting or file
        _calibration_rows(plan)

    with _claimed(files, output, s.overwrite):
        kinds = HEADS if s.head == "all" else (s.head,)
        results = []
        for kind in kinds:
            log.info("fitting %s head on %d samples", kind, len(plan.train))
            res = _fit_one(kind, plan, s)
            if s.calibrate:
                _calibrate(res, plan, s)
            results.append(res)
        best = _best_of(results, plan, s) if s.head == "all" else results[0]
        _record_seen([best, *best.results], plan, s, selected=bool(s.calibrate or (best.selection or {}).get("rows")))
        if files:
            _save(best, output, rdir, every=s.head == "all")
    return best


def _best_of(results: list, plan: _Plan, s: FitSettings) -> FitResult:
    """Keep the best head, chosen on rows its reported score does not use (issue 24.3: picking the best of six on
    val and then reporting that same val score as "held-out" flatters the winner). With CV on, heads are ranked by
    their cross-validated score on the training rows and the winner's validation score stays untouched; with
    --cv 0 half of the validation rows (stratified, seeded) choose and the winner is scored on the other half."""
    val = plan.evals.get("val")
    if all(r.cv and r.cv.get("mean") is not None for r in results):
        metric = results[0].cv.get("metric", "accuracy")
        chosen_by = {r.kind: float(r.cv["mean"]) for r in results}
        how = (f"{results[0].cv.get('folds')}-fold cross-validated {metric.replace('_', ' ')} on the training rows; "
               f"the validation rows took no part in choosing")
        rows = None
        headline = None
    else:
        metric = "balanced_accuracy" if s.class_weight == "balanced" else "accuracy"
        choose, score = _val_halves(val.labels, s.seed)
        chosen_by = {r.kind: float(classification_metrics(val.labels[choose],
                                                          r.head.pipeline.predict(val.features[choose]),
                                                          r.head.classes)[metric]) for r in results}
        how = (f"{metric.replace('_', ' ')} on {len(choose)} of the {len(val)} validation rows (a stratified seeded "
               f"half; --cv 0); the kept head is scored on the other {len(score)}")
        rows = {"choose": int(len(choose)), "score": int(len(score))}
        headline = {}
    results.sort(key=lambda r: -chosen_by[r.kind] if math.isfinite(chosen_by[r.kind]) else math.inf)  # stable
    winner = results[0]
    if headline is not None:
        pipe = winner.head.pipeline
        headline = {"val": classification_metrics(val.labels[score], pipe.predict(val.features[score]),
                                                  winner.head.classes),
                    **{n: m for n, m in winner.scores.items() if n != "val"}}
    best = copy.copy(winner)
    # Its own Head object: the best is saved twice (<stem>.skops and <stem>-<kind>.skops), each records its path.
    best.head = Head(winner.head.pipeline, dict(winner.head.meta))
    best.results = results
    best.selection = {"how": how, "metric": metric, "scores": chosen_by, **({"rows": rows} if rows else {})}
    best.headline = headline
    best.head.meta["selection"] = {**best.selection,
                                   "held_out": {n: summary(m) for n, m in best.held_out.items()}}
    return best


def _record_seen(results: list, plan: _Plan, s: FitSettings, selected: bool) -> None:
    """Record in each head which images trained it and, when validation rows chose or calibrated it, those too
    (content hashes, featx.data.seen): `featx predict` then scores such images apart (issue 24.2)."""
    from ..data.seen import make_record

    record = make_record(plan.train.meta.get("root"), plan.train.paths, "trained")
    val = plan.evals.get("val")
    if selected and val is not None:
        record = make_record(val.meta.get("root"), val.paths, "selected", record)
    for r in results:
        r.head.meta["seen"] = record


def _val_halves(labels: np.ndarray, seed: int) -> tuple:
    """(rows that choose, rows that score): a stratified seeded half of the validation rows each (unstratified when a
    class has a single row)."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(labels))
    if len(idx) < 2:
        raise DataError("--head all with --cv 0 needs at least 2 validation rows: half choose the head, half score it")
    try:
        choose, score = train_test_split(idx, test_size=0.5, stratify=labels, random_state=seed)
    except ValueError:  # a class with one validation row cannot be in both halves
        choose, score = train_test_split(idx, test_size=0.5, random_state=seed)
    return np.sort(choose), np.sort(score)


# ------------------------------------------------------------------------------------------------ validation


def _validate(s: FitSettings) -> None:
    s.head = check_head_name(s.head)
    if isinstance(s.class_weight, str) and s.class_weight.lower() in ("none", ""):
        s.class_weight = None
    if s.class_weight not in (None, "balanced"):
        raise UsageError(f"class weight must be 'balanced' or none, got {s.class_weight!r}")
    if not (isinstance(s.val_split, (int, float)) and 0.0 < float(s.val_split) < 1.0):
        raise UsageError(f"--val-split must be a fraction between 0 and 1 (exclusive), got {s.val_split}")
    if s.C is not None and not (math.isfinite(float(s.C)) and float(s.C) > 0):
        raise UsageError(f"--C must be a positive number, got {s.C}")
    if s.k is not None and (int(s.k) != s.k or int(s.k) < 1):
        raise UsageError(f"--k must be a positive integer, got {s.k}")
    # 1 is refused, not read as "off": one fold holds nothing out, so `--cv 1` is a typo or a misunderstanding, and
    # silently fitting without a search hid that (issue 22.10); audit's --folds refuses 1 the same way
    if isinstance(s.cv, bool) or not isinstance(s.cv, (int, np.integer)) or s.cv < 0 or s.cv == 1:
        hint = "; one fold holds nothing out: --cv 0 switches the search off" if s.cv == 1 else ""
        raise UsageError(f"--cv must be 0 (off) or a number of folds >= 2, got {s.cv}{hint}")
    if s.n_jobs is not None and (int(s.n_jobs) != s.n_jobs or int(s.n_jobs) == 0):
        raise UsageError(f"--jobs must be a number of parallel CV fits (1 or more, or -1 for all cores), "
                         f"got {s.n_jobs}")
    if s.head in ("knn", "mlp") and s.C is not None:
        raise UsageError(f"--C does not apply to the {s.head} head" + ("; use --k" if s.head == "knn" else ""))
    if s.head not in ("knn", "all") and s.k is not None:
        raise UsageError(f"--k only applies to the knn head, not {s.head!r}; use --C")
    _validate_backend(s)


def _validate_backend(s: FitSettings) -> None:
    if s.backend not in ("auto", "sklearn", "torch", "stream"):
        raise UsageError(f"unknown backend {s.backend!r}; use auto, sklearn, torch or stream")
    if s.backend == "torch" and s.head not in (*TORCH_KINDS, "all"):
        raise UsageError(f"the torch backend exists for the {', '.join(TORCH_KINDS)} heads, not {s.head!r}")
    if s.backend == "sklearn" and s.head == "mlp":
        raise UsageError("the mlp head is trained in torch; drop --backend sklearn")
    dev = str(s.device or "auto").lower()
    if not (dev in ("auto", "cpu") or dev.startswith("cuda")):
        raise UsageError(f"unknown device {s.device!r}; use auto, cpu or cuda")
    if dev.startswith("cuda"):
        from .torch_logistic import resolve_device

        resolve_device(dev)  # raises UsageError when CUDA is absent
        if s.head not in (*TORCH_KINDS, "all"):
            log.warning("only the %s heads run on the GPU; the %s head runs on the CPU", "/".join(TORCH_KINDS), s.head)
        if s.backend == "sklearn":
            raise UsageError("--device cuda needs the torch backend; drop --backend sklearn")


def _as_features(obj, what: str) -> FeatureSet:
    if isinstance(obj, FeatureSet):
        fs = obj
    elif isinstance(obj, (str, Path)):
        fs = load_features(obj)
    else:
        raise UsageError(f"{what} must be a FeatureSet or the path of a features file, got {type(obj).__name__}")
    if fs.labels is None:
        raise DataError(f"the {what} carry no labels (the images were not in class folders); a head needs labelled "
                        f"features: extract from a folder laid out as ROOT/CLASS/image.jpg")
    unlabeled = fs.labels == ""  # images of an unlabeled split (e.g. a flat test/ beside train/CLASS/)
    if unlabeled.any():
        log.warning("%d unlabeled rows of the %s are left out of fitting and scoring", int(unlabeled.sum()), what)
        fs = fs.subset(~unlabeled)
    if len(fs) == 0:
        raise DataError(f"the {what} are empty")
    if not fs.meta.get("backbone"):  # predict rebuilds the backbone from this: without it the head is unusable
        raise ArtifactError(f"the {what} record no backbone provenance (meta['backbone']), so a head fitted on them "
                            f"could never be applied to images; re-extract them with `featx extract`, or in Python set "
                            f"fs.meta['backbone'] (and its weights and preprocessing) to what made them")
    check_feature_dim(fs, f"the {what}" + (f" ({obj})" if isinstance(obj, (str, Path)) else ""))
    check_finite(fs, what)
    return fs


def _plan(fs: FeatureSet, val_fs: Optional[FeatureSet], s: FitSettings) -> _Plan:
    """Train rows and evaluation sets by featx.data.split's rule; training rows never appear in an evaluation set."""
    if val_fs is not None:
        _check_same_provenance(fs, val_fs)
    names = set(fs.split_names)
    if fs.splits is not None and "train" not in names:
        raise DataError(f"the features carry splits ({', '.join(sorted(names))}) but no 'train' split to fit on")
    pool = fs.labels if fs.splits is None else fs.labels[fs.splits == "train"]
    if len(set(pool.tolist())) < 2:
        raise DataError(f"the training rows hold a single class ({pool[0] if len(pool) else 'none'}); "
                        f"a classifier needs at least two")
    sp = plan_split(fs.paths, fs.labels.tolist(), None if fs.splits is None else fs.splits.tolist(),
                    val_fraction=float(s.val_split), seed=s.seed, has_val=False if val_fs is not None else None)
    for w in sp.warnings:
        log.warning("%s", w)
    val_name = next((n for n in VAL_NAMES if n in names), None)
    if val_fs is not None:
        if val_name:
            log.warning("--val given: the features' own %r rows are not used", val_name)
        evals, how = {"val": val_fs}, "the --val features"
    else:
        evals = {"val": fs.subset(sp.val)}
        how = f"the features' {val_name!r} split" if val_name else sp.how
    if len(sp.test):
        evals["test"] = fs.subset(sp.test)
    train = fs.subset(sp.train)
    classes = set(train.labels.tolist())
    for name, e in evals.items():
        unseen = sorted(set(e.labels.tolist()) - classes)
        if unseen:
            log.warning("%s rows have classes absent from training (%s); they always count as errors",
                        name, ", ".join(unseen))
    evals = {n: e for n, e in evals.items() if len(e)}
    if not evals:
        raise DataError("no rows are left to validate on; add images or raise --val-split")
    return _Plan(train=train, evals=evals, how=how)


def _check_same_provenance(fs: FeatureSet, val_fs: FeatureSet) -> None:
    if provenance_key(val_fs.meta) != provenance_key(fs.meta):
        raise ArtifactError(
            f"the --val features come from another backbone/weights/preprocessing "
            f"({val_fs.meta.get('backbone')!r}, fingerprint {provenance_fingerprint(val_fs.meta)}) than the "
            f"training features ({fs.meta.get('backbone')!r}, fingerprint {provenance_fingerprint(fs.meta)}); "
            f"extract both with the same backbone")
    if val_fs.dim != fs.dim:
        raise ArtifactError(f"the --val features have {val_fs.dim} columns, the training features {fs.dim}")


# ------------------------------------------------------------------------------------------------ fitting


def _backend(kind: str, n: int, d: int, s: FitSettings) -> tuple:
    """(backend, device) for this head. mlp runs in torch (CUDA when present); svm too from SVM_TORCH_MIN (n x d);
    logistic stays in sklearn on the CPU (its lbfgs is as fast there) and moves to torch for CUDA or large sets;
    svm-rbf solves on a precomputed kernel up to PRECOMPUTED_MAX_ROWS rows. Importing torch is skipped for the
    sklearn-only heads."""
    from .torch_logistic import resolve_device

    if kind == "svm-rbf":
        # its n x n kernel in float64 must fit in memory: 6,000 rows are 288 MB
        return ("precomputed" if n <= PRECOMPUTED_MAX_ROWS and s.backend != "sklearn" else "sklearn"), "cpu"
    if kind not in TORCH_KINDS or (s.backend == "sklearn" and kind != "mlp"):
        return "sklearn", "cpu"
    dev = str(s.device or "auto").lower()
    if kind == "mlp" or s.backend == "torch" or dev.startswith("cuda"):
        return "torch", resolve_device(dev)
    if kind == "svm":
        return ("torch", resolve_device(dev)) if n * d >= SVM_TORCH_MIN else ("sklearn", "cpu")
    if dev == "auto" and n * d > s.torch_auto_threshold:
        resolved = resolve_device("auto")
        if resolved.startswith("cuda"):
            log.info("large set (%d x %d) and CUDA present: fitting the logistic head on the GPU", n, d)
            return "torch", resolved
    return "sklearn", "cpu"


def _fixed_value(kind: str, s: FitSettings):
    if kind == "knn":
        if s.class_weight:
            log.warning("the knn head has no class weights; --class-weight is ignored for it")
        return s.k
    if kind == "mlp":
        return None
    return c_to_param(kind, s.C) if s.C is not None else None


def _choose_value(kind: str, est, X, y, s: FitSettings, cv_jobs) -> tuple:
    """(value, cv summary or None): the CV search, the CV score of a fixed value, or the default without CV."""
    spec = SPECS[kind]
    n = len(y)
    fixed = _fixed_value(kind, s)
    metric = "balanced_accuracy" if s.class_weight == "balanced" else "accuracy"
    folds = resolve_folds(y, int(s.cv)) if int(s.cv) >= 2 else 0
    upper = None
    if kind == "knn":  # k <= the rows it is fitted on: the smallest CV training fold, or all rows without CV
        upper = n - math.ceil(n / folds) if folds else n
        if fixed is not None and fixed > upper:
            raise DataError(f"--k {fixed} is more than the {upper} training samples available to each fit")
    prefix = "clf__" if hasattr(est, "steps") else ""

    def to_params(v):
        return {prefix + name: val for name, val in estimator_params(kind, v).items()}

    def label(v):
        return value_label(kind, v)

    if folds and fixed is None:
        grid = [tuple(v) for v in s.grid] if (kind == "mlp" and s.grid) else (s.grid or spec.grid)
        return grid_search(est, to_params, X, y, param=spec.param, grid=grid, folds=folds, seed=s.seed,
                                 log_scale=spec.log_scale, stronger=spec.stronger, lower=1 if kind == "knn" else None,
                                 upper=upper, max_widen=s.max_widen, metric=metric, n_jobs=cv_jobs,
                                 widen=spec.widen, label=label)
    if folds:
        return fixed, cross_validate_one(est, to_params, fixed, X, y, param=spec.param, folds=folds, seed=s.seed,
                                         metric=metric, n_jobs=cv_jobs, label=label)
    value = fixed if fixed is not None else spec.default
    return (min(int(value), n) if kind == "knn" else value), None


def _fit_one(kind: str, plan: _Plan, s: FitSettings) -> FitResult:
    X, y = plan.train.features, plan.train.labels
    n, d = X.shape
    backend, device = _backend(kind, n, d, s)
    with_std = _with_std(y)
    est = make_estimator(kind, SPECS[kind].default, class_weight=s.class_weight, seed=s.seed, device=device,
                         backend=backend, with_std=with_std)
    if kind == "svm-rbf" and n > 20000:
        log.warning("svm-rbf scales quadratically: %d training samples may take a long time", n)
    cv_jobs = 1 if str(device).startswith("cuda") else s.n_jobs  # one GPU: folds run one after another
    value, cv_res = _choose_value(kind, est, X, y, s, cv_jobs)

    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        final = make_estimator(kind, value, class_weight=s.class_weight, seed=s.seed, device=device,
                               backend=backend, with_std=with_std).fit(X, y)
    fit_seconds = time.perf_counter() - t0
    for w in {str(w.message).split("\n")[0] for w in caught if "Converg" in type(w.message).__name__}:
        log.warning("%s head: %s", kind, w)
    pipeline = final.to_sklearn_pipeline() if hasattr(final, "to_sklearn_pipeline") else final
    del final  # frees a device copy's last references before scoring on the CPU

    scores, train_acc = _score(pipeline, plan, s.seed)
    training = {"n": int(n), "n_features": int(d), "fit_seconds": round(fit_seconds, 4), "backend": backend,
                "device": device,
                # For diagnosing over-fitting only (on <= 1000 of the rows the head was fitted on): never a score.
                "training_data_accuracy": train_acc,
                "scaling": "standardised" if with_std else f"centred (a class has < {FEW_ROWS} training rows)"}
    if plan.excluded:
        training["excluded"] = plan.excluded
    meta = _head_meta(kind, value, cv_res, scores, training, plan, s, classes=[str(c) for c in pipeline.classes_])
    return FitResult(head=Head(pipeline, meta), scores=scores, cv=cv_res, training=training, validation=plan.how)


def _with_std(y: np.ndarray) -> bool:
    """Standardise (True) unless the smallest class has fewer than FEW_ROWS training rows (then centre only)."""
    counts = np.unique(np.asarray(y).astype(str), return_counts=True)[1]
    with_std = bool(counts.min() >= FEW_ROWS)
    if not with_std:
        log.info("a class has %d training rows (< %d): features are centred, not scaled per feature",
                 int(counts.min()), FEW_ROWS)
    return with_std


def _score(pipeline, plan: _Plan, seed: int) -> tuple:
    classes = [str(c) for c in pipeline.classes_]
    scores = {name: classification_metrics(e.labels, pipeline.predict(e.features), classes)
              for name, e in plan.evals.items()}
    X, y = plan.train.features, plan.train.labels
    # A diagnostic only, so a sample will do: predicting training rows costs O(n) each for knn and svm-rbf (libsvm
    # evaluates the kernel against every support vector): 4,000 rows took longer than svm-rbf's whole CV search.
    sample = np.random.default_rng(seed).choice(len(y), size=min(len(y), 1000), replace=False)
    return scores, float(np.mean(pipeline.predict(X[sample]).astype(str) == y[sample]))


def _head_meta(kind: str, value, cv_res, scores: dict, training: dict, plan: _Plan, s: FitSettings, *,
               classes: list) -> dict:
    spec = SPECS[kind]
    versions = library_versions()
    if training["backend"] == "torch":
        import torch

        versions["torch"] = torch.__version__
    return {
        "kind": kind,
        "description": spec.description,
        "params": estimator_params(kind, value),
        "class_weight": s.class_weight,
        "classes": classes,
        "score_kind": spec.score_kind,
        "backend": training["backend"],
        "fit_device": training["device"],
        "seed": s.seed,
        "cv": None if cv_res is None else {k: v for k, v in cv_res.items() if k != "per_value"},
        "validation": plan.how,
        "scores": {name: summary(m) for name, m in scores.items()},
        "training": {k: training[k] for k in ("n", "n_features", "training_data_accuracy", "scaling", "excluded")
                     if k in training},
        "features": feature_provenance(plan.train.meta, dim=training["n_features"]),
        "versions": versions,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _calibration_rows(plan: _Plan) -> None:
    from . import calibration as cal

    val = plan.evals.get("val")
    if val is None:
        raise DataError("--calibrate needs validation rows (a val split, --val, or a --val-split hold-out)")
    cal.check_rows(sorted(set(np.asarray(plan.train.labels).astype(str).tolist())), val.labels)


def _calibrate(res: FitResult, plan: _Plan, s: FitSettings) -> None:
    """Temperature scaling on the validation rows; ECE before/after on every evaluated split. On val, the split T was
    fitted on, "after" is cross-fitted (each row scored with a T fitted on the other rows): the ECE of the rows that
    fitted T is kept as "after_in_sample" and never reported as the result. Stores the temperature in the head's meta."""
    from . import calibration as cal

    _calibration_rows(plan)
    val = plan.evals["val"]
    pipe, classes = res.head.pipeline, res.head.classes
    cal.check_enough(pipe, val.features, val.labels)
    temperature = cal.fit_temperature(pipe, val.features, val.labels)
    per_split = {}
    for name, e in plan.evals.items():
        before, how = cal.uncalibrated(pipe, e.features)
        after = cal.reliability(cal.probabilities(pipe, e.features, temperature), e.labels, classes)
        per_split[name] = {"before": cal.reliability(before, e.labels, classes), "after": after}
    oof, y_oof = cal.cross_fitted(pipe, val.features, val.labels, seed=s.seed)
    if oof is None:  # cannot happen after check_rows (5 rows a class); refuse rather than report the in-sample ECE
        raise DataError("--calibrate: too few validation rows of a class to cross-fit the calibration error")
    per_split["val"]["after_in_sample"] = per_split["val"]["after"]
    per_split["val"]["after"] = cal.reliability(oof, y_oof, classes)
    res.calibration = {"method": "temperature", "temperature": temperature, "fitted_on": "val", "before": how,
                       "bins": cal.N_BINS, "val_after": "cross-fitted", "splits": per_split}
    res.head.meta["calibration"] = {
        "method": "temperature", "temperature": temperature, "fitted_on": "val", "before": how,
        "val_after": "cross-fitted",
        "ece": {name: {k: v["ece"] for k, v in d.items()} for name, d in per_split.items()}}
    res.head.meta["score_kind"] = "probability"


# ------------------------------------------------------------------------------------------------ saving


def _resolve_output(output, overwrite: bool = False) -> Optional[Path]:
    if output is None:
        return None
    out = Path(output)
    if out.is_dir():
        from .store import DEFAULT_HEAD_PATH

        out = out / DEFAULT_HEAD_PATH.name
    if not out.suffix:
        out = out.with_suffix(".skops")
    if out.exists() and not overwrite and not is_head_file(out):
        # A typo like `-o features.npz` must not replace the user's data with a head.
        raise UsageError(f"refusing to overwrite {out}: it exists and is not a featx head file; choose another -o "
                         f"(or pass --overwrite)")
    return out


def _output_files(output: Optional[Path], rdir: Optional[Path], plan: _Plan, s: FitSettings) -> dict:
    """Every file this run will write -> how to recognise featx's own version of it (None: by suffix)."""
    if output is None and rdir is None:
        return {}
    stem = output.stem if output is not None else "head"
    files: dict = {}
    if output is not None:
        files[output] = is_head_file
    if s.head == "all":
        for kind in HEADS:
            if output is not None:
                files[output.with_name(f"{stem}-{kind}{output.suffix}")] = is_head_file
            files[rdir / f"{stem}-{kind}.report.json"] = None
        files[rdir / f"{stem}.comparison.png"] = None
    files[rdir / f"{stem}.report.json"] = None
    for name in plan.evals:
        files[rdir / f"{stem}.confusion-{name}.png"] = None
        if s.calibrate:
            files[rdir / f"{stem}.reliability-{name}.png"] = None
    return files


def _claimed(files: dict, output: Optional[Path], overwrite: bool):
    """claim_outputs over every file (checked before any work, locked for the run), or nothing when none are written."""
    if not files:
        return contextlib.nullcontext()
    from .._io import claim_outputs

    return claim_outputs(files, overwrite=overwrite, lock=output if output is not None else next(iter(files)))


def _save(best: FitResult, output: Optional[Path], rdir: Path, every: bool) -> None:
    from .._io import write_json
    from ..report import save_bar_chart_png

    stem = output.stem if output is not None else "head"
    if every:  # each head beside the best one, with its own JSON report
        for r in best.results:
            if output is not None:
                r.path = output.with_name(f"{stem}-{r.kind}{output.suffix}")
                r.head.save(r.path)
            r.report_dir = rdir
            r.report_path = rdir / f"{stem}-{r.kind}.report.json"
            write_json(r.report_path, _report(r))

    if output is not None:
        best.head.save(output)
        best.path = output
    best.report_dir = rdir
    best.report_path = rdir / f"{stem}.report.json"
    report = _report(best)
    report["files"] = _save_pngs(best, rdir, stem)
    if every:
        split = best.selection_split or "val"
        rows = [{"name": r.kind, "accuracy": r.scores.get(split, {}).get("accuracy")} for r in best.results]
        png = rdir / f"{stem}.comparison.png"
        save_bar_chart_png(rows, png, key="accuracy", label_key="name", title=f"head comparison ({split} accuracy)")
        report["files"]["comparison"] = str(png)
    write_json(best.report_path, report)


def _save_pngs(best: FitResult, rdir: Path, stem: str) -> dict:
    """Confusion matrix per evaluated split, and the reliability diagram per split of a calibrated head."""
    from ..report import save_confusion_png
    from ..report import save_reliability_png

    files = {}
    for name, m in best.scores.items():
        png = rdir / f"{stem}.confusion-{name}.png"
        save_confusion_png(m, png, title=f"{best.kind} head, {name} (accuracy {m['accuracy']:.3f}, n={m['n']})")
        files[f"confusion-{name}"] = str(png)
        if best.calibration:
            rel = best.calibration["splits"][name]
            png = rdir / f"{stem}.reliability-{name}.png"
            t = best.calibration["temperature"]
            save_reliability_png(rel["before"], rel["after"], png,
                                 title=f"{best.kind} head, {name}: temperature {t:.3g} fitted on val"
                                       + (" (after: cross-fitted)" if "after_in_sample" in rel else ""))
            files[f"reliability-{name}"] = str(png)
    return files


def _report(r: FitResult) -> dict:
    d = r.to_dict()
    d.pop("results", None)
    d["metrics"] = r.scores  # full per-class tables and confusion matrices
    if r.calibration:
        d["calibration"] = r.calibration  # with the reliability bins per split
    if r.results:
        d["comparison"] = [{"head": x.kind, "params": x.head.meta.get("params"),
                            "selection_score": (r.selection or {}).get("scores", {}).get(x.kind),
                            "scores": {n: summary(m) for n, m in x.scores.items()},
                            "path": str(x.path) if x.path else None} for x in r.results]
    return d
