"""The mlp head: one hidden layer on standardised features, trained in torch, stored as sklearn's MLPClassifier.

Training: inputs standardised; ``Linear(D, H) -> ReLU -> Dropout(p) -> Linear(H, K)``; cross-entropy (class-weighted
with ``class_weight="balanced"``); AdamW with decoupled ``weight_decay``; mini-batches; early stopping on a stratified
``inner_val`` share of the rows it is given (the weights of the epoch with the lowest inner loss are kept). Seeded: the
same rows, seed and thread count give identical weights on the CPU. Runs on CUDA when ``device`` says so.

Saved form: the head file holds ``Pipeline([("scale", StandardScaler), ("clf", MLPClassifier)])``, scikit-learn's own
types holding plain arrays, so it loads through the same trusted-type check as every head and predicts without torch.
An exporter (ONNX) folds it from these attributes, nothing else:

- ``scale.mean_`` (D,), ``scale.scale_`` (D,): ``x_std = (x - mean_) / scale_``
- ``clf.coefs_[0]`` (D, H), ``clf.intercepts_[0]`` (H,): ``h = relu(x_std @ coefs_[0] + intercepts_[0])``
  (``clf.activation == "relu"``; dropout is the identity at inference and is not stored)
- ``clf.coefs_[1]`` (H, K'), ``clf.intercepts_[1]`` (K',): ``z = h @ coefs_[1] + intercepts_[1]``
- ``clf.out_activation_``: ``"softmax"`` over K' = K classes, or ``"logistic"`` with K' = 1 for two classes
  (``p(classes_[1]) = sigmoid(z)``; the two-class net is trained with two softmax outputs and stored as their
  difference, which gives identical probabilities)
- ``clf.classes_``: class names in column order.

A calibrated head (``fit --calibrate``) gives ``softmax(log(p + 1e-12) / T)``, T = ``meta["calibration"]["temperature"]``:
for the mlp that is ``softmax(z / T)`` up to the 1e-12 floor (featx/heads/calibration.py).
"""
from __future__ import annotations

import copy
import logging

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin

log = logging.getLogger(__name__)


class TorchMLPClassifier(ClassifierMixin, BaseEstimator):
    """One-hidden-layer classifier trained in torch; :meth:`to_sklearn_pipeline` gives the stored form."""

    # lr 2e-3, batches of 256, patience 5 (of at most 200 epochs), measured on lite0 ants/bees and the seeded
    # mixture (benchmarks/bench_heads.py): 3e-3 stopped sooner but lost up to 3 points on the mixture, 1e-3 took
    # twice the epochs for the same accuracy, batches of 128 cost time for nothing.
    def __init__(self, hidden: int = 128, dropout: float = 0.5, weight_decay: float = 1e-2, lr: float = 2e-3,
                 batch_size: int = 256, max_epochs: int = 200, patience: int = 5, min_delta: float = 0.01,
                 inner_val: float = 0.1, class_weight=None, seed: int = 0, device: str = "cpu",
                 with_std: bool = True):
        self.with_std = with_std
        self.hidden = hidden
        self.dropout = dropout
        self.weight_decay = weight_decay
        self.lr = lr
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.min_delta = min_delta  # an epoch "improves" when the inner loss drops by this fraction (or 1e-4)
        self.inner_val = inner_val
        self.class_weight = class_weight
        self.seed = seed
        self.device = device

    def fit(self, X, y):
        import torch
        from sklearn.preprocessing import StandardScaler

        y = np.asarray(y)
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError("need at least two classes")
        X = np.asarray(X)
        scaler = StandardScaler(with_std=self.with_std).fit(X)
        dev = torch.device(self.device)
        Xt = torch.as_tensor(scaler.transform(X).astype(np.float32)).to(dev)
        yt = torch.as_tensor(y_idx.astype(np.int64)).to(dev)
        fit_rows, stop_rows = self._inner_split(y_idx)
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            torch.manual_seed(int(self.seed))  # initial weights and dropout masks
            net, self.n_iter_, self.best_inner_loss_ = self._train(Xt, yt, fit_rows, stop_rows, dev)
        self.scaler_ = scaler
        self.coefs_ = [net[0].weight.detach().cpu().numpy().T.astype(np.float64),
                       net[3].weight.detach().cpu().numpy().T.astype(np.float64)]
        self.intercepts_ = [net[0].bias.detach().cpu().numpy().astype(np.float64),
                            net[3].bias.detach().cpu().numpy().astype(np.float64)]
        self.n_features_in_ = int(X.shape[1])
        return self

    def _inner_split(self, y_idx: np.ndarray):
        """Rows to train on and rows that decide when to stop (stratified, seeded); no stop rows for tiny sets."""
        from sklearn.model_selection import train_test_split

        n = len(y_idx)
        rows = np.arange(n)
        n_stop = int(round(n * self.inner_val))
        counts = np.bincount(y_idx)
        if n_stop < len(counts) or counts.min() < 2:
            return rows, None  # too few rows to hold any out: a fixed number of epochs instead
        fit_rows, stop_rows = train_test_split(rows, test_size=n_stop, stratify=y_idx, random_state=int(self.seed))
        return np.sort(fit_rows), np.sort(stop_rows)

    def _class_weights(self, y_idx, dev):
        import torch
        from sklearn.utils.class_weight import compute_class_weight

        if self.class_weight is None:
            return None
        w = compute_class_weight(self.class_weight, classes=np.arange(len(self.classes_)), y=y_idx)
        return torch.as_tensor(w, dtype=torch.float32, device=dev)

    def _train(self, Xt, yt, fit_rows, stop_rows, dev):
        """The training loop; returns (net with the best epoch's weights, epochs run, best inner loss)."""
        import torch
        from torch import nn

        nn_f = torch.nn.functional
        k = len(self.classes_)
        net = nn.Sequential(nn.Linear(Xt.shape[1], int(self.hidden)), nn.ReLU(), nn.Dropout(float(self.dropout)),
                            nn.Linear(int(self.hidden), k)).to(dev)
        opt = torch.optim.AdamW(net.parameters(), lr=float(self.lr), weight_decay=float(self.weight_decay))
        weight = self._class_weights(yt.cpu().numpy(), dev)
        gen = torch.Generator().manual_seed(int(self.seed))  # batch order, on the CPU so it is the same everywhere
        train_idx = torch.as_tensor(fit_rows)
        stop_idx = None if stop_rows is None else torch.as_tensor(stop_rows).to(dev)
        epochs = int(self.max_epochs) if stop_rows is not None else min(int(self.max_epochs), 30)
        best, best_state, since, epoch = float("inf"), None, 0, 0
        for epoch in range(1, epochs + 1):
            net.train()
            order = train_idx[torch.randperm(len(train_idx), generator=gen)].to(dev)
            for start in range(0, len(order), int(self.batch_size)):
                batch = order[start:start + int(self.batch_size)]
                loss = nn_f.cross_entropy(net(Xt[batch]), yt[batch], weight=weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if stop_idx is None:
                continue
            net.eval()
            with torch.no_grad():
                inner = float(nn_f.cross_entropy(net(Xt[stop_idx]), yt[stop_idx], weight=weight))
            if best == float("inf") or inner < best - max(1e-4, self.min_delta * best):
                best, best_state, since = inner, copy.deepcopy(net.state_dict()), 0
            else:
                since += 1
                if since >= int(self.patience):
                    break
        if best_state is not None:
            net.load_state_dict(best_state)
        net.eval()
        return net, epoch, best

    def _logits(self, X) -> np.ndarray:
        Xs = self.scaler_.transform(np.asarray(X, dtype=np.float64))
        h = np.maximum(Xs @ self.coefs_[0] + self.intercepts_[0], 0.0)
        return h @ self.coefs_[1] + self.intercepts_[1]

    def predict_proba(self, X) -> np.ndarray:
        from scipy.special import softmax

        return softmax(self._logits(X), axis=1)

    def predict(self, X):
        return self.classes_[self._logits(X).argmax(axis=1)]

    def to_sklearn_pipeline(self):
        """The fitted ``Pipeline(StandardScaler, MLPClassifier)`` described in the module docstring."""
        from sklearn.neural_network import MLPClassifier
        from sklearn.pipeline import Pipeline
        from sklearn.preprocessing import LabelBinarizer

        W2, b2 = self.coefs_[1], self.intercepts_[1]
        binary = len(self.classes_) == 2
        if binary:  # softmax over (z0, z1) == sigmoid(z1 - z0): MLPClassifier's two-class layout
            W2, b2 = (W2[:, 1] - W2[:, 0])[:, None], np.asarray([b2[1] - b2[0]])
        clf = MLPClassifier(hidden_layer_sizes=(int(self.hidden),), activation="relu", random_state=int(self.seed))
        clf.coefs_ = [np.asarray(self.coefs_[0]), np.asarray(W2)]
        clf.intercepts_ = [np.asarray(self.intercepts_[0]), np.asarray(b2)]
        clf.n_layers_ = 3
        clf.n_outputs_ = 1 if binary else len(self.classes_)
        clf.out_activation_ = "logistic" if binary else "softmax"
        clf.classes_ = np.asarray(self.classes_)
        clf._label_binarizer = LabelBinarizer().fit(self.classes_)  # what MLPClassifier.predict maps outputs through
        clf.n_features_in_ = self.n_features_in_
        clf.n_iter_ = int(self.n_iter_)
        return Pipeline([("scale", self.scaler_), ("clf", clf)])
