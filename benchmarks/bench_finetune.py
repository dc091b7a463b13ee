"""Benchmark for issue 5: `featx finetune` with default settings on hymenoptera (ants vs bees).

Reports best validation accuracy, wall time to the best epoch, and training images/s for
efficientnet_lite0 (pretrained, embedded weights) and a randomly initialised resnet18 (the recipe on a
non-embedded model). Meant for the GPU machine; on a CPU pass --image-size 128 --epochs 6 for a smaller run.

    python benchmarks/bench_finetune.py [--data ../shared/data/hymenoptera] [--device auto] [--out bench-finetune.json]
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


def run_one(backbone: str, data: Path, runs: Path, pretrained: bool, args) -> dict:
    import featx

    extra = {}
    if args.epochs:
        extra["epochs"] = args.epochs
    if args.image_size:
        extra["image_size"] = args.image_size
    t0 = time.perf_counter()
    res = featx.finetune(backbone, data, pretrained=pretrained, device=args.device, runs_dir=str(runs),
                         seed=args.seed, log=lambda m: print(m, file=sys.stderr), **extra)
    wall = time.perf_counter() - t0
    best_epoch = res.best["epoch"]
    to_best = sum(r["seconds"] for r in res.rows if r["epoch"] <= best_epoch)
    ips = [r["images_per_s"] for r in res.rows]
    ft_ips = [r["images_per_s"] for r in res.rows if r["phase"] == "finetune"] or ips
    return {
        "backbone": backbone, "pretrained": pretrained, "best_val_accuracy": res.best["accuracy"],
        "best_val_balanced_accuracy": res.best["balanced_accuracy"], "best_epoch": best_epoch,
        "epochs_run": len(res.rows), "seconds_to_best_epoch": round(to_best, 1), "wall_seconds": round(wall, 1),
        "train_images_per_s_finetune_phase": round(sum(ft_ips) / len(ft_ips), 1),
        "train_images_per_s_max": max(ips), "run_dir": str(res.run_dir),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "hymenoptera")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--epochs", type=int, default=None, help="override the default epochs (default: featx's)")
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-resnet18", action="store_true")
    ap.add_argument("--runs-dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()
    import torch

    runs = args.runs_dir or Path(tempfile.mkdtemp(prefix="featx-bench-"))
    results = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device != "cpu" else "cpu",
               "torch": torch.__version__, "runs": []}
    results["runs"].append(run_one("efficientnet_lite0", args.data, runs, True, args))
    if not args.skip_resnet18:
        results["runs"].append(run_one("resnet18", args.data, runs, False, args))
    print(json.dumps(results, indent=2))
    print("\n| backbone | init | best val acc | balanced | best epoch | s to best | train img/s |", file=sys.stderr)
    print("|---|---|---|---|---|---|---|", file=sys.stderr)
    for r in results["runs"]:
        print(f"| {r['backbone']} | {'ImageNet' if r['pretrained'] else 'random'} | {r['best_val_accuracy']:.4f} | "
              f"{r['best_val_balanced_accuracy']:.4f} | {r['best_epoch']} | {r['seconds_to_best_epoch']} | "
              f"{r['train_images_per_s_finetune_phase']} |", file=sys.stderr)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
