"""Issue 26 item 4: `featx audit` at a million rows, planted-duplicate recall, agreement with exact search.

    python benchmarks/bench_audit_large.py make --n 1000000 --out /work/scratch-c/planted-1m [--pairs 5000]
    flock /work/big.lock python benchmarks/bench_audit_large.py run /work/scratch-c/planted-1m [--queries 2000]

make: a sharded store of n x dim synthetic embeddings written shard by shard (never whole in memory): ReLU of a
128-d latent (10 classes, 50 sub-clusters each) mapped to dim dimensions plus isotropic noise, so that, as with a CNN
embedding, PCA keeps most of the variance in 256 components (82% here) and no two distinct rows reach cosine 0.88;
then `--pairs` near-duplicates planted over it: a copy of an earlier row (same shard or any earlier one) with
multiplicative noise of sd 5-75% (cosine after featx's normalisation ~0.999 down to ~0.87, below the threshold),
written over a random row. The planted (source, copy) pairs go to OUT/planted.json.
run: in a fresh process, `featx.audit(store)` (``--index auto``: the faiss path above 100,000 rows) writing its
report folder; then seconds per step, peak RSS (VmHWM) in GB and as a multiple of the float32 features, recall of
the planted pairs whose exact cosine reaches the threshold (both rows in one duplicate group), and on a random
sample of ``--queries`` rows the exact nearest other row and k-th neighbour distance by brute force over the whole
store (streamed shard by shard): agreement of the report's nearest image with it, and of the k-th distance.
Load averages are printed: this machine is shared.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARD = 65536
LATENT = 128


def _vmhwm_gb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1e6
    return float("nan")


def _load() -> list:
    return [round(x, 2) for x in os.getloadavg()]


def make(out: Path, n: int, dim: int, pairs: int, seed: int = 0, classes: int = 10) -> dict:
    from featx.features.sharded import ShardWriter

    rng = np.random.default_rng(seed)
    W = (rng.normal(size=(LATENT, dim)) / np.sqrt(LATENT)).astype(np.float32)
    centres = rng.normal(0, 1.0, (classes, LATENT)).astype(np.float32)
    subs = (centres[:, None, :] + rng.normal(0, 0.7, (classes, 50, LATENT))).astype(np.float32)
    names = [f"class{k}" for k in range(classes)]
    copies_per_shard = max(1, pairs * SHARD // n)
    planted, pool = [], []  # pool: (row, features) of earlier rows a later copy may take
    t0 = time.perf_counter()
    w = ShardWriter(out, dim=dim, classes=names, meta={"backbone": "synthetic-latent", "weights_sha256": "none",
                                                      "feature_dim": dim}, shard_size=SHARD)
    for lo in range(0, n, SHARD):
        m = min(SHARD, n - lo)
        y = rng.integers(0, classes, m)
        z = subs[y, rng.integers(0, 50, m)] + rng.normal(0, 1.0, (m, LATENT)).astype(np.float32)
        x = np.maximum(z @ W + rng.normal(0, 0.5, (m, dim)).astype(np.float32), 0)
        k = min(copies_per_shard, pairs - len(planted), m // 2)
        if k > 0:
            dst = rng.choice(m, k, replace=False)
            for c, d in enumerate(dst.tolist()):
                if pool and c % 2:  # half the copies come from an earlier shard
                    src, feat, y[d] = pool[int(rng.integers(len(pool)))]
                else:
                    src = int(rng.integers(m))
                    while src in dst:
                        src = int(rng.integers(m))
                    feat, src = x[src].copy(), lo + src
                    y[d] = y[src - lo]
                x[d] = feat * (1 + rng.normal(0, rng.uniform(0.05, 0.75), dim)).astype(np.float32)
                planted.append((int(src), lo + d))
        copies = set(dst.tolist()) if k > 0 else set()
        pool.extend((lo + int(r), x[r].copy(), y[r]) for r in rng.choice(m, min(m, 64), replace=False)
                    if int(r) not in copies)  # a copy is not itself copied: each planted pair stays a pair
        pool = pool[-4096:]
        idx = np.arange(lo, lo + m)
        w.add(x, [f"{names[c]}/img{i:08d}.jpg" for c, i in zip(y, idx)], [names[c] for c in y],
              np.where(idx % 5 == 0, "val", "train"))
    w.close()
    info = {"n": n, "dim": dim, "planted": len(planted), "write_s": round(time.perf_counter() - t0, 1)}
    (out / "planted.json").write_text(json.dumps({"pairs": planted, **info}))
    return info


def _exact_sample(store, queries: np.ndarray, k: int) -> tuple:
    """Brute force over every row, shard by shard: the exact nearest other row and k-th neighbour cosine."""
    from featx.audit.large import StoreRows
    from featx.audit.neighbors import normalise

    rows = StoreRows.from_sharded(store)
    Q = normalise(rows.take(queries))
    best = np.full((len(queries), k), -np.inf, dtype=np.float32)
    best_i = np.full((len(queries), k), -1, dtype=np.int64)
    for lo, block in rows.blocks(16384):
        S = Q @ normalise(block).T
        S[queries[:, None] == np.arange(lo, lo + len(block))[None, :]] = -np.inf  # not itself
        allS = np.hstack([best, S])
        alli = np.hstack([best_i, np.broadcast_to(np.arange(lo, lo + len(block)), S.shape)])
        top = np.argpartition(-allS, k - 1, axis=1)[:, :k]
        best, best_i = np.take_along_axis(allS, top, 1), np.take_along_axis(alli, top, 1)
    order = np.argsort(-best, axis=1)
    return np.take_along_axis(best_i, order, 1), np.take_along_axis(best, order, 1)


def run_child(store: str, report: str, queries: int, k: int, index: str) -> dict:
    import featx  # noqa: F401
    from featx.audit import audit
    from featx.features.sharded import open_sharded

    st = open_sharded(store)
    feats_gb = st.n * st.dim * 4 / 1e9
    load0 = _load()
    t0 = time.perf_counter()
    res = audit(store, report_dir=report, overwrite=True, index=index, k=k)
    total = time.perf_counter() - t0
    peak = _vmhwm_gb()
    out = {"n": st.n, "dim": st.dim, "features_gb": round(feats_gb, 2), "index": index, "seconds_total": round(total, 1),
           "seconds": res.info["seconds"], "search": res.info["search"], "peak_rss_gb": round(peak, 2),
           "peak_over_features": round(peak / feats_gb, 2), "findings": {
               "duplicate_groups": len(res.duplicates), "similar_pairs": res.info.get("n_similar_pairs"),
               "label_issues": len(res.label_issues), "outliers": len(res.outliers)},
           "labels": res.info.get("labels"), "notes": res.info["notes"], "load_before": load0, "load_after": _load()}
    cols = res.scores.columns
    group = np.array([-1 if g is None else g for g in cols["duplicate_group"]])
    planted_file = Path(store) / "planted.json"
    from featx.audit.large import StoreRows
    from featx.audit.neighbors import normalise

    rows = StoreRows.from_sharded(st)
    if planted_file.is_file():
        pairs = np.array(json.loads(planted_file.read_text())["pairs"], dtype=np.int64)
        a, b = normalise(rows.take(pairs[:, 0])), normalise(rows.take(pairs[:, 1]))
        cos = np.einsum("ij,ij->i", a, b)
        real = cos >= res.info["settings"]["threshold"]
        found = (group[pairs[:, 0]] >= 0) & (group[pairs[:, 0]] == group[pairs[:, 1]])
        out["planted"] = {"pairs": int(len(pairs)), "at_threshold_exactly": int(real.sum()),
                          "found": int((found & real).sum()), "recall": round(float(found[real].mean()), 4),
                          "cosine_range": [round(float(cos.min()), 3), round(float(cos.max()), 3)]}
    t = time.perf_counter()
    rng = np.random.default_rng(1)
    q = np.sort(rng.choice(st.n, min(queries, st.n), replace=False))
    ex_i, ex_s = _exact_sample(st, q, k)
    paths = cols["path"]
    nearest = np.array([cols["nearest"][i] == paths[ex_i[n, 0]] for n, i in enumerate(q.tolist())])
    exact_kth = 1.0 - ex_s[:, k - 1]
    got_kth = np.asarray(cols["knn_distance"], dtype=np.float64)[q]
    in_top = np.array([cols["nearest"][i] in {paths[j] for j in ex_i[n].tolist()} for n, i in enumerate(q.tolist())])
    out["sample"] = {"queries": int(len(q)), "nearest_equals_exact": round(float(nearest.mean()), 4),
                     "nearest_in_exact_top_k": round(float(in_top.mean()), 4),
                     "kth_distance_corr": round(float(np.corrcoef(exact_kth, got_kth)[0, 1]), 4),
                     "kth_distance_ratio_median": round(float(np.median(got_kth / exact_kth)), 4),
                     "seconds": round(time.perf_counter() - t, 1)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--n", type=int, default=1_000_000)
    m.add_argument("--dim", type=int, default=1280)
    m.add_argument("--pairs", type=int, default=5000)
    m.add_argument("--out", required=True)
    r = sub.add_parser("run")
    r.add_argument("store")
    r.add_argument("--report", default=None, help="report folder (default: STORE-audit beside the store)")
    r.add_argument("--queries", type=int, default=2000)
    r.add_argument("--k", type=int, default=10)
    r.add_argument("--index", default="auto")
    c = sub.add_parser("_child")
    c.add_argument("store")
    c.add_argument("report")
    c.add_argument("queries", type=int)
    c.add_argument("k", type=int)
    c.add_argument("index")
    a = ap.parse_args()
    if a.cmd == "make":
        print(json.dumps(make(Path(a.out), a.n, a.dim, a.pairs), indent=1))
    elif a.cmd == "_child":
        print(json.dumps(run_child(a.store, a.report, a.queries, a.k, a.index)))
    else:
        report = a.report or str(Path(a.store).with_name(Path(a.store).name + "-audit"))
        p = subprocess.run([sys.executable, __file__, "_child", a.store, report, str(a.queries), str(a.k), a.index],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT),
                                                                "FEATX_NO_PROGRESS": "1"})
        if p.returncode:
            sys.exit(p.stderr[-3000:])
        print(json.dumps(json.loads(p.stdout.strip().splitlines()[-1]), indent=1))


if __name__ == "__main__":
    main()
