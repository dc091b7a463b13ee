"""fit_head: choose an honest validation set, tune one hyper-parameter by CV, fit the head, score it, save it."""
from __future__ import annotations

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

from ..errors import ArtifactError, DataError, UsageError
from ..features.store import FeatureSet, load_features, provenance_fingerprint, provenance_key
from ..report import classification_metrics, summary
from .pipelines import HEADS, SPECS, c_to_param, check_head_name, make_estimator
from .search import cross_validate_one, grid_search, resolve_folds
from .store import Head, feature_provenance, library_versions

log = logging.getLogger(__name__)

VAL_NAMES = ("val", "valid", "validation")  # split names a features file may use for its validation rows


@dataclass
class FitSettings:
    """Every knob of ``featx fit`` on one screen (CLI flags map 1:1 onto these)."""

    head: str = "logistic"  # one of HEADS, or "all" to fit each and keep the best on validation
    C: Optional[float] = None  # fixed regularisation (ridge gets alpha = 1/(2C)); None = CV grid search
    k: Optional[int] = None  # fixed k for knn; None = CV grid search
    class_weight: Optional[str] = None  # "balanced" reweights classes inversely to their frequency
    val_split: float = 0.2  # held-out fraction when the features carry no val split and no --val is given
    cv: int = 5  # folds for the search; lowered to the smallest class count; < 2 switches CV off
    seed: int = 0  # seeds the hold-out split, CV folds and the SVMs
    device: str = "auto"  # where the logistic head may run: auto picks CUDA only for large sets
    backend: str = "auto"  # "sklearn", "torch" (logistic only; also runs on CPU), or auto
    n_jobs: Optional[int] = None  # CV fits in parallel (joblib); None = 1, -1 = all cores
    # n * d above which "auto" fits the logistic head in torch on CUDA: ~20M (e.g. 16k x 1280) is where sklearn's
    # lbfgs starts taking tens of seconds while a GPU full-batch solve stays around a second.
    torch_auto_threshold: int = 20_000_000
    max_widen: int = 3  # extra grid values tried beyond an edge before giving up (warns if still at the edge)
    grid: Optional[Sequence] = None  # override the default grid of the tuned parameter (tests use short ones)


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

    def _rank_key(self):
        s = self.scores.get(self.selection_split or "", {})
        acc, f1 = s.get("accuracy", -1.0), s.get("macro_f1", -1.0)
        return (-(acc if math.isfinite(acc) else -1.0), -(f1 if math.isfinite(f1) else -1.0))

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
            "backend": self.training.get("backend"),
            "device": self.training.get("device"),
            "cv": cv,
            "validation": self.validation,
            "scores": {name: summary(m) for name, m in self.scores.items()},
            "selection_split": self.selection_split,
            "training": dict(self.training),
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


# ------------------------------------------------------------------------------------------------ public entry


def fit_head(features, head: str = "logistic", *, output=None, C: Optional[float] = None, k: Optional[int] = None,
             class_weight: Optional[str] = None, val_split: float = 0.2, val=None, cv: int = 5, seed: int = 0,
             device: str = "auto", backend: str = "auto", n_jobs: Optional[int] = None, report_dir=None,
             grid: Optional[Sequence] = None) -> FitResult:
    """Fit a classification head on extracted features and score it on data it did not see.

    Args:
        features: a FeatureSet or the path of a features file (``featx extract`` output). Must be labelled.
        head: one of ``HEADS`` or ``"all"`` (fit each; the result lists them in ``.results``, best first, and the
            best is saved at ``output``, each one also as ``<stem>-<kind>.skops`` beside it).
        output: head file to write (skops). ``None`` writes nothing (the CLI passes ``featx-out/head.skops``).
        C, k: fix the regularisation strength / number of neighbours instead of searching a CV grid.
        class_weight: ``"balanced"`` for imbalanced classes (CV then ranks by balanced accuracy).
        val_split, val: when the features carry splits the head trains on ``train`` and is scored on ``val``
            (and ``test``); otherwise on ``val`` features if given, else on a stratified seeded ``val_split`` hold-out.
        cv: folds of the stratified CV search (lowered to the smallest class count; < 2 turns CV off).
        device, backend: the logistic head runs in torch (L-BFGS) with ``backend="torch"``, with ``device="cuda"``,
            or automatically for large sets when CUDA is present; it is saved as an ordinary sklearn pipeline.
        report_dir: where ``<stem>.report.json`` and ``<stem>.confusion-<split>.png`` go (default: beside the head).

    Raises:
        UsageError for bad options, DataError for unusable labels, ArtifactError for unreadable or mismatched files.
    """
    s = FitSettings(head=head, C=C, k=k, class_weight=class_weight, val_split=val_split, cv=cv, seed=seed,
                    device=device, backend=backend, n_jobs=n_jobs, grid=grid)
    _validate(s)
    fs = _as_features(features, "features")
    val_fs = _as_features(val, "validation features") if val is not None else None
    plan = _plan(fs, val_fs, s)
    output = _resolve_output(output)

    kinds = HEADS if s.head == "all" else (s.head,)
    results = []
    for kind in kinds:
        log.info("fitting %s head on %d samples", kind, len(plan.train))
        results.append(_fit_one(kind, plan, s))

    if s.head == "all":
        results.sort(key=FitResult._rank_key)
        best = copy.copy(results[0])
        # Its own Head object: the best is saved twice (<stem>.skops and <stem>-<kind>.skops), each records its path.
        best.head = Head(results[0].head.pipeline, dict(results[0].head.meta))
        best.results = results
    else:
        best = results[0]
    if output is not None or report_dir is not None:
        _save(best, output, Path(report_dir) if report_dir is not None else None, every=s.head == "all")
    return best


# ------------------------------------------------------------------------------------------------ validation


def _validate(s: FitSettings) -> None:
    check_head_name(s.head)
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
    if s.cv is None or int(s.cv) < 0:
        raise UsageError(f"--cv must be 0 (off) or a number of folds >= 2, got {s.cv}")
    if s.head == "knn" and s.C is not None:
        raise UsageError("--C does not apply to the knn head; use --k")
    if s.head not in ("knn", "all") and s.k is not None:
        raise UsageError(f"--k only applies to the knn head, not {s.head!r}; use --C")
    if s.backend not in ("auto", "sklearn", "torch"):
        raise UsageError(f"unknown backend {s.backend!r}; use auto, sklearn or torch")
    if s.backend == "torch" and s.head not in ("logistic", "all"):
        raise UsageError(f"the torch backend exists for the logistic head only, not {s.head!r}")
    dev = str(s.device or "auto")
    if not (dev in ("auto", "cpu") or dev.startswith("cuda")):
        raise UsageError(f"unknown device {s.device!r}; use auto, cpu or cuda")
    if dev.startswith("cuda"):
        from .torch_logistic import resolve_device

        resolve_device(dev)  # raises UsageError when CUDA is absent
        if s.head not in ("logistic", "all"):
            log.warning("only the logistic head runs on the GPU; the %s head runs on the CPU", s.head)
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
    return fs


def _plan(fs: FeatureSet, val_fs: Optional[FeatureSet], s: FitSettings) -> _Plan:
    """Decide train rows and evaluation sets; training rows never appear in an evaluation set."""
    evals: dict = {}
    if fs.splits is not None:
        names = set(fs.split_names)
        if "train" not in names:
            raise DataError(f"the features carry splits ({', '.join(sorted(names))}) but no 'train' split to fit on")
        train = fs.split("train")
        val_name = next((n for n in VAL_NAMES if n in names), None)
        unknown = names - {"train", "test", *VAL_NAMES}
        if unknown:
            log.warning("ignoring rows of unknown split(s): %s", ", ".join(sorted(unknown)))
        if val_fs is not None:
            if val_name:
                log.warning("--val given: the features' own %r rows are not used", val_name)
            evals["val"], how = val_fs, "the --val features"
        elif val_name:
            evals["val"], how = fs.split(val_name), f"the features' {val_name!r} split"
        else:
            train, evals["val"] = _hold_out(train, s)
            how = f"a stratified {s.val_split:.0%} hold-out of the 'train' split (seed {s.seed})"
        if "test" in names:
            evals["test"] = fs.split("test")
    elif val_fs is not None:
        train, how = fs, "the --val features"
        evals["val"] = val_fs
    else:
        train, evals["val"] = _hold_out(fs, s)
        how = f"a stratified {s.val_split:.0%} hold-out (seed {s.seed})"

    if val_fs is not None:
        if provenance_key(val_fs.meta) != provenance_key(fs.meta):
            raise ArtifactError(
                f"the --val features come from another backbone/weights/preprocessing "
                f"({val_fs.meta.get('backbone')!r}, fingerprint {provenance_fingerprint(val_fs.meta)}) than the "
                f"training features ({fs.meta.get('backbone')!r}, fingerprint {provenance_fingerprint(fs.meta)}); "
                f"extract both with the same backbone")
        if val_fs.dim != fs.dim:
            raise ArtifactError(f"the --val features have {val_fs.dim} columns, the training features {fs.dim}")

    classes = sorted(set(train.labels.tolist()))
    if len(classes) < 2:
        raise DataError(f"the training rows hold a single class ({classes[0] if classes else 'none'}); "
                        f"a classifier needs at least two")
    for name, e in evals.items():
        unseen = sorted(set(e.labels.tolist()) - set(classes))
        if unseen:
            log.warning("%s rows have classes absent from training (%s); they always count as errors",
                        name, ", ".join(unseen))
    evals = {n: e for n, e in evals.items() if len(e)}
    if not evals:
        raise DataError("no rows are left to validate on; add images or lower --val-split")
    return _Plan(train=train, evals=evals, how=how)


def _hold_out(fs: FeatureSet, s: FitSettings):
    from collections import Counter

    from sklearn.model_selection import train_test_split

    counts = Counter(fs.labels.tolist())
    few = sorted(c for c, n in counts.items() if n < 2)
    if few:
        raise DataError(f"class(es) {', '.join(map(repr, few))} have a single labelled sample; a stratified "
                        f"hold-out needs at least 2 per class (add images or pass --val OTHER_FEATURES)")
    idx = np.arange(len(fs))
    try:
        tr, va = train_test_split(idx, test_size=float(s.val_split), stratify=fs.labels, random_state=s.seed)
    except ValueError as exc:
        raise DataError(f"cannot hold out {s.val_split:.0%} of {len(fs)} samples with {len(counts)} classes "
                        f"stratified ({exc}); raise --val-split or add images") from exc
    return fs.subset(np.sort(tr)), fs.subset(np.sort(va))


# ------------------------------------------------------------------------------------------------ fitting


def _use_torch(kind: str, n: int, d: int, s: FitSettings) -> tuple:
    """(use torch?, device) for this head. Importing torch is skipped for small sets on ``auto``."""
    if kind != "logistic" or s.backend == "sklearn":
        return False, "cpu"
    from .torch_logistic import resolve_device

    dev = str(s.device or "auto")
    if s.backend == "torch" or dev.startswith("cuda"):
        return True, resolve_device(dev)
    if dev == "auto" and n * d > s.torch_auto_threshold:
        resolved = resolve_device("auto")
        if resolved.startswith("cuda"):
            log.info("large set (%d x %d) and CUDA present: fitting the logistic head on the GPU", n, d)
            return True, resolved
    return False, "cpu"


def _fit_one(kind: str, plan: _Plan, s: FitSettings) -> FitResult:
    spec = SPECS[kind]
    X = plan.train.features
    y = plan.train.labels
    n, d = X.shape
    use_torch, device = _use_torch(kind, n, d, s)

    if use_torch:
        from .torch_logistic import TorchLogisticRegression

        def make(v):  # standardises on the device itself; becomes Pipeline(StandardScaler, LogisticRegression)
            return TorchLogisticRegression(C=float(v), class_weight=s.class_weight, device=device)
    else:
        def make(v):
            return make_estimator(kind, v, class_weight=s.class_weight, seed=s.seed)

    if kind == "knn":
        fixed = s.k
        if s.class_weight:
            log.warning("the knn head has no class weights; --class-weight is ignored for it")
    else:
        fixed = c_to_param(kind, s.C) if s.C is not None else None
    if kind == "svm-rbf" and n > 20000:
        log.warning("svm-rbf scales quadratically: %d training samples may take a long time", n)

    metric = "balanced_accuracy" if s.class_weight == "balanced" else "accuracy"
    folds = resolve_folds(y, int(s.cv)) if int(s.cv) >= 2 else 0
    # knn needs k <= the rows it is fitted on: the smallest CV training fold, or all rows without CV
    upper = None
    if kind == "knn":
        upper = n - math.ceil(n / folds) if folds else n
        if fixed is not None and fixed > upper:
            raise DataError(f"--k {fixed} is more than the {upper} training samples available to each fit")
    cv_jobs = 1 if use_torch else s.n_jobs  # one GPU: folds run one after another

    cv_res = None
    if folds and fixed is None:
        cv_res = grid_search(make, X, y, param=spec.param, grid=s.grid or spec.grid, folds=folds, seed=s.seed,
                             log_scale=spec.log_scale, stronger=spec.stronger, lower=1 if kind == "knn" else None,
                             upper=upper, max_widen=s.max_widen, metric=metric, n_jobs=cv_jobs)
        value = cv_res["best"]
    elif folds:
        cv_res = cross_validate_one(make, fixed, X, y, param=spec.param, folds=folds, seed=s.seed, metric=metric,
                                    n_jobs=cv_jobs)
        value = fixed
    else:
        value = fixed if fixed is not None else spec.default
        if kind == "knn":
            value = min(int(value), n)
    value = int(value) if kind == "knn" else float(value)

    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        est = make(value).fit(X, y)
    fit_seconds = time.perf_counter() - t0
    for w in {str(w.message).split("\n")[0] for w in caught if "Converg" in type(w.message).__name__}:
        log.warning("%s head: %s", kind, w)

    if use_torch:
        pipeline = est.to_sklearn_pipeline()
        del est  # frees the device copy's last references before scoring on the CPU
    else:
        pipeline = est
    classes = [str(c) for c in pipeline.classes_]

    scores = {name: classification_metrics(e.labels, pipeline.predict(e.features), classes)
              for name, e in plan.evals.items()}
    # A diagnostic only, so a sample will do: predicting every training row costs O(n^2) for knn and svm-rbf.
    sample = np.random.default_rng(s.seed).choice(n, size=min(n, 5000), replace=False)
    train_acc = float(np.mean(pipeline.predict(X[sample]).astype(str) == y[sample]))
    training = {
        "n": int(n),
        "n_features": int(d),
        "fit_seconds": round(fit_seconds, 4),
        "backend": "torch" if use_torch else "sklearn",
        "device": device if use_torch else "cpu",
        # For diagnosing over-fitting only (on <= 5000 of the rows the head was fitted on): never a score.
        "training_data_accuracy": train_acc,
    }
    versions = library_versions()
    if use_torch:
        import torch

        versions["torch"] = torch.__version__
    meta = {
        "kind": kind,
        "description": spec.description,
        "params": {spec.param: value},
        "class_weight": s.class_weight,
        "classes": classes,
        "score_kind": spec.score_kind,
        "backend": training["backend"],
        "fit_device": training["device"],
        "seed": s.seed,
        "cv": None if cv_res is None else {k: v for k, v in cv_res.items() if k != "per_value"},
        "validation": plan.how,
        "scores": {name: summary(m) for name, m in scores.items()},
        "training": {k: training[k] for k in ("n", "n_features", "training_data_accuracy")},
        "features": feature_provenance(plan.train.meta, dim=d),
        "versions": versions,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return FitResult(head=Head(pipeline, meta), scores=scores, cv=cv_res, training=training, validation=plan.how)


# ------------------------------------------------------------------------------------------------ saving


def _resolve_output(output) -> Optional[Path]:
    if output is None:
        return None
    out = Path(output)
    if out.is_dir():
        from .store import DEFAULT_HEAD_PATH

        out = out / DEFAULT_HEAD_PATH.name
    if not out.suffix:
        out = out.with_suffix(".skops")
    if out.exists() and not _is_skops_file(out):
        # A typo like `-o features.npz` must not replace the user's data with a head.
        raise UsageError(f"refusing to overwrite {out}: it exists and is not a featx head file; choose another -o")
    return out


def _is_skops_file(path: Path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as zf:
            return "schema.json" in zf.namelist()
    except (OSError, zipfile.BadZipFile):
        return False


def _save(best: FitResult, output: Optional[Path], report_dir: Optional[Path], every: bool) -> None:
    from ..report import save_bar_chart_png, save_confusion_png
    from .._io import write_json

    stem = output.stem if output is not None else "head"
    rdir = report_dir if report_dir is not None else output.parent

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
    for name, m in best.scores.items():
        png = rdir / f"{stem}.confusion-{name}.png"
        save_confusion_png(m, png, title=f"{best.kind} head, {name} (accuracy {m['accuracy']:.3f}, n={m['n']})")
        report.setdefault("files", {})[f"confusion-{name}"] = str(png)
    if every:
        split = best.selection_split or "val"
        rows = [{"name": r.kind, "accuracy": r.scores.get(split, {}).get("accuracy")} for r in best.results]
        png = rdir / f"{stem}.comparison.png"
        save_bar_chart_png(rows, png, key="accuracy", label_key="name", title=f"head comparison ({split} accuracy)")
        report.setdefault("files", {})["comparison"] = str(png)
    write_json(best.report_path, report)


def _report(r: FitResult) -> dict:
    d = r.to_dict()
    d.pop("results", None)
    d["metrics"] = r.scores  # full per-class tables and confusion matrices
    if r.results:
        d["comparison"] = [{"head": x.kind, "params": x.head.meta.get("params"),
                            "scores": {n: summary(m) for n, m in x.scores.items()},
                            "path": str(x.path) if x.path else None} for x in r.results]
    return d
