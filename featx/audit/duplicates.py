"""Near-duplicate groups from similar pairs: connected components, exact (sha256) copies marked, leakage first."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Optional

import numpy as np

from .._io import sha256_file

_SPLIT_ORDER = {"train": 0, "val": 1, "valid": 1, "validation": 1, "test": 2}


def group_pairs(n: int, i: np.ndarray, j: np.ndarray) -> list:
    """Index groups (lists of >= 2 rows) linked by the pairs: scipy's connected components (single linkage)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if len(i) == 0:
        return []
    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (i, j)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    members = np.flatnonzero(np.bincount(comp)[comp] > 1)
    groups = defaultdict(list)
    for row in members:
        groups[int(comp[row])].append(int(row))
    return list(groups.values())


def _digests(rows: list, paths: list, root: Optional[Path]) -> dict:
    """row -> sha256 of its file, for the files that can be read (None where the images are not at hand)."""
    if root is None:
        return {}
    out = {}
    for r in rows:
        try:
            out[r] = sha256_file(root / paths[r])
        except OSError:
            continue
    return out


def describe_groups(groups: list, pairs: tuple, *, paths: list, splits, roles, labels, root: Optional[Path],
                    known_exact: Optional[list] = None) -> list:
    """One dict per group: members (path, folder split, role, label, best similarity inside the group, exact copy
    or not), whether it spans roles (train / val / test as `featx fit` uses them: leakage) and whether its labels
    disagree. Leakage first, then biggest, then closest.

    ``known_exact``: the store's own sha256 leakage groups (lists of paths), used when the files are not readable.
    """
    i, j, s = pairs
    best = defaultdict(float)
    for a, b, sim in zip(i.tolist(), j.tolist(), s.tolist()):
        best[a] = max(best[a], sim)
        best[b] = max(best[b], sim)
    known = {}
    for g, members in enumerate(known_exact or []):
        for p in members:
            known[p] = f"store:{g}"
    out = []
    for rows in groups:
        digests = _digests(rows, paths, root)
        keys = {r: digests.get(r) or known.get(paths[r]) for r in rows}
        counts = defaultdict(int)
        for key in keys.values():
            if key is not None:
                counts[key] += 1
        members = []
        for r in sorted(rows, key=lambda r: (_split_key(roles, r), paths[r])):
            members.append({
                "path": paths[r],
                "split": None if splits is None else str(splits[r]),
                "role": None if roles is None else (str(roles[r]) or None),
                "label": None if labels is None else str(labels[r]),
                "similarity": round(float(min(best[r], 1.0)), 4),
                "exact": bool(keys[r] is not None and counts[keys[r]] > 1),
                "sha256": digests.get(r),
            })
        split_set = {m["role"] for m in members if m["role"]}
        label_set = {m["label"] for m in members if m["label"]}
        out.append({
            "size": len(members),
            "leakage": len(split_set) > 1,
            "roles": sorted(split_set, key=lambda x: (_SPLIT_ORDER.get(x, 9), x)),
            "conflicting_labels": len(label_set) > 1,
            "all_exact": all(m["exact"] for m in members),
            "min_similarity": round(min(m["similarity"] for m in members), 4),
            "members": members,
        })
    out.sort(key=lambda g: (not g["leakage"], -g["size"], -g["min_similarity"], g["members"][0]["path"]))
    for n, g in enumerate(out, 1):
        g["group"] = n
    return out


def _split_key(splits, r: int) -> tuple:
    if splits is None:
        return (0, "")
    s = str(splits[r])
    return (_SPLIT_ORDER.get(s, 9), s)
