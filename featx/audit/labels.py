"""Likely label errors: out-of-sample probabilities of a logistic head by cross-validation, ranked by cleanlab.

cleanlab is an optional extra (``pip install 'featx[audit]'``): only this check needs it, and it brings pandas,
which nothing else in featx uses. Duplicates and outliers run without it.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from ..errors import UsageError

EXTRA_HINT = "likely-label-error detection needs cleanlab: pip install 'featx[audit]' (or pip install cleanlab)"


def require_cleanlab() -> None:
    """Fail at once, in one line naming the extra, when cleanlab is missing (checked before any work)."""
    try:
        import cleanlab.filter  # noqa: F401
    except ImportError:
        raise UsageError(f"{EXTRA_HINT}; or skip this check with --checks duplicates,outliers") from None


def usable_rows(labels: np.ndarray, folds: int) -> tuple:
    """Rows that can take part (a class needs at least 2 labelled rows to be cross-validated), folds, notes."""
    labels = np.asarray(labels).astype(str)
    named = labels != ""
    classes, counts = np.unique(labels[named], return_counts=True)
    small = set(classes[counts < 2].tolist())
    notes = []
    if small:
        notes.append(f"classes with a single image were left out of the label check: {', '.join(sorted(small))}")
    rows = np.flatnonzero(named & ~np.isin(labels, list(small)))
    kept = counts[counts >= 2]
    if len(kept) < 2:
        return np.zeros(0, np.int64), 0, notes + ["fewer than two classes with 2+ images: label check skipped"]
    folds = int(min(folds, kept.min()))
    return rows, folds, notes


def out_of_sample_probabilities(X: np.ndarray, y: np.ndarray, *, C: float, folds: int, seed: int = 0,
                                n_jobs: Optional[int] = None, train_rows: Optional[int] = None) -> np.ndarray:
    """N x C probabilities, each row predicted by a head that never saw it (sklearn ``cross_val_predict``).

    The head is the one ``featx fit`` builds for ``--head logistic``: standardised features, multinomial logistic
    regression (lbfgs), here at a fixed C instead of fit's grid search (a search per fold costs 5x more), and
    with tol=1e-3 instead of fit's 1e-4: the ranking needs no tighter optimum (measured on 10,000 synthetic
    rows: 49 -> 18 lbfgs iterations per fold, planted swaps found 479 -> 487 of 500; BENCHMARKS.md).

    ``train_rows``: fit each fold's head on at most this many random rows of the other folds (the audit's large-n
    path: every row is still predicted by a head that never saw it, at a fraction of the cost of full folds).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    head = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=1000, tol=1e-3))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    if train_rows is None or len(y) * (folds - 1) <= train_rows * folds:
        return cross_val_predict(head, X, y, cv=cv, method="predict_proba", n_jobs=n_jobs)
    from sklearn.base import clone

    rng = np.random.default_rng(seed)
    probs = np.zeros((len(y), int(y.max()) + 1), dtype=np.float64)
    for train, test in cv.split(np.zeros((len(y), 1)), y):
        train = np.sort(rng.choice(train, min(train_rows, len(train)), replace=False))
        fitted = clone(head).fit(X[train], y[train])
        cols = fitted[-1].classes_  # a class missing from the sample keeps probability 0
        for lo in range(0, len(test), 65536):  # predict_proba's temporaries stay small
            part = test[lo:lo + 65536]
            probs[np.ix_(part, cols)] = fitted.predict_proba(X[part])
    return probs


def chance_level(y: np.ndarray, suggested: np.ndarray) -> tuple:
    """(is the CV accuracy at chance level?, majority-class rate) for labels ``y`` and predictions ``suggested``:
    featx.report's one chance rule (`chance_check`), so audit and every printed score agree."""
    from ..report import chance_check

    found = chance_check(np.asarray(y), np.asarray(suggested))
    majority = found["majority_rate"] if len(y) else 0.0
    return found["beats_chance"] is not True, majority


def find_label_issues(X: np.ndarray, labels: np.ndarray, *, C: float = 0.1, folds: int = 5, seed: int = 0,
                      n_jobs: Optional[int] = None, train_rows: Optional[int] = None) -> dict:
    """Ranked likely label errors among the labelled rows of ``X``.

    Returns ``{"rows", "given", "suggested", "given_probability", "suggested_probability", "classes", "folds",
    "n_checked", "notes", "cv_accuracy", "majority_rate", "chance_level", "checked_rows", "y", "probabilities"}``:
    row indices into X, most likely error first (cleanlab's ``find_label_issues`` with its default noise-rate
    pruning, ranked by self-confidence); the last three cover every checked row, flagged or not (the scores table).
    """
    require_cleanlab()
    from cleanlab.filter import find_label_issues as cl_find

    rows, folds, notes = usable_rows(labels, folds)
    empty = {"rows": [], "given": [], "suggested": [], "given_probability": [], "suggested_probability": [],
             "classes": [], "folds": folds, "n_checked": 0, "notes": notes, "cv_accuracy": None,
             "majority_rate": None, "chance_level": None, "checked_rows": rows, "y": np.zeros(0, np.int64),
             "probabilities": np.zeros((0, 0))}
    if len(rows) == 0:
        return empty
    classes, y = np.unique(np.asarray(labels)[rows].astype(str), return_inverse=True)
    probs = out_of_sample_probabilities(X[rows] if len(rows) < len(X) else X, y, C=C, folds=folds, seed=seed,
                                       n_jobs=n_jobs, train_rows=train_rows)
    # n_jobs=1: cleanlab's process pool copies pred_probs to each worker; on 2 cores that is slower than one pass.
    ranked = cl_find(labels=y, pred_probs=probs, return_indices_ranked_by="self_confidence", n_jobs=1)
    suggested = probs.argmax(axis=1)
    ranked = np.asarray(ranked, dtype=np.int64)
    at_chance, majority = chance_level(y, suggested)
    accuracy = float((suggested == y).mean())
    if at_chance:
        notes = notes + [
            f"the label check is at chance level: its cross-validated accuracy {accuracy:.3f} is not clearly above "
            f"the majority-class rate {majority:.3f}, so the features do not predict the labels and its "
            f"{len(ranked)} likely label errors are meaningless; check the features (a random or unsuitable "
            f"backbone?) before acting on label_issues.csv"]
    return {
        "rows": rows[ranked].tolist(),
        "given": classes[y[ranked]].tolist(),
        "suggested": classes[suggested[ranked]].tolist(),
        "given_probability": [round(float(p), 4) for p in probs[ranked, y[ranked]]],
        "suggested_probability": [round(float(p), 4) for p in probs[ranked, suggested[ranked]]],
        "classes": classes.tolist(),
        "folds": folds,
        "n_checked": int(len(rows)),
        "notes": notes,
        "cv_accuracy": round(accuracy, 4),
        "majority_rate": round(majority, 4),
        "chance_level": bool(at_chance),
        # every checked row, flagged or not (the scores table): row indices into X, class indices, N x C probabilities
        "checked_rows": rows,
        "y": y,
        "probabilities": probs,
    }
