"""Linear SVM (one-vs-rest squared hinge, LinearSVC's objective) by full-batch L-BFGS in torch, stored as sklearn.

Why not liblinear: on standardised 1,280-d CNN features liblinear is slow where C grows (issue 15: 34-66 s per fit at
C = 0.1, 1,349 s for the CV search of `featx fit --head svm`; here 9.7-13.7 CPU-s per fit at C = 0.001 on 3,200 x 1,280
lite0-like features, against 1.2 s for this solver). This solver reaches the same optimum (coefficients within 1e-4 of
LinearSVC(tol=1e-5) there, within 2e-3 of LinearSVC(tol=1e-8) in tests/test_heads.py). It is fast because every step is
two dense products with the whole training matrix (both kept contiguous: a transposed view made the gradient product
~8x slower on the CPU); the same code runs on a GPU. The CV search fits a fold's C values in ascending order one after the other
(featx.heads.search.cv_scores), so each fit starts from the previous C's solution on the same rows (kept in a
small cache keyed by a hash of the rows): ~20% fewer L-BFGS iterations, measured on lite0-like features.

Objective, exactly scikit-learn's ``LinearSVC(C, loss="squared_hinge", fit_intercept=True, intercept_scaling=1)``
(liblinear appends a constant feature, so the intercept is penalised like a weight), for each class k against the rest:
``0.5 * (||w_k||^2 + b_k^2) + sum_i C_ik * max(0, 1 - y_ik (w_k . x_i + b_k))^2`` with ``C_ik = C * class_weight`` as
liblinear applies it: two classes weight every sample by its own class; more classes weight only the positives of each
one-vs-rest problem. We minimise it divided by ``C * n`` so one gradient tolerance fits every C and set size.
"""
from __future__ import annotations

import logging

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

from .kernel_svm import _key
from .torch_logistic import StandardisedLinear, _as_device_tensor, standardize

log = logging.getLogger(__name__)

# rows hash -> (C, coef, intercept) of the last fit on those rows: the warm start of the next, larger C. A few
# kilobytes per entry; 16 entries cover every fold of a search, widening included.
_LAST: dict = {}
_LAST_MAX = 16


def _targets(y_idx: np.ndarray, n_classes: int, C: float, weights: np.ndarray | None):
    """(+-1 targets N x K, per-sample-per-problem C N x K) in LinearSVC's layout (one column for two classes)."""
    n = len(y_idx)
    if n_classes == 2:
        Y = np.where(y_idx == 1, 1.0, -1.0)[:, None]
        Cw = np.full((n, 1), C) if weights is None else (C * weights[y_idx])[:, None]
        return Y, Cw
    Y = -np.ones((n, n_classes))
    Y[np.arange(n), y_idx] = 1.0
    Cw = np.full((n, n_classes), C)
    if weights is not None:
        Cw = np.where(Y > 0, C * weights[None, :], C)
    return Y, Cw


def fit_squared_hinge(Xs, y_idx: np.ndarray, n_classes: int, *, C: float = 1.0, class_weights=None,
                      device: str = "cpu", max_iter: int = 1000, tol: float = 1e-4, init=None):
    """``(coef, intercept, n_iter)`` as numpy arrays in LinearSVC's layout ((1, D) for two classes, else (K, D)).

    ``Xs`` (numpy or tensor) should already be standardised; float32 throughout, full batch on ``device``. ``init``:
    a previous ``(coef, intercept)`` to start from (the same rows at a smaller C: a warm start along the C path).
    """
    import torch

    dev = torch.device(device)
    Xt = _as_device_tensor(Xs, dev)
    n, d = Xt.shape
    Xa = torch.cat([Xt, torch.ones(n, 1, device=dev)], dim=1).contiguous()
    XaT = Xa.T.contiguous()
    Y, Cw = _targets(np.asarray(y_idx), n_classes, float(C), class_weights)
    Y = torch.as_tensor(Y, dtype=torch.float32, device=dev)
    Cw = torch.as_tensor(Cw, dtype=torch.float32, device=dev)
    W = torch.zeros(d + 1, Y.shape[1], device=dev)
    if init is not None:
        W[:-1] = torch.as_tensor(init[0].T, dtype=torch.float32)
        W[-1] = torch.as_tensor(init[1], dtype=torch.float32)
    W.requires_grad_(True)
    scale = 1.0 / (float(C) * n)

    # history 20 (scipy's default is 10): a longer memory pays off on ill-conditioned CNN features at nearly no cost.
    opt = torch.optim.LBFGS([W], lr=1.0, max_iter=max_iter, max_eval=int(max_iter * 1.25), tolerance_grad=tol,
                            tolerance_change=1e-10, history_size=20, line_search_fn="strong_wolfe")

    def closure():  # the gradient by hand: autograd would multiply by a transposed (non-contiguous) view of X
        with torch.no_grad():
            w = W.detach()
            margin = torch.clamp(1.0 - Y * (Xa @ w), min=0.0)
            loss = (0.5 * (w * w).sum() + (Cw * margin * margin).sum()) * scale
            W.grad = (w - 2.0 * (XaT @ (Cw * Y * margin))) * scale
        return loss

    opt.step(closure)
    n_iter = int(opt.state[opt._params[0]].get("n_iter", 0))
    if n_iter >= max_iter:
        log.warning("torch SVM head stopped after %d L-BFGS iterations without meeting tol=%g", n_iter, tol)
    Wn = W.detach().cpu().numpy().astype(np.float64)
    return Wn[:-1].T.copy(), Wn[-1].copy(), n_iter


class TorchLinearSVC(StandardisedLinear, ClassifierMixin, BaseEstimator):
    """Standardise + one-vs-rest squared-hinge linear SVM on ``device``, as one sklearn-compatible estimator.

    :meth:`to_sklearn_pipeline` returns the equivalent fitted ``Pipeline(StandardScaler, LinearSVC)`` that the head
    file stores, so using the head needs neither torch nor a GPU.
    """

    def __init__(self, C: float = 1.0, class_weight=None, device: str = "cpu", max_iter: int = 1000, tol: float = 1e-4,
                 with_std: bool = True):
        self.C = C
        self.class_weight = class_weight
        self.device = device
        self.max_iter = max_iter
        self.tol = tol
        self.with_std = with_std

    def fit(self, X, y):
        import torch
        from sklearn.utils.class_weight import compute_class_weight

        y = np.asarray(y)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError("need at least two classes")
        weights = None
        if self.class_weight is not None:
            weights = compute_class_weight(self.class_weight, classes=self.classes_, y=y)
        with torch.no_grad():
            Xs, mean, var, scale = standardize(_as_device_tensor(X, torch.device(self.device)), self.with_std)
        self.mean_, self.var_, self.scale_ = (t.cpu().numpy() for t in (mean, var, scale))
        key = _key(np.asarray(X), y_idx, np.asarray([-1.0] if weights is None else weights),
                   np.asarray([self.with_std]))
        last = _LAST.get(key)
        init = last[1:] if last is not None and last[0] <= float(self.C) else None
        self.coef_, self.intercept_, n_iter = fit_squared_hinge(
            Xs, y_idx, len(self.classes_), C=self.C, class_weights=weights, device=self.device,
            max_iter=self.max_iter, tol=self.tol, init=init)
        _LAST.pop(key, None)
        _LAST[key] = (float(self.C), self.coef_, self.intercept_)
        while len(_LAST) > _LAST_MAX:
            _LAST.pop(next(iter(_LAST)))
        del Xs
        self.n_iter_ = int(n_iter)
        self.n_features_in_ = int(X.shape[1])
        self.n_samples_seen_ = int(X.shape[0])
        return self

    def to_sklearn_pipeline(self):
        """The fitted ``Pipeline(StandardScaler, LinearSVC)`` with the same numbers (CPU-only, no torch)."""
        from sklearn.pipeline import Pipeline
        from sklearn.svm import LinearSVC

        from .torch_logistic import fitted_scaler

        svc = LinearSVC(C=float(self.C), class_weight=self.class_weight, max_iter=self.max_iter, tol=self.tol)
        svc.classes_ = np.asarray(self.classes_)
        svc.coef_ = np.asarray(self.coef_, dtype=np.float64)
        svc.intercept_ = np.asarray(self.intercept_, dtype=np.float64)
        svc.n_features_in_ = self.n_features_in_
        svc.n_iter_ = self.n_iter_
        return Pipeline([("scale", fitted_scaler(self)), ("clf", svc)])
