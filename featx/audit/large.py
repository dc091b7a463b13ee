"""The audit's large-n path: one approximate k-NN graph (faiss IVF on a PCA projection), a store read shard by shard.

Above ``large_above()`` rows (100,000; ``FEATX_AUDIT_LARGE_ABOVE`` or ``large_above=`` lowers it) and with faiss
installed, ``featx audit`` (``--index auto``) stops using the exact O(n^2) search of :mod:`featx.audit.neighbors`:

1. the store is read shard by shard (memory-mapped, each shard unmapped before the next; ``ShardedStore.load`` is
   never called) into ONE normalised float32 copy, the only full-dimension copy held (an ``.npz`` read here is
   normalised in place): at 1M x 1,280 that is 1x the features, where the exact path holds ~5x;
2. a PCA (``PROJECT_DIM`` components) is fitted on a random sample of it and every row projected (N x 256);
3. a faiss ``IndexIVFFlat`` (inverted lists over k-means cells) is trained on a sample of the projection and holds
   it; every row asks it for its ``want`` nearest rows (``nprobe`` cells searched);
4. that one k-NN graph serves every check: near-duplicate candidates are its edges within the duplicate radius in
   the projection, each re-measured in the full dimension (kept at cosine >= threshold); the nearest image (the
   closest in the full dimension of the first ``NEAREST_OF``) and the k-th neighbour (outlier score) are
   re-measured too; the own-class k-th distance and the
   neighbours' label vote are read off the graph;
5. the label check's out-of-fold probabilities come from a logistic head on the projection, each fold's head fitted
   on a random sample of the other folds (``LABEL_TRAIN_ROWS``): every row still gets a probability from a head
   that never saw it, at a fraction of the cost of 5 full fits in 1,280 dimensions.

What it gives up against the exact path (said in the report's notes): a duplicate pair is found when one image is
among the other's ``want`` nearest in the projection and in a probed cell; recall of planted pairs and agreement
with the exact nearest neighbour are measured by ``benchmarks/bench_audit_large.py`` (BENCHMARKS.md).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import numpy as np

from ..errors import DataError, UsageError

INDEXES = ("auto", "exact", "faiss")
LARGE_ABOVE = 100_000  # --index auto: rows above which the approximate path runs (when faiss is installed)
ENV_LARGE_ABOVE = "FEATX_AUDIT_LARGE_ABOVE"
# --index auto without faiss: up to this many times `large_above` rows the exact search runs with a note (100k: 200 s,
# 3.5x the features, BENCHMARKS.md); beyond, it is refused before any work (n^2: 400k would be ~1 h, 1M ~25 GB)
EXACT_AUTO_FACTOR = 4
FAISS_HINT = "pip install 'featx[faiss]'"
PROJECT_DIM = 256  # as the exact path's projection (neighbors.PROJECT_DIM)
PCA_SAMPLE = 20_000  # rows the PCA is fitted on
BLOCK = 16_384  # rows normalised / searched / re-measured at a time (a 1,280-d block is 84 MB)
RERANK = 3  # the graph keeps RERANK * k neighbours per row (duplicate candidates, own-class k-th)
# the nearest image: the closest, in the full dimension, of the first NEAREST_OF graph neighbours (each one more
# full-dimension row read per image: the re-measure dominates the path's time at a million rows)
NEAREST_OF = 3
# IVF cells 2 sqrt(n) (2,000 at a million rows), 8 searched per query. Measured on a 150,000-row planted store
# (bench_audit_large.py, PCA-256, load 6 on 2 cores): the 10 nearest in the projection were found at 0.997 (8 cells
# searched) / 0.999 (16) / 1.0 (32), and the exact nearest image sat in the first 3 at 0.937 whatever the setting:
# the projection, not the index, limits it. 8 cells cost half of 16; at 1M rows 4 sqrt(n) cells cost the same per
# query (more cells to rank, fewer rows per cell) but 4x the k-means training. HNSW (M=32) searched a little faster
# (recall 0.99) but took as long to build at 150,000 rows as IVF took to train, and builds grow faster than IVF's.
NPROBE = 8
CELLS_PER_SQRT_N = 2
TRAIN_PER_CELL = 40  # k-means training rows per IVF cell (faiss warns below 39)
KMEANS_ITER = 10  # k-means iterations for the cells (faiss: 25); cells need not be optimal, only balanced
LABEL_TRAIN_ROWS = 100_000  # rows each fold's logistic head is fitted on (label check, large path)


def large_above(value: Optional[int] = None) -> int:
    if value is not None:
        return int(value)
    env = os.environ.get(ENV_LARGE_ABOVE)
    if env:
        try:
            return int(env)
        except ValueError:
            raise UsageError(f"{ENV_LARGE_ABOVE}={env!r} is not a whole number of rows") from None
    return LARGE_ABOVE


def has_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def require_faiss() -> None:
    if not has_faiss():
        raise UsageError(f"--index faiss needs faiss: {FAISS_HINT} (or pip install faiss-cpu); or use --index exact")


def choose(index: str, n: int, above: Optional[int] = None) -> tuple:
    """("exact" | "faiss", note or None): the search ``--index`` asks for on ``n`` rows."""
    if index not in INDEXES:
        raise UsageError(f"unknown --index {index!r} (choose from {', '.join(INDEXES)})")
    if index == "exact":
        return "exact", None
    if index == "faiss":
        require_faiss()
        return "faiss", None
    limit = large_above(above)
    if n <= limit:
        return "exact", None
    if not has_faiss() and n > EXACT_AUTO_FACTOR * limit:  # hours, and more memory than most machines: ask first
        raise UsageError(f"{n:,} rows: without faiss the exact neighbour search would take hours and ~5x the "
                         f"features in memory; install it ({FAISS_HINT}) or pass --index exact to run it anyway")
    if not has_faiss():
        return "exact", (f"{n} rows: the exact neighbour search grows as n^2 (hours, and memory ~5x the features, at "
                         f"a million rows); above {limit} rows `featx audit` uses an approximate faiss index when "
                         f"faiss is installed: {FAISS_HINT}")
    return "faiss", None


# ------------------------------------------------------------------------------------------------------ the rows
@dataclass
class StoreRows:
    """What the audit needs of a store without its features in memory: paths, labels, splits, meta, and the
    features read a block (or a gathered set of rows) at a time from ``store`` (a ShardedStore) or ``array``."""

    paths: list
    labels: Optional[np.ndarray]
    splits: Optional[np.ndarray]
    classes: list
    meta: dict
    dim: int
    store: object = None
    array: Optional[np.ndarray] = None
    owned: bool = False  # array may be normalised in place (a FeatureSet this audit read itself)
    bounds: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))

    def __len__(self) -> int:
        return len(self.paths)

    @classmethod
    def from_featureset(cls, fs, owned: bool = False) -> "StoreRows":
        return cls(paths=fs.paths, labels=fs.labels, splits=fs.splits, classes=fs.classes, meta=fs.meta,
                   dim=fs.dim, array=fs.features, owned=owned)

    @classmethod
    def from_sharded(cls, store) -> "StoreRows":
        """Paths, labels and splits of every shard (small); features stay on disk, mapped when read."""
        paths, labels, splits = [], [], []
        for i in range(len(store.shards)):
            rows = store.rows(i)
            paths.extend(rows["paths"].tolist())
            labels.append(rows["labels"])
            splits.append(rows["splits"])
        join = (lambda vs: None if not vs or any(v is None for v in vs) else np.concatenate(vs).astype(str))
        bounds = np.cumsum([0] + [int(s["n"]) for s in store.shards]).astype(np.int64)
        return cls(paths=paths, labels=join(labels), splits=join(splits), classes=list(store.classes),
                   meta=dict(store.meta), dim=int(store.dim), store=store, bounds=bounds)

    def blocks(self, size: int = BLOCK) -> Iterator[tuple]:
        """(start, float32 rows) in row order, ``size`` rows at a time (never crossing a shard: a shard is mapped,
        read and unmapped in turn, so its pages leave this process's memory)."""
        if self.store is None:
            for lo in range(0, len(self), size):
                yield lo, np.array(self.array[lo:lo + size], dtype=np.float32)  # a copy: callers work in place
            return
        for i in range(len(self.store.shards)):
            m = self.store.features(i)
            for lo in range(0, len(m), size):
                yield int(self.bounds[i]) + lo, np.array(m[lo:lo + size], dtype=np.float32)
            del m

    def normalised(self) -> np.ndarray:
        """All rows normalised (featx.audit.neighbors.normalise) in one float32 N x D array, filled block by block:
        the one full-dimension copy the path holds (a store's shards are mapped one at a time and unmapped; an
        array this object owns is normalised in place)."""
        if self.store is None and self.owned and self.array.dtype == np.float32:
            X = self.array
            self.array = None  # the rows are now the normalised ones: nothing else may read them as features
            for lo in range(0, len(X), BLOCK):
                _check_finite(X[lo:lo + BLOCK], lo)
                _normalise_inplace(X[lo:lo + BLOCK])
            return X
        X = np.empty((len(self), self.dim), dtype=np.float32)
        for lo, block in self.blocks():
            _check_finite(block, lo)
            _normalise_inplace(block)
            X[lo:lo + len(block)] = block
        return X

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The listed rows (any order, repeats allowed) as float32, gathered shard by shard."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.store is None:
            return np.asarray(self.array[rows], dtype=np.float32)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        order = np.argsort(rows, kind="stable")
        srt = rows[order]
        shard = np.searchsorted(self.bounds, srt, side="right") - 1
        cuts = np.flatnonzero(np.r_[True, shard[1:] != shard[:-1], True])
        for a, b in zip(cuts[:-1], cuts[1:]):
            s = int(shard[a])
            m = self.store.features(s)
            out[order[a:b]] = m[srt[a:b] - self.bounds[s]]
            del m
        return out


def open_rows(features, owned: bool = False) -> StoreRows:
    """A StoreRows for a path (a sharded store stays on disk; an .npz or Parquet file is read and owned) or a
    FeatureSet (``owned``: its features may be normalised in place)."""
    from ..features import formats
    from ..features.store import FeatureSet, load_features

    if isinstance(features, FeatureSet):
        return StoreRows.from_featureset(features, owned=owned)
    if formats.format_of(features) == "sharded":
        from ..features.sharded import open_sharded

        return StoreRows.from_sharded(open_sharded(features))
    return StoreRows.from_featureset(load_features(features), owned=True)


def count_rows(features) -> Optional[int]:
    """Rows of a sharded store from its manifest (cheap); None for other formats (they are read to be counted)."""
    from ..features import formats

    if formats.format_of(features) != "sharded":
        return None
    from ..features.sharded import read_manifest

    return int(read_manifest(features)["n"])


# ------------------------------------------------------------------------------------------------------ the graph
@dataclass
class Graph:
    """Every row's ``want`` nearest other rows in the projection, and what was re-measured in the full dimension."""

    neighbours: np.ndarray  # N x want row indices, nearest (in the projection) first; -1 = none found
    proj_sims: np.ndarray  # N x want cosines in the projection (1 - d^2 / 2; an upper bound of the true cosine)
    nearest: np.ndarray  # N: the first neighbour
    nearest_sim: np.ndarray  # N: its cosine, full dimension
    kth_sim: np.ndarray  # N: cosine of the k-th neighbour, full dimension
    pairs: tuple  # (i, j, cosine) with i < j, cosine >= threshold in the full dimension
    Z: np.ndarray  # N x d projection (the label check's head reads it)
    info: dict


def _check_finite(block: np.ndarray, start: int) -> None:
    if not np.isfinite(block).all():
        bad = start + int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
        raise DataError(f"the features contain NaN or Inf values (row {bad} first); re-extract them "
                        "(`featx extract ... --overwrite`)")


def _normalise_inplace(c: np.ndarray) -> None:
    """featx.audit.neighbors.normalise, in place on a float32 block (signed square root, unit rows)."""
    np.copysign(np.sqrt(np.abs(c)), c, out=c)
    c /= np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)


def build_graph(rows: StoreRows, *, k: int, threshold: Optional[float], seed: int = 0,
                dim: Optional[int] = None, nprobe: int = NPROBE,
                progress: Optional[Callable[[int, int], None]] = None) -> Graph:
    """Project, index, search and re-measure (see the module docstring). ``threshold`` None: no duplicate pairs."""
    import faiss
    from sklearn.decomposition import PCA

    n, D = len(rows), rows.dim
    rng = np.random.default_rng(seed)
    info, sec = {}, {}
    t = time.perf_counter()
    X = rows.normalised()
    d = min(PROJECT_DIM if dim is None else dim, D)
    Z = X
    if d < D:
        sample = np.sort(rng.choice(n, min(n, PCA_SAMPLE), replace=False))
        pca = PCA(n_components=min(d, len(sample)), svd_solver="randomized", iterated_power=2,
                  random_state=seed).fit(X[sample])
        d = pca.n_components_
        info["pca_variance"] = round(float(pca.explained_variance_ratio_.sum()), 4)
        Z = np.empty((n, d), dtype=np.float32)
        for lo in range(0, n, BLOCK):
            Z[lo:lo + BLOCK] = pca.transform(X[lo:lo + BLOCK])
    sec["project"] = round(time.perf_counter() - t, 2)

    t = time.perf_counter()
    nlist = int(max(1, min(round(CELLS_PER_SQRT_N * np.sqrt(n)), n // TRAIN_PER_CELL)))
    quantizer = faiss.IndexFlatL2(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_L2)
    train = Z if n <= nlist * TRAIN_PER_CELL else Z[np.sort(rng.choice(n, nlist * TRAIN_PER_CELL, replace=False))]
    index.cp.seed = seed  # k-means seed: the same store gives the same cells
    index.cp.niter = KMEANS_ITER
    index.train(np.ascontiguousarray(train))
    for lo in range(0, n, 65536):
        index.add(Z[lo:lo + 65536])
    index.nprobe = min(nlist, nprobe)
    sec["index"] = round(time.perf_counter() - t, 2)
    info.update(nlist=nlist, nprobe=int(index.nprobe), searched_dim=int(d))

    want = max(1, min(n - 1, RERANK * k))
    kk = min(k, want)
    r2 = None if threshold is None else max(0.0, 2.0 - 2.0 * threshold) + 1e-4
    neighbours = np.full((n, want), -1, dtype=np.int64)
    proj = np.full((n, want), -np.inf, dtype=np.float32)
    nearest = np.full(n, -1, dtype=np.int64)
    nearest_sim = np.full(n, np.nan, dtype=np.float32)
    kth_sim = np.full(n, np.nan, dtype=np.float32)
    pi, pj, ps = [], [], []
    t_search = t_exact = 0.0
    for lo in range(0, n, BLOCK):
        hi = min(n, lo + BLOCK)
        t = time.perf_counter()
        dist, idx = index.search(Z[lo:hi], want + 1)  # +1: a row usually finds itself
        own = np.arange(lo, hi)[:, None]
        dist = np.where((idx == own) | (idx < 0), np.inf, dist)
        order = np.argsort(dist, axis=1, kind="stable")[:, :want]
        dist = np.take_along_axis(dist, order, axis=1)
        idx = np.where(np.isfinite(dist), np.take_along_axis(idx, order, axis=1), -1)
        neighbours[lo:hi] = idx
        proj[lo:hi] = np.where(np.isfinite(dist), 1.0 - dist / 2.0, -np.inf)
        t_search += time.perf_counter() - t
        t = time.perf_counter()
        # full-dimension re-measure: the nearest, the k-th, and every duplicate candidate (radius in the projection:
        # a projection never lengthens a difference, so no pair at cosine >= threshold is lost at this step)
        need = np.zeros(idx.shape, dtype=bool)
        need[:, :NEAREST_OF] = True
        need[:, kk - 1] = True
        if r2 is not None:
            need |= dist <= r2
        need &= idx >= 0
        qi, qc = np.nonzero(need)
        sims = np.empty(len(qi), dtype=np.float32)
        for s in range(0, len(qi), BLOCK):
            e = min(len(qi), s + BLOCK)
            sims[s:e] = np.einsum("ij,ij->i", X[lo + qi[s:e]], X[idx[qi[s:e], qc[s:e]]])
        exact = np.full(idx.shape, np.nan, dtype=np.float32)
        exact[qi, qc] = sims
        best = np.argmax(np.where(np.isnan(exact[:, :NEAREST_OF]), -np.inf, exact[:, :NEAREST_OF]), axis=1)
        first = np.arange(len(idx))
        nearest[lo:hi] = idx[first, best]
        nearest_sim[lo:hi] = exact[first, best]
        kth_sim[lo:hi] = exact[:, kk - 1]
        if r2 is not None:
            dup = need & (dist <= r2) & (exact >= threshold)
            a, c = np.nonzero(dup)
            i, j = a + lo, idx[a, c]
            pi.append(np.minimum(i, j))
            pj.append(np.maximum(i, j))
            ps.append(exact[a, c])
        t_exact += time.perf_counter() - t
        if progress:
            progress(hi, n)
    del index, X
    sec.update(search=round(t_search, 2), exact=round(t_exact, 2))
    pairs = _unique_pairs(pi, pj, ps)
    info.update(want=want, seconds=sec, candidate_pairs=None if r2 is None else int(sum(len(p) for p in pi)))
    return Graph(neighbours=neighbours, proj_sims=proj, nearest=nearest, nearest_sim=nearest_sim,
                 kth_sim=kth_sim, pairs=pairs, Z=Z, info=info)


def _unique_pairs(pi: list, pj: list, ps: list) -> tuple:
    if not pi or not sum(len(p) for p in pi):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    i, j, s = np.concatenate(pi), np.concatenate(pj), np.concatenate(ps)
    key = np.unique(i * (int(j.max()) + 1) + j, return_index=True)[1]  # a pair found from both ends counts once
    return i[key].astype(np.int64), j[key].astype(np.int64), s[key].astype(np.float32)


def class_kth_distance(graph: Graph, labels: Optional[np.ndarray], k: int) -> np.ndarray:
    """Per row, the projected cosine distance to its k-th nearest image of its own class among its ``want`` graph
    neighbours; a row with fewer own-class neighbours there gets the distance to its farthest graph neighbour (a
    lower bound: its class is farther still). NaN for an unlabelled row."""
    n = len(graph.neighbours)
    out = np.full(n, np.nan)
    if labels is None:
        return out
    labels = np.asarray(labels).astype(str)
    named = labels != ""
    codes = np.unique(labels, return_inverse=True)[1]
    nb = graph.neighbours
    same = (nb >= 0) & (codes[np.maximum(nb, 0)] == codes[:, None])
    count = np.cumsum(same, axis=1)
    hit = same & (count == k)
    dist = 1.0 - graph.proj_sims.astype(np.float64)
    found = hit.any(axis=1)
    kth = np.where(found, dist[np.arange(n), hit.argmax(axis=1)], np.nan)
    valid = np.isfinite(dist)
    farthest = np.where(valid, dist, -np.inf).max(axis=1)
    out[named] = np.where(found, kth, farthest)[named]
    return out


__all__ = ["choose", "open_rows", "count_rows", "build_graph", "StoreRows", "Graph", "large_above", "LARGE_ABOVE",
           "INDEXES", "FAISS_HINT"]
