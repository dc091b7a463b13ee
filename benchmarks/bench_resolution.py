"""Why featx extracts EfficientNet-Lite features above their training size: linear-probe accuracy vs resolution.

    python benchmarks/bench_resolution.py [--data ../shared/data/hymenoptera] [--sizes 224 256 288]

For each backbone and crop size: extract features of the train/val folder (resize/crop ratio kept), fit
StandardScaler + logistic regression on train for a few C values, print val accuracy side by side.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "hymenoptera")
    ap.add_argument("--backbones", nargs="+", default=["efficientnet_lite0"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[224, 256, 288])
    ap.add_argument("--C", nargs="+", type=float, default=[0.001, 0.01, 0.1, 1.0])
    ap.add_argument("--work", type=Path, default=Path("bench-out") / "resolution")
    args = ap.parse_args(argv)
    os.environ.setdefault("FEATX_NO_PROGRESS", "1")

    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    import featx

    rows = []
    for name in args.backbones:
        for size in args.sizes:
            bb = featx.create_backbone(name, image_size=size)
            out = args.work / f"{name}-{size}.npz"
            t = time.perf_counter()
            featx.extract_features(args.data, out, backbone=bb, overwrite=True)
            secs = time.perf_counter() - t
            fs = featx.load_features(out)
            tr, va = fs.split("train"), fs.split("val")
            accs = []
            for C in args.C:
                p = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=5000)).fit(tr.features, tr.labels)
                accs.append(float(np.mean(p.predict(va.features) == va.labels)))
            rows.append((name, size, bb.preprocess.resize, secs, accs))
            print(f"{name} {size}: {' '.join(f'{a:.4f}' for a in accs)} ({secs:.0f} s)", flush=True)
    print(f"\nLinear probe (StandardScaler + LogisticRegression) on {args.data.name}: val accuracy, "
          f"{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs")
    print(f"{'backbone':<20} {'crop':>5} {'resize':>6} " + " ".join(f"{'C=' + str(c):>8}" for c in args.C) + f" {'extract s':>9}")
    for name, size, resize, secs, accs in rows:
        print(f"{name:<20} {size:>5} {resize:>6} " + " ".join(f"{a:>8.4f}" for a in accs) + f" {secs:>9.0f}")


if __name__ == "__main__":
    main()
