"""Logistic head fit time: scikit-learn (lbfgs, all cores) next to featx's torch L-BFGS head, same C, one run.

    python benchmarks/bench_logistic_backends.py              # 100,000 x 1280 synthetic, 10 classes (issue 3 figure)
    python benchmarks/bench_logistic_backends.py 20000 --features featx-out/features.npz   # plus real features
    python benchmarks/bench_logistic_backends.py 5000 --device cpu   # the CPU (the torch head runs on CPU too)

(Until issue 15 this was benchmarks/bench_heads.py, which now times every head with its CV search.)

Both fit the same objective (C * sum log-loss + 0.5 ||W||^2) on standardised features through ``featx.fit_head``
with a fixed C (no CV), so "fit seconds" is one full fit of the head pipeline (scaler + classifier), host-to-device
copy included. Accuracy is on a held-out 20% (or the features' own val split). scikit-learn >= 1.8 ignores
LogisticRegression(n_jobs); its lbfgs uses every core through BLAS/OpenMP threads, which is what runs here.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from featx.features.store import FeatureSet, load_features  # noqa: E402
from featx.heads import fit_head  # noqa: E402


def synthetic(n: int, dim: int, classes: int, seed: int = 0) -> FeatureSet:
    """Clusters that look like pooled CNN features: non-negative, correlated, overlapping classes.

    Class means live in a 64-d subspace (CNN features are highly correlated); each sample is its class mean plus a
    shared low-rank nuisance and isotropic noise, then ReLU. Noise scales are set so a linear head lands near 90%
    accuracy (0.89 at 10k samples) rather than a trivial 100%, so "equal accuracy" is a real check.
    """
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((64, dim)).astype(np.float32) / 8.0
    means = rng.standard_normal((classes, 64)).astype(np.float32) * 0.35
    nuisance = rng.standard_normal((16, dim)).astype(np.float32) * 0.3
    y = rng.integers(0, classes, size=n)
    X = np.empty((n, dim), dtype=np.float32)
    step = 20000
    for a in range(0, n, step):  # chunks keep the temporary float64 arrays small
        b = min(n, a + step)
        z = means[y[a:b]] + rng.standard_normal((b - a, 64)).astype(np.float32) * 0.8
        X[a:b] = z @ basis + rng.standard_normal((b - a, 16)).astype(np.float32) @ nuisance
        X[a:b] += rng.standard_normal((b - a, dim)).astype(np.float32) * 0.5
    np.maximum(X, 0.0, out=X)
    labels = np.array([f"class{c:02d}" for c in y])
    meta = {"backbone": "synthetic", "weights_sha256": f"seed{seed}", "preprocess": None, "layer": "pooled",
            "feature_dim": dim}
    return FeatureSet(X, [f"{i}" for i in range(n)], labels=labels, classes=sorted(set(labels)), meta=meta)


def device_line(device: str) -> str:
    import torch

    dev = device
    if device == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev.startswith("cuda"):
        return f"{dev}: {torch.cuda.get_device_name(torch.device(dev))}"
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def warm_up(device: str) -> None:
    """Create the CUDA context and load kernels before timing (a one-off cost of the process, not of a fit)."""
    fs = synthetic(256, 32, 3, seed=1)
    fit_head(fs, "logistic", C=1.0, cv=0, backend="torch", device=device)


def compare(name: str, fs: FeatureSet, C: float, device: str) -> dict:
    rows = {}
    for backend in ("sklearn", "torch"):
        kw = {"device": device} if backend == "torch" else {}
        t0 = time.perf_counter()
        res = fit_head(fs, "logistic", C=C, cv=0, backend=backend, **kw)
        total = time.perf_counter() - t0
        rows[backend] = {"fit_s": res.training["fit_seconds"], "total_s": round(total, 3),
                         "accuracy": res.scores["val"]["accuracy"], "device": res.training["device"],
                         "n_iter": int(np.asarray(res.head.pipeline[-1].n_iter_).max())}
    n_train = fs.features.shape
    ratio = rows["sklearn"]["fit_s"] / max(rows["torch"]["fit_s"], 1e-9)
    return {"data": name, "shape": f"{n_train[0]} x {n_train[1]}", "classes": len(set(fs.labels.tolist())), "C": C,
            "sklearn": rows["sklearn"], "torch": rows["torch"], "speedup": round(ratio, 2),
            "accuracy_diff_points": round(100 * (rows["torch"]["accuracy"] - rows["sklearn"]["accuracy"]), 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("n", nargs="?", type=int, default=100_000, help="synthetic samples (default 100000)")
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--C", type=float, default=0.1, help="same regularisation for both heads")
    ap.add_argument("--features", type=Path, default=None, help="also benchmark these real features (labelled)")
    ap.add_argument("--device", default="auto", help="device of the torch head: auto | cpu | cuda")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args(argv)

    import sklearn
    import torch

    print(f"device for the torch head: {device_line(args.device)}")
    print(f"scikit-learn {sklearn.__version__} (lbfgs, {os.cpu_count()} cores), torch {torch.__version__}")
    warm_up(args.device)

    results = []
    t0 = time.perf_counter()
    fs = synthetic(args.n, args.dim, args.classes)
    print(f"generated {args.n} x {args.dim} synthetic features, {args.classes} classes in {time.perf_counter() - t0:.1f} s")
    results.append(compare("synthetic clusters", fs, args.C, args.device))
    del fs
    if args.features is not None:
        real = load_features(args.features)
        results.append(compare(f"{args.features.name} ({real.meta.get('backbone')})", real, args.C, args.device))

    head = (f"{'data':<34} {'N x D':>14} {'cls':>4} | {'sklearn s':>9} {'acc':>6} | {'torch s':>8} {'acc':>6} "
            f"{'dev':>6} | {'speedup':>7} {'d acc pt':>8}")
    print(head)
    print("-" * len(head))
    for r in results:
        s, t = r["sklearn"], r["torch"]
        print(f"{r['data'][:34]:<34} {r['shape']:>14} {r['classes']:>4} | {s['fit_s']:>9.2f} {s['accuracy']:>6.3f} | "
              f"{t['fit_s']:>8.2f} {t['accuracy']:>6.3f} {t['device'][:6]:>6} | {r['speedup']:>6.1f}x "
              f"{r['accuracy_diff_points']:>+8.2f}")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
