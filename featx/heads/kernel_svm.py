"""RBF-kernel SVM through a precomputed kernel matrix: the model Pipeline(StandardScaler, SVC(rbf)) gives, ~20x faster.

libsvm spends its time evaluating kernel entries, each a 1,280-long dot product, again and again across SMO
iterations. Computing the whole training kernel once with one BLAS product and handing libsvm
``kernel="precomputed"`` turns each entry into a lookup: on 3,200 x 1,280 standardised lite0-like features a fit went
from 8-9 s to 0.4 s of CPU (plus 0.5 s for the kernel), for the same support vectors and dual coefficients. The fitted
model is converted back into an ordinary ``SVC(kernel="rbf")`` holding its support vectors, so the head file and
predictions are exactly those of a direct fit (tests/test_heads.py compares the decision functions).

The CV search fits every C value of a fold one after the other on the same rows (featx.heads.search.cv_scores), so
the last fold's standardisation and kernels are kept (one entry, keyed by a hash of the rows) and reused across C:
the kernels were three quarters of svm-rbf's CV time.
"""
from __future__ import annotations

import hashlib

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

_CACHE: dict = {}  # {"fit": (key, fitted state), "predict": (key, kernel)}: the last fold's work only


def _key(*arrays) -> str:
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.data)
    return h.hexdigest()


def _cached(slot: str, key: str, compute):
    hit = _CACHE.get(slot)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = compute()
    _CACHE[slot] = (key, value)
    return value


def rbf(A: np.ndarray, B: np.ndarray, gamma: float) -> np.ndarray:
    """exp(-gamma * ||a - b||^2) for every row pair, through one matrix product."""
    sq = (A * A).sum(axis=1)[:, None] + (B * B).sum(axis=1)[None, :] - 2.0 * (A @ B.T)
    return np.exp(-gamma * np.maximum(sq, 0.0))


class PrecomputedRBFSVC(ClassifierMixin, BaseEstimator):
    """Standardise, then SVC(C, rbf, gamma="scale") solved on the precomputed kernel."""

    def __init__(self, C: float = 1.0, class_weight=None, seed: int = 0, with_std: bool = True):
        self.C = C
        self.class_weight = class_weight
        self.seed = seed
        self.with_std = with_std

    def fit(self, X, y):
        from sklearn.svm import SVC

        X = np.asarray(X)
        self.train_key_ = _key(X, np.asarray([self.with_std]))
        self.scaler_, A, self.gamma_, K = _cached("fit", self.train_key_, lambda: self._prepare(X, self.with_std))
        self.svc_ = SVC(C=float(self.C), kernel="precomputed", class_weight=self.class_weight,
                        random_state=self.seed).fit(K, y)
        self.rows_ = A
        self.support_rows_ = A[self.svc_.support_]
        self.classes_ = self.svc_.classes_
        self.n_features_in_ = int(A.shape[1])
        return self

    @staticmethod
    def _prepare(X, with_std: bool = True):
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler(with_std=with_std).fit(X)
        A = scaler.transform(X).astype(np.float64)  # libsvm works in float64 (the direct fit converts too)
        gamma = 1.0 / (A.shape[1] * A.var())  # SVC's gamma="scale" on the data it is fitted on
        return scaler, A, gamma, rbf(A, A, gamma)

    def _kernel(self, X) -> np.ndarray:
        """Kernel against every training row (libsvm indexes the precomputed matrix by training position)."""
        X = np.asarray(X)
        return _cached("predict", self.train_key_ + _key(X),
                       lambda: rbf(self.scaler_.transform(X).astype(np.float64), self.rows_, self.gamma_))

    def decision_function(self, X):
        return self.svc_.decision_function(self._kernel(X))

    def predict(self, X):
        return self.svc_.predict(self._kernel(X))

    def to_sklearn_pipeline(self):
        """``Pipeline(StandardScaler, SVC(kernel="rbf", gamma=<the scale value>))`` with this fit's solution."""
        from sklearn.pipeline import Pipeline
        from sklearn.svm import SVC

        svc = SVC(C=float(self.C), kernel="rbf", gamma=float(self.gamma_), class_weight=self.class_weight,
                  random_state=self.seed)
        for name, value in vars(self.svc_).items():  # every fitted attribute (public and libsvm's private ones)
            if name.endswith("_") or name.startswith("_"):
                setattr(svc, name, value)
        svc.support_vectors_ = self.support_rows_
        svc._gamma = float(self.gamma_)
        svc.shape_fit_ = (self.svc_.shape_fit_[0], self.n_features_in_)
        svc.n_features_in_ = self.n_features_in_
        _CACHE.clear()  # the search is over: do not keep an n x n kernel alive
        return Pipeline([("scale", self.scaler_), ("clf", svc)])
