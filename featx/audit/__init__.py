"""`featx audit`: near-duplicates (and the leakage they cause across splits), likely label errors and outliers,
found from a feature store alone. Read-only on the images: it lists, the user acts.

    import featx
    res = featx.audit("featx-out/features.npz")          # report folder featx-out/features-audit/
    res.duplicates[0]["members"], res.label_issues[:5], res.outliers[:5]
"""
from __future__ import annotations

import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np

from ..errors import DataError, UsageError
from . import neighbors, scores

CHECKS = ("duplicates", "labels", "outliers")


@dataclass
class AuditSettings:
    """Every knob of ``featx audit`` on one screen (CLI flags map 1:1 onto these)."""

    checks: Sequence[str] = CHECKS  # which checks to run; "labels" is skipped on unlabelled stores
    # Cosine similarity (square-rooted, L2-normalised features; see neighbors.normalise) at and above which two
    # images count as near-duplicates. Measured on hymenoptera with efficientnet_lite0 (BENCHMARKS.md, "Audit"):
    # the closest pair of distinct photos (two shots of one scene) scored 0.854; at 0.88, 160 of 180 resized /
    # re-encoded / cropped copies pass (all 4%- and 8%-crops and 75% resizes; 21/30 halved, 20/30 mixed edits).
    threshold: float = 0.88
    # Outlier score: cosine distance to the k-th nearest other image (Ramaswamy et al. 2000). Not the mean over
    # the k nearest (cleanlab's score): on the planted set the 5 foreign images resemble each other, and a mean
    # over k=10 ranked them 50th-78th of 413, the k-th distance 1st-6th (BENCHMARKS.md). A batch of up to k-1
    # similar foreign images stays visible; a bigger one looks like a class of its own.
    k: int = 10
    # An image is an outlier when its score exceeds Q3 + fence * IQR of all scores: Tukey's "far out" fence (3).
    # cleanlab's Datalab uses the same form with 1.7; on the planted set 1.5 listed 22 images for 6 real ones, 3
    # listed 7 (BENCHMARKS.md). The CSV ranks only the listed ones; lower --fence to see more.
    fence: float = 3.0
    # Fixed inverse regularisation of the cross-validated logistic head (label check): one fit per fold instead of
    # fit's grid search per fold. 0.1 found all 10 planted label swaps (list of 20); 0.003..1 in BENCHMARKS.md.
    C: float = 0.1
    folds: int = 5  # cross-validation folds for out-of-sample probabilities; lowered to the smallest class count
    val_split: float = 0.2  # as `featx fit`: which rows fit would hold out when the store has no val split
    seed: int = 0  # seeds the hold-out (same rule as fit), the CV folds and the PCA
    backend: str = "auto"  # neighbour search: numpy (blocked products), sklearn, faiss; auto = faiss if installed
    n_jobs: Optional[int] = None  # parallel CV fits (joblib); None = 1
    # exact: the exact search above (any n; O(n^2)); faiss: one approximate k-NN graph (faiss IVF on a PCA
    # projection, featx.audit.large); auto: exact up to `large_above` rows, faiss beyond when installed
    index: str = "auto"
    large_above: Optional[int] = None  # None: featx.audit.large.LARGE_ABOVE, or FEATX_AUDIT_LARGE_ABOVE

    def validate(self) -> None:
        unknown = [c for c in self.checks if c not in CHECKS]
        if unknown or not self.checks:
            raise UsageError(f"unknown check(s) {', '.join(map(repr, unknown)) or '(none given)'}; "
                             f"choose from {', '.join(CHECKS)}")
        if not 0.5 <= self.threshold <= 1.0:
            raise UsageError(f"--threshold {self.threshold} is outside 0.5..1 (cosine similarity; default 0.88)")
        if self.k < 1:
            raise UsageError("--neighbours (k) must be at least 1")
        if self.folds < 2:
            raise UsageError("--folds must be at least 2 (out-of-sample probabilities need cross-validation)")
        if self.C <= 0:
            raise UsageError("--C must be positive")
        if self.fence < 0:
            raise UsageError("--fence must be zero or positive")
        neighbors.resolve_backend(self.backend)
        from .large import INDEXES

        if self.index not in INDEXES:
            raise UsageError(f"unknown --index {self.index!r} (choose from {', '.join(INDEXES)})")


@dataclass
class AuditResult:
    """What :func:`audit` found. Every path is relative to the image root (``root``)."""

    features_path: Optional[Path]
    root: Optional[str]
    n_images: int
    duplicates: list  # groups, leakage first: {group, size, leakage, splits, conflicting_labels, all_exact, ...}
    label_issues: list  # most likely first: {rank, path, split, given, suggested, given_probability, ...}
    outliers: list  # most isolated first: {rank, path, split, label, score}
    info: dict = field(default_factory=dict)  # settings used, timings, search backend, notes, skipped checks
    report_dir: Optional[Path] = None
    files: list = field(default_factory=list)
    scores: Optional[object] = None  # featx.audit.scores.ScoreTable: every image, every score (scores.csv)
    top: int = 20  # rows of each ranking in report.md, --json and report.html

    def rankings(self, top: Optional[int] = None) -> dict:
        """The top rows of each score's ranking, flagged or not: {"label": [...], "outlier": [...], ...}."""
        if self.scores is None:
            return {}
        top = self.top if top is None else top
        return {name: self.scores.ranked(name, top) for name in self.scores.available()}

    @property
    def leakage(self) -> list:
        return [g for g in self.duplicates if g["leakage"]]

    def to_dict(self) -> dict:
        return {
            "features": None if self.features_path is None else str(self.features_path),
            "root": self.root, "n_images": self.n_images,
            "counts": {"duplicate_groups": len(self.duplicates), "leakage_groups": len(self.leakage),
                       "label_issues": len(self.label_issues), "outliers": len(self.outliers)},
            "duplicates": self.duplicates, "label_issues": self.label_issues, "outliers": self.outliers,
            "rankings": self.rankings(),
            "info": self.info,
            "report_dir": None if self.report_dir is None else str(self.report_dir),
            "files": [str(f) for f in self.files],
        }


def default_report_dir(features_path: Union[str, Path]) -> Path:
    """featx-out/features.npz -> featx-out/features-audit/ (beside the store, named after it)."""
    p = Path(features_path)
    return p.with_name(p.stem + "-audit")


def audit(features, *, report_dir: Union[str, Path, None, bool] = True, images: Union[str, Path, None] = None,
          overwrite: bool = False, progress: Optional[Callable[[int, int], None]] = None, top: int = 20,
          **settings) -> AuditResult:
    """Audit a feature store (a path or a FeatureSet) for near-duplicates, likely label errors and outliers.

    Args:
        features: a store written by ``featx extract`` (labelled or not), or a FeatureSet.
        report_dir: where report.md, one CSV and one PNG gallery per finding kind go. True (default): beside the
            store (``<stem>-audit/``; nothing is written for an in-memory FeatureSet); a path; or False/None.
        images: the image root, when the images are no longer where the store says (sha256 marks, galleries).
        overwrite: allow replacing report files featx did not write.
        progress: optional ``callback(done, total)`` over the neighbour passes (rows searched; the label check's
            cross-validation reports nothing).
        top: rows of each score's ranking (flagged or not) in report.md, report.html and ``to_dict()``; scores.csv
            always lists every image.
        settings: any field of :class:`AuditSettings` (threshold, checks, k, fence, C, folds, seed, backend...).
    """
    from ..features.store import FeatureSet, load_features
    from . import report as rep

    s = AuditSettings(**settings)
    s.validate()
    if top < 0:
        raise UsageError("--top must be zero or positive")
    from . import large

    path = None if isinstance(features, FeatureSet) else Path(features)
    # a sharded store is counted from its manifest, so the approximate path never reads it whole
    n = len(features) if path is None else large.count_rows(path)
    fs = None
    if n is None:
        fs = load_features(path)
        n = len(fs)
    engine, why = large.choose(s.index, n, s.large_above)
    if engine == "faiss":
        fs = large.open_rows(features) if fs is None else large.open_rows(fs, owned=True)  # read here: ours
    elif fs is None:
        fs = features if path is None else load_features(path)
    checks = _plan_checks(fs, s)
    out_dir = _resolve_report_dir(report_dir, path)
    root = images if images is not None else fs.meta.get("root")
    if out_dir is not None and root:  # PNGs inside the image folder would be read back as images next time
        from .._io import refuse_inside

        refuse_inside(out_dir, root, what="report folder")
    outputs = rep.report_files(out_dir) if out_dir is not None else {}
    with rep.claim(outputs, overwrite=overwrite):  # checked and locked before any work
        run = _run_large if engine == "faiss" else run_checks
        res = run(fs, s, checks, images=images, progress=progress)
        if why:
            res.info["notes"].append(why)
        res.features_path = path
        res.top = top
        if out_dir is not None:
            res.report_dir = out_dir
            res.files = rep.write_report(res, out_dir)
    return res


def _plan_checks(fs, s: AuditSettings) -> list:
    """The checks that will run; a clear line up front when one cannot (cleanlab missing, bad features)."""
    if len(fs) < 2:
        raise DataError(f"the features hold {len(fs)} image(s); an audit needs at least two")
    from ..features.store import check_paths

    check_paths(fs.paths, "the features")  # the gallery and the sha256 marks read root/path: never outside the root
    if hasattr(fs, "features") and not np.isfinite(fs.features).all():  # the large path checks block by block
        raise DataError("the features contain NaN or Inf values; re-extract them (`featx extract ... --overwrite`)")
    checks = [c for c in CHECKS if c in s.checks]
    if "labels" in checks and (fs.labels is None or not (fs.labels != "").any()):
        checks.remove("labels")  # unlabelled store: nothing to check, said in the report
    if "labels" in checks:
        from .labels import require_cleanlab

        require_cleanlab()
    return checks


def _resolve_report_dir(report_dir, path: Optional[Path]) -> Optional[Path]:
    if report_dir is True:
        return None if path is None else default_report_dir(path)
    if report_dir in (False, None):
        return None
    return Path(report_dir)



def _begin(fs, s: AuditSettings, checks: list, images) -> tuple:
    """(image root, the run's info record, train/val roles): what both search paths start from."""
    root = Path(images) if images is not None else (Path(fs.meta["root"]) if fs.meta.get("root") else None)
    info = {"settings": {k: getattr(s, k) for k in ("threshold", "k", "fence", "C", "folds", "val_split", "seed")},
            "checks": checks, "skipped": [c for c in s.checks if c not in checks], "seconds": {}, "notes": []}
    info["settings"]["checks"] = list(s.checks)
    roles, how = _roles(fs, s)
    info["split_rule"] = how
    return root, info, roles

def run_checks(fs, s: AuditSettings, checks: list, *, images=None, progress=None) -> AuditResult:
    """The computation, no files written: neighbour index, then each requested check."""
    from ..features.store import check_paths

    check_paths(fs.paths, "the features")  # the gallery and the sha256 marks read root/path: never outside the root
    root, info, roles = _begin(fs, s, checks, images)
    dups, outs, labs = [], [], []
    pairs = found = class_knn = None
    # one neighbour index and one k-NN pass serve every check: outlier scores, the nearest image of every row
    # (scores table) and the neighbours' vote on each label
    t = time.perf_counter()
    index = neighbors.build_index(fs.features, backend=s.backend, seed=s.seed)
    info["search"] = index.describe()
    info["seconds"]["index"] = round(time.perf_counter() - t, 3)
    if "duplicates" in checks:
        dups, pairs = _duplicates(fs, s, index, roles, root, info, progress)
    t = time.perf_counter()
    knn = neighbors.kth_neighbour_distance(index, s.k, seed=s.seed, progress=_stage(progress, checks, "neighbours"))
    info["outlier_knn"] = {"k": knn.k, "reference": knn.reference}
    info["seconds"]["neighbours"] = round(time.perf_counter() - t, 3)
    if "outliers" in checks:
        outs = _outliers(fs, s, knn, roles, info)
        if fs.labels is not None and (fs.labels != "").any():
            t = time.perf_counter()
            class_knn = scores.class_kth_distance(index, fs.labels, s.k, seed=s.seed)
            info["seconds"]["class_outliers"] = round(time.perf_counter() - t, 3)
    if "labels" in checks:
        labs, found = _label_issues(fs, s, roles, info)
    return _result(fs, root, info, checks, roles, knn, class_knn, found, pairs, dups, outs, labs)



def _result(fs, root, info: dict, checks: list, roles, knn, class_knn, found, pairs, dups, outs, labs) -> AuditResult:
    """The per-image score table and the AuditResult, from what either search path found."""
    t = time.perf_counter()
    table = scores.build(fs, roles=roles, knn=knn, class_knn=class_knn, label_found=found, pairs=pairs,
                         duplicates=dups if "duplicates" in checks else None,
                         outliers=outs if "outliers" in checks else None,
                         label_issues=labs if "labels" in checks else None)
    if "outliers" not in checks:  # the k-NN pass ran for the nearest image only: no outlier ranking offered
        for c in ("outlier_rank", "outlier_score", "outlier_percentile", "knn_distance", "class_knn_distance"):
            table.columns[c] = np.full(len(fs), np.nan)
        table.columns["outlier_flagged"] = [None] * len(fs)
    info["seconds"]["scores"] = round(time.perf_counter() - t, 3)
    return AuditResult(features_path=None, root=None if root is None else str(root), n_images=len(fs),
                       duplicates=dups, label_issues=labs, outliers=outs, info=info, scores=table)

def _run_large(rows, s: AuditSettings, checks: list, *, images=None, progress=None) -> AuditResult:
    """run_checks on one approximate k-NN graph (featx.audit.large): same findings, same table, same files."""
    from . import large
    from .duplicates import describe_groups, group_pairs
    from .labels import find_label_issues

    root, info, roles = _begin(rows, s, checks, images)
    t = time.perf_counter()
    g = large.build_graph(rows, k=s.k, threshold=s.threshold if "duplicates" in checks else None, seed=s.seed,
                          progress=_stage(progress, ["neighbours"], "neighbours"))
    gi = g.info
    info["seconds"].update({f"graph_{k}": v for k, v in gi["seconds"].items()})
    info["seconds"]["neighbours"] = round(time.perf_counter() - t, 3)
    info["search"] = {"backend": f"faiss IVF (nlist {gi['nlist']}, nprobe {gi['nprobe']}, {gi['want']} neighbours "
                                 f"per image)", "searched_dim": gi["searched_dim"], "projected": True,
                      "candidate_pairs": gi["candidate_pairs"], "approximate": True,
                      "pca_variance": gi.get("pca_variance")}
    from .report import ordinal

    space = (f"a {gi['searched_dim']}-d PCA projection" if gi.get("pca_variance") is not None
             else f"the {gi['searched_dim']} dimensions")
    info["notes"].append(
        f"{len(rows)} images: approximate search (--index {s.index}): one k-NN graph of the {gi['want']} nearest "
        f"images in {space} (faiss IVF); duplicate candidates, the nearest image and the {ordinal(s.k)} neighbour "
        f"re-measured in the full dimension. A near-duplicate not among an image's {gi['want']} nearest may be "
        "missed; --index exact searches exhaustively (O(n^2)).")
    # a k-th neighbour the probed cells did not hold (tiny cells only): as far as a cosine distance goes (2)
    kth = np.where(np.isnan(g.kth_sim), 2.0, 1.0 - g.kth_sim).astype(np.float32)
    near = g.neighbours[:, :s.k]
    near = np.where(near < 0, np.arange(len(rows))[:, None], near)  # none found: weight 0 in the vote (sim -inf)
    knn = neighbors.KnnResult(distance=kth, k=min(s.k, gi["want"]), reference=len(rows), neighbours=near,
                              similarities=g.proj_sims[:, :s.k].copy())
    # scores.build takes the nearest image from the exact pairs, then the graph: its first neighbour, re-measured
    knn.neighbours[:, 0] = np.where(g.nearest < 0, knn.neighbours[:, 0], g.nearest)
    knn.similarities[:, 0] = g.nearest_sim
    info["outlier_knn"] = {"k": knn.k, "reference": knn.reference}
    dups, outs, labs = [], [], []
    pairs = found = class_knn = None
    if "duplicates" in checks:
        t = time.perf_counter()
        pairs = g.pairs
        max_pairs = max(1000, 50 * len(rows))
        if len(pairs[0]) > max_pairs:
            raise UsageError(f"more than {max_pairs} image pairs reach cosine {s.threshold}: that is not "
                             "duplication; raise --threshold")
        groups = group_pairs(len(rows), *pairs[:2])
        known = [x["paths"] for x in rows.meta.get("leakage") or [] if isinstance(x, dict) and x.get("paths")]
        dups = describe_groups(groups, pairs, paths=rows.paths, splits=rows.splits, roles=roles, labels=rows.labels,
                               root=root, known_exact=known)
        info["n_similar_pairs"] = int(len(pairs[0]))
        info["seconds"]["duplicates"] = round(time.perf_counter() - t, 3)
    if "outliers" in checks:
        outs = _outliers(rows, s, knn, roles, info)
        if rows.labels is not None and (rows.labels != "").any():
            class_knn = large.class_kth_distance(g, rows.labels, s.k)
    if "labels" in checks:
        t = time.perf_counter()
        found = find_label_issues(g.Z, rows.labels, C=s.C, folds=s.folds, seed=s.seed, n_jobs=s.n_jobs,
                                  train_rows=large.LABEL_TRAIN_ROWS)
        info["seconds"]["labels"] = round(time.perf_counter() - t, 3)
        sampled = found["n_checked"] * (found["folds"] - 1) > large.LABEL_TRAIN_ROWS * found["folds"]
        info["notes"] += found["notes"] + [
            f"label check at this size: out-of-fold probabilities of a logistic head on {space}"
            + (f", each of the {found['folds']} folds' heads fitted on {large.LABEL_TRAIN_ROWS} random rows of the "
               "other folds" if sampled else f" ({found['folds']}-fold)")
            + ", mixed with the neighbours' vote from the k-NN graph"]
        info["labels"] = {k: found[k] for k in ("folds", "n_checked", "cv_accuracy", "majority_rate", "chance_level",
                                                "classes")}
        labs = [{"rank": n, "path": rows.paths[r], "split": _at(rows.splits, r), "role": _at(roles, r), "given": gv,
                 "suggested": sg, "given_probability": gp, "suggested_probability": sp}
                for n, (r, gv, sg, gp, sp) in enumerate(zip(found["rows"], found["given"], found["suggested"],
                                                            found["given_probability"],
                                                            found["suggested_probability"]), 1)]
    del g
    return _result(rows, root, info, checks, roles, knn, class_knn, found, pairs, dups, outs, labs)


def _roles(fs, s: AuditSettings) -> tuple:
    """Per row, the part each image plays when featx fits on this store: train / val / test (plan_split's rule),
    so that a duplicate between train and fit's own hold-out counts as leakage even without a val/ folder.
    Rows plan_split ignores (unlabelled, unknown split) keep their folder split."""
    from ..data.split import plan_split

    if fs.labels is not None and (fs.labels != "").any():
        try:
            plan = plan_split(fs.paths, fs.labels.tolist(), None if fs.splits is None else fs.splits.tolist(),
                              val_fraction=s.val_split, seed=s.seed)
        except DataError:
            plan = None
        if plan is not None:
            roles = np.array([""] * len(fs), dtype=object) if fs.splits is None else fs.splits.astype(object)
            for name in ("train", "val", "test"):
                roles[getattr(plan, name)] = name
            return roles, plan.how
    if fs.splits is not None:
        return np.asarray(fs.splits, dtype=object), "the folder's splits"
    return None, "no splits (unlabelled, flat folder): no leakage to look for"


def _duplicates(fs, s, index, roles, root, info, progress) -> list:
    from .duplicates import describe_groups, group_pairs

    t = time.perf_counter()
    max_pairs = max(1000, 50 * len(fs))
    try:
        pairs = neighbors.similar_pairs(index, s.threshold, max_pairs=max_pairs,
                                        progress=_stage(progress, info["checks"], "duplicates"))
    except ValueError:
        raise UsageError(f"more than {max_pairs} image pairs reach cosine {s.threshold}: that is not duplication; "
                         "raise --threshold") from None
    groups = group_pairs(len(fs), *pairs[:2])
    known = [g["paths"] for g in fs.meta.get("leakage") or [] if isinstance(g, dict) and g.get("paths")]
    out = describe_groups(groups, pairs, paths=fs.paths, splits=fs.splits, roles=roles, labels=fs.labels,
                          root=root, known_exact=known)
    info["seconds"]["duplicates"] = round(time.perf_counter() - t, 3)
    info["n_similar_pairs"] = int(len(pairs[0]))
    info["search"] = index.describe()
    return out, pairs


def _outliers(fs, s, knn, roles, info) -> list:
    """The flagged set (unchanged since issue 16): k-th-neighbour distance past Tukey's fence."""
    t = time.perf_counter()
    score = knn.distance
    q1, q3 = np.percentile(score, [25, 75])
    cut = float(q3 + s.fence * (q3 - q1))
    order = np.argsort(-score, kind="stable")
    order = order[score[order] > cut]
    info["outlier_cut"] = round(cut, 4)
    info["seconds"]["outliers"] = round(time.perf_counter() - t, 3)
    return [{"rank": n, "path": fs.paths[r], "split": _at(fs.splits, r), "role": _at(roles, r),
             "label": _at(fs.labels, r),
             "score": round(float(score[r]), 4)} for n, r in enumerate(order.tolist(), 1)]


def _label_issues(fs, s, roles, info) -> list:
    from .labels import find_label_issues

    t = time.perf_counter()
    found = find_label_issues(fs.features, fs.labels, C=s.C, folds=s.folds, seed=s.seed, n_jobs=s.n_jobs)
    info["seconds"]["labels"] = round(time.perf_counter() - t, 3)
    info["notes"] += found["notes"]
    info["labels"] = {k: found[k] for k in ("folds", "n_checked", "cv_accuracy", "majority_rate", "chance_level",
                                            "classes")}
    return [{"rank": n, "path": fs.paths[r], "split": _at(fs.splits, r), "role": _at(roles, r), "given": g,
             "suggested": sg,
             "given_probability": gp, "suggested_probability": sp}
            for n, (r, g, sg, gp, sp) in enumerate(zip(found["rows"], found["given"], found["suggested"],
                                                       found["given_probability"],
                                                       found["suggested_probability"]), 1)], found


def _at(arr, r: int):
    if arr is None:
        return None
    v = str(arr[r])
    return v or None


def _stage(progress, checks: list, name: str):
    """Progress of one neighbour pass as a share of all of them (the duplicate search and the k-NN pass each walk
    every row)."""
    if progress is None:
        return None
    passes = [c for c in ("duplicates",) if c in checks] + ["neighbours"]
    before = passes.index(name)
    return lambda done, total: progress(before * total + done, len(passes) * total)


__all__ = ["audit", "AuditSettings", "AuditResult", "CHECKS", "default_report_dir", "run_checks"]


class _CallablePackage(types.ModuleType):
    """``featx.audit`` names both this package and its main function. Once the package is imported, Python binds
    the package to ``featx.audit`` (over the lazy API's function), so the package itself calls ``audit``: the
    documented ``featx.audit(features, ...)`` works whatever was imported first."""

    def __call__(self, *args, **kwargs):
        return audit(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
