"""Benchmark for issues 6 and 18: `featx compare` on hymenoptera (heads vs fine-tuning vs scratch), optionally as a
learning curve (--shots), plus LeNet-5 on digits.

    python benchmarks/bench_compare.py [--data ../shared/data/hymenoptera] [--quick] [--device auto]
        [--shots 1,2,5,10,20,all] [--budget SECONDS] [--out bench-compare.json]

Prints the comparison table as Markdown (for the README), with --shots the curve table and its sentence, and the
JSON document; the report and charts are in the printed run folder. The digits line times a scratch run on
scikit-learn's 8x8 digits (exported to PNGs).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def digits_folder(root: Path) -> Path:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    for i, (img, y) in enumerate(zip(d.images, d.target)):
        p = root / str(y) / f"{i:04d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((img * 255 / 16).astype(np.uint8)).save(p)
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "hymenoptera")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--arch", action="append", default=None, help="scratch architecture(s) (default lenet5, resnet20)")
    ap.add_argument("--shots", default=None, help="e.g. 1,2,5,10,20,all or auto: also draw the learning curve")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget", type=float, default=None)
    ap.add_argument("--skip-digits", action="store_true")
    ap.add_argument("--runs-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    import torch

    import featx

    runs = args.runs_dir or Path(tempfile.mkdtemp(prefix="featx-bench-"))
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    kw = {"archs": tuple(args.arch)} if args.arch else {}
    res = featx.compare(args.data, backbone=args.backbone, quick=args.quick, device=args.device,
                        runs_dir=str(runs), log=log, shots=args.shots, repeats=args.repeats, budget=args.budget, **kw)
    out = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device != "cpu" else "cpu",
           **res.to_dict()}
    print("| method | val accuracy | balanced accuracy | seconds | trainable params |")
    print("|---|---|---|---|---|")
    for r in res.rows:
        acc = "failed" if r.error else f"{r.accuracy:.4f}"
        bal = "" if r.error else f"{r.balanced_accuracy:.4f}"
        tp = "-" if r.trainable_params is None else f"{r.trainable_params:,}"
        print(f"| {r.method} | {acc} | {bal} | {r.seconds:.1f} | {tp} |")
    if res.curve is not None:
        from featx.comparison.render import render_curve

        print("\n".join(render_curve(res)))
    if not args.skip_digits:
        digits = digits_folder(Path(tempfile.mkdtemp(prefix="featx-digits-")) / "digits")
        t0 = time.perf_counter()
        d = featx.train_scratch(digits, arch="lenet5", epochs=10, augment="light", device=args.device,
                                runs_dir=str(runs), log=log)
        out["digits_lenet5"] = {"best_val_accuracy": d.best["accuracy"], "train_seconds": round(d.seconds, 2),
                                "wall_seconds": round(time.perf_counter() - t0, 2)}
        print(f"\ndigits, lenet5, 10 epochs: val accuracy {d.best['accuracy']:.4f} in {d.seconds:.1f} s of training")
    print(json.dumps(out, indent=2), file=sys.stderr)
    if args.out:
        args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
