"""A score for every image (the audit's scores table): label-issue, outlier and near-duplicate scores side by side,
so a user can sort and look further down than the flagged sets go (FiftyOne's mistakenness / uniqueness, cleanlab's
label-quality scores)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np

COLUMNS = ["path", "split", "role", "label",
           "label_rank", "label_score", "given", "suggested", "given_probability", "neighbour_agreement",
           "label_flagged",
           "outlier_rank", "outlier_score", "outlier_percentile", "knn_distance", "class_knn_distance",
           "outlier_flagged",
           "duplicate_rank", "nearest", "nearest_similarity", "duplicate_group", "crosses_splits"]
# ranking name -> (score column, rank column, flag column): most suspicious first
RANKINGS = {"label": ("label_score", "label_rank", "label_flagged"),
            "outlier": ("outlier_score", "outlier_rank", "outlier_flagged"),
            "duplicate": ("nearest_similarity", "duplicate_rank", "duplicate_group")}
# The label score mixes the head's doubt with the neighbours' vote (cleanlab's find_label_issues and FiftyOne's
# mistakenness both lean on a model; k-NN agreement catches what a linear head fits around): weight of the vote.
# Tuned on bench_audit_planted.py's plants only (BENCHMARKS.md, "Audit: a score for every image"): planted
# relabels in the top 10 were 7/10 with the head alone, 6/10 with the vote alone, 9/10 at weights 0.1-0.25 and 8/10
# at 0.3-0.75; 0.25 sits inside the best plateau.
NEIGHBOUR_WEIGHT = 0.25
# The outlier score mixes the distance to the k-th nearest image of the whole set with that of the image's own
# class, as percentiles (a foreign image filed under one class sits far from that class even when it resembles a
# few images of another). Weight of the class term: 0.25, 0.5 and 0.75 all put 7 of 8 planted foreign images in the
# top 20 (the whole-set distance alone: 5); 0.5 treats both alike.
CLASS_WEIGHT = 0.5


@dataclass
class ScoreTable:
    """Columns of equal length (numpy arrays or lists), one row per image in store order."""

    columns: dict
    notes: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.columns["path"])

    def row(self, i: int) -> dict:
        return {c: _plain(self.columns[c][i], c in RANK_COLUMNS) for c in COLUMNS}

    def rows(self) -> Iterator[list]:
        """Every row as a list in COLUMNS order (None for an empty cell), for the CSV."""
        cols = [(self.columns[c], c in RANK_COLUMNS) for c in COLUMNS]
        for i in range(len(self)):
            yield [_plain(col[i], whole) for col, whole in cols]

    def ranked(self, name: str, top: Optional[int] = None) -> list:
        """Rows by ranking ``name`` (label / outlier / duplicate), most suspicious first; rows without a score left
        out (an unlabelled image has no label score)."""
        _, rank_col, _ = RANKINGS[name]
        ranks = np.asarray(self.columns[rank_col], dtype=np.float64)
        have = np.flatnonzero(~np.isnan(ranks))
        order = have[np.argsort(ranks[have], kind="stable")]
        if top is not None:
            order = order[:top]
        return [self.row(int(i)) for i in order]

    def available(self) -> list:
        return [n for n, (_, rank_col, _) in RANKINGS.items()
                if not np.isnan(np.asarray(self.columns[rank_col], dtype=np.float64)).all()]


RANK_COLUMNS = {rank for _, rank, _ in RANKINGS.values()}


def _plain(v, whole: bool = False):
    """numpy scalars -> Python; NaN -> None (an empty cell); ``whole``: a rank, written as an integer."""
    if v is None:
        return None
    if isinstance(v, (np.floating, float)):
        return None if np.isnan(v) else int(v) if whole else round(float(v), 4)
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.bool_):
        return bool(v)
    return v


def _ranks(score: np.ndarray, tie: Optional[np.ndarray] = None) -> np.ndarray:
    """1 = highest score (among equal scores, the highest ``tie``); NaN stays NaN (float array)."""
    out = np.full(len(score), np.nan)
    have = np.flatnonzero(~np.isnan(score))
    if tie is None:
        order = have[np.argsort(-score[have], kind="stable")]
    else:
        order = have[np.lexsort((-np.nan_to_num(tie[have]), -score[have]))]
    out[order] = np.arange(1, len(order) + 1)
    return out


def percentile_of(score: np.ndarray) -> np.ndarray:
    """Share (0..100) of the images whose score is at or below each image's (ties count as at or below)."""
    out = np.full(len(score), np.nan)
    have = ~np.isnan(score)
    v = score[have]
    if len(v):
        srt = np.sort(v)
        out[have] = 100.0 * np.searchsorted(srt, v, side="right") / len(v)
    return out


def neighbour_agreement(labels: np.ndarray, neighbours: np.ndarray, sims: np.ndarray) -> np.ndarray:
    """Per row, the similarity-weighted share of its labelled neighbours that carry its own label (NaN: unlabelled
    row or no labelled neighbour). The k-NN vote of cleanlab's and FiftyOne's neighbour-based label checks."""
    labels = np.asarray(labels).astype(str)
    named = labels != ""
    nl = labels[neighbours]
    w = np.clip(sims, 0.0, None) * (nl != "")
    same = (nl == labels[:, None]) * w
    total = w.sum(axis=1)
    out = np.full(len(labels), np.nan)
    ok = named & (total > 0)
    out[ok] = same.sum(axis=1)[ok] / total[ok]
    return out


def class_kth_distance(index, labels: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """Per row, the cosine distance to the k-th nearest other image of its own class (NaN for an unlabelled row or a
    class of one). Each class is searched on its own (a fraction of one pass over the whole set)."""
    from . import neighbors

    labels = np.asarray(labels).astype(str)
    out = np.full(len(labels), np.nan)
    for cls in np.unique(labels[labels != ""]):
        rows = np.flatnonzero(labels == cls)
        if len(rows) < 2:
            continue
        knn = neighbors.kth_neighbour_distance(neighbors.subset(index, rows), min(k, len(rows) - 1), seed=seed)
        out[rows] = knn.distance
    return out


def build(fs, *, roles, knn=None, class_knn=None, label_found=None, pairs=None, duplicates=None, outliers=None,
          label_issues=None) -> ScoreTable:
    """The scores table from what the checks computed (any of them may be missing: its columns stay empty).

    ``pairs``: the duplicate search's exact ``(i, j, cosine)`` arrays; ``duplicates``, ``outliers``,
    ``label_issues``: the flagged sets (matched by path: a store's paths are unique)."""
    n = len(fs)
    at = {p: r for r, p in enumerate(fs.paths)}
    nan = lambda: np.full(n, np.nan)  # noqa: E731
    none = lambda: [None] * n  # noqa: E731
    cols = {"path": list(fs.paths),
            "split": none() if fs.splits is None else [str(s) or None for s in fs.splits],
            "role": none() if roles is None else [str(r) or None for r in roles],
            "label": none() if fs.labels is None else [str(v) or None for v in fs.labels]}
    # label-issue score
    label_score, given_p, agreement = nan(), nan(), nan()
    given, suggested = none(), none()
    if label_found is not None and len(label_found["checked_rows"]):
        rows, y, probs = label_found["checked_rows"], label_found["y"], label_found["probabilities"]
        classes = np.asarray(label_found["classes"], dtype=object)
        given_p[rows] = probs[np.arange(len(rows)), y]
        for r, g, s in zip(rows.tolist(), classes[y].tolist(), classes[probs.argmax(axis=1)].tolist()):
            given[r], suggested[r] = g, s
        doubt = 1.0 - given_p
        if knn is not None and knn.neighbours is not None:
            agreement = neighbour_agreement(fs.labels, knn.neighbours, knn.similarities)
            vote = np.where(np.isnan(agreement), doubt, 1.0 - agreement)
            label_score = (1 - NEIGHBOUR_WEIGHT) * doubt + NEIGHBOUR_WEIGHT * vote
        else:
            label_score = doubt
    flagged = np.zeros(n, dtype=bool)
    for r in label_issues or []:
        flagged[at[r["path"]]] = True
    cols.update(label_rank=_ranks(label_score), label_score=label_score, given=given, suggested=suggested,
                given_probability=given_p, neighbour_agreement=agreement,
                label_flagged=[bool(f) if label_found is not None else None for f in flagged])
    # outlier score
    dist = nan() if knn is None else knn.distance.astype(np.float64)
    cdist = nan() if class_knn is None else class_knn
    if knn is None:
        outlier = nan()
    else:
        glob = percentile_of(dist)
        cls = percentile_of(cdist)
        outlier = np.where(np.isnan(cls), glob, (1 - CLASS_WEIGHT) * glob + CLASS_WEIGHT * cls) / 100.0
    oflag = np.zeros(n, dtype=bool)
    for r in outliers or []:
        oflag[at[r["path"]]] = True
    cols.update(outlier_rank=_ranks(outlier, tie=dist), outlier_score=outlier,
                outlier_percentile=percentile_of(outlier),
                knn_distance=dist, class_knn_distance=cdist,
                outlier_flagged=[bool(f) if knn is not None else None for f in oflag])
    # nearest image and duplicate groups
    nearest, near_sim = none(), nan()
    if knn is not None and knn.neighbours is not None and knn.neighbours.shape[1]:
        near_sim = knn.similarities[:, 0].astype(np.float64)
        nearest = [fs.paths[j] for j in knn.neighbours[:, 0].tolist()]
    if pairs is not None and len(pairs[0]):
        # the pair search is exact; the k-NN pass may have seen a sample only (beyond KNN_REFERENCE images)
        a = np.concatenate([pairs[0], pairs[1]])
        b = np.concatenate([pairs[1], pairs[0]])
        sim = np.concatenate([pairs[2], pairs[2]]).astype(np.float64)
        order = np.lexsort((-sim, a))  # per row a, its closest partner first
        a, b, sim = a[order], b[order], sim[order]
        first = np.r_[True, a[1:] != a[:-1]]
        for r, j, v in zip(a[first].tolist(), b[first].tolist(), sim[first].tolist()):
            if np.isnan(near_sim[r]) or v > near_sim[r] + 1e-6:
                near_sim[r], nearest[r] = v, fs.paths[j]
    group, crosses = none(), none()
    for g in duplicates or []:
        for m in g["members"]:
            r = at[m["path"]]
            group[r], crosses[r] = g["group"], g["leakage"]
    if duplicates is not None:
        crosses = [False if c is None else c for c in crosses]
    cols.update(duplicate_rank=_ranks(near_sim), nearest=nearest, nearest_similarity=near_sim,
                duplicate_group=group, crosses_splits=crosses)
    return ScoreTable(columns=cols)
