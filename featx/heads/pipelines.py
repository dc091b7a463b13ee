"""The head kinds: which estimator each name builds, what its CV search tunes and the default grid."""
from __future__ import annotations

import difflib
from dataclasses import dataclass

from ..errors import UsageError

HEADS = ("logistic", "svm", "svm-rbf", "linear", "knn", "mlp")


@dataclass(frozen=True)
class HeadSpec:
    """What a head kind tunes and how its grid may be widened."""

    kind: str
    param: str  # the tuned parameter as users see it ("C", "alpha", "n_neighbors", "hidden/dropout/weight_decay")
    grid: tuple  # default grid, in order of strength: scalars ascending; mlp: configurations, most regularised first
    log_scale: bool  # widen by a factor of 10 (C, alpha) or step through integers (k)
    stronger: str  # "low" or "high": which end regularises more; ties in CV go that way (simpler model wins)
    default: object  # value used when CV is switched off (cv < 2) and nothing is fixed
    score_kind: str  # "probability" (predict_proba) or "decision" (decision_function)
    description: str
    widen: bool = True  # False: the grid is a fixed list of configurations (mlp)


# The mlp's configurations (hidden width, dropout, AdamW weight decay), from most to least regularised, so a tie in CV
# goes to the smaller net. Three, not a 2x2x2 factorial, and no width above 128: each configuration costs five CPU fits
# of ~1-2 s on 4,000 x 1,280 features, a 256-wide net costs twice that per epoch without scoring higher on either set
# measured (ants/bees, the seeded mixture: BENCHMARKS.md, heads), and the 64-wide net won the search on both.
MLP_GRID = ((64, 0.5, 1e-1), (128, 0.5, 1e-2), (128, 0.25, 1e-3))

SPECS = {
    # Standardised CNN features with ~1000 dims: C around 0.01-1 usually wins; widening covers the rest.
    "logistic": HeadSpec("logistic", "C", (0.001, 0.01, 0.1, 1.0, 10.0), True, "low", 1.0, "probability",
                         "multinomial logistic regression (probabilities)"),
    # Hinge-type losses on ~1000 standardised dims separate the data at small C; C >= 0.1 scored 5-9 points worse
    # on 5-class lite0 features (issue 15) and costs the most to fit, so it is reached only by widening.
    "svm": HeadSpec("svm", "C", (0.0001, 0.001, 0.01), True, "low", 0.01, "decision",
                    "linear SVM, one-vs-rest squared hinge (decision scores)"),
    # gamma="scale" on standardised features: C = 0.1 leaves every row a support vector and scored 0.35-0.76 where
    # C >= 1 scored 0.80-0.93 (ants/bees and the seeded mixture); it is still reached by widening when C = 1 wins.
    "svm-rbf": HeadSpec("svm-rbf", "C", (1.0, 10.0, 100.0), True, "low", 1.0, "decision",
                        "RBF-kernel SVM, gamma='scale' (decision scores; slow beyond ~20k samples)"),
    # Ridge's alpha is an inverse C (alpha = 1 / (2 C)); bigger alpha = stronger regularisation.
    "linear": HeadSpec("linear", "alpha", (0.1, 1.0, 10.0, 100.0, 1000.0), True, "high", 1.0, "decision",
                       "ridge classifier (least squares on +-1 targets; decision scores)"),
    # Odd k avoids ties between two classes; bigger k = smoother boundary.
    "knn": HeadSpec("knn", "n_neighbors", (1, 3, 5, 9, 15, 25), False, "high", 5, "probability",
                    "k-nearest neighbours on L2-normalised features (cosine; vote fractions)"),
    "mlp": HeadSpec("mlp", "hidden/dropout/weight_decay", MLP_GRID, False, "low", MLP_GRID[1], "probability",
                    "one-hidden-layer net (ReLU, dropout, AdamW, early stopping; probabilities)", widen=False),
}


def check_head_name(name: str, allow_all: bool = True) -> str:
    """The head kind ``name`` means (case and surrounding blanks ignored), else UsageError with close matches."""
    valid = HEADS + (("all",) if allow_all else ())
    canon = str(name).strip().lower()
    if canon in valid:
        return canon
    close = difflib.get_close_matches(canon, valid, n=2, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise UsageError(f"unknown head {name!r}{hint} (choose from {', '.join(valid)})")


def estimator_params(kind: str, value) -> dict:
    """The estimator's own parameter names for one grid value (mlp: a (hidden, dropout, weight_decay) triple)."""
    if kind == "mlp":
        hidden, dropout, weight_decay = value
        return {"hidden": int(hidden), "dropout": float(dropout), "weight_decay": float(weight_decay)}
    spec = SPECS[kind]
    return {spec.param: int(value) if kind == "knn" else float(value)}


def value_label(kind: str, value):
    """How a grid value is shown and stored in reports: the number itself, or "256/0.5/0.01" for an mlp config."""
    if kind == "mlp":
        return "/".join(f"{v:g}" for v in value)
    return int(value) if kind == "knn" else float(value)


def make_estimator(kind: str, value, *, class_weight=None, seed: int = 0, device: str = "cpu",
                   backend: str = "sklearn", with_std: bool = True):
    """An unfitted estimator for ``kind`` with its tuned parameter set to ``value``.

    ``backend="torch"`` (logistic, svm; mlp always) gives a torch estimator that standardises on ``device`` itself,
    ``backend="precomputed"`` (svm-rbf) libsvm on a precomputed kernel; both turn into the equivalent fitted sklearn
    Pipeline (``to_sklearn_pipeline``). Otherwise a Pipeline(scaling step, classifier).
    ``with_std=False``: features are centred, not divided by a per-feature standard deviation (featx.heads.fit
    chooses it when a class has few training rows: see FEW_ROWS there).
    """
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler

    params = estimator_params(kind, value)
    if kind == "mlp" or (backend == "torch" and kind in ("logistic", "svm")):
        return _torch_estimator(kind, params, class_weight=class_weight, seed=seed, device=device, with_std=with_std)
    if kind == "svm-rbf" and backend == "precomputed":
        from .kernel_svm import PrecomputedRBFSVC

        return PrecomputedRBFSVC(class_weight=class_weight, seed=seed, with_std=with_std, **params)
    if kind == "knn":
        from sklearn.neighbors import KNeighborsClassifier

        # brute force: exact, and keeps tree objects (extra types) out of the head file.
        clf = KNeighborsClassifier(algorithm="brute", metric="euclidean", **params)
        return Pipeline([("normalize", Normalizer(norm="l2")), ("clf", clf)])
    return Pipeline([("scale", StandardScaler(with_std=with_std)),
                     ("clf", _sklearn_classifier(kind, params, class_weight, seed))])


def _sklearn_classifier(kind: str, params: dict, class_weight, seed: int):
    from sklearn.linear_model import LogisticRegression, RidgeClassifier
    from sklearn.svm import SVC, LinearSVC

    if kind == "logistic":
        # lbfgs + softmax loss = multinomial; 1000 iterations because 100 rarely converges on CNN features.
        return LogisticRegression(class_weight=class_weight, max_iter=1000, tol=1e-4, **params)
    if kind == "svm":
        return LinearSVC(class_weight=class_weight, dual="auto", max_iter=5000, random_state=seed, **params)
    if kind == "svm-rbf":
        return SVC(kernel="rbf", gamma="scale", class_weight=class_weight, random_state=seed, **params)
    if kind == "linear":
        return RidgeClassifier(class_weight=class_weight, **params)
    check_head_name(kind, allow_all=False)
    raise AssertionError(kind)  # pragma: no cover


def _torch_estimator(kind: str, params: dict, *, class_weight, seed: int, device: str, with_std: bool = True):
    if kind == "logistic":
        from .torch_logistic import TorchLogisticRegression

        return TorchLogisticRegression(class_weight=class_weight, device=device, with_std=with_std, **params)
    if kind == "svm":
        from .torch_svm import TorchLinearSVC

        return TorchLinearSVC(class_weight=class_weight, device=device, with_std=with_std, **params)
    from .mlp import TorchMLPClassifier

    return TorchMLPClassifier(class_weight=class_weight, seed=seed, device=device, with_std=with_std, **params)


def c_to_param(kind: str, C: float) -> float:
    """Translate a user's ``--C`` into the head's own parameter (ridge's alpha = 1 / (2 C))."""
    return 1.0 / (2.0 * float(C)) if kind == "linear" else float(C)
