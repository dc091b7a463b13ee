"""Benchmark for issue 25: recall of each audit ranking (top 10 / top 20) on problems planted in hymenoptera.

    python benchmarks/bench_audit_planted.py plant   [--data ../shared/data/hymenoptera] [--work /work/cache-h]
    python benchmarks/bench_audit_planted.py extract [--work /work/cache-h]     # once: WORK/features.npz
    python benchmarks/bench_audit_planted.py recall  [--work /work/cache-h]     # before (issue 16) vs after
    python benchmarks/bench_audit_planted.py scale   [--n 100000 --dim 1280] [--code ../main .]   # whole audit

plant: copies hymenoptera to WORK/planted and plants three kinds of problem (the truth goes to WORK/planted.json):
- 10 copies across splits, each resized to 55-70 %, cropped by 5-10 % on two sides and re-encoded at JPEG 35-60
  (harder than bench_audit.py's one-edit copies: every copy has all three edits);
- 10 relabelled images (6 ants filed as bees, 4 bees filed as ants), moved to the other class folder;
- 8 images from another domain, none of them ants or bees, filed under ants/ or bees/: 4 crops of scikit-learn's
  bundled sample photos (`load_sample_images`: the Chinese temple and the flower), 2 of its 8x8 digits upscaled and
  2 synthetic textures (a sine grating and smoothed noise). No download.
recall: runs the audit on WORK/features.npz and prints, per kind, how many planted items sit in the top 10 / top 20
of the ranking, for the ranking before this issue (the flagged sets: label issues as cleanlab ordered them, outliers
past the fence, duplicate groups) and after (scores.csv: every image ranked; duplicates as pairs of nearest images,
most similar first), with the variants the weights were chosen from (tuned on these plants only).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hymenoptera"
DEFAULT_WORK = Path("/work/cache-h")


def _jpegs(root: Path) -> list:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))


def _hard_copy(src: Path, dst: Path, rng) -> str:
    """Resized, cropped on two sides and re-encoded: all three edits on one copy."""
    from PIL import Image

    im = Image.open(src).convert("RGB")
    w, h = im.size
    scale, cut, q = rng.uniform(0.55, 0.7), rng.uniform(0.05, 0.10), int(rng.integers(35, 61))
    im = im.crop((int(w * cut), 0, w, h - int(h * cut)))
    im = im.resize((max(8, int(im.width * scale)), max(8, int(im.height * scale))), Image.BICUBIC)
    im.save(dst, quality=q)
    return f"crop {cut:.2f}, resize {scale:.2f}, jpeg {q}"


def _other_domain(rng) -> list:
    """(name, PIL image, what) for 8 images that are neither ants nor bees."""
    from PIL import Image, ImageFilter
    from sklearn.datasets import load_digits, load_sample_images

    out = []
    photos = load_sample_images().images  # china.jpg, flower.jpg (427 x 640)
    for n, (arr, box) in enumerate([(photos[0], (0, 0, 300, 300)), (photos[0], (120, 300, 420, 640)),
                                    (photos[1], (50, 150, 400, 500)), (photos[1], (0, 0, 250, 250))]):
        y0, x0, y1, x1 = box
        out.append((f"sample_photo_{n}.jpg", Image.fromarray(arr[y0:y1, x0:x1]), "scikit-learn sample photo crop"))
    digits = load_digits().images
    for d in (3, 7):
        arr = (digits[d] * 255 / 16).astype(np.uint8)
        out.append((f"digit_{d}.jpg", Image.fromarray(arr).convert("RGB").resize((256, 256), Image.BICUBIC),
                    "scikit-learn digit, upscaled"))
    yy, xx = np.mgrid[0:256, 0:256]
    grating = (127 + 120 * np.sin(xx / 6.0 + yy / 11.0)).astype(np.uint8)
    out.append(("texture_grating.jpg", Image.fromarray(np.stack([grating, grating[::-1], 255 - grating], -1)),
                "synthetic sine grating"))
    noise = Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(3))
    out.append(("texture_noise.jpg", noise, "synthetic smoothed noise"))
    return out


def plant(data: Path, work: Path, seed: int = 25) -> dict:
    """Copy ``data`` to work/planted and plant the three kinds of problem; returns (and writes) the truth."""
    dst = work / "planted"
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(data, dst)
    rng = np.random.default_rng(seed)
    files = _jpegs(dst)
    order = [files[i] for i in rng.permutation(len(files))]
    truth = {"duplicates": [], "label_errors": [], "outliers": []}
    for rel in order[:10]:  # copies into the other split, same class
        split, cls, name = rel.split("/")
        other = "val" if split == "train" else "train"
        copy = f"{other}/{cls}/copy_{Path(name).stem}.jpg"
        how = _hard_copy(dst / rel, dst / copy, rng)
        truth["duplicates"].append({"original": rel, "copy": copy, "how": how})
    ants = [r for r in order[10:] if r.split("/")[1] == "ants"][:6]
    bees = [r for r in order[10:] if r.split("/")[1] == "bees"][:4]
    for rel in ants + bees:  # relabelled: the file moves to the other class folder of its split
        split, cls, name = rel.split("/")
        other = "bees" if cls == "ants" else "ants"
        new = f"{split}/{other}/{name}"
        (dst / rel).rename(dst / new)
        truth["label_errors"].append({"path": new, "true": cls, "given": other})
    for i, (name, im, what) in enumerate(_other_domain(rng)):
        rel = f"{'train' if i % 3 else 'val'}/{'ants' if i % 2 == 0 else 'bees'}/{name}"
        im.convert("RGB").save(dst / rel, quality=92)
        truth["outliers"].append({"path": rel, "what": what})
    (work / "planted.json").write_text(json.dumps(truth, indent=1))
    return truth


def extract(work: Path) -> Path:
    """featx extract WORK/planted -> WORK/features.npz (efficientnet_lite0, the default backbone), once."""
    import featx

    out = work / "features.npz"
    if not out.exists():
        featx.extract_features(work / "planted", out)
    return out


def _hits(ranked: list, planted: set, top: int) -> int:
    return len(set(ranked[:top]) & planted)


def _pairs(rows) -> list:
    """Unordered pairs (frozensets of two paths) from (path, nearest, similarity) rows, most similar first."""
    out, seen = [], set()
    for path, near, _ in sorted(rows, key=lambda r: -r[2]):
        pair = frozenset((path, near))
        if near is not None and pair not in seen:
            seen.add(pair)
            out.append(pair)
    return out


def rankings_before(res) -> dict:
    """The orderings the issue-16 audit offered: its flagged lists (labels, outliers) and its duplicate groups (the
    most similar pair of each member, best first)."""
    rows = []
    for g in res.duplicates:
        ms = g["members"]
        for m in ms:
            others = [o for o in ms if o is not m]
            rows += [(m["path"], o["path"], m["similarity"]) for o in others]
    return {"label_errors": [r["path"] for r in res.label_issues], "outliers": [r["path"] for r in res.outliers],
            "duplicates": _pairs(rows)}


def _by(table, key: str, values=None) -> list:
    v = np.asarray(table.columns[key] if values is None else values, dtype=np.float64)
    have = np.flatnonzero(~np.isnan(v))
    return [table.columns["path"][i] for i in have[np.argsort(-v[have], kind="stable")]]


def rankings_after(res) -> dict:
    """The full rankings of scores.csv (every image), most suspicious first, and the variants they were chosen from."""
    from featx.audit.scores import percentile_of

    t = res.scores
    c = t.columns
    doubt = 1.0 - np.asarray(c["given_probability"], dtype=np.float64)
    vote = 1.0 - np.asarray(c["neighbour_agreement"], dtype=np.float64)
    glob = percentile_of(np.asarray(c["knn_distance"], dtype=np.float64))
    cls = percentile_of(np.asarray(c["class_knn_distance"], dtype=np.float64))
    ranked = lambda col: _by(t, "", -np.asarray(c[col], dtype=np.float64))  # noqa: E731 - rank 1 first
    out = {"label_errors": ranked("label_rank"), "outliers": ranked("outlier_rank"),
           "duplicates": _pairs(zip(c["path"], c["nearest"], c["nearest_similarity"])),
           "label_errors [1 - p(given) only]": _by(t, "", doubt),
           "label_errors [neighbour vote only]": _by(t, "", vote)}
    for w in (0.1, 0.5, 0.75):
        out[f"label_errors [vote weight {w}]"] = _by(t, "", (1 - w) * doubt + w * vote)
    out["outliers [whole set only]"] = _by(t, "knn_distance")
    out["outliers [own class only]"] = _by(t, "class_knn_distance")
    for w in (0.25, 0.75):
        out[f"outliers [class weight {w}]"] = _by(t, "", (1 - w) * glob + w * cls + 1e-6 * np.asarray(
            c["knn_distance"], dtype=np.float64))
    return out


def recall(work: Path, **settings) -> dict:
    import featx

    truth = json.loads((work / "planted.json").read_text())
    planted = {"label_errors": {t["path"] for t in truth["label_errors"]},
               "outliers": {t["path"] for t in truth["outliers"]},
               "duplicates": {frozenset((t["original"], t["copy"])) for t in truth["duplicates"]}}
    res = featx.audit(work / "features.npz", report_dir=False, **settings)
    out = {}
    for name, ranking in (("before", rankings_before(res)), ("after", rankings_after(res))):
        for kind, ranked in ranking.items():
            base = kind.split(" [")[0]
            out[f"{name} {kind}"] = {f"top{k}": _hits(ranked, planted[base], k) for k in (10, 20)}
            out[f"{name} {kind}"].update(planted=len(planted[base]), listed=len(ranked))
    return out


# --------------------------------------------------------------------------------------------------- scale
WHOLE = """
import json, os, sys, time
t = time.perf_counter()
from featx.audit import audit
res = audit(sys.argv[1], report_dir=sys.argv[2], overwrite=True)
wall = time.perf_counter() - t
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
sizes = {f.name: f.stat().st_size for f in __import__("pathlib").Path(sys.argv[2]).iterdir()}
print(json.dumps({"seconds": round(wall, 1), "peak_rss_mb": round(int(hwm) / 1024), "steps": res.info["seconds"],
                  "files": sizes, "load_after": os.getloadavg()}))
"""


def scale(work: Path, n: int, dim: int, code: list) -> dict:
    """The whole audit (every check, every report file) of a synthetic n x dim store, in a fresh process per code
    tree (``code``: repository roots, e.g. main and this branch, run one after the other on the same store)."""
    import os
    import subprocess

    from bench_audit import synthetic_store

    store = work / f"synthetic-{n}x{dim}.npz"
    if not store.exists():
        synthetic_store(store, n, dim)
    out = {}
    for root in code:
        env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "2", "OPENBLAS_NUM_THREADS": "2"}
        load = os.getloadavg()
        shutil.rmtree(work / f"scale-report-{Path(root).name}", ignore_errors=True)
        r = subprocess.run([sys.executable, "-c", WHOLE, str(store), str(work / f"scale-report-{Path(root).name}")],
                           env=env, capture_output=True, text=True, cwd=str(root))  # -c: cwd comes first on sys.path
        doc = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {"error": r.stderr[-2000:]}
        doc["load_before"] = load
        out[str(root)] = doc
        print(root, json.dumps(doc), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["plant", "extract", "recall", "scale"])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--code", nargs="+", default=[str(ROOT)], help="scale: repository roots to time, in turn")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    if a.what == "plant":
        print(json.dumps(plant(a.data, a.work), indent=1))
    elif a.what == "scale":
        scale(a.work, a.n, a.dim, a.code)
    elif a.what == "extract":
        print(extract(a.work))
    else:
        for kind, r in recall(a.work).items():
            print(f"{kind:45s} top10 {r['top10']:2d}  top20 {r['top20']:2d}  of {r['planted']:2d}  "
                  f"(list {r['listed']})")


if __name__ == "__main__":
    main()
