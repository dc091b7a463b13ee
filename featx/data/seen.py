"""Which images a model was trained or selected on, by content: a small record in the artifact, matched at predict.

A model scored on the images it learned from looks better than it is (issue 24.2: `featx predict` on the folder a
head was fitted on read "all 0.979" with train 1.000 inside). The record is the sorted first 8 bytes of each image
file's SHA-256 (8 bytes per image: 100,000 images make 800 kB, about 1.1 MB as base64 text), so a copied or renamed
folder is still recognised; files that could not be read when the model was made are kept by relative path. Two
different images share an 8-byte prefix with probability about n^2 / 2^65: negligible for any folder featx meets.
"""
from __future__ import annotations

import base64
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

HASH = "sha256[:8]"  # what the record holds; another value is a record this featx cannot match
# Above this many images of one role nothing is hashed: reading every file again at fit time would cost minutes to
# hours on large or remote sets (the features are all fit reads otherwise), and the record would pass a megabyte.
# The record says so and predict warns instead of claiming the images are unseen.
MAX_FILES = 200_000
_CHUNK = 1 << 20


def _prefix(path) -> Optional[int]:
    """First 8 bytes of the file's SHA-256 as an unsigned integer; None when it cannot be read."""
    import hashlib

    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(_CHUNK), b""):
                h.update(block)
    except OSError:
        return None
    return int.from_bytes(h.digest()[:8], "big")


def content_prefixes(paths: Sequence, workers: Optional[int] = None) -> list:
    """[int or None] per path, in order; hashing runs in threads (hashlib releases the GIL on large buffers)."""
    paths = list(paths)
    if not paths:
        return []
    n = workers or min(8, os.cpu_count() or 1)
    from ..errors import signals_to_main_thread

    with ThreadPoolExecutor(max_workers=n, initializer=signals_to_main_thread) as pool:
        return list(pool.map(_prefix, paths, chunksize=64))


def _pack(values: Iterable[int]) -> str:
    arr = np.unique(np.asarray(sorted(values), dtype=np.uint64)).astype(">u8")
    return base64.b64encode(arr.tobytes()).decode("ascii")


def _unpack(text: str) -> np.ndarray:
    raw = base64.b64decode(text.encode("ascii"), validate=True)
    if len(raw) % 8:
        raise ValueError("not a whole number of 8-byte hashes")
    return np.frombuffer(raw, dtype=">u8").astype(np.uint64)


def make_record(root, relpaths: Sequence[str], role: str = "trained", record: Optional[dict] = None) -> dict:
    """Add the images ``root/relpath`` under ``role`` ("trained" | "selected") to ``record`` (a new one if None)."""
    base = Path(root) if root else None
    return record_files([base / p for p in relpaths] if base is not None else [None] * len(relpaths), relpaths, role,
                        record)


def record_files(files: Sequence, relpaths: Sequence[str], role: str = "trained",
                 record: Optional[dict] = None) -> dict:
    """`make_record` for image files given one by one (None: not readable), each with its relative path."""
    rec = dict(record) if record else {"hash": HASH}
    if len(relpaths) > MAX_FILES:
        rec[f"n_{role}"] = len(relpaths)
        rec[f"{role}_unrecorded"] = f"{len(relpaths):,} images, more than featx hashes ({MAX_FILES:,})"
        return rec
    readable = [(i, f) for i, f in enumerate(files) if f is not None]
    found = [None] * len(relpaths)
    for (i, _), v in zip(readable, content_prefixes([f for _, f in readable])):
        found[i] = v
    rec[role] = _pack(v for v in found if v is not None)
    rec[f"n_{role}"] = len(relpaths)
    unread = sorted(str(p) for p, v in zip(relpaths, found) if v is None)
    if unread:
        rec[f"{role}_paths"] = unread[:MAX_FILES // 10]  # the fallback: matched by relative path
        if len(unread) > MAX_FILES // 10:
            rec[f"{role}_unrecorded"] = f"{len(unread):,} images could not be read when the model was made"
    return rec


def match(record: Optional[dict], files: Sequence, relpaths: Sequence[str]) -> Optional[dict]:
    """-> ``{"seen": bool array, "role": [role or ""], "by_path": n matched by path only}`` for images ``files``
    (their ``relpaths`` relative to the folder), or None when the record is missing or unreadable."""
    if not record or record.get("hash") != HASH:
        return None
    try:
        sets = {role: _unpack(record[role]) for role in ("trained", "selected") if isinstance(record.get(role), str)}
    except (ValueError, TypeError):
        return None
    paths = {role: set(record.get(f"{role}_paths") or []) for role in ("trained", "selected")}
    where = {role: set(record.get(f"{role}_files") or []) for role in ("trained", "selected")}
    found = content_prefixes(files) if sets else [None] * len(files)
    roles = []
    by_path = 0
    for v, rel, f in zip(found, relpaths, files):
        role = ""
        for name, values in sets.items():
            at = min(int(np.searchsorted(values, np.uint64(v))), len(values) - 1) if v is not None and len(values) else -1
            if at >= 0 and int(values[at]) == v:  # as Python ints: uint64 vs int may compare as floats
                role = name
                break
        if not role:
            role = next((name for name, ps in paths.items() if str(rel) in ps), "")
            by_path += bool(role)
        if not role and (where["trained"] or where["selected"]):
            file = _resolved(f)
            role = next((name for name, ps in where.items() if file in ps), "")
            by_path += bool(role)
        roles.append(role)
    return {"seen": np.array([bool(r) for r in roles], dtype=bool), "role": roles, "by_path": by_path,
            "unrecorded": [record[k] for k in ("trained_unrecorded", "selected_unrecorded") if record.get(k)]}


def _resolved(path) -> str:
    try:
        return str(Path(path).resolve())
    except (OSError, RuntimeError):
        return str(path)


def old_run_record(run_dir) -> Optional[dict]:
    """For a finetune/scratch run made before runs recorded their images: its train and val files by path, rebuilt
    from its config.json (image folder, val fraction, seed) with featx's one split rule; None when that folder is
    gone or the config says too little. Matching is then by path only: a copied folder is not recognised."""
    from .._io import read_json
    from .discover import discover
    from .split import split_records

    try:
        cfg = read_json(Path(run_dir) / "config.json")
        images = Path(cfg["images"])
        if not images.is_dir() or cfg.get("train_subset"):
            return None
        split = split_records(discover(images), float(cfg.get("val_split", 0.2)), int(cfg.get("seed", 0)))
    except Exception:  # noqa: BLE001 - an unreadable or foreign config: no fallback, the caller says so
        return None
    return {"hash": HASH, "by": "path", "trained_files": sorted({_resolved(r.path) for r in split.train}),
            "selected_files": sorted({_resolved(r.path) for r in split.val}), "n_trained": len(split.train),
            "n_selected": len(split.val)}
