"""The head kinds: which scikit-learn Pipeline each name builds, its tuned parameter and the default search grid."""
from __future__ import annotations

import difflib
from dataclasses import dataclass

from ..errors import UsageError

HEADS = ("logistic", "svm", "svm-rbf", "linear", "knn")


@dataclass(frozen=True)
class HeadSpec:
    """What a head kind tunes and how its grid may be widened."""

    kind: str
    param: str  # the estimator parameter the CV searches ("C", "alpha" or "n_neighbors")
    grid: tuple  # default grid, ascending
    log_scale: bool  # widen by a factor of 10 (C, alpha) or step through integers (k)
    stronger: str  # "low" or "high": which end regularises more; ties in CV go that way (simpler model wins)
    default: float  # value used when CV is switched off (cv < 2) and nothing is fixed
    score_kind: str  # "probability" (predict_proba) or "decision" (decision_function)
    description: str


SPECS = {
    # Standardised CNN features with ~1000 dims: C around 0.01-1 usually wins; widening covers the rest.
    "logistic": HeadSpec("logistic", "C", (0.001, 0.01, 0.1, 1.0, 10.0), True, "low", 1.0, "probability",
                         "multinomial logistic regression (probabilities)"),
    # Hinge-type losses on ~1000 standardised dims separate the data at small C; larger C mostly costs time.
    "svm": HeadSpec("svm", "C", (0.0001, 0.001, 0.01, 0.1, 1.0), True, "low", 0.01, "decision",
                    "linear SVM, one-vs-rest (decision scores)"),
    "svm-rbf": HeadSpec("svm-rbf", "C", (0.1, 1.0, 10.0, 100.0), True, "low", 1.0, "decision",
                        "RBF-kernel SVM, gamma='scale' (decision scores; slow beyond ~20k samples)"),
    # Ridge's alpha is an inverse C (alpha = 1 / (2 C)); bigger alpha = stronger regularisation.
    "linear": HeadSpec("linear", "alpha", (0.1, 1.0, 10.0, 100.0, 1000.0), True, "high", 1.0, "decision",
                       "ridge classifier (least squares on +-1 targets; decision scores)"),
    # Odd k avoids ties between two classes; bigger k = smoother boundary.
    "knn": HeadSpec("knn", "n_neighbors", (1, 3, 5, 9, 15, 25), False, "high", 5, "probability",
                    "k-nearest neighbours on L2-normalised features (cosine; vote fractions)"),
}


def check_head_name(name: str, allow_all: bool = True) -> str:
    """Return ``name`` if it is a head kind (or "all"), else raise UsageError with close matches."""
    valid = HEADS + (("all",) if allow_all else ())
    if name in valid:
        return name
    close = difflib.get_close_matches(str(name), valid, n=2, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise UsageError(f"unknown head {name!r}{hint} (choose from {', '.join(valid)})")


def make_estimator(kind: str, value, *, class_weight=None, seed: int = 0):
    """An unfitted Pipeline (scaling step + classifier) for ``kind`` with its tuned parameter set to ``value``."""
    from sklearn.linear_model import LogisticRegression, RidgeClassifier
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler
    from sklearn.svm import SVC, LinearSVC

    if kind == "logistic":
        # lbfgs + softmax loss = multinomial; 1000 iterations because 100 rarely converges on CNN features.
        clf = LogisticRegression(C=float(value), class_weight=class_weight, max_iter=1000, tol=1e-4)
    elif kind == "svm":
        clf = LinearSVC(C=float(value), class_weight=class_weight, dual="auto", max_iter=5000, random_state=seed)
    elif kind == "svm-rbf":
        clf = SVC(C=float(value), kernel="rbf", gamma="scale", class_weight=class_weight, random_state=seed)
    elif kind == "linear":
        clf = RidgeClassifier(alpha=float(value), class_weight=class_weight)
    elif kind == "knn":
        # brute force: exact, and keeps tree objects (extra types) out of the head file.
        clf = KNeighborsClassifier(n_neighbors=int(value), algorithm="brute", metric="euclidean")
        return Pipeline([("normalize", Normalizer(norm="l2")), ("clf", clf)])
    else:
        check_head_name(kind, allow_all=False)
        raise AssertionError(kind)  # pragma: no cover
    return Pipeline([("scale", StandardScaler()), ("clf", clf)])


def c_to_param(kind: str, C: float) -> float:
    """Translate a user's ``--C`` into the head's own parameter (ridge's alpha = 1 / (2 C))."""
    return 1.0 / (2.0 * float(C)) if kind == "linear" else float(C)
