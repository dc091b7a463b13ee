"""Few images per class: does standardising features (StandardScaler first) hurt? Side by side with centred-only
and L2-normalised features, on a store's own train/val split (why featx.heads.fit has FEW_ROWS).

    python benchmarks/bench_fewshot_scaling.py FEATURES.npz [--shots 1 2 5 10 20 all] [--draws 10]
    python benchmarks/bench_fewshot_scaling.py --digits        # scikit-learn's digits (raw 8x8 pixels), 1,200 / 597

For each k, `--draws` seeded draws of k training images per class (featx compare --shots draws the same way: from
the training split only); every model is scored on all validation rows; prints mean ± std per model and k.
Measured on the lite0 features of hymenoptera in BENCHMARKS.md ("Compare --shots").
"""
from __future__ import annotations

import argparse
import warnings

import numpy as np


def models() -> dict:
    from sklearn.linear_model import LogisticRegression, RidgeClassifier
    from sklearn.neighbors import NearestCentroid
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler

    return {
        "standardised + ridge alpha=1 (featx linear default)": lambda: make_pipeline(StandardScaler(),
                                                                                     RidgeClassifier(alpha=1.0)),
        "standardised + logistic C=1 (featx logistic default)": lambda: make_pipeline(
            StandardScaler(), LogisticRegression(C=1.0, max_iter=2000)),
        "centred + logistic C=1 (featx below 30 per class)": lambda: make_pipeline(
            StandardScaler(with_std=False), LogisticRegression(C=1.0, max_iter=3000)),
        "L2-normalised + logistic C=1": lambda: make_pipeline(Normalizer(), LogisticRegression(C=1.0, max_iter=2000)),
        "L2-normalised + nearest centroid": lambda: make_pipeline(Normalizer(), NearestCentroid()),
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("features", nargs="?", help="a featx store with train/val splits")
    ap.add_argument("--digits", action="store_true", help="scikit-learn's digits instead: seeded 1,200 train / 597 val")
    ap.add_argument("--shots", nargs="+", default=["1", "2", "5", "10", "20", "all"])
    ap.add_argument("--draws", type=int, default=10)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    from featx.features.store import load_features

    if args.digits:
        from sklearn.datasets import load_digits

        X, y = load_digits(return_X_y=True)
        perm = np.random.default_rng(0).permutation(len(y))
        train, val = perm[:1200], perm[1200:]
    elif args.features:
        fs = load_features(args.features)
        train, val = np.flatnonzero(fs.splits == "train"), np.flatnonzero(fs.splits == "val")
        X, y = fs.features, fs.labels
    else:
        ap.error("give FEATURES.npz or --digits")
    classes = sorted(set(y[train].tolist()))
    print("| model | " + " | ".join(f"k={k}" for k in args.shots) + " |")
    print("|---" * (len(args.shots) + 1) + "|")
    for name, make in models().items():
        cells = []
        for k in args.shots:
            accs = []
            for d in range(1 if k == "all" else args.draws):
                rng = np.random.default_rng(d)
                sub = train if k == "all" else np.concatenate(
                    [rng.permutation(train[y[train] == c])[:int(k)] for c in classes])
                accs.append(float((make().fit(X[sub], y[sub]).predict(X[val]) == y[val]).mean()))
            cells.append(f"{np.mean(accs):.3f}" + (f" ± {np.std(accs):.3f}" if len(accs) > 1 else ""))
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
