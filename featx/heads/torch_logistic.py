"""Multinomial logistic regression fitted with full-batch L-BFGS in torch (GPU for large sets), stored as sklearn.

Same objective as scikit-learn's ``LogisticRegression(C)`` with lbfgs: ``C * sum_i w_i * logloss_i + 0.5 * ||W||^2``,
intercept unpenalised; two classes use one weight vector and the binomial loss, exactly as sklearn does. We minimise
that objective divided by ``C * sum(w)`` (sklearn scales it the same way), which keeps gradients O(1) so one gradient
tolerance works for any set size. The result is turned into an ordinary fitted ``LogisticRegression`` so the head file,
loading and prediction are the same as for the CPU head, and no GPU is needed to use it.
"""
from __future__ import annotations

import logging

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

log = logging.getLogger(__name__)


def resolve_device(device: str = "auto") -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; asking for CUDA without one is a UsageError."""
    from ..devices import resolve_device as _resolve

    return str(_resolve(device))


def _as_device_tensor(X, dev):
    import torch

    if isinstance(X, torch.Tensor):
        return X.to(dev, dtype=torch.float32)
    return torch.as_tensor(np.ascontiguousarray(X, dtype=np.float32)).to(dev)


def standardize(Xt, with_std: bool = True):
    """(standardised copy, mean, var, scale) computed on the tensor's device; scale as sklearn's StandardScaler
    (population variance; near-zero scales become 1 so constant features stay finite). ``with_std=False``: centred
    only (scale 1), as ``StandardScaler(with_std=False)``."""
    import torch

    mean = Xt.mean(dim=0, dtype=torch.float64)
    var = ((Xt - mean.to(Xt.dtype)) ** 2).mean(dim=0, dtype=torch.float64)
    scale = torch.sqrt(var)
    scale = torch.where(scale < 10 * np.finfo(np.float64).eps, torch.ones_like(scale), scale)
    if not with_std:
        scale = torch.ones_like(scale)
    Xs = (Xt - mean.to(Xt.dtype)) / scale.to(Xt.dtype)
    return Xs, mean, var, scale


def fit_logistic_lbfgs(X, y_idx: np.ndarray, n_classes: int, *, C: float = 1.0, sample_weight=None,
                       device: str = "cpu", max_iter: int = 1000, tol: float = 1e-4):
    """Return ``(coef, intercept, n_iter)`` as numpy arrays in sklearn's layout ((1, D) for two classes, else (K, D)).

    ``X`` (numpy or a tensor) should already be standardised; float32 throughout, full batch on ``device``.
    """
    import torch

    dev = torch.device(device)
    Xt = _as_device_tensor(X, dev)
    yt = torch.as_tensor(np.asarray(y_idx, dtype=np.int64)).to(dev)
    n, d = Xt.shape
    sw = torch.ones(n, device=dev) if sample_weight is None else torch.as_tensor(
        np.asarray(sample_weight, dtype=np.float32)).to(dev)
    sw_sum = float(sw.sum())
    binary = n_classes == 2
    k = 1 if binary else n_classes
    W = torch.zeros(d, k, device=dev, requires_grad=True)
    b = torch.zeros(k, device=dev, requires_grad=True)
    l2 = 1.0 / (float(C) * sw_sum)
    yb = yt.to(torch.float32)

    def objective():
        z = torch.addmm(b, Xt, W)
        if binary:
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z[:, 0], yb, reduction="none")
        else:
            loss = torch.nn.functional.cross_entropy(z, yt, reduction="none")
        return (loss * sw).sum() / sw_sum + 0.5 * l2 * (W * W).sum()

    # tolerance_grad mirrors sklearn's tol on the (identically scaled) gradient; history 20 as scipy's default is 10
    # but a longer memory pays off on ill-conditioned CNN features at nearly no cost.
    opt = torch.optim.LBFGS([W, b], lr=1.0, max_iter=max_iter, max_eval=int(max_iter * 1.25), tolerance_grad=tol,
                            tolerance_change=1e-10, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad(set_to_none=False)
        loss = objective()
        loss.backward()
        return loss

    opt.step(closure)
    n_iter = int(opt.state[opt._params[0]].get("n_iter", 0))
    if n_iter >= max_iter:
        log.warning("torch logistic head stopped after %d L-BFGS iterations without meeting tol=%g", n_iter, tol)
    coef = W.detach().T.contiguous().cpu().numpy().astype(np.float64)
    intercept = b.detach().cpu().numpy().astype(np.float64)
    return coef, intercept, n_iter


class StandardisedLinear:
    """Scores of a linear model fitted on standardised features (``mean_``, ``scale_``, ``coef_``, ``intercept_``),
    as sklearn's linear classifiers give them: one column for two classes, argmax or sign for the label."""

    def decision_function(self, X):
        Xs = (np.asarray(X, dtype=np.float64) - self.mean_) / self.scale_
        z = Xs @ self.coef_.T + self.intercept_
        return z[:, 0] if z.shape[1] == 1 else z

    def predict(self, X):
        z = self.decision_function(X)
        idx = (z > 0).astype(int) if z.ndim == 1 else z.argmax(axis=1)
        return self.classes_[idx]


class TorchLogisticRegression(StandardisedLinear, ClassifierMixin, BaseEstimator):
    """Standardise + multinomial logistic regression on ``device``, as one sklearn-compatible estimator.

    Standardising on the device too keeps the large-set path free of CPU passes over the data (the copy to the
    device is the only one). :meth:`to_sklearn_pipeline` returns the equivalent fitted
    ``Pipeline(StandardScaler, LogisticRegression)`` that the head file stores.
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
        from sklearn.utils.class_weight import compute_sample_weight

        y = np.asarray(y)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError("need at least two classes")
        sw = compute_sample_weight(self.class_weight, y) if self.class_weight is not None else None
        with torch.no_grad():
            Xt = _as_device_tensor(X, torch.device(self.device))
            Xs, mean, var, scale = standardize(Xt, self.with_std)
            del Xt
        self.mean_ = mean.cpu().numpy()
        self.var_ = var.cpu().numpy()
        self.scale_ = scale.cpu().numpy()
        self.coef_, self.intercept_, n_iter = fit_logistic_lbfgs(
            Xs, y_idx, len(self.classes_), C=self.C, sample_weight=sw, device=self.device,
            max_iter=self.max_iter, tol=self.tol)
        del Xs
        self.n_iter_ = np.asarray([n_iter], dtype=np.int32)
        self.n_features_in_ = int(X.shape[1])
        self.n_samples_seen_ = int(X.shape[0])
        return self

    def to_sklearn_pipeline(self):
        """The fitted ``Pipeline(StandardScaler, LogisticRegression)`` with the same numbers (CPU-only, no torch)."""
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import Pipeline

        lr = LogisticRegression(C=float(self.C), class_weight=self.class_weight, max_iter=self.max_iter, tol=self.tol)
        lr.classes_ = np.asarray(self.classes_)
        lr.coef_ = np.asarray(self.coef_, dtype=np.float64)
        lr.intercept_ = np.asarray(self.intercept_, dtype=np.float64)
        lr.n_features_in_ = self.n_features_in_
        lr.n_iter_ = np.asarray(self.n_iter_, dtype=np.int32)
        return Pipeline([("scale", fitted_scaler(self)), ("clf", lr)])


def fitted_scaler(est):
    """A fitted StandardScaler holding ``est.mean_/var_/scale_`` (what the torch estimators standardised with)."""
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler()
    scaler.mean_ = np.asarray(est.mean_, dtype=np.float64)
    scaler.var_ = np.asarray(est.var_, dtype=np.float64)
    scaler.scale_ = np.asarray(est.scale_, dtype=np.float64)
    scaler.n_samples_seen_ = np.int64(est.n_samples_seen_)
    scaler.n_features_in_ = est.n_features_in_
    return scaler
