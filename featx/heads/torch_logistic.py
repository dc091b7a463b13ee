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


def fit_logistic_lbfgs(X: np.ndarray, y_idx: np.ndarray, n_classes: int, *, C: float = 1.0, sample_weight=None,
                       device: str = "cpu", max_iter: int = 1000, tol: float = 1e-4):
    """Return ``(coef, intercept, n_iter)`` as numpy arrays in sklearn's layout ((1, D) for two classes, else (K, D)).

    ``X`` should already be standardised (the pipeline's scaler does it); float32 throughout, full batch.
    """
    import torch

    dev = torch.device(device)
    Xt = torch.as_tensor(np.ascontiguousarray(X, dtype=np.float32), device=dev)
    yt = torch.as_tensor(np.asarray(y_idx, dtype=np.int64), device=dev)
    n, d = Xt.shape
    sw = torch.ones(n, device=dev) if sample_weight is None else torch.as_tensor(
        np.asarray(sample_weight, dtype=np.float32), device=dev)
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


class TorchLogisticRegression(ClassifierMixin, BaseEstimator):
    """sklearn-compatible estimator (usable in CV and Pipelines) backed by :func:`fit_logistic_lbfgs`."""

    def __init__(self, C: float = 1.0, class_weight=None, device: str = "cpu", max_iter: int = 1000, tol: float = 1e-4):
        self.C = C
        self.class_weight = class_weight
        self.device = device
        self.max_iter = max_iter
        self.tol = tol

    def fit(self, X, y):
        from sklearn.utils.class_weight import compute_sample_weight

        y = np.asarray(y)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError("need at least two classes")
        sw = compute_sample_weight(self.class_weight, y) if self.class_weight is not None else None
        self.coef_, self.intercept_, n_iter = fit_logistic_lbfgs(
            X, y_idx, len(self.classes_), C=self.C, sample_weight=sw, device=self.device,
            max_iter=self.max_iter, tol=self.tol)
        self.n_iter_ = np.asarray([n_iter], dtype=np.int32)
        self.n_features_in_ = int(np.asarray(X).shape[1])
        return self

    def decision_function(self, X):
        z = np.asarray(X, dtype=np.float64) @ self.coef_.T + self.intercept_
        return z[:, 0] if z.shape[1] == 1 else z

    def predict(self, X):
        z = self.decision_function(X)
        idx = (z > 0).astype(int) if z.ndim == 1 else z.argmax(axis=1)
        return self.classes_[idx]

    def to_sklearn(self):
        """A fitted ``sklearn.linear_model.LogisticRegression`` with the same coefficients (CPU-only, no torch)."""
        from sklearn.linear_model import LogisticRegression

        lr = LogisticRegression(C=float(self.C), class_weight=self.class_weight, max_iter=self.max_iter, tol=self.tol)
        lr.classes_ = np.asarray(self.classes_)
        lr.coef_ = np.asarray(self.coef_, dtype=np.float64)
        lr.intercept_ = np.asarray(self.intercept_, dtype=np.float64)
        lr.n_features_in_ = self.n_features_in_
        lr.n_iter_ = np.asarray(self.n_iter_, dtype=np.int32)
        return lr


def to_sklearn_pipeline(pipeline):
    """Swap a fitted TorchLogisticRegression step for its sklearn twin (the scaler is kept as is)."""
    from sklearn.pipeline import Pipeline

    steps = [(name, est.to_sklearn() if isinstance(est, TorchLogisticRegression) else est)
             for name, est in pipeline.steps]
    return Pipeline(steps)
