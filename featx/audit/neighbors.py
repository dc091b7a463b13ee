"""Neighbour search for the audit: cosine near-duplicate pairs and k-th-neighbour distances, memory-bounded.

Features are square-rooted and L2-normalised (:func:`normalise`), so cosine similarity ``s`` and euclidean distance
``d`` are one thing: d^2 = 2 - 2s. For large N the search runs on an orthonormal PCA projection ``P`` of those
vectors and candidates are then re-checked exactly in the full dimension. A projection never lengthens a
difference (||P(x - y)|| <= ||x - y||), so every pair with cosine >= t lies within the radius sqrt(2 - 2t) in the
projection too: the projection only adds candidates (removed by the exact check), it never loses a true pair.

Backends (all give the same pairs; tests check it):
- ``numpy`` (default without faiss): row blocks of float32 matrix products (BLAS sgemm), the upper triangle only
  for pairs. Hand-written because it measured ~3x faster than scikit-learn's radius search on the same data
  (BENCHMARKS.md, "Audit"): sklearn's euclidean reduction upcasts float32 blocks to float64 and returns one array
  per query row; pairs also need only half the products.
- ``sklearn``: ``NearestNeighbors(algorithm="brute")`` radius / k-neighbour queries, block by block.
- ``faiss`` (``pip install faiss-cpu``): ``IndexFlatL2`` range and k-NN search; chosen by ``auto`` when installed.
No N x N matrix is ever held: a block of rows x N similarities at most (``BLOCK_MB``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ..errors import UsageError

BACKENDS = ("auto", "numpy", "sklearn", "faiss")
# Above this many rows the search runs on a projection (below it the exact full-dimension search takes seconds).
PROJECT_ABOVE = 20_000
PROJECT_DIM = 256  # components kept; BENCHMARKS.md ("Audit") has the speed / candidate-count measurement
PCA_SAMPLE = 10_000  # rows the PCA is fitted on (any orthonormal basis keeps the guarantee; a sample is enough)
BLOCK_MB = 256  # memory for one block of similarities (and its temporaries)
# k-NN for outliers: above this many rows each image is measured against a random reference sample of this size
# (with k scaled by the sample fraction), which keeps the outlier pass a fraction of the duplicate pass.
KNN_REFERENCE = 20_000
RERANK = 3  # on a projection, rerank this many times k candidates in the full dimension
_EPS = 1e-4  # float32 rounding slack on the radius: a true pair is never lost to the last bit


def normalise(X: np.ndarray) -> np.ndarray:
    """Signed square root of every value, then rows scaled to unit length (a float32 copy; a zero row stays zero).

    The square root ("power normalisation", Perronnin et al. 2010, a retrieval staple) damps the few large
    activations that dominate a CNN feature's cosine. Measured on hymenoptera with efficientnet_lite0
    (BENCHMARKS.md, "Audit"): of 180 resized / re-encoded / cropped copies, 171 scored above the closest pair of
    distinct photos with it, 142 without. It needs no dataset statistics, so a threshold means the same on any store.
    """
    X = np.array(X, dtype=np.float32, copy=True)
    for s in range(0, len(X), 8192):  # in place, a slab at a time: no full-size temporaries (100k x 1280 = 0.5 GB)
        c = X[s:s + 8192]
        np.copysign(np.sqrt(np.abs(c)), c, out=c)
        c /= np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    return X


@dataclass
class NeighborIndex:
    """The normalised features, the space searched (a projection, or the features themselves) and the backend."""

    X: np.ndarray  # N x D, unit rows
    Z: np.ndarray  # N x d, the searched space (d <= D)
    backend: str  # "numpy", "sklearn" or "faiss"
    projected: bool
    # numpy backend: Q_i . K_j = z_i . z_j - |z_i|^2 / 2 - |z_j|^2 / 2 = -d_ij^2 / 2, so one matrix product gives the
    # distances with no elementwise passes over the (memory-bound) block: Q = [z, -|z|^2/2, 1], K = [z, 1, -|z|^2/2]
    Q: Optional[np.ndarray] = None
    K: Optional[np.ndarray] = None
    candidates: int = 0  # pairs the last pair search re-checked in the full dimension

    def describe(self) -> dict:
        return {"backend": self.backend, "searched_dim": int(self.Z.shape[1]), "projected": self.projected,
                "candidate_pairs": int(self.candidates)}


def resolve_backend(name: str) -> str:
    if name not in BACKENDS:
        raise UsageError(f"unknown neighbour backend {name!r} (choose from {', '.join(BACKENDS)})")
    if name in ("numpy", "sklearn"):
        return name
    try:
        import faiss  # noqa: F401
    except ImportError:
        if name == "faiss":
            raise UsageError("--backend faiss needs faiss: pip install 'featx[faiss]' (or use --backend numpy)") from None
        return "numpy"
    return "faiss"


def build_index(features: np.ndarray, *, backend: str = "auto", project: Optional[bool] = None,
                dim: Optional[int] = None, seed: int = 0) -> NeighborIndex:
    """Normalise, and project to ``dim`` (default PROJECT_DIM) when N is large (or when ``project`` says so)."""
    X = normalise(features)
    n, d = X.shape
    dim = PROJECT_DIM if dim is None else dim
    if project is None:
        project = n > PROJECT_ABOVE and d > dim
    Z = _project(X, min(dim, d), seed) if project else X
    index = NeighborIndex(X=X, Z=Z, backend=resolve_backend(backend), projected=bool(project))
    if index.backend == "numpy":
        half = (-0.5 * np.einsum("ij,ij->i", Z, Z))[:, None].astype(np.float32)
        one = np.ones((n, 1), dtype=np.float32)
        index.Q = np.hstack([Z, half, one])
        index.K = np.hstack([Z, one, half])
    return index


def _project(X: np.ndarray, dim: int, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(seed)
    sample = X if len(X) <= PCA_SAMPLE else X[np.sort(rng.choice(len(X), PCA_SAMPLE, replace=False))]
    # 2 power iterations instead of sklearn's 7: same captured variance within 0.01 on 100k synthetic rows, 40% less time
    pca = PCA(n_components=dim, svd_solver="randomized", iterated_power=2, random_state=seed).fit(sample)
    # PCA.transform centres first; centring cancels in every difference, so distances are those of the projection.
    return np.ascontiguousarray(pca.transform(X), dtype=np.float32)


def block_rows(n_cols: int) -> int:
    """Query rows per block so that a block of float32 scores and its boolean mask (5 bytes each) fit in BLOCK_MB."""
    return int(max(16, min(8192, BLOCK_MB * 2**20 // (5 * max(1, n_cols)))))


class _Blocks:
    """One reusable buffer for the blocks of products (fresh 100+ MB arrays per block cost page faults)."""

    def __init__(self, rows: int, cols: int):
        self.buf = np.empty(rows * cols, dtype=np.float32)

    def scores(self, Q: np.ndarray, K: np.ndarray) -> np.ndarray:
        """Q @ K.T = -(squared distance) / 2 for every query x candidate pair, into the buffer."""
        out = self.buf[:len(Q) * len(K)].reshape(len(Q), len(K))
        return np.matmul(Q, K.T, out=out)


# --------------------------------------------------------------------------------------------------- pairs
def similar_pairs(index: NeighborIndex, threshold: float, *, max_pairs: Optional[int] = None,
                  progress: Optional[Callable[[int, int], None]] = None) -> tuple:
    """All pairs (i < j) with cosine(x_i, x_j) >= threshold, exactly: ``(i, j, cosine)`` arrays.

    ``max_pairs``: a threshold so low that most of the data pairs up (memory would follow) raises ValueError.
    """
    r2 = max(0.0, 2.0 - 2.0 * threshold) + _EPS
    n = len(index.X)
    found_i, found_j, found_s = [], [], []
    total = candidates = 0
    step = block_rows(n)
    engine = _engine(index, index.Z) if index.backend != "numpy" else _Blocks(step, n)
    for start in range(0, n, step):
        stop = min(n, start + step)
        rows, cols = _candidates(index, engine, start, stop, r2)
        keep = cols > rows  # each pair once, no self-pairs
        rows, cols = rows[keep], cols[keep]
        candidates += len(rows)
        sims = _exact_cosines(index.X, rows, cols)
        ok = sims >= threshold
        found_i.append(rows[ok])
        found_j.append(cols[ok])
        found_s.append(sims[ok])
        total += int(ok.sum())
        if max_pairs is not None and total > max_pairs:
            raise ValueError(total)
        if progress:
            progress(stop, n)
    cat = lambda parts, dt: np.concatenate(parts).astype(dt) if parts else np.zeros(0, dt)  # noqa: E731
    index.candidates = candidates  # how many pairs the (projected) search had to re-check exactly: a diagnostic
    return cat(found_i, np.int64), cat(found_j, np.int64), cat(found_s, np.float32)


def _engine(index: NeighborIndex, data: np.ndarray):
    if index.backend == "faiss":
        import faiss

        engine = faiss.IndexFlatL2(data.shape[1])
        engine.add(np.ascontiguousarray(data, dtype=np.float32))
        return engine
    if index.backend == "sklearn":
        from sklearn.neighbors import NearestNeighbors

        return NearestNeighbors(algorithm="brute", metric="euclidean").fit(data)
    return None


def _candidates(index: NeighborIndex, engine, start: int, stop: int, r2: float) -> tuple:
    """(row, col) pairs within squared distance r2 in the searched space, query rows start..stop."""
    if index.backend == "numpy":  # columns from `start` on: the pairs below the diagonal were seen already
        S = engine.scores(index.Q[start:stop], index.K[start:])
        flat = np.flatnonzero(S.reshape(-1) >= -0.5 * r2)
        rows, cols = np.divmod(flat, S.shape[1])
        return rows.astype(np.int64) + start, cols.astype(np.int64) + start
    q = index.Z[start:stop]
    if index.backend == "faiss":
        lims, _, cols = engine.range_search(q, r2)  # faiss L2 radii are squared
        counts = np.diff(lims).astype(np.int64)  # faiss gives uint64 limits; np.repeat wants int64
        cols = np.asarray(cols, dtype=np.int64)
    else:
        from sklearn import config_context

        with config_context(working_memory=BLOCK_MB):
            neigh = engine.radius_neighbors(q, radius=float(np.sqrt(r2)), return_distance=False)
        counts = np.fromiter((len(a) for a in neigh), dtype=np.int64, count=len(neigh))
        cols = np.concatenate(neigh).astype(np.int64) if len(neigh) else np.zeros(0, np.int64)
    return np.repeat(np.arange(start, stop, dtype=np.int64), counts), cols


def _exact_cosines(X: np.ndarray, rows: np.ndarray, cols: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Cosine of each listed pair in the full dimension, a chunk of pairs at a time into two reused buffers
    (fresh 300 MB gathers per chunk made this step 2x slower than the search itself: page faults)."""
    out = np.empty(len(rows), dtype=np.float32)
    a = np.empty((min(chunk, len(rows)), X.shape[1]), dtype=X.dtype)
    b = np.empty_like(a)
    for s in range(0, len(rows), chunk):
        m = min(chunk, len(rows) - s)
        np.take(X, rows[s:s + m], axis=0, out=a[:m])
        np.take(X, cols[s:s + m], axis=0, out=b[:m])
        out[s:s + m] = np.einsum("ij,ij->i", a[:m], b[:m])
    return out


# --------------------------------------------------------------------------------------------------- k-NN
@dataclass
class KnnResult:
    distance: np.ndarray  # N: cosine distance (1 - cosine) to the k-th nearest image of the reference set
    k: int  # the k used (scaled down when the reference is a sample)
    reference: int  # reference images (all N, or a random sample)
    # N x m: the m nearest other images of the reference set (row indices, nearest first) and their cosines, for the
    # scores table (nearest image) and the label check's neighbour vote; m = the k asked for, not the scaled one
    neighbours: Optional[np.ndarray] = None
    similarities: Optional[np.ndarray] = None


def kth_neighbour_distance(index: NeighborIndex, k: int, *, seed: int = 0,
                           progress: Optional[Callable[[int, int], None]] = None) -> KnnResult:
    """Cosine distance from every image to its k-th nearest other image.

    Up to KNN_REFERENCE images: exact (on a projection: the RERANK * k nearest in the projection re-measured in
    the full dimension). Beyond: against a random sample of KNN_REFERENCE images with k scaled by the sample
    fraction (at least 1): the same density estimate at a fraction of the cost (kNN outlier scores on subsamples:
    Zimek et al. 2013).
    """
    n = len(index.X)
    ref = np.arange(n) if n <= KNN_REFERENCE else np.sort(
        np.random.default_rng(seed).choice(n, KNN_REFERENCE, replace=False))
    kk = max(1, min(len(ref) - 1, round(k * len(ref) / n)))
    m = max(1, min(len(ref) - 1, k))  # neighbours kept per image
    want = min(len(ref), (max(kk, m) * RERANK if index.projected else max(kk, m)) + 1)  # +1: it may find itself
    # a smaller block than the pair search: the re-measure gathers block x want x D floats
    step = int(max(16, min(block_rows(len(ref)), BLOCK_MB * 2**20 // (4 * want * index.X.shape[1]))))
    engine = _engine(index, index.Z[ref]) if index.backend != "numpy" else (_Blocks(step, len(ref)), index.K[ref])
    out = np.empty(n, dtype=np.float32)
    near = np.empty((n, m), dtype=np.int64)
    near_sims = np.empty((n, m), dtype=np.float32)
    for start in range(0, n, step):
        stop = min(n, start + step)
        nbrs = _nearest(index, engine, start, stop, want)  # indices into ref
        rows = np.arange(start, stop)
        sims = np.einsum("id,ijd->ij", index.X[start:stop], index.X[ref[nbrs]])
        sims[ref[nbrs] == rows[:, None]] = -np.inf  # not its own neighbour (an identical copy still counts)
        kth = -np.partition(-sims, kk - 1, axis=1)[:, kk - 1]
        out[start:stop] = 1.0 - kth
        order = np.argsort(-sims, axis=1, kind="stable")[:, :m]
        near[start:stop] = ref[np.take_along_axis(nbrs, order, axis=1)]
        near_sims[start:stop] = np.take_along_axis(sims, order, axis=1)
        if progress:
            progress(stop, n)
    return KnnResult(distance=out, k=int(kk), reference=int(len(ref)), neighbours=near, similarities=near_sims)


def subset(index: NeighborIndex, rows: np.ndarray) -> NeighborIndex:
    """The index restricted to ``rows`` (already normalised and projected: nothing is recomputed but Q and K)."""
    X, Z = index.X[rows], index.Z[rows]
    sub = NeighborIndex(X=X, Z=Z, backend=index.backend, projected=index.projected)
    if sub.backend == "numpy":
        sub.Q, sub.K = index.Q[rows], index.K[rows]  # each row's terms depend on that row alone
    return sub


def _nearest(index: NeighborIndex, engine, start: int, stop: int, want: int) -> np.ndarray:
    if index.backend == "numpy":
        blocks, K = engine
        if want >= len(K):
            return np.tile(np.arange(len(K)), (stop - start, 1))
        S = blocks.scores(index.Q[start:stop], K)  # larger = nearer
        np.negative(S, out=S)
        return np.argpartition(S, want - 1, axis=1)[:, :want]
    q = index.Z[start:stop]
    if index.backend == "faiss":
        return engine.search(q, want)[1].astype(np.int64)
    return engine.kneighbors(q, n_neighbors=want, return_distance=False)
