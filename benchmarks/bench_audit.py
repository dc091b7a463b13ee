"""Benchmark for issue 16 (`featx audit`): planted problems on hymenoptera (recall, false positives) and speed at 100k x 1280.

    python benchmarks/bench_audit.py plant   [--data ../shared/data/hymenoptera] [--work /tmp/featx-audit-bench]
    python benchmarks/bench_audit.py honesty [--work /tmp/featx-audit-bench]   # after `featx extract WORK/planted -o WORK/features.npz`
    python benchmarks/bench_audit.py speed   [--n 100000] [--dim 1280] [--threads 2] [--naive-n 20000]

plant: copies hymenoptera to WORK/planted and plants 10 near-duplicates across splits (resized, re-encoded or
slightly cropped copies of another split's image), 10 swapped labels (moved to the other class folder) and 5
images that are neither ants nor bees (scikit-learn digits, upscaled); the truth goes to WORK/planted.json.
honesty: runs the audit library on WORK/features.npz and prints, per finding kind, recall among the top k
(k = number planted) and among the whole list, plus the list length and how many listed items are not planted.
speed: synthetic clustered features (with planted near-duplicates), the audit's duplicate search and label-issue
step timed, beside a naive N x N baseline run at --naive-n and extrapolated (O(N^2) time, stated as such).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hymenoptera"
DEFAULT_WORK = Path("/tmp/featx-audit-bench")


# --------------------------------------------------------------------------------------------------- planting
def _jpegs(root: Path) -> list:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))


def _near_copy(src: Path, dst: Path, kind: str) -> None:
    """A visually identical copy that is not byte-identical: resized, re-encoded, or cropped by a few percent."""
    from PIL import Image

    im = Image.open(src).convert("RGB")
    w, h = im.size
    if kind == "resize":
        im = im.resize((max(1, int(w * 0.6)), max(1, int(h * 0.6))), Image.BICUBIC)
        im.save(dst, quality=85)
    elif kind == "reencode":
        im.save(dst, quality=40)
    else:  # small crop: 6 % off each side
        dx, dy = int(w * 0.06), int(h * 0.06)
        im.crop((dx, dy, w - dx, h - dy)).save(dst, quality=90)


def _digit(dst: Path, index: int) -> None:
    from PIL import Image
    from sklearn.datasets import load_digits

    img = load_digits().images[index]
    arr = (img * 255 / 16).astype(np.uint8)
    Image.fromarray(arr).convert("RGB").resize((224, 224), Image.BICUBIC).save(dst, quality=95)


def plant(data: Path, work: Path, seed: int = 16) -> dict:
    """Copy ``data`` to work/planted and plant the three kinds of problem; returns (and writes) the truth."""
    dst = work / "planted"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(data, dst)
    rng = np.random.default_rng(seed)
    files = _jpegs(dst)
    picks = [files[i] for i in rng.permutation(len(files))[:20]]
    truth = {"duplicates": [], "label_errors": [], "outliers": []}
    kinds = ["resize", "reencode", "crop"]
    for i, rel in enumerate(picks[:10]):  # near-duplicates into the other split, same class
        split, cls, name = rel.split("/")
        other = "val" if split == "train" else "train"
        copy = f"{other}/{cls}/copy_{Path(name).stem}.jpg"
        _near_copy(dst / rel, dst / copy, kinds[i % 3])
        truth["duplicates"].append({"original": rel, "copy": copy, "how": kinds[i % 3]})
    for rel in picks[10:20]:  # swapped labels: the file moves to the other class folder of its split
        split, cls, name = rel.split("/")
        other = "bees" if cls == "ants" else "ants"
        new = f"{split}/{other}/{name}"
        (dst / rel).rename(dst / new)
        truth["label_errors"].append({"path": new, "true": cls, "given": other})
    for i, digit in enumerate([0, 1, 2, 3, 4]):  # not ants, not bees
        rel = f"train/{'ants' if i % 2 == 0 else 'bees'}/digit_{digit}.jpg"
        _digit(dst / rel, digit)
        truth["outliers"].append({"path": rel})
    (work / "planted.json").write_text(json.dumps(truth, indent=1))
    return truth


CALIB = {  # transform name -> function(PIL image) -> (image, JPEG quality)
    "resize50": lambda im: (im.resize((im.width // 2, im.height // 2)), 90),
    "resize75": lambda im: (im.resize((im.width * 3 // 4, im.height * 3 // 4)), 90),
    "jpeg30": lambda im: (im, 30),
    "crop4": lambda im: (im.crop((im.width // 25, im.height // 25, im.width - im.width // 25, im.height - im.height // 25)), 90),
    "crop8": lambda im: (im.crop((im.width * 2 // 25, im.height * 2 // 25, im.width - im.width * 2 // 25, im.height - im.height * 2 // 25)), 90),
    "mixed": lambda im: (im.crop((im.width // 25, 0, im.width, im.height - im.height // 25)).resize((im.width * 2 // 3, im.height * 2 // 3)), 60),
}


def calibrate_set(data: Path, work: Path, n: int = 30, seed: int = 7) -> Path:
    """n photos x every CALIB transform, in WORK/calib/<transform>/<split>__<class>__<name>.jpg (for the threshold)."""
    from PIL import Image

    dst = work / "calib"
    shutil.rmtree(dst, ignore_errors=True)
    files = _jpegs(data)
    rng = np.random.default_rng(seed)
    for rel in [files[i] for i in rng.permutation(len(files))[:n]]:
        with Image.open(data / rel) as im:
            im = im.convert("RGB")
            for name, fn in CALIB.items():
                out, q = fn(im)
                p = dst / name / rel.replace("/", "__")
                p.parent.mkdir(parents=True, exist_ok=True)
                out.save(p, quality=q)
    return dst


def calibrate(work: Path, thresholds=(0.84, 0.86, 0.87, 0.88, 0.89, 0.90, 0.92), plain: bool = False) -> dict:
    """Cosine (as the audit measures it) of each calibration copy to its original, against every pair of distinct
    photos in the planted store (copies and digits left out): copies found and distinct pairs above each threshold.
    plain: plain L2 normalisation instead of the audit's (signed square root first), for the comparison."""
    import featx
    from featx.audit.neighbors import normalise

    if plain:
        normalise = lambda A: A / np.linalg.norm(A, axis=1, keepdims=True)  # noqa: E731

    fs = featx.load_features(work / "features.npz")
    cs = featx.load_features(work / "calib.npz")
    keep = [i for i, p in enumerate(fs.paths) if not Path(p).name.startswith(("copy_", "digit_"))]
    X = normalise(fs.features[keep])
    C = normalise(cs.features)
    by_name = {Path(fs.paths[k]).name: n for n, k in enumerate(keep)}
    orig = np.array([by_name[p.split("__")[-1]] for p in cs.paths])
    copy_sim = (C * X[orig]).sum(1)
    kinds = np.array([p.split("/")[0] for p in cs.paths])
    S = X @ X.T
    distinct = S[np.triu_indices(len(X), 1)]
    S[np.arange(len(X)), np.arange(len(X))] = -1
    out = {"distinct_pairs": int(len(distinct)), "closest_distinct_pair": round(float(distinct.max()), 4),
           "copies": int(len(copy_sim)), "copy_is_nearest": int(sum((S[o] < s).all() for o, s in zip(orig, copy_sim))),
           "per_threshold": {}}
    for t in thresholds:
        row = {k: f"{int((copy_sim[kinds == k] >= t).sum())}/{int((kinds == k).sum())}" for k in sorted(set(kinds))}
        row.update(all=f"{int((copy_sim >= t).sum())}/{len(copy_sim)}", distinct_pairs_above=int((distinct >= t).sum()))
        out["per_threshold"][str(t)] = row
    return out


# --------------------------------------------------------------------------------------------------- honesty
def _recall(found: list, planted: set, top: int) -> tuple:
    return len(planted & set(found[:top])), len(planted & set(found))


def honesty(work: Path, **settings) -> dict:
    """Recall of the planted problems at the top of each list and in the whole list, plus what else is listed."""
    import featx.audit as A

    truth = json.loads((work / "planted.json").read_text())
    t = time.perf_counter()
    res = A.audit(work / "features.npz", report_dir=work / "report", **settings)
    seconds = time.perf_counter() - t
    pairs = {frozenset((d["original"], d["copy"])) for d in truth["duplicates"]}
    groups = [frozenset(m["path"] for m in g["members"]) for g in res.duplicates]
    hit = [any(p <= g for p in pairs) for g in groups]
    found_pairs = {p for p in pairs if any(p <= g for g in groups)}
    top_pairs = {p for p in pairs if any(p <= g for g in groups[:len(pairs)])}
    swapped = {d["path"] for d in truth["label_errors"]}
    digits = {d["path"] for d in truth["outliers"]}
    lab = [r["path"] for r in res.label_issues]
    out = [r["path"] for r in res.outliers]
    report = {
        "seconds": round(seconds, 2), "settings": res.info["settings"], "timings": res.info["seconds"],
        "duplicates": {"planted": len(pairs), f"recall@{len(pairs)}": len(top_pairs), "recall_all": len(found_pairs),
                       "groups": len(groups), "leakage_groups": len(res.leakage),
                       "groups_without_a_planted_pair": [sorted(g) for g, h in zip(groups, hit) if not h]},
        "label_errors": {"planted": len(swapped), **dict(zip((f"recall@{len(swapped)}", "recall_all"),
                                                              _recall(lab, swapped, len(swapped)))),
                         "listed": len(lab), "listed_planted_outliers": len(digits & set(lab)),
                         "listed_not_planted": [p for p in lab if p not in swapped | digits]},
        "outliers": {"planted": len(digits), **dict(zip((f"recall@{len(digits)}", "recall_all"),
                                                         _recall(out, digits, len(digits)))),
                     "listed": len(out), "listed_not_planted": [p for p in out if p not in digits],
                     "cut": res.info.get("outlier_cut")},
    }
    return report


# --------------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plant")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--work", type=Path, default=DEFAULT_WORK)
    p = sub.add_parser("calib-set")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--work", type=Path, default=DEFAULT_WORK)
    p = sub.add_parser("calibrate")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK)
    p.add_argument("--plain", action="store_true", help="plain L2 normalisation (no square root), for comparison")
    p = sub.add_parser("honesty")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK)
    p.add_argument("--threshold", type=float, default=None)
    args = ap.parse_args()
    if args.cmd == "calibrate":
        print(json.dumps(calibrate(args.work, plain=args.plain), indent=1))
    if args.cmd == "honesty":
        kw = {} if args.threshold is None else {"threshold": args.threshold}
        print(json.dumps(honesty(args.work, overwrite=True, **kw), indent=1))
    if args.cmd == "calib-set":
        print(calibrate_set(args.data, args.work))
    if args.cmd == "plant":
        truth = plant(args.data, args.work)
        print(json.dumps({k: len(v) for k, v in truth.items()}), "->", args.work / "planted")


if __name__ == "__main__":
    main()
