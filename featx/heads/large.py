"""Linear heads on feature stores too large to hold in memory: the store is read chunk by chunk, never whole.

Why and how (``featx fit`` on 1,000,000 x 1,280 rows, issue 26): scikit-learn's path holds the features several
times over (its own copies, the standardised float64 matrix, CV folds: 4.7x the features at 100k rows), which at 1M
rows is more than a 24 GB machine. Here:

1. the rows' paths, labels and splits are read (no features) and split by featx.data.split's one rule;
2. one pass over the features fits the ``StandardScaler`` with ``partial_fit`` (scikit-learn's own incremental mean
   and variance, accumulated in float64) and refuses NaN/Inf rows;
3. the objective scikit-learn minimises (logistic: ``LogisticRegression``'s multinomial / binomial loss with its L2
   penalty; svm: ``LinearSVC``'s squared hinge, one-vs-rest) is minimised by scipy's L-BFGS-B, the solver and
   stopping rule ``LogisticRegression(solver="lbfgs")`` uses, with a loss and gradient summed over chunks of
   ``CHUNK_ROWS`` standardised training rows (float32 products in torch, sums in float64; on CUDA when present,
   where the standardised rows stay on the GPU between passes if they fit); linear (``RidgeClassifier``) is solved
   exactly from sums over one pass (its normal equations, d x d);
4. one more pass predicts the validation (and test) rows with the saved pipeline itself.

Memory is one shard's mapped pages plus one chunk, whatever the number of rows; each L-BFGS step is one pass over
the training rows. The head file is the same ``Pipeline(StandardScaler, LogisticRegression | LinearSVC)`` as the
in-memory path's, so ``load_head``, ``predict`` and ``export`` use it unchanged.

There is no cross-validated search here (it would cost folds x grid values x passes over every row): ``--C`` picks the
regularisation (``--cv 0`` uses the default C), and the validation rows score the head. Heads whose fit needs every
row at once are refused above ``STREAM_MIN`` unless a backend is named explicitly (see :func:`refusal`).
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from ..errors import ArtifactError, DataError, UsageError

log = logging.getLogger(__name__)

STREAM_KINDS = ("logistic", "svm", "linear")
# n x d (values in the training store) from which backend "auto" streams: 2^28 values = 1 GiB of float32, e.g.
# 210,000 x 1,280. Below it the in-memory path (4.7-5x the features at 100k rows: at most ~5 GB here) is the one with
# the cross-validated search; above it, its peak grows past what a 24 GB machine shared by a few jobs can give. A fixed
# size rather than the memory free at the moment, so that one command fits the same way on every run; both paths
# minimise the same objective.
STREAM_MIN = 1 << 28
CHUNK_ROWS = 16384  # rows standardised and multiplied at once: 84 MB of float32 at 1,280 features
TRAIN_SAMPLE = 1000  # training rows predicted for the over-fitting diagnostic (as featx.heads.fit._score)

_WHY = {  # heads without a streaming fit: why each needs every row at once, and what to do instead
    "svm-rbf": "its kernel matrix grows with the square of the rows (and libsvm's time faster still)",
    "knn": "the head would store every training row and compare each image with all of them",
    "mlp": "its trainer holds every training row in memory",
    "all": "it includes heads whose fit holds every row (svm-rbf, knn, mlp)",
}


# ------------------------------------------------------------------------------------------------ the switch rule


def store_size(features) -> Optional[tuple]:
    """(rows, dim) of a sharded store (from its manifest) or of a FeatureSet, without reading features; None for a
    single-file store (it is read whole in any case: fit decides after loading it)."""
    from ..features.formats import format_of
    from ..features.store import FeatureSet

    if isinstance(features, FeatureSet):
        return len(features), (features.dim if len(features) else 0)
    if isinstance(features, (str, Path)) and format_of(features) == "sharded":
        from ..features.sharded import read_manifest

        doc = read_manifest(features)
        return int(doc["n"]), int(doc["dim"])
    return None


def chosen(s, size: Optional[tuple]) -> bool:
    """Whether ``fit_head`` takes this module's path: ``backend="stream"``, or ``"auto"`` at STREAM_MIN values or
    more. Raises the refusal of a head that cannot stream at that size (before any heavy work)."""
    if s.backend == "stream":
        return True
    if size is None or s.backend != "auto" or size[0] * size[1] < STREAM_MIN:
        return False
    if s.head not in STREAM_KINDS:
        raise UsageError(refusal(s.head, *size))
    return True


def refusal(head: str, n: int, d: int) -> str:
    """The one-line reason a head is not fitted on ``n`` x ``d`` features by the streaming path, and what to do."""
    return (f"the {head} head is not fitted on {n:,} x {d:,} features ({n * d * 4 / 1e9:.1f} GB of float32) by "
            f"streaming: {_WHY.get(head, 'it has no streaming fit')}. Fit --head logistic, svm or linear (read "
            f"chunk by chunk), or pass --backend {'torch' if head == 'mlp' else 'sklearn'} to load every row anyway")


def _check_settings(s, n: int, d: int) -> None:
    if s.head not in STREAM_KINDS:
        raise UsageError(refusal(s.head, n, d))
    if s.C is None and int(s.cv) >= 2:
        raise UsageError(f"no cross-validated search of C on the streaming path ({n:,} rows: {s.cv} folds x each C "
                         f"would each pass over every row many times); give --C (e.g. --C 1) or --cv 0 for the "
                         f"head's default, and the validation rows score the head")
    if s.calibrate:
        raise UsageError("--calibrate is not available on the streaming path yet; fit without it, or pass "
                         "--backend sklearn to load every row")


# ------------------------------------------------------------------------------------------------ rows and chunks


@dataclass
class _Rows:
    """Paths, labels and splits of some of a store's rows (never its features); ``index``: their store positions."""

    paths: list
    labels: np.ndarray
    splits: Optional[np.ndarray]
    meta: dict
    index: np.ndarray

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, mask_or_index) -> "_Rows":
        idx = np.asarray(mask_or_index)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        return _Rows([self.paths[i] for i in idx], self.labels[idx],
                     None if self.splits is None else self.splits[idx], self.meta, self.index[idx])


class _Source:
    """A feature store read ``CHUNK_ROWS`` at a time: a sharded store's shards memory-mapped one after another (each
    unmapped before the next, so its pages leave this process), or slices of a FeatureSet already in memory."""

    def __init__(self, features, what: str):
        from ..features.formats import format_of
        from ..features.store import FeatureSet, load_features

        self.what = what
        self._store = self._fs = None
        if isinstance(features, FeatureSet):
            self._fs = features
        elif isinstance(features, (str, Path)):
            if format_of(features) == "sharded":
                from ..features.sharded import open_sharded

                self._store = open_sharded(features)
            else:  # a single file is read whole (an .npz member cannot be read in part)
                self._fs = load_features(features)
        else:
            raise UsageError(f"{what} must be a FeatureSet or the path of a features file, got "
                             f"{type(features).__name__}")
        self.shown = str(features) if isinstance(features, (str, Path)) else what
        st, fs = self._store, self._fs
        self.n = st.n if st is not None else len(fs)
        self.dim = st.dim if st is not None else (fs.dim if len(fs) else 0)
        self.meta = dict(st.meta if st is not None else fs.meta)

    def rows(self) -> _Rows:
        """Every row's path, label and split, checked as load_features checks a store."""
        from ..features.store import check_paths

        if self._fs is not None:
            fs = self._fs
            paths, labels, splits = fs.paths, fs.labels, fs.splits
        else:
            paths, labels, splits = [], [], []
            for i in range(len(self._store.shards)):
                r = self._store.rows(i)
                paths.extend(r["paths"].tolist())
                labels.append(r["labels"])
                splits.append(r["splits"])
            labels = None if not labels or any(v is None for v in labels) else np.concatenate(labels).astype(str)
            splits = None if not splits or any(v is None for v in splits) else np.concatenate(splits).astype(str)
            check_paths(paths, self.shown)
        if labels is None:
            raise DataError(f"the {self.what} carry no labels (the images were not in class folders); a head needs "
                            f"labelled features: extract from a folder laid out as ROOT/CLASS/image.jpg")
        if not self.meta.get("backbone"):
            raise ArtifactError(f"the {self.what} record no backbone provenance (meta['backbone']), so a head fitted "
                                f"on them could never be applied to images; re-extract them with `featx extract`")
        said = self.meta.get("feature_dim")
        if isinstance(said, (int, float)) and not isinstance(said, bool) and self.n and int(said) != self.dim:
            raise ArtifactError(f"the {self.what} ({self.shown}) say their backbone gives {int(said)} values per "
                                f"image (meta feature_dim) but hold {self.dim}; re-extract them with `featx extract`")
        return _Rows(list(paths), np.asarray(labels), splits, self.meta, np.arange(len(paths)))

    def chunks(self, size: Optional[int] = None) -> Iterator[tuple]:
        """(first row, rows x dim array) in row order; the array may be a read-only memory map: copy what you keep."""
        size = int(size or CHUNK_ROWS)
        if self._fs is not None:
            for lo in range(0, self.n, size):
                yield lo, self._fs.features[lo:lo + size]
            return
        base = 0
        for i, s in enumerate(self._store.shards):
            mapped = self._store.features(i)
            for lo in range(0, len(mapped), size):
                yield base + lo, mapped[lo:lo + size]
            base += int(s["n"])
            del mapped  # unmapped before the next shard is mapped (the caller holds no slice of it by now)


def _take(chunk, mask: Optional[np.ndarray]) -> np.ndarray:
    """The chunk's rows under ``mask`` (all when None) as a float32 array of this process's own (one copy: fancy
    indexing already copies, and np.array(copy=True) of a memory map's rows costs 6x a plain copy, measured)."""
    x = np.asarray(chunk)
    x = x.copy() if mask is None else x[mask]
    return x if x.dtype == np.float32 else x.astype(np.float32)


# ------------------------------------------------------------------------------------------------ planning


@dataclass
class _StreamPlan:
    """Which store rows train and which score (duck-types featx.heads.fit._Plan for its report and save helpers)."""

    train: _Rows
    evals: dict  # name -> _Rows (labelled), scored from ``sources[name]``
    sources: dict  # name -> _Source the rows of evals[name] index into
    how: str
    excluded: Optional[dict] = None


def _plan(src: _Source, rows: _Rows, val_src: Optional[_Source], s) -> _StreamPlan:
    from ..data.split import plan_split

    unlabeled = rows.labels == ""
    if unlabeled.any():
        log.warning("%d unlabeled rows of the features are left out of fitting and scoring", int(unlabeled.sum()))
        rows = rows.subset(~unlabeled)
    if not len(rows):
        raise DataError("the features are empty")
    excluded = None
    if s.exclude is not None:
        from .exclude import apply_exclusions

        rows, excluded = apply_exclusions(rows, s.exclude)
        if not len(rows):
            raise DataError(f"--exclude {s.exclude} leaves no images to fit on")
    sp = plan_split(rows.paths, rows.labels.tolist(), None if rows.splits is None else rows.splits.tolist(),
                    val_fraction=float(s.val_split), seed=s.seed, has_val=False if val_src is not None else None)
    for w in sp.warnings:
        log.warning("%s", w)
    evals, sources = {}, {}
    if val_src is not None:
        from ..features.store import provenance_key

        if provenance_key(val_src.meta) != provenance_key(src.meta) or val_src.dim != src.dim:
            raise ArtifactError("the --val features come from another backbone/weights/preprocessing (or have "
                                "another number of columns) than the training features; extract both with the "
                                "same backbone")
        val_rows = val_src.rows()
        val_rows = val_rows.subset(val_rows.labels != "")
        evals["val"], sources["val"], how = val_rows, val_src, "the --val features"
    else:
        evals["val"], sources["val"] = rows.subset(sp.val), src
        names = set() if rows.splits is None else set(rows.splits.tolist())
        val_name = next((v for v in ("val", "valid", "validation") if v in names), None)
        how = f"the features' {val_name!r} split" if val_name else sp.how
    if len(sp.test):
        evals["test"], sources["test"] = rows.subset(sp.test), src
    evals = {k: v for k, v in evals.items() if len(v)}
    if not evals:
        raise DataError("no rows are left to validate on; add images or raise --val-split")
    return _StreamPlan(train=rows.subset(sp.train), evals=evals, sources=sources, how=how, excluded=excluded)


# ------------------------------------------------------------------------------------------------ fitting


def _device(s) -> str:
    from .torch_logistic import resolve_device

    return resolve_device(str(s.device or "auto").lower())


def _keep_on_device(device: str, nbytes: int) -> bool:
    """Keep the standardised training rows on a GPU between passes when they take under half its free memory (each
    pass then reads GPU memory instead of the store); on the CPU that would be the copy this path exists to avoid."""
    if not device.startswith("cuda"):
        return False
    import torch

    return nbytes < 0.5 * torch.cuda.mem_get_info(torch.device(device))[0]


class _TrainBatches:
    """The standardised training rows, chunk after chunk, as float32 tensors on the device (with labels, weights)."""

    def __init__(self, src: _Source, is_train: np.ndarray, y_store: np.ndarray, w_class: np.ndarray, scaler,
                 device: str, n_train: int):
        import torch

        self.src, self.is_train, self.y, self.w_class = src, is_train, y_store, w_class
        self.dev = torch.device(device)
        self.mean = torch.as_tensor(scaler.mean_, dtype=torch.float32, device=self.dev)
        self.inv_scale = torch.as_tensor(1.0 / scaler.scale_, dtype=torch.float32, device=self.dev)
        self.cache = [] if _keep_on_device(device, n_train * src.dim * 4) else None
        self.filled = False
        self.passes = 0

    def __iter__(self):
        import torch

        self.passes += 1
        if self.filled:
            yield from self.cache
            return
        for lo, chunk in self.src.chunks():
            hi = lo + len(chunk)
            mask = self.is_train[lo:hi]
            if not mask.any():
                continue
            x = _take(chunk, None if mask.all() else mask)
            del chunk
            xt = torch.from_numpy(x).to(self.dev)
            xt.sub_(self.mean).mul_(self.inv_scale)  # in place: the chunk's one copy is the standardised one
            yi = torch.as_tensor(self.y[lo:hi][mask].astype(np.int64), device=self.dev)
            sw = torch.as_tensor(self.w_class[self.y[lo:hi][mask]], dtype=torch.float32, device=self.dev)
            if self.cache is not None:
                self.cache.append((xt, yi, sw))
            yield xt, yi, sw
        if self.cache is not None:
            self.filled = True


def _logistic_terms(x, yi, sw, W, b, binary: bool):
    """Sum over the chunk of weighted log-losses and its gradient w.r.t. (W, b) (float64 sums of float32 products)."""
    import torch
    import torch.nn.functional as F

    z = torch.addmm(b, x, W)
    if binary:
        yf = yi.to(torch.float32)
        loss = F.binary_cross_entropy_with_logits(z[:, 0], yf, reduction="none")
        g = ((torch.sigmoid(z[:, 0]) - yf) * sw)[:, None]
    else:
        logp = torch.log_softmax(z, dim=1)
        loss = -logp.gather(1, yi[:, None])[:, 0]
        g = logp.exp_()  # softmax - one-hot: the gradient of the log-loss w.r.t. z
        g[torch.arange(len(yi), device=g.device), yi] -= 1.0
        g.mul_(sw[:, None])
    return (loss * sw).sum(dtype=torch.float64), (g.T @ x).T, g.sum(dim=0, dtype=torch.float64)


def _hinge_terms(x, yi, sw, W, b, n_classes: int, C: float, cls_w):
    """Sum over the chunk of LinearSVC's C-weighted squared hinges and its gradient w.r.t. (W, b): class weights
    (``sw`` per row, ``cls_w`` per class) as liblinear applies them (see featx.heads.torch_svm._targets)."""
    import torch

    if n_classes == 2:
        Y = (yi.to(torch.float32) * 2 - 1)[:, None]
        Cw = (C * sw)[:, None]
    else:
        Y = -torch.ones(len(yi), n_classes, device=x.device)
        Y[torch.arange(len(yi), device=x.device), yi] = 1.0
        # with class weights, only the positives of each one-vs-rest problem are reweighted (liblinear)
        Cw = torch.where(Y > 0, C * cls_w[None, :].expand_as(Y), torch.full_like(Y, C))
    margin = torch.clamp(1.0 - Y * torch.addmm(b, x, W), min=0.0)
    g = -2.0 * Cw * Y * margin
    return (Cw * margin * margin).sum(dtype=torch.float64), (g.T @ x).T, g.sum(dim=0, dtype=torch.float64)


def _minimise(kind: str, batches: _TrainBatches, d: int, n_classes: int, *, C: float, sw_sum: float, n_train: int,
              device: str, max_iter: int, tol: float) -> tuple:
    """(coef (K, d), intercept (K,), iterations, converged, solver message) by scipy's L-BFGS-B with sklearn's
    lbfgs options."""
    import torch
    from scipy.optimize import minimize

    k = 1 if n_classes == 2 else n_classes
    dev = torch.device(device)
    cls_w = torch.as_tensor(batches.w_class, dtype=torch.float32, device=dev)

    def value_and_grad(theta):
        W = torch.as_tensor(theta[:d * k].reshape(d, k), dtype=torch.float32, device=dev)
        b = torch.as_tensor(theta[d * k:], dtype=torch.float32, device=dev)
        total = 0.0
        gW = torch.zeros(d, k, dtype=torch.float64, device=dev)
        gb = torch.zeros(k, dtype=torch.float64, device=dev)
        with torch.no_grad():
            for x, yi, sw in batches:
                if kind == "logistic":
                    f, a, c = _logistic_terms(x, yi, sw, W, b, n_classes == 2)
                else:
                    f, a, c = _hinge_terms(x, yi, sw, W, b, n_classes, C, cls_w)
                total += float(f)
                gW += a.double()
                gb += c
        gW, gb = gW.cpu().numpy(), gb.cpu().numpy()
        Wn, bn = theta[:d * k].reshape(d, k), theta[d * k:]
        if kind == "logistic":
            # sklearn's objective divided by C * sum(w): mean weighted loss + ||W||^2 / (2 C sum(w)), b unpenalised
            reg = 1.0 / (C * sw_sum)
            value = total / sw_sum + 0.5 * reg * float((Wn * Wn).sum())
            grad = np.concatenate([(gW / sw_sum + reg * Wn).ravel(), gb / sw_sum])
        else:
            # liblinear's primal divided by C * n: (||W||^2 + b^2) / 2 + the C-weighted squared hinges (b penalised)
            scale = 1.0 / (C * n_train)
            value = (0.5 * float((Wn * Wn).sum() + (bn * bn).sum()) + total) * scale
            grad = np.concatenate([((gW + Wn) * scale).ravel(), (gb + bn) * scale])
        log.debug("pass %d: objective %.8g, |grad|_inf %.3g", batches.passes, value, float(np.abs(grad).max()))
        return value, grad

    # sklearn's LogisticRegression(solver="lbfgs") call: maxls 50, gtol = tol, ftol = 64 eps (sklearn/linear_model/
    # _logistic.py); the same stopping rule for the hinge loss
    res = minimize(value_and_grad, np.zeros(d * k + k), jac=True, method="L-BFGS-B",
                   options={"maxiter": max_iter, "maxls": 50, "gtol": tol, "ftol": 64 * np.finfo(float).eps})
    theta = res.x
    return theta[:d * k].reshape(d, k).T.copy(), theta[d * k:].copy(), int(res.nit), bool(res.success), str(
        res.message)


def _ridge(batches: _TrainBatches, d: int, n_classes: int, *, alpha: float, device: str) -> tuple:
    """(coef (K, d), intercept (K,)) of ``RidgeClassifier(alpha)`` on the standardised rows, exactly, from one pass:
    the weighted sums of x, x x^T, x y^T and y (float64) give the centred normal equations sklearn's cholesky solver
    solves, (Xc^T W Xc + alpha I) coef = Xc^T W Yc with +-1 targets, intercept = ybar - xbar coef."""
    import scipy.linalg
    import torch

    dev = torch.device(device)
    k = 1 if n_classes == 2 else n_classes
    s0 = 0.0
    s1 = torch.zeros(d, dtype=torch.float64, device=dev)
    s2 = torch.zeros(d, d, dtype=torch.float64, device=dev)
    t = torch.zeros(d, k, dtype=torch.float64, device=dev)
    ty = torch.zeros(k, dtype=torch.float64, device=dev)
    with torch.no_grad():
        for x, yi, sw in batches:
            if k == 1:
                Y = (yi.to(torch.float64) * 2 - 1)[:, None]
            else:
                Y = -torch.ones(len(yi), k, dtype=torch.float64, device=dev)
                Y[torch.arange(len(yi), device=dev), yi] = 1.0
            xd, w = x.double(), sw.double()[:, None]
            xw = xd * w
            s0 += float(w.sum())
            s1 += xw.sum(dim=0)
            s2 += xw.T @ xd
            t += xw.T @ Y
            ty += (w * Y).sum(dim=0)
    s1, s2, t, ty = (v.cpu().numpy() for v in (s1, s2, t, ty))
    xbar, ybar = s1 / s0, ty / s0
    gram = s2 - np.outer(s1, xbar)
    gram[np.diag_indices(d)] += alpha
    W = scipy.linalg.solve(gram, t - np.outer(s1, ybar), assume_a="pos")
    return W.T.copy(), ybar - xbar @ W


def _pipeline(kind: str, scaler, classes, coef, intercept, C: float, class_weight, n_iter: int, max_iter: int,
              tol: float, seed: int):
    """The fitted ``Pipeline(StandardScaler, LogisticRegression | LinearSVC)`` the in-memory path would save."""
    from sklearn.pipeline import Pipeline

    from .pipelines import make_estimator

    pipe = make_estimator(kind, C, class_weight=class_weight, seed=seed)
    clf = pipe.named_steps["clf"]
    clf.classes_ = np.asarray(classes)
    if kind == "linear":  # the attributes RidgeClassifier.fit sets: its +-1 label binarizer, its solver
        from sklearn.preprocessing import LabelBinarizer

        clf._label_binarizer = LabelBinarizer(pos_label=1, neg_label=-1).fit(np.asarray(classes))
        clf.solver_, clf.n_iter_ = "cholesky", None
    else:
        clf.set_params(max_iter=max_iter, tol=tol)
        clf.n_iter_ = np.asarray([n_iter], dtype=np.int32) if kind == "logistic" else int(n_iter)
    clf.coef_ = np.asarray(coef, dtype=np.float64)
    clf.intercept_ = np.asarray(intercept, dtype=np.float64)
    clf.n_features_in_ = int(coef.shape[1])
    if kind == "linear" and len(coef) == 1:  # two classes: RidgeClassifier's coef_ is 1-D (intercept_ stays (1,))
        clf.coef_ = clf.coef_[0]
    return Pipeline([("scale", scaler), ("clf", clf)])


def _fit_scaler(src: _Source, is_train: np.ndarray, with_std: bool, paths: list):
    """StandardScaler.partial_fit over the training rows, chunk by chunk (sklearn's incremental float64 mean and
    variance); rows holding NaN/Inf anywhere in the store are refused as featx.features.store.check_finite does."""
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler(with_std=with_std)
    bad, first = 0, []
    for lo, chunk in src.chunks():
        hi = lo + len(chunk)
        x = np.asarray(chunk)
        finite = np.isfinite(x).all(axis=1)
        if not finite.all():
            bad += int((~finite).sum())
            first.extend(paths[lo + int(i)] for i in np.flatnonzero(~finite)[:3 - len(first)])
            continue
        mask = is_train[lo:hi]
        if mask.any():
            scaler.partial_fit(x if mask.all() else x[mask])
        del x, chunk
    if bad:
        raise DataError(f"{bad} of {src.n} rows of the {src.what} hold NaN or Inf values ({', '.join(first)}"
                        f"{', ...' if bad > 3 else ''}); re-extract those images (featx extract ... --overwrite)")
    return scaler


def _predict(pipe, plan: _StreamPlan, sample: np.ndarray, train_src: _Source) -> tuple:
    """({split: predicted labels in row order}, predictions of the ``sample`` store rows): one pass per source."""
    wanted = {name: np.zeros(src.n, dtype=bool) for name, src in plan.sources.items()}
    for name, rows in plan.evals.items():
        wanted[name][rows.index] = True
    in_sample = np.zeros(train_src.n, dtype=bool)
    in_sample[sample] = True
    preds = {name: [] for name in plan.evals}
    sample_preds = []
    for src in {id(s): s for s in (train_src, *plan.sources.values())}.values():
        names = [n for n in plan.evals if plan.sources[n] is src]
        for lo, chunk in src.chunks():
            hi = lo + len(chunk)
            for name in names:
                m = wanted[name][lo:hi]
                if m.any():
                    preds[name].append(pipe.predict(_take(chunk, m)))
            if src is train_src:
                m = in_sample[lo:hi]
                if m.any():
                    sample_preds.append(pipe.predict(_take(chunk, m)))
            del chunk
    join = (lambda parts: np.concatenate(parts) if parts else np.zeros(0, dtype=str))
    return {n: join(p) for n, p in preds.items()}, join(sample_preds)


def fit_streaming(features, s, *, output=None, report_dir=None, val=None):
    """``fit_head`` for the logistic and svm heads reading the store chunk by chunk (see the module docstring).

    ``s`` is fit_head's validated FitSettings. Returns a FitResult whose head is the same kind of sklearn pipeline
    the in-memory path saves; writes the same head file and report.
    """
    from ..report import classification_metrics, summary
    from . import fit as F
    from .pipelines import SPECS, c_to_param
    from .store import Head

    src = _Source(features, "features")
    _check_settings(s, src.n, src.dim)
    kind = s.head
    rows = src.rows()
    val_src = _Source(val, "validation features") if val is not None else None
    plan = _plan(src, rows, val_src, s)
    output = F._resolve_output(output, s.overwrite)
    rdir = Path(report_dir) if report_dir is not None else (output.parent if output is not None else None)
    files = F._output_files(output, rdir, plan, s)
    value = c_to_param(kind, s.C) if s.C is not None else SPECS[kind].default
    if s.C is not None and int(s.cv) >= 2:
        log.info("streaming fit: --C %g is used as given; no %d-fold score of it (each fold would pass over every "
                 "row again): the validation rows score the head", s.C, s.cv)
    device = _device(s)

    with F._claimed(files, output, s.overwrite):
        t0 = time.perf_counter()
        train = plan.train
        classes = np.unique(train.labels)
        y_store = np.full(src.n, -1, dtype=np.int32)
        y_store[train.index] = np.searchsorted(classes, train.labels)
        is_train = np.zeros(src.n, dtype=bool)
        is_train[train.index] = True
        counts = np.bincount(y_store[train.index], minlength=len(classes))
        with_std = bool(counts.min() >= F.FEW_ROWS)
        w_class = (len(train) / (len(classes) * counts) if s.class_weight == "balanced"
                   else np.ones(len(classes))).astype(np.float32)
        log.info("streaming %s fit on %d of %d rows x %d features (%s, chunks of %d rows)", kind, len(train), src.n,
                 src.dim, device, CHUNK_ROWS)
        scaler = _fit_scaler(src, is_train, with_std, rows.paths)
        if not with_std:
            scaler.scale_ = np.ones(src.dim)
        batches = _TrainBatches(src, is_train, y_store, w_class, scaler, device, len(train))
        max_iter = 1000 if kind == "logistic" else 5000  # as the in-memory estimators (featx.heads.pipelines)
        tol = 1e-4
        sw_sum = float((w_class[y_store[train.index]]).sum(dtype=np.float64))
        if kind == "linear":  # exact, one pass: nothing to iterate
            coef, intercept = _ridge(batches, src.dim, len(classes), alpha=float(value), device=device)
            n_iter, ok, message = 0, True, ""
        else:
            coef, intercept, n_iter, ok, message = _minimise(
                kind, batches, src.dim, len(classes), C=float(value), sw_sum=sw_sum, n_train=len(train),
                device=device, max_iter=max_iter, tol=tol)
        if not ok:
            log.warning("%s head: L-BFGS stopped after %d iterations without meeting tol=%g (%s)", kind, n_iter, tol,
                        message)
        if not with_std:
            scaler.scale_ = None
        pipe = _pipeline(kind, scaler, classes, coef, intercept, float(value), s.class_weight, n_iter, max_iter, tol,
                         s.seed)
        fit_seconds = time.perf_counter() - t0
        passes = batches.passes
        del batches

        rng = np.random.default_rng(s.seed)
        sample = np.sort(rng.choice(train.index, size=min(len(train), TRAIN_SAMPLE), replace=False))
        preds, sample_pred = _predict(pipe, plan, sample, src)
        names = [str(c) for c in classes]
        scores = {name: classification_metrics(r.labels, preds[name], names) for name, r in plan.evals.items()}
        train_acc = float(np.mean(sample_pred.astype(str) == rows.labels[sample])) if len(sample) else float("nan")
        training = {"n": int(len(train)), "n_features": int(src.dim), "fit_seconds": round(fit_seconds, 4),
                    "backend": "stream", "device": device, "training_data_accuracy": train_acc,
                    "scaling": ("standardised" if with_std else
                                f"centred (a class has < {F.FEW_ROWS} training rows)"),
                    "passes": int(passes), "iterations": int(n_iter), "chunk_rows": int(CHUNK_ROWS)}
        if plan.excluded:
            training["excluded"] = plan.excluded
        meta = F._head_meta(kind, value, None, scores, training, plan, s, classes=names)
        import torch

        meta["versions"]["torch"] = torch.__version__
        meta["training"]["solver"] = (
            f"normal equations summed over chunks of {CHUNK_ROWS} rows, one pass" if kind == "linear" else
            f"L-BFGS-B (scipy) over chunks of {CHUNK_ROWS} rows, {n_iter} iterations, {passes} passes over the "
            f"training rows")
        res = F.FitResult(head=Head(pipe, meta), scores=scores, cv=None, training=training, validation=plan.how)
        F._record_seen([res], plan, s, selected=False)
        if files:
            F._save(res, output, rdir, every=False)
    log.info("streaming fit: %s", {n: summary(m) for n, m in scores.items()})
    return res


__all__ = ["STREAM_MIN", "STREAM_KINDS", "CHUNK_ROWS", "chosen", "fit_streaming", "refusal", "store_size"]
