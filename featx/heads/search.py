"""Model selection: sklearn's GridSearchCV on stratified folds, widening the grid while the best value is at its edge.

GridSearchCV scores every candidate on the same seeded StratifiedKFold splits the hand-written search used (so the
same folds give the same per-value scores; tests/test_heads.py checks it against a plain fit-and-score loop). What
scikit-learn cannot express is kept here: when the best value is at an end of the grid, one more value beyond that end
is searched (up to ``max_widen`` times), and ties go to the more regularised value rather than to the first listed.
The final refit on all training rows is the caller's (GridSearchCV's ``refit`` only sees one batch of the grid).
"""
from __future__ import annotations

import logging
import warnings
from collections import Counter
from typing import Callable, Optional, Sequence

import numpy as np

from ..errors import DataError

log = logging.getLogger(__name__)


def resolve_folds(y: np.ndarray, cv: int) -> int:
    """The number of folds to use: ``cv``, lowered (with a warning) to the smallest class count when that is smaller.

    Stratified k-fold needs every class in every fold; a class with a single training sample cannot be
    cross-validated at all, which is a data problem the user should hear about by name.
    """
    counts = Counter(np.asarray(y).tolist())
    cls, smallest = min(counts.items(), key=lambda kv: (kv[1], kv[0]))
    if smallest >= cv:
        return cv
    if smallest < 2:
        raise DataError(
            f"class {cls!r} has only {smallest} training sample; cross-validation needs at least 2 per class "
            f"(add images, drop the class, or fix the parameter with --C/--k and --cv 0)")
    log.warning("class %r has only %d training samples: using %d-fold instead of %d-fold cross-validation",
                cls, smallest, smallest, cv)
    return smallest


def fold_splits(X, y, folds: int, seed: int) -> list:
    from sklearn.model_selection import StratifiedKFold

    return list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(X, y))


def cv_scores(estimator, to_params: Callable, values: Sequence, X, y, splits: list, metric: str, n_jobs) -> dict:
    """``{value: [score per fold]}`` for each candidate, through GridSearchCV (no refit).

    One GridSearchCV per fold, so that every value of a fold is fitted one after the other on the same rows: an
    estimator can then reuse its per-fold work across values (svm-rbf reuses the fold's kernel matrix, which took
    three quarters of its CV time). The scores are those of a single GridSearchCV over all folds.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import GridSearchCV

    grid = [{k: [v] for k, v in to_params(value).items()} for value in values]  # one candidate per value, in order
    scores: dict = {value: [] for value in values}
    for split in splits:
        search = GridSearchCV(estimator, grid, scoring=metric, cv=[split], refit=False, n_jobs=n_jobs,
                              error_score="raise")
        with warnings.catch_warnings():
            # Non-converged folds are reported once by the final fit; per-fold warnings would flood the terminal.
            warnings.simplefilter("ignore", category=ConvergenceWarning)
            warnings.simplefilter("ignore", category=UserWarning)
            search.fit(X, y)
        for i, value in enumerate(values):
            scores[value].append(float(search.cv_results_["split0_test_score"][i]))
    return scores


def _widen(value, direction: int, log_scale: bool, lower, upper):
    """The next value beyond the edge, or None when a bound stops the widening."""
    if log_scale:
        new = value * 10.0 if direction > 0 else value / 10.0
        new = float(f"{new:.6g}")  # 0.1/10 -> 0.01 exactly, for readable grids
    else:
        step = max(2, int(round(value * 0.7)))  # ~geometric steps in k, keeping them odd-ish and distinct
        new = int(value + step) if direction > 0 else int(value - step)
    if lower is not None and new < lower:
        return None
    if upper is not None and new > upper:
        return None
    return new


def grid_search(estimator, to_params: Callable, X: np.ndarray, y: np.ndarray, *, param: str, grid: Sequence,
                folds: int, seed: int = 0, log_scale: bool = True, stronger: str = "low", lower=None, upper=None,
                max_widen: int = 3, metric: str = "accuracy", n_jobs=None, widen: bool = True,
                label: Optional[Callable] = None) -> tuple:
    """Cross-validate ``estimator.set_params(**to_params(value))`` for every value of ``grid``.

    Scalar grids are searched in ascending order and widened while the best mean score sits at an end (and a bound
    allows it), one value at a time, up to ``max_widen`` times. ``widen=False`` keeps a fixed list of configurations
    in the order given (most regularised first). Ties go to the more regularised value (``stronger``: which end).
    Returns ``(best_value, summary)``; the summary is ``{param, metric, folds, grid, best, mean, std, widened,
    at_edge, per_value: [{value, mean, std}]}`` with values shown through ``label``.
    """
    label = label or (lambda v: v)
    splits = fold_splits(X, y, folds, seed)
    if widen:
        grid = sorted({(float(v) if log_scale else int(v)) for v in grid
                       if (lower is None or v >= lower) and (upper is None or v <= upper)})
    else:
        grid = list(grid)
    if not grid:
        raise DataError(f"no {param} value of the grid is usable with this little data")
    results = cv_scores(estimator, to_params, grid, X, y, splits, metric, n_jobs)
    order = (lambda vs: sorted(vs)) if widen else (lambda vs: [v for v in grid if v in vs])

    def pick():
        values = order(list(results))
        means = np.array([np.mean(results[v]) for v in values])
        tied = [i for i, m in enumerate(means) if m >= means.max() - 1e-12]
        return values, values[min(tied) if stronger == "low" else max(tied)]

    widened = 0
    values, best = pick()
    while widen and widened < max_widen:
        direction = -1 if best == values[0] else (+1 if best == values[-1] else 0)
        new = _widen(best, direction, log_scale, lower, upper) if direction else None
        if new is None or new in results:
            break
        log.info("best %s=%s is at the edge of the grid; also trying %s", param, best, new)
        results.update(cv_scores(estimator, to_params, [new], X, y, splits, metric, n_jobs))
        widened += 1
        values, best = pick()

    # Only an edge that could have moved counts: k=1 for knn is a floor, not a sign of a too-narrow grid.
    at_edge = widen and len(values) > 1 and (
        (best == values[0] and _widen(best, -1, log_scale, lower, upper) is not None)
        or (best == values[-1] and _widen(best, +1, log_scale, lower, upper) is not None))
    if at_edge:
        log.warning("best %s=%s is still at the edge of the searched range %s..%s", param, best, values[0], values[-1])
    per_value = [{"value": label(v), "mean": float(np.mean(results[v])), "std": float(np.std(results[v]))}
                 for v in values]
    best_row = per_value[values.index(best)]
    summary = {"param": param, "metric": metric, "folds": folds, "grid": [r["value"] for r in per_value],
               "best": label(best), "mean": best_row["mean"], "std": best_row["std"], "widened": widened,
               "at_edge": bool(at_edge), "per_value": per_value}
    return best, summary


def cross_validate_one(estimator, to_params: Callable, value, X, y, *, param: str, folds: int, seed: int = 0,
                       metric: str = "accuracy", n_jobs=None, label: Optional[Callable] = None) -> dict:
    """CV score of one fixed value (the user chose it): same summary shape as :func:`grid_search`, ``fixed: True``."""
    _, summary = grid_search(estimator, to_params, X, y, param=param, grid=[value], folds=folds, seed=seed,
                             max_widen=0, metric=metric, n_jobs=n_jobs, widen=False, label=label)
    summary["fixed"] = True
    summary["at_edge"] = False
    return summary
