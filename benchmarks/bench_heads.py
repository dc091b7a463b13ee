"""Head fitting speed and accuracy: every head with its CV search, this featx next to an older checkout, side by side.

    # the issue-15 set: 4,000 training x 1,280 features, 8 classes, seeded from real lite0 features of hymenoptera
    featx extract /work/shared/data/hymenoptera -o /tmp/heads-hym.npz
    python benchmarks/bench_heads.py --seed-features /tmp/heads-hym.npz --before /tmp/featx-before
    # real features (their own train/val split), e.g. ants/bees
    python benchmarks/bench_heads.py --data /tmp/heads-hym.npz --before /tmp/featx-before
    # calibration: expected calibration error on val before / after temperature scaling (after: cross-fitted too)
    python benchmarks/bench_heads.py --data /tmp/heads-hym.npz --calibrate

(The torch-vs-sklearn logistic comparison on large sets, the GPU figure, is benchmarks/bench_logistic_backends.py.)

``--before DIR`` names a folder holding an older ``featx`` package (e.g. ``git archive 08c0210 featx | tar -x -C DIR``);
each head is then fitted by that code too, in a subprocess, on the same rows. Every fit is ``fit_head(features, head,
cv=5, seed=0)`` (the CLI's defaults: default grids, widening, final refit), timed as wall seconds and CPU seconds of
the process (CPU seconds move less when other jobs share the machine; both are printed). Accuracy is on the
validation rows, which no head trains or searches on.

The seeded mixture (``--seed-features``): the real features are grouped into 8 k-means clusters (the classes);
each synthetic row is its class centroid plus a mix of two real residuals (row minus its cluster centroid) scaled by
2, plus Gaussian noise of 0.3 x each column's spread, clipped at 0 like the ReLU features it copies. That keeps the
real features' scale, sparsity (48% zeros vs 46% real) and within-class correlations, with classes a linear head
separates at ~92%, not 100%.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HEADS = ("logistic", "svm", "svm-rbf", "linear", "knn", "mlp")


def seeded_mixture(seed_features: Path, n_train: int = 4000, n_val: int = 1000, classes: int = 8, seed: int = 0):
    """(X, labels, splits): the mixture described in the module docstring."""
    from sklearn.cluster import KMeans

    from featx.features.store import load_features

    F = load_features(seed_features).features.astype(np.float64)
    km = KMeans(classes, n_init=4, random_state=seed).fit(F)
    resid = F - km.cluster_centers_[km.labels_]
    rng = np.random.default_rng(seed)
    n = n_train + n_val
    y = rng.integers(0, classes, n)
    a, b = rng.integers(0, len(F), n), rng.integers(0, len(F), n)
    lam = rng.uniform(0, 1, n)[:, None]
    mix = (np.sqrt(lam) * resid[a] + np.sqrt(1 - lam) * resid[b]) * 2.0
    X = km.cluster_centers_[y] + mix + rng.standard_normal((n, F.shape[1])) * F.std(0) * 0.3
    X = np.maximum(X, 0).astype(np.float32)
    labels = np.array([f"class{c}" for c in y])
    splits = np.array(["train"] * n_train + ["val"] * n_val)
    return X, labels, splits


def _features(args):
    """The FeatureSet every head is fitted on (built identically in the before/after processes)."""
    from featx.features.store import FeatureSet, load_features

    if args.data is not None:
        return load_features(args.data)
    X, labels, splits = seeded_mixture(args.seed_features)
    meta = {"backbone": "efficientnet_lite0 (seeded mixture)", "weights_sha256": "mixture", "preprocess": None,
            "layer": "pooled", "feature_dim": int(X.shape[1])}
    return FeatureSet(X, [f"{s}/{i}.jpg" for i, s in enumerate(splits)], labels=labels, splits=splits,
                      classes=sorted(set(labels)), meta=meta)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)  # joblib workers, if any
    return r.ru_utime + r.ru_stime + c.ru_utime + c.ru_stime


def run_heads(args) -> list:
    """Fit each head with this process's featx; one dict per head."""
    from featx.heads import fit_head

    fs = _features(args)
    rows = []
    for kind in args.heads:
        w0, c0 = time.perf_counter(), _cpu()
        res = fit_head(fs, kind, cv=5, seed=0, **({"calibrate": True} if args.calibrate else {}))
        rows.append({"head": kind, "wall_s": round(time.perf_counter() - w0, 2), "cpu_s": round(_cpu() - c0, 2),
                     "accuracy": res.scores["val"]["accuracy"], "params": res.head.meta.get("params"),
                     "n_train": res.training["n"], "n_val": res.scores["val"]["n"]})
        if kind == "all":
            rows[-1]["params"] = {"best": res.kind, **rows[-1]["params"]}
        if args.calibrate:
            cal = res.head.calibration
            rows[-1]["calibration"] = {"temperature": cal["temperature"], "how": cal["before"], **cal["ece"]["val"]}
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def run_before(args) -> list:
    """The same heads fitted by the featx package under ``args.before``, in a subprocess."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *sys.argv[1:]]
    env = dict(os.environ, PYTHONPATH=str(args.before))
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def machine_line() -> str:
    import sklearn
    import torch

    load = os.getloadavg()
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {load[0]:.1f}; "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads), scikit-learn {sklearn.__version__}, "
            f"{time.strftime('%Y-%m-%d %H:%M')}")


def print_table(after: list, before: list | None) -> None:
    by = {r["head"]: r for r in (before or [])}
    head = f"{'head':<9} | {'before s':>9} {'cpu s':>7} {'acc':>6} | {'after s':>8} {'cpu s':>7} {'acc':>6} | params after"
    print(head)
    print("-" * len(head))
    for r in after:
        b = by.get(r["head"])
        left = f"{b['wall_s']:>9.1f} {b['cpu_s']:>7.1f} {b['accuracy']:>6.3f}" if b else f"{'-':>9} {'-':>7} {'-':>6}"
        print(f"{r['head']:<9} | {left} | {r['wall_s']:>8.1f} {r['cpu_s']:>7.1f} {r['accuracy']:>6.3f} | {r['params']}")
    one = [r for r in after if r["head"] != "all"]
    total, ctotal = sum(r["wall_s"] for r in one), sum(r["cpu_s"] for r in one)
    bone = [r for r in (before or []) if r["head"] != "all"]
    btotal, bctotal = sum(r["wall_s"] for r in bone), sum(r["cpu_s"] for r in bone)
    print(f"{'sum':<9} | {btotal:>9.1f} {bctotal:>7.1f} {'':>6} | {total:>8.1f} {ctotal:>7.1f}")


def print_calibration(rows: list) -> None:
    print(f"\n{'head':<9} | {'T':>6} | {'ECE before':>10} {'after':>7} {'after, cross-fitted':>20} | before: probabilities from")
    for r in rows:
        c = r["calibration"]
        # since issue 22.4 "after" on val is cross-fitted and the in-sample ECE is "after_in_sample"
        inner, cross = (c["after_in_sample"], c["after"]) if "after_in_sample" in c else \
            (c["after"], c.get("after_cross_fitted"))
        print(f"{r['head']:<9} | {c['temperature']:>6.3g} | {c['before']:>10.3f} {inner:>7.3f} "
              f"{(f'{cross:.3f}' if cross is not None else '-'):>20} | {c['how']}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--seed-features", type=Path, default=Path("/tmp/heads-hym.npz"),
                     help="real features the 8-class mixture is seeded from (default /tmp/heads-hym.npz)")
    src.add_argument("--data", type=Path, default=None, help="fit on these labelled features instead")
    ap.add_argument("--heads", default=",".join(HEADS),
                    help="comma-separated head kinds, 'all' for `--head all` in one call (default: the six heads)")
    ap.add_argument("--before", type=Path, default=None, help="folder holding an older featx package to compare")
    ap.add_argument("--calibrate", action="store_true", help="fit with --calibrate; print ECE before/after on val")
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not args.child:
        sys.path.insert(0, str(ROOT))
    args.heads = [h for h in args.heads.split(",") if h]
    if args.child:  # the --before process: only the heads that code knows
        import featx.heads as fh

        args.heads = [h for h in args.heads if h in fh.HEADS or h == "all"]
        print(json.dumps(run_heads(args)))
        return 0

    print(f"machine: {machine_line()}")
    before = run_before(args) if args.before else None
    after = run_heads(args)
    n = after[0]
    print(f"data: {args.data or f'8-class mixture seeded from {args.seed_features}'}: {n['n_train']} training rows, "
          f"{n['n_val']} validation rows")
    print_table(after, before)
    if args.calibrate:
        print_calibration(after)
    if args.json_out:
        args.json_out.write_text(json.dumps({"machine": machine_line(), "before": before, "after": after}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
