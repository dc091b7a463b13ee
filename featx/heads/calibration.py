"""Calibrated probabilities for any head: temperature scaling fitted on the validation split, its ECE, its plot.

The temperature is fitted by scikit-learn (``CalibratedClassifierCV(FrozenEstimator(head), method="temperature")``)
and stored as one number in the head's metadata, so the stored pipeline stays the plain one (an exporter folds the
temperature as a division of the logits). The logits are what scikit-learn calibrates: ``decision_function`` when the
head has one (two classes: ``(-s, s)``), else ``log(predict_proba + 1e-12)``; probabilities are
``softmax(logits / T)``. One temperature keeps every prediction's class (argmax) unchanged: only confidences move.

Expected calibration error (top-label, 15 equal-width confidence bins) is written here because scikit-learn has none
for more than two classes (``calibration_curve`` is binary only).
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import DataError

N_BINS = 15
_EPS = 1e-12  # as sklearn.calibration._convert_to_logits

# Validation rows of every trained class below which --calibrate is refused. Why 5: the ECE featx reports for the
# validation split is cross-fitted (each row scored by a temperature fitted on the others, 5 stratified folds), which
# needs 5 rows of a class for it to be held out in every fold; and a temperature from fewer rows is mostly noise:
# on a binary digits head (72 % accurate), 30 random draws of 1 validation row a class gave T from 0.0005 to 22,026
# (test ECE up to 0.28; the uncalibrated head's was 0.14). Every T below 0.05 there, at 1, 2, 3 and 5 rows a class,
# came from a draw in which the head made no mistake, which `check_enough` refuses whatever the count. The issue's
# case was one row a class: T = 0.0105, "ECE 0.285 -> 0.000" on the two rows that fitted it.
MIN_ROWS_PER_CLASS = 5
CROSS_FIT_FOLDS = 5


def logits(pipeline, X) -> np.ndarray:
    """The head's scores as the logits scikit-learn's temperature scaling uses (N x C, columns in classes_ order)."""
    if hasattr(pipeline, "decision_function"):
        s = np.asarray(pipeline.decision_function(X), dtype=np.float64)
        if s.ndim == 1 or s.shape[1] == 1:
            s = s.reshape(-1, 1)
            return np.hstack([-s, s])
        return s
    return np.log(np.asarray(pipeline.predict_proba(X), dtype=np.float64) + _EPS)


def softmax_t(z: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    from scipy.special import softmax

    return softmax(np.asarray(z, dtype=np.float64) / float(temperature), axis=1)


def probabilities(pipeline, X, temperature: float) -> np.ndarray:
    """Calibrated probabilities (what a calibrated head's ``predict_scores`` returns)."""
    return softmax_t(logits(pipeline, X), temperature)


def uncalibrated(pipeline, X) -> tuple:
    """(probabilities, how) before calibration: the head's own, or a softmax of its raw decision scores."""
    if hasattr(pipeline, "predict_proba"):  # False for SVMs and ridge (sklearn's available_if)
        return np.asarray(pipeline.predict_proba(X), dtype=np.float64), "the head's own probabilities"
    return softmax_t(logits(pipeline, X)), "softmax of the raw decision scores (temperature 1)"


def _calibrator(pipeline):
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.frozen import FrozenEstimator

    # The head is frozen, so folds change nothing but would need >= 5 rows of every class (sklearn's default cv):
    # one "split" whose training and test rows are all rows fits T on every row with no such limit.
    return CalibratedClassifierCV(FrozenEstimator(pipeline), method="temperature", ensemble=False, cv=_AllRows())


class _AllRows:
    """A cross-validator with one split: train on all rows, predict all rows (for a frozen estimator)."""

    def split(self, X, y=None, groups=None):
        idx = np.arange(len(X))
        yield idx, idx

    def get_n_splits(self, X=None, y=None, groups=None):
        return 1


def fit_temperature(pipeline, X, y) -> float:
    """The temperature T (> 0) that minimises the log-loss of ``softmax(logits / T)`` on (X, y)."""
    X, y = _known(pipeline, X, y)
    cal = _calibrator(pipeline).fit(X, y)
    beta = float(cal.calibrated_classifiers_[0].calibrators[0].beta_)
    return 1.0 / beta


def check_rows(classes, y) -> None:
    """Refuse (DataError) fewer than ``MIN_ROWS_PER_CLASS`` validation rows ``y`` of any of ``classes``."""
    y = np.asarray(y).astype(str)
    counts = {str(c): int((y == str(c)).sum()) for c in classes}
    short = {c: n for c, n in counts.items() if n < MIN_ROWS_PER_CLASS}
    if short:
        c, n = min(short.items(), key=lambda kv: (kv[1], kv[0]))
        others = f"; {len(short) - 1} other class(es) have too few as well" if len(short) > 1 else ""
        raise DataError(
            f"--calibrate needs at least {MIN_ROWS_PER_CLASS} validation images of every class (class {c} has {n}"
            f"{others}): a temperature fitted on fewer is noise, and its calibration error cannot be measured on "
            f"images it was not fitted on; add validation images (a larger val/ folder or --val-split) or fit "
            f"without --calibrate")


def check_enough(pipeline, X, y) -> None:
    """Refuse (DataError) validation rows a temperature cannot honestly be fitted on: too few of a class the head
    knows (`check_rows`), or no mistake (or nothing right) among them."""
    check_rows(pipeline.classes_, y)
    X, y = _known(pipeline, X, y)
    right = np.asarray(pipeline.predict(X)).astype(str) == y
    if right.all():  # the log-loss keeps falling as T -> 0: the "fit" is wherever the optimiser stops
        raise DataError(
            f"--calibrate: the head makes no mistake on the {len(y)} validation images, so temperature scaling has "
            f"nothing to learn a confidence from (T would run to its bound and every prediction would claim "
            f"confidence 1.000); calibrate on more validation images, or fit without --calibrate")
    if not right.any():
        raise DataError(f"--calibrate: the head gets none of the {len(y)} validation images right; there is no "
                        f"confidence to calibrate (check the labels of the validation split)")


def cross_fitted(pipeline, X, y, seed: int = 0, folds: int = CROSS_FIT_FOLDS):
    """Calibrated probabilities of each validation row from a temperature fitted on the other rows (an honest ECE on
    the rows the temperature comes from); None when a class has too few rows for two folds."""
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    X, y = _known(pipeline, X, y)
    counts = np.unique(y, return_counts=True)[1]
    k = min(folds, int(counts.min()))
    if k < 2:
        return None, y
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return cross_val_predict(_calibrator(pipeline), X, y, cv=cv, method="predict_proba"), y


def _known(pipeline, X, y):
    """Rows whose class the head knows (a class absent from training cannot be calibrated for)."""
    y = np.asarray(y).astype(str)
    keep = np.isin(y, np.asarray(pipeline.classes_).astype(str))
    if keep.sum() < 2 or len(np.unique(y[keep])) < 2:
        raise DataError("--calibrate needs validation rows of at least two of the trained classes")
    return np.asarray(X)[keep], y[keep]


def reliability(proba: np.ndarray, y_true, classes, n_bins: int = N_BINS) -> dict:
    """Top-label expected calibration error and the per-bin table a reliability diagram draws.

    ``{"ece", "n", "bins": [{"lo", "hi", "n", "confidence", "accuracy"}]}``; empty bins have n = 0 and None values.
    """
    proba = np.asarray(proba, dtype=np.float64)
    y_true = np.asarray(y_true).astype(str)
    conf = proba.max(axis=1)
    correct = np.asarray(classes).astype(str)[proba.argmax(axis=1)] == y_true
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        m = which == b
        nb = int(m.sum())
        row = {"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": nb, "confidence": None, "accuracy": None}
        if nb:
            row["confidence"], row["accuracy"] = float(conf[m].mean()), float(correct[m].mean())
            ece += nb / len(conf) * abs(row["accuracy"] - row["confidence"])
        bins.append(row)
    return {"ece": float(ece) if len(conf) else math.nan, "n": int(len(conf)), "bins": bins}
