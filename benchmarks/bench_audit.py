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
    "crop4": lambda im: (_crop(im, 0.04), 90),  # 4 % off each side
    "crop8": lambda im: (_crop(im, 0.08), 90),
    "mixed": lambda im: (im.crop((im.width // 25, 0, im.width, im.height - im.height // 25))
                         .resize((im.width * 2 // 3, im.height * 2 // 3)), 60),
}


def _crop(im, frac: float):
    dx, dy = int(im.width * frac), int(im.height * frac)
    return im.crop((dx, dy, im.width - dx, im.height - dy))


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


def sweep(work: Path) -> dict:
    """Recall and list length of the label check over C, and of the outlier list over the fence (planted set)."""
    import featx.audit as A

    truth = json.loads((work / "planted.json").read_text())
    swapped = {d["path"] for d in truth["label_errors"]}
    digits = {d["path"] for d in truth["outliers"]}
    out = {"C": {}, "fence": {}}
    for C in (0.003, 0.01, 0.03, 0.1, 0.3, 1.0):
        res = A.audit(work / "features.npz", report_dir=False, checks=["labels"], C=C)
        listed = [r["path"] for r in res.label_issues]
        out["C"][str(C)] = {"listed": len(listed), "found_in_top_10": len(swapped & set(listed[:10])),
                            "found": len(swapped & set(listed)), "cv_accuracy": res.info["labels"]["cv_accuracy"]}
    for fence in (1.5, 1.7, 2.0, 3.0):
        res = A.audit(work / "features.npz", report_dir=False, checks=["outliers"], fence=fence)
        listed = [r["path"] for r in res.outliers]
        out["fence"][str(fence)] = {"listed": len(listed), "found": len(digits & set(listed))}
    return out


# --------------------------------------------------------------------------------------------------- speed
def synthetic_store(path: Path, n: int, dim: int, classes: int = 10, n_dups: int = 500, n_swaps: int = 500,
                    seed: int = 0) -> dict:
    """A labelled feature store shaped like CNN features (non-negative, low-rank class structure plus noise) with
    planted near-duplicate pairs (copy = original + small noise) and swapped labels; truth returned (indices)."""
    from featx.features.store import FeatureSet, save_features

    rng = np.random.default_rng(seed)
    latent = 256
    decay = (1.0 + np.arange(latent, dtype=np.float32)) ** -0.5  # a decaying spectrum, as CNN features have
    W = rng.standard_normal((latent, dim), dtype=np.float32) / np.sqrt(latent)
    centres = rng.standard_normal((classes, latent), dtype=np.float32) * decay * 2.0
    y = rng.integers(classes, size=n)
    X = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 8192):
        e = min(n, s + 8192)
        lat = centres[y[s:e]] + rng.standard_normal((e - s, latent), dtype=np.float32) * decay * 2.0
        X[s:e] = np.maximum(lat @ W + 0.3 * rng.standard_normal((e - s, dim), dtype=np.float32), 0.0)
    src, dst = rng.choice(n, size=(2, n_dups), replace=False)
    X[dst] = np.maximum(X[src] + 0.08 * rng.standard_normal((n_dups, dim), dtype=np.float32) * X[src].std(), 0)
    y[dst] = y[src]
    swapped = rng.choice(np.setdiff1d(np.arange(n), np.concatenate([src, dst])), size=n_swaps, replace=False)
    given = y.copy()
    given[swapped] = (y[swapped] + rng.integers(1, classes, size=n_swaps)) % classes
    splits = np.where(rng.random(n) < 0.8, "train", "val")
    fs = FeatureSet(features=X, paths=[f"c{c}/img{i:07d}.jpg" for i, c in enumerate(given)],
                    labels=[f"c{c}" for c in given], splits=splits, classes=[f"c{c}" for c in range(classes)],
                    meta={"backbone": "synthetic", "root": None})
    save_features(fs, path)
    return {"dup_pairs": [[int(a), int(b)] for a, b in zip(src, dst)], "swapped": swapped.tolist()}


def _gflops(threads: int) -> float:
    """What the shared machine gives right now: float32 matrix product speed (context for every time printed)."""
    from threadpoolctl import threadpool_limits

    a = np.random.default_rng(0).random((2048, 1280), dtype=np.float32)
    b = np.random.default_rng(1).random((8192, 1280), dtype=np.float32)
    with threadpool_limits(threads):
        t = time.perf_counter()
        for _ in range(3):
            a @ b.T
        dt = time.perf_counter() - t
    return round(3 * 2 * 2048 * 8192 * 1280 / dt / 1e9, 1)


def _peak_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def speed_run(store: Path, truth: dict, checks: list, threads: int, backend: str = "auto",
              project_dim: int = 0) -> dict:
    """Time each audit step on a saved store (run in a fresh process so the peak RSS is the audit's own)."""
    from threadpoolctl import threadpool_limits

    import featx
    from featx.audit import AuditSettings, neighbors, run_checks

    if project_dim:
        neighbors.PROJECT_DIM = project_dim
    with threadpool_limits(threads):
        t = time.perf_counter()
        fs = featx.load_features(store)
        load_s = time.perf_counter() - t
        res = run_checks(fs, AuditSettings(checks=checks, backend=backend), checks)
    out = {"n": len(fs), "dim": fs.dim, "threads": threads, "load_s": round(load_s, 2), "seconds": res.info["seconds"],
           "sgemm_gflops_now": _gflops(threads), "outlier_knn": res.info.get("outlier_knn"),
           "search": res.info.get("search"), "peak_rss_mb": _peak_mb(), "load": os.getloadavg()}
    if "duplicates" in checks:
        groups = [set(m["path"] for m in g["members"]) for g in res.duplicates]
        member = {p: gi for gi, g in enumerate(groups) for p in g}
        hits = sum(1 for a, b in truth["dup_pairs"] if fs.paths[a] in member and member.get(fs.paths[a]) == member.get(fs.paths[b]))
        out["duplicates"] = {"planted_pairs": len(truth["dup_pairs"]), "found": hits, "groups": len(groups),
                             "similar_pairs": res.info.get("n_similar_pairs")}
    if "labels" in checks:
        listed = [r["path"] for r in res.label_issues]
        sw = {fs.paths[i] for i in truth["swapped"]}
        out["labels"] = {"planted": len(sw), f"found_in_top_{len(sw)}": len(sw & set(listed[:len(sw)])),
                         "found": len(sw & set(listed)), "listed": len(listed), "cv_accuracy": res.info["labels"]["cv_accuracy"]}
    return out


def naive_duplicates(store: Path, n: int, threshold: float, threads: int) -> dict:
    """The tutorial way: the full N x N similarity matrix in memory, then threshold it (n rows of the store)."""
    from threadpoolctl import threadpool_limits

    import featx
    from featx.audit.neighbors import normalise

    with threadpool_limits(threads):
        X = normalise(featx.load_features(store).features[:n])
        t = time.perf_counter()
        S = X @ X.T
        i, j = np.nonzero(np.triu(S >= threshold, 1))
        secs = time.perf_counter() - t
    return {"n": n, "seconds": round(secs, 2), "pairs": int(len(i)), "matrix_gb": round(S.nbytes / 2**30, 2),
            "peak_rss_mb": _peak_mb(), "load": os.getloadavg()}


def naive_labels(store: Path, n: int, threads: int) -> dict:
    """fit's grid search inside every fold (nested CV: 5 values x 5 inner folds per outer fold), n rows."""
    from threadpoolctl import threadpool_limits

    import featx
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    fs = featx.load_features(store)
    X, y = fs.features[:n], fs.labels[:n]
    head = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    search = GridSearchCV(head, {"logisticregression__C": [0.001, 0.01, 0.1, 1.0, 10.0]}, cv=5)
    with threadpool_limits(threads):
        t = time.perf_counter()
        cross_val_predict(search, X, y, cv=StratifiedKFold(5, shuffle=True, random_state=0), method="predict_proba")
        secs = time.perf_counter() - t
    return {"n": n, "seconds": round(secs, 2), "load": os.getloadavg()}


def _subprocess_json(*args) -> dict:
    import subprocess

    r = subprocess.run([sys.executable, __file__, *map(str, args)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr)
    return json.loads(r.stdout.strip().splitlines()[-1])


def speed(work: Path, n: int, dim: int, classes: int, threads: int, naive_n: int, naive_labels_n: int,
          checks: list, backend: str = "auto") -> dict:
    store = work / f"synthetic-{n}x{dim}-c{classes}.npz"
    truth_path = store.with_suffix(".json")
    if not truth_path.exists():
        truth_path.write_text(json.dumps(synthetic_store(store, n, dim, classes)))
    out = {"store": str(store), "audit": _subprocess_json("speed-run", store, "--threads", threads, "--checks",
                                                          ",".join(checks), "--backend", backend)}
    threshold = AUDIT_THRESHOLD
    if naive_n:
        nd = _subprocess_json("naive-dups", store, "--n", naive_n, "--threads", threads, "--threshold", threshold)
        nd["extrapolated_to_n_seconds"] = round(nd["seconds"] * (n / naive_n) ** 2, 1)  # O(N^2): stated as such
        nd["extrapolated_matrix_gb"] = round(4 * n * n / 2**30, 1)
        out["naive_duplicates"] = nd
    if naive_labels_n:
        nl = _subprocess_json("naive-labels", store, "--n", naive_labels_n, "--threads", threads)
        nl["extrapolated_to_n_seconds"] = round(nl["seconds"] * n / naive_labels_n, 1)  # ~linear in N: stated
        out["naive_labels"] = nl
    return out


AUDIT_THRESHOLD = 0.88


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
    p = sub.add_parser("sweep")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK)
    p = sub.add_parser("honesty")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK)
    p.add_argument("--threshold", type=float, default=None)
    p = sub.add_parser("speed")
    p.add_argument("--work", type=Path, default=DEFAULT_WORK)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=1280)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--checks", default="duplicates,labels,outliers")
    p.add_argument("--backend", default="auto")
    p.add_argument("--naive-n", type=int, default=16_000, help="rows for the N x N baseline (0 = skip)")
    p.add_argument("--naive-labels-n", type=int, default=5_000, help="rows for the nested-search baseline (0 = skip)")
    for name in ("speed-run", "naive-dups", "naive-labels"):  # internal: one measurement in a fresh process
        p = sub.add_parser(name)
        p.add_argument("store", type=Path)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--n", type=int, default=0)
        p.add_argument("--threshold", type=float, default=AUDIT_THRESHOLD)
        p.add_argument("--checks", default="duplicates,labels,outliers")
        p.add_argument("--backend", default="auto")
        p.add_argument("--project-dim", type=int, default=0)
    args = ap.parse_args()
    if args.cmd == "speed":
        print(json.dumps(speed(args.work, args.n, args.dim, args.classes, args.threads, args.naive_n,
                               args.naive_labels_n, args.checks.split(","), args.backend), indent=1))
    if args.cmd == "speed-run":
        truth = json.loads(args.store.with_suffix(".json").read_text())
        print(json.dumps(speed_run(args.store, truth, args.checks.split(","), args.threads, args.backend,
                                   args.project_dim)))
    if args.cmd == "naive-dups":
        print(json.dumps(naive_duplicates(args.store, args.n, args.threshold, args.threads)))
    if args.cmd == "naive-labels":
        print(json.dumps(naive_labels(args.store, args.n, args.threads)))
    if args.cmd == "calibrate":
        print(json.dumps(calibrate(args.work, plain=args.plain), indent=1))
    if args.cmd == "sweep":
        print(json.dumps(sweep(args.work), indent=1))
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
