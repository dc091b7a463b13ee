"""Stratified k-fold grid search over one hyper-parameter, widening the grid while the best value sits at its edge."""
from __future__ import annotations

import logging
import warnings
from collections import Counter
from typing import Callable, Sequence

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


def _fold_score(make, value, X, y, train_idx, test_idx, metric: str) -> float:
    from sklearn.metrics import accuracy_score, balanced_accuracy_score

    est = make(value)
    with warnings.catch_warnings():
        # Non-converged folds are reported once by the caller's final fit; per-fold warnings would flood the terminal.
        warnings.simplefilter("ignore", category=UserWarning)
        try:
            from sklearn.exceptions import ConvergenceWarning

            warnings.simplefilter("ignore", category=ConvergenceWarning)
        except ImportError:  # pragma: no cover
            pass
        est.fit(X[train_idx], y[train_idx])
    pred = est.predict(X[test_idx])
    fn = balanced_accuracy_score if metric == "balanced_accuracy" else accuracy_score
    return float(fn(y[test_idx], pred))


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


def grid_search(make: Callable, X: np.ndarray, y: np.ndarray, *, param: str, grid: Sequence, folds: int,
                seed: int = 0, log_scale: bool = True, stronger: str = "low", lower=None, upper=None,
                max_widen: int = 3, metric: str = "accuracy", n_jobs=None) -> dict:
    """Evaluate ``make(value)`` on stratified ``folds``-fold splits for every value of ``grid``.

    While the best mean score sits at an end of the grid (and a bound allows it), one more value is tried beyond
    that end, up to ``max_widen`` times in all. Ties go to the more regularised value (``stronger`` says which end
    that is). Returns ``{param, metric, folds, grid, best, mean, std, widened, per_value: [{value, mean, std}]}``.
    """
    from joblib import Parallel, delayed
    from sklearn.model_selection import StratifiedKFold

    splits = list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(X, y))
    results: dict = {}

    def evaluate(values):
        values = [v for v in values if v not in results]
        if not values:
            return
        jobs = [(v, tr, te) for v in values for tr, te in splits]
        scores = Parallel(n_jobs=n_jobs)(delayed(_fold_score)(make, v, X, y, tr, te, metric) for v, tr, te in jobs)
        for (v, _, _), s in zip(jobs, scores):
            results.setdefault(v, []).append(s)

    grid = sorted({(float(v) if log_scale else int(v)) for v in grid
                   if (lower is None or v >= lower) and (upper is None or v <= upper)})
    if not grid:
        raise DataError(f"no {param} value of the grid is usable with this little data")
    evaluate(grid)
    widened = 0

    def pick():
        values = sorted(results)
        means = np.array([np.mean(results[v]) for v in values])
        best_mean = means.max()
        tied = [v for v, m in zip(values, means) if m >= best_mean - 1e-12]
        return values, (min(tied) if stronger == "low" else max(tied))

    while True:
        values, best = pick()
        if widened >= max_widen:
            break
        if best == values[0]:
            new = _widen(best, -1, log_scale, lower, upper)
        elif best == values[-1]:
            new = _widen(best, +1, log_scale, lower, upper)
        else:
            break
        if new is None or new in results:
            break
        log.info("best %s=%s is at the edge of the grid; also trying %s", param, best, new)
        evaluate([new])
        widened += 1

    per_value = [{"value": v, "mean": float(np.mean(results[v])), "std": float(np.std(results[v]))}
                 for v in sorted(results)]
    best_row = next(r for r in per_value if r["value"] == best)
    # Only an edge that could have moved counts: k=1 for knn is a floor, not a sign of a too-narrow grid.
    at_edge = len(values) > 1 and (
        (best == values[0] and _widen(best, -1, log_scale, lower, upper) is not None)
        or (best == values[-1] and _widen(best, +1, log_scale, lower, upper) is not None))
    if at_edge:
        log.warning("best %s=%s is still at the edge of the searched range %s..%s", param, best, values[0], values[-1])
    return {
        "param": param,
        "metric": metric,
        "folds": folds,
        "grid": [r["value"] for r in per_value],
        "best": best,
        "mean": best_row["mean"],
        "std": best_row["std"],
        "widened": widened,
        "at_edge": bool(at_edge),
        "per_value": per_value,
    }


def cross_validate_one(make: Callable, value, X, y, *, param: str, folds: int, seed: int = 0,
                       metric: str = "accuracy", n_jobs=None) -> dict:
    """CV score of one fixed value (the user chose it): same dict shape as :func:`grid_search`, ``fixed: True``."""
    res = grid_search(make, X, y, param=param, grid=[value], folds=folds, seed=seed,
                      log_scale=param != "n_neighbors",
                      max_widen=0, metric=metric, n_jobs=n_jobs)
    res["fixed"] = True
    res["at_edge"] = False
    return res

