"""Extraction throughput: featx's engine next to a tutorial-style baseline and the network-alone ceiling, one run.

    python benchmarks/bench_extract.py --n 8000            # GPU machine (issue 2 / issue 7 figures)
    python benchmarks/bench_extract.py --n 400 --device cpu  # the 2-core CPU here
    python benchmarks/bench_extract.py --n 64 --device cpu --decoder both --skip-baseline   # logic check on a CPU

--decoder picks the featx rows: pil (CPU decoding in workers), torchvision (batched decode + resize on the
device), both, or auto (both on CUDA, pil on the CPU). When both run, the two stores are compared (mean / max
absolute feature difference) and, unless --no-probe, a linear probe is fitted on ants/bees train and scored on val
with each decoder's features (issue 7: within 0.5 point).

The image set is ../shared/data/hymenoptera replicated (hard links, else copies) to --n files under --work.
Printed: images/s of each pipeline, ratio to the tutorial baseline and to the ceiling, peak host RSS and GPU memory.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hymenoptera"


def replicate(src: Path, dst: Path, n: int) -> Path:
    """dst/<class>/<i>_<name>.jpg, n files in all (two classes), reusing a previous replica of the same size."""
    files = sorted(p for p in src.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    marker = dst / f".n{n}"
    if marker.exists():
        return dst
    shutil.rmtree(dst, ignore_errors=True)
    for i in range(n):
        f = files[i % len(files)]
        out = dst / f.parent.name / f"{i:06d}_{f.name}"
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, out)
        except OSError:
            shutil.copyfile(f, out)
    marker.touch()
    return dst


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tutorial_baseline(folder: Path, device, batch_size=32, workers=4) -> float:
    """The PyTorch transfer-learning tutorial's input pipeline, fp32, same network, features discarded."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    from featx.backbones import create_backbone

    bb = create_backbone("efficientnet_lite0")
    tf = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    ds = ImageFolder(str(folder), transform=tf)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers)
    model = bb.model.eval().to(device)
    n = 0
    t = time.perf_counter()
    with torch.inference_mode():
        for x, _ in dl:
            bb.forward_features(x.to(device))
            n += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    del model
    return n / (time.perf_counter() - t)


def ceiling(device, n: int, batch_size: int, bf16: bool) -> float:
    """Network alone on synthetic tensors already on the device."""
    from featx.backbones import create_backbone

    bb = create_backbone("efficientnet_lite0")
    model = bb.model.eval().to(device)
    x = torch.randn(batch_size, 3, 224, 224, device=device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if (bf16 and device.type == "cuda") else torch.autocast("cpu", enabled=False)
    with torch.inference_mode(), ctx:
        bb.forward_features(x)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        steps = max(1, n // batch_size)
        for _ in range(steps):
            bb.forward_features(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return steps * batch_size / (time.perf_counter() - t)


def featx_engine(folder: Path, out: Path, device: str, workers, batch_size, decoder: str = "auto",
                 image_size=None) -> tuple:
    from featx.backbones import create_backbone
    from featx.features.engine import extract_features

    if out.exists():
        out.unlink()
    shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)  # never resume in a benchmark
    bb = create_backbone("efficientnet_lite0", image_size=image_size)  # outside the timed region, as the baseline's
    t = time.perf_counter()
    res = extract_features(folder, out, backbone=bb, device=device, workers=workers, batch_size=batch_size,
                           decoder=decoder)
    return res.n_images / (time.perf_counter() - t), res


def feature_difference(a_path: Path, b_path: Path) -> tuple:
    """(mean, max) absolute difference between two stores of the same files, rows matched by path."""
    import numpy as np

    from featx.features.store import load_features

    a, b = load_features(a_path), load_features(b_path)
    assert a.paths == b.paths, "the two decoders kept different files"
    d = np.abs(a.features - b.features)
    return float(d.mean()), float(d.max())


def probe_agreement(data: Path, work: Path, device: str, workers) -> dict:
    """Linear probe (standardise + logistic regression) on train, accuracy on val, with each decoder's features."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from featx.features.store import load_features

    acc = {}
    for dec in ("pil", "torchvision"):
        _, res = featx_engine(data, work / f"probe-{dec}.npz", device, workers, None, dec)
        fs = load_features(res.path)
        split, labels = np.asarray(fs.splits), np.asarray(fs.labels)
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, C=0.1))
        clf.fit(fs.features[split == "train"], labels[split == "train"])
        acc[dec] = 100.0 * float((clf.predict(fs.features[split == "val"]) == labels[split == "val"]).mean())
    mean_d, max_d = feature_difference(work / "probe-pil.npz", work / "probe-torchvision.npz")
    return {**acc, "mean_abs_diff": mean_d, "max_abs_diff": max_d}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--n", type=int, default=8000)
    ap.add_argument("--work", type=Path, default=Path("bench-out"))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--image-size", type=int, default=224,
                    help="featx crop size (224 = the baseline's work; featx's own default for lite0 is 256)")
    ap.add_argument("--decoder", default="auto", choices=["auto", "pil", "torchvision", "both"],
                    help="featx rows to run (auto: both on CUDA, pil on the CPU)")
    ap.add_argument("--no-probe", action="store_true", help="skip the linear-probe comparison of the two decoders")
    args = ap.parse_args(argv)
    os.environ.setdefault("FEATX_NO_PROGRESS", "1")
    from featx.devices import resolve_device

    dev = resolve_device(args.device)
    folder = replicate(args.data, args.work / f"replica{args.n}", args.n)
    rows = []
    if dev.type == "cuda":
        rows.append(("network alone, bf16, channels_last, batch 256 (ceiling)", ceiling(dev, 4096, 256, True)))
        rows.append(("network alone, fp32, batch 256", ceiling(dev, 4096, 256, False)))
    else:
        rows.append(("network alone, fp32, batch 64 (ceiling)", ceiling(dev, 256, 64, False)))
    if not args.skip_baseline:
        rows.append(("tutorial: ImageFolder+Resize/CenterCrop/ToTensor/Normalize, 4 workers, batch 32, fp32",
                     tutorial_baseline(folder, dev)))
    decoders = {"both": ["pil", "torchvision"], "pil": ["pil"], "torchvision": ["torchvision"],
                "auto": ["pil", "torchvision"] if dev.type == "cuda" else ["pil"]}[args.decoder]
    gpu_peaks, stores = {}, {}
    for dec in decoders:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        rate, res = featx_engine(folder, args.work / f"features-{dec}.npz", args.device, args.workers,
                                 args.batch_size, dec, args.image_size)
        where = "batched device decode+resize" if dec == "torchvision" else "CPU workers decode+resize"
        rows.append((f"featx extract --decoder {dec} ({where}), {args.image_size}px, workers={args.workers or 'auto'}, "
                     f"batch={args.batch_size or 'auto'}", rate))
        if dev.type == "cuda":
            gpu_peaks[dec] = torch.cuda.max_memory_allocated() / 2**20
        stores[dec] = res.path
    base = next((r for name, r in rows if name.startswith("tutorial")), None)
    top = rows[0][1]
    print(f"\nExtraction throughput, efficientnet_lite0, {args.n} JPEGs, device={dev}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}")
    print(f"{'pipeline':<92} {'img/s':>9} {'x tutorial':>10} {'/ ceiling':>9}")
    for name, r in rows:
        rel = f"{r / base:.2f}" if base else "-"
        print(f"{name:<92} {r:>9.1f} {rel:>10} {r / top:>9.2f}")
    peaks = ", ".join(f"{d} {m:.0f} MiB" for d, m in gpu_peaks.items())
    print(f"peak host RSS {peak_rss_mb():.0f} MiB (this process; workers excluded), peak GPU memory per featx row: "
          f"{peaks or '-'}; {res.n_images} images, {res.n_skipped} skipped")
    if len(stores) == 2:
        mean_d, max_d = feature_difference(stores["pil"], stores["torchvision"])
        print(f"features, torchvision vs pil decoder ({args.n} images): mean abs difference {mean_d:.5f}, "
              f"max {max_d:.4f}")
        if not args.no_probe and (args.data / "train").is_dir():
            p = probe_agreement(args.data, args.work, args.device, args.workers)
            print(f"linear probe on {args.data.name} val: pil {p['pil']:.2f}%, torchvision {p['torchvision']:.2f}% "
                  f"(difference {p['torchvision'] - p['pil']:+.2f} points); features mean abs difference "
                  f"{p['mean_abs_diff']:.5f}, max {p['max_abs_diff']:.4f}")


if __name__ == "__main__":
    main()
