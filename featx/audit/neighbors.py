"""Neighbour search for the audit: cosine near-duplicate pairs and k-nearest-neighbour distances, memory-bounded.

Features are L2-normalised, so cosine similarity ``s`` and euclidean distance ``d`` are one thing: d^2 = 2 - 2s.
For large N the search runs on an orthonormal PCA projection ``P`` of the normalised features and then re-checks
candidates exactly in the full dimension. A projection never lengthens a difference (||P(x - y)|| <= ||x - y||),
so every pair with cosine >= t is within the radius sqrt(2 - 2t) in the projection too: the projection only
adds candidates (removed by the exact check), it never loses a true pair. Measured on 100,000 x 1,280 features
(BENCHMARKS.md): the full-dimension radius search costs ~5x the projected one, which is what brings it under the
issue's 2-minute budget on 2 cores.

The search itself is scikit-learn's ``NearestNeighbors`` (brute force, its chunked, multi-threaded Cython
pairwise-distance reduction; memory bounded by ``working_memory``) or faiss's flat index when faiss is installed
(``pip install faiss-cpu``) and asked for. Queries go in row blocks so that no N x N matrix is ever held.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ..errors import UsageError

BACKENDS = ("auto", "sklearn", "faiss")
# Above this many rows the search runs on a projection (below it the exact full-dimension search takes seconds).
PROJECT_ABOVE = 20_000
PROJECT_DIM = 256  # components kept; see the module docstring and BENCHMARKS.md for the measurement
PCA_SAMPLE = 20_000  # rows the PCA is fitted on (any orthonormal basis keeps the guarantee; a sample is enough)
QUERY_BLOCK = 4096  # rows per query block: bounds the candidate lists held at once
WORKING_MEMORY_MB = 256  # scikit-learn's chunk budget for the distance blocks
KNN_BLOCK = 512  # rows per k-NN block
_EPS = 1e-4  # float32 rounding slack on the radius: a true pair is never lost to the last bit


def normalise(X: np.ndarray) -> np.ndarray:
    """Signed square root of every value, then rows scaled to unit length (a float32 copy; a zero row stays zero).

    The square root ("power normalisation", Perronnin et al. 2010, a retrieval staple) damps the few large
    activations that dominate a CNN feature's cosine. Measured on hymenoptera with efficientnet_lite0
    (BENCHMARKS.md, "Audit"): of 180 resized / re-encoded / cropped copies, 171 scored above the closest pair of
    distinct photos with it, 142 without. It needs no dataset statistics, so a threshold means the same on any store.
    """
    X = np.asarray(X, dtype=np.float32)
    X = np.sign(X) * np.sqrt(np.abs(X))
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.maximum(norms, 1e-12)


@dataclass
class NeighborIndex:
    """The normalised features, the space searched (projection or the features themselves) and the search engine."""

    X: np.ndarray  # N x D, unit rows
    Z: np.ndarray  # N x d, the searched space (d <= D)
    backend: str  # "sklearn" or "faiss"
    projected: bool
    engine: object  # a fitted NearestNeighbors, or a faiss IndexFlatL2

    def describe(self) -> dict:
        return {"backend": self.backend, "searched_dim": int(self.Z.shape[1]), "projected": self.projected}


def resolve_backend(name: str) -> str:
    if name not in BACKENDS:
        raise UsageError(f"unknown neighbour backend {name!r} (choose from {', '.join(BACKENDS)})")
    if name == "sklearn":
        return name
    try:
        import faiss  # noqa: F401
    except ImportError:
        if name == "faiss":
            raise UsageError("--backend faiss needs faiss: pip install faiss-cpu (or use --backend sklearn)") from None
        return "sklearn"
    return "faiss"


def build_index(features: np.ndarray, *, backend: str = "auto", project: Optional[bool] = None,
                dim: int = PROJECT_DIM, seed: int = 0) -> NeighborIndex:
    """Normalise, project when N is large (or when ``project`` says so), and fit the search engine."""
    X = normalise(features)
    n, d = X.shape
    if project is None:
        project = n > PROJECT_ABOVE and d > dim
    Z = _project(X, min(dim, d), seed) if project else X
    backend = resolve_backend(backend)
    if backend == "faiss":
        import faiss

        engine = faiss.IndexFlatL2(Z.shape[1])
        engine.add(Z)
    else:
        from sklearn.neighbors import NearestNeighbors

        engine = NearestNeighbors(algorithm="brute", metric="euclidean").fit(Z)
    return NeighborIndex(X=X, Z=Z, backend=backend, projected=bool(project), engine=engine)


def _project(X: np.ndarray, dim: int, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(seed)
    sample = X if len(X) <= PCA_SAMPLE else X[np.sort(rng.choice(len(X), PCA_SAMPLE, replace=False))]
    pca = PCA(n_components=dim, svd_solver="randomized", random_state=seed).fit(sample)
    # PCA.transform centres first; centring cancels in every difference, so distances are those of the projection.
    return np.ascontiguousarray(pca.transform(X), dtype=np.float32)


def _blocks(n: int, size: int = QUERY_BLOCK):
    for start in range(0, n, size):
        yield start, min(n, start + size)


def similar_pairs(index: NeighborIndex, threshold: float, *, max_pairs: Optional[int] = None,
                  progress: Optional[Callable[[int, int], None]] = None) -> tuple:
    """All pairs (i < j) with cosine(x_i, x_j) >= threshold, exactly: ``(i, j, cosine)`` arrays.

    ``max_pairs`` stops a threshold so low that most of the data pairs up (memory would follow) with a ValueError.
    """
    from sklearn import config_context

    radius = float(np.sqrt(max(0.0, 2.0 - 2.0 * threshold))) + _EPS
    n = len(index.X)
    found_i, found_j, found_s = [], [], []
    total = 0
    for start, stop in _blocks(n):
        rows, cols = _radius_block(index, start, stop, radius, config_context)
        keep = cols > rows  # each pair once, no self-pairs
        rows, cols = rows[keep], cols[keep]
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
    return cat(found_i, np.int64), cat(found_j, np.int64), cat(found_s, np.float32)


def _radius_block(index: NeighborIndex, start: int, stop: int, radius: float, config_context) -> tuple:
    """Candidate (row, col) pairs within ``radius`` for query rows start..stop, in the searched space."""
    q = index.Z[start:stop]
    if index.backend == "faiss":
        lims, _, cols = index.engine.range_search(q, radius * radius)  # faiss L2 radii are squared
        counts = np.diff(lims)
        cols = np.asarray(cols, dtype=np.int64)
    else:
        with config_context(working_memory=WORKING_MEMORY_MB):
            neigh = index.engine.radius_neighbors(q, radius=radius, return_distance=False)
        counts = np.fromiter((len(a) for a in neigh), dtype=np.int64, count=len(neigh))
        cols = np.concatenate(neigh).astype(np.int64) if len(neigh) else np.zeros(0, np.int64)
    rows = np.repeat(np.arange(start, stop, dtype=np.int64), counts)
    return rows, cols


def _exact_cosines(X: np.ndarray, rows: np.ndarray, cols: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """cosine of each listed pair in the full dimension, a chunk of pairs at a time (bounded memory)."""
    out = np.empty(len(rows), dtype=np.float32)
    for s in range(0, len(rows), chunk):
        a, b = X[rows[s:s + chunk]], X[cols[s:s + chunk]]
        out[s:s + chunk] = np.einsum("ij,ij->i", a, b)
    return out


def knn_distances(index: NeighborIndex, k: int, *, rerank: int = 3,
                  progress: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
    """N x k cosine distances (1 - cosine) to each row's k nearest other rows, ascending.

    On a projection the ``rerank * k`` nearest in the projection are re-measured in the full dimension and the k
    closest kept (the usual candidate-then-rerank search; exact when not projected).
    """
    n = len(index.X)
    k = min(k, n - 1)
    want = min(n, (k * rerank if index.projected else k) + 1)  # +1: a row finds itself
    out = np.empty((n, k), dtype=np.float32)
    # smaller blocks than the radius search: the re-measure gathers block x want x D floats (512 x 31 x 1280 = 81 MB)
    for start, stop in _blocks(n, KNN_BLOCK):
        q = index.Z[start:stop]
        if index.backend == "faiss":
            _, nbrs = index.engine.search(q, want)
        else:
            nbrs = index.engine.kneighbors(q, n_neighbors=want, return_distance=False)
        rows = np.arange(start, stop)
        nbrs = np.asarray(nbrs, dtype=np.int64)
        sims = np.einsum("id,ijd->ij", index.X[rows], index.X[nbrs]) if len(rows) else np.zeros((0, want))
        sims[nbrs == rows[:, None]] = -np.inf  # not its own neighbour (an identical copy still counts)
        best = -np.sort(-sims, axis=1)[:, :k]
        out[start:stop] = 1.0 - best
        if progress:
            progress(stop, n)
    return out
