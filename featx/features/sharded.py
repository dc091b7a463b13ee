"""Sharded feature stores: a folder of fixed-size ``.npy`` shards and one ``manifest.json``, for millions of images.

Layout of ``STORE/``::

    manifest.json              {"format": "featx.features.sharded", "n", "dim", "dtype", "classes", "meta",
                                "shards": [{"index": 0, "n": 1024, "features": "features-000000.npy",
                                            "rows": "rows-000000.npz"}, ...]}
    features-000000.npy        n x dim float32 or float16, a plain .npy: np.load(..., mmap_mode="r") maps it
    rows-000000.npz            paths (and labels, splits when the folder had them), fixed-width text, no pickle
    manifest-part-00000-of-00002.json   while workers of `featx extract --shard I/N` are still running

Why ``.npy`` rather than Parquet shards (measured, BENCHMARKS.md "Stores at scale"): a ``.npy`` shard is mapped
into memory without decoding (reading any rows costs only their pages), numpy alone reads it (pyarrow stays an
extra), and float16 is a plain dtype. Parquet stays available as a single-file export for SQL tools.

Reading without featx (numpy, pandas, DuckDB via pandas)::

    m = json.load(open("STORE/manifest.json"))
    X = np.concatenate([np.load(f"STORE/{s['features']}", mmap_mode="r") for s in m["shards"]])
    paths = np.concatenate([np.load(f"STORE/{s['rows']}")["paths"] for s in m["shards"]])

Writers: each shard is written atomically under its own name, so workers never write the same file; a worker's
list of shards is its ``manifest-part-*.json``; the last worker to finish merges the parts into ``manifest.json``
under a lock (:func:`merge_parts`). A store is appendable (:class:`ShardWriter` with ``append=True``) and only
``manifest.json`` makes it readable, so a reader never sees a half-written store.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from .._io import atomic_write, open_beside, safe_str, write_json
from ..errors import ArtifactError, OutputError, UsageError
from .formats import MANIFEST
from .store import FORMAT as NPZ_FORMAT
from .store import FeatureSet, _check_member, _str_array, cast_features, npy_layout, read_npz

FORMAT = "featx.features.sharded"
FORMAT_VERSION = 1
DEFAULT_SHARD_SIZE = 65536  # rows per shard when writing a FeatureSet (320 MB of 1,280 float32 features)
_FEATURES = re.compile(r"features-(\d{6,9})\.npy")
_ROWS = re.compile(r"rows-(\d{6,9})\.npz")
_PART = re.compile(r"manifest-part-(\d{5})-of-(\d{5})\.json")
_MANIFEST_CAP = 256 << 20  # a manifest lists shards and skipped files: 256 MiB is ~millions of entries
_HEADER_READ = 1 << 16


def features_name(index: int) -> str:
    return f"features-{index:06d}.npy"


def rows_name(index: int) -> str:
    return f"rows-{index:06d}.npz"


def part_name(rank: int, world: int) -> str:
    return f"manifest-part-{rank:05d}-of-{world:05d}.json"


def parse_shard(spec) -> Optional[tuple]:
    """``"I/N"`` (or a tuple) -> (I, N) with 0 <= I < N; None stays None. UsageError for anything else."""
    if spec is None:
        return None
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        i, n = spec
    else:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(spec))
        if not m:
            raise UsageError(f"--shard takes I/N (this worker's number from 0, and the number of workers), "
                             f"not {safe_str(str(spec))!r}")
        i, n = m.groups()
    i, n = int(i), int(n)
    if not (0 <= i < n) or n > 99999:
        raise UsageError(f"--shard {i}/{n}: I must be from 0 to N-1 (N at most 99999)")
    return i, n


# -- writing ----------------------------------------------------------------------------------------------------------
_OURS = re.compile(r"(features-\d{6,9}\.npy|rows-\d{6,9}\.npz|manifest(-part-\d{5}-of-\d{5})?\.json"
                   r"|manifest-part-\d{5}-of-\d{5}\.json\.partial|\.featx-.*|\..*\.featx-(merge-)?lock)")


def check_folder(folder, overwrite: bool = False) -> None:
    """Refuse to write shards into a folder holding files featx did not write (unless ``overwrite``): old shards are
    removed by name once a new manifest replaces them, and a user's ``features-000001.npy`` must never be one."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{safe_str(str(folder))} is a file; a sharded store is a folder (choose another -o)")
    if overwrite or not folder.is_dir():
        return
    foreign = sorted(p.name for p in folder.iterdir() if not _OURS.fullmatch(p.name))
    if foreign:
        raise OutputError(f"{safe_str(str(folder))} holds files featx did not write (e.g. {safe_str(foreign[0])}); a "
                          f"sharded store needs a folder of its own: choose a new or empty folder")


def write_shard(folder: Path, index: int, features: np.ndarray, paths, labels=None, splits=None,
                dtype: str = "float32") -> dict:
    """Write shard ``index`` (features + rows), each file atomically; -> its manifest entry."""
    folder = Path(folder)
    stored = cast_features(np.asarray(features), dtype)
    with atomic_write(folder / features_name(index)) as fh:
        np.save(fh, stored, allow_pickle=False)
    rows = {"paths": _str_array(paths)}
    if labels is not None:
        rows["labels"] = _str_array(labels)
    if splits is not None:
        rows["splits"] = _str_array(splits)
    with atomic_write(folder / rows_name(index)) as fh:
        np.savez(fh, **rows)
    return {"index": int(index), "n": int(len(features)), "features": features_name(index), "rows": rows_name(index)}


def _document(shards: list, dim: int, dtype: str, classes, meta: dict, **extra) -> dict:
    shards = sorted(shards, key=lambda s: s["index"])
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "n": int(sum(s["n"] for s in shards)),
            "dim": int(dim), "dtype": dtype, "classes": [str(c) for c in classes],
            "meta": {"format": NPZ_FORMAT, **meta}, **extra, "shards": shards}


class ShardWriter:
    """Append rows to a sharded store, ``shard_size`` rows per shard; ``close()`` publishes ``manifest.json``.

    ``append=True`` continues an existing store (same dim, dtype and classes); otherwise the folder's old shards are
    replaced once the new manifest is written. Nothing is readable until ``close()``, and the old manifest stays
    valid until then.
    """

    def __init__(self, folder, *, dim: int, classes=(), meta: Optional[dict] = None, dtype: str = "float32",
                 shard_size: int = DEFAULT_SHARD_SIZE, append: bool = False, overwrite: bool = False):
        if shard_size < 1:
            raise UsageError("shard size must be at least 1")
        self.folder = Path(folder)
        check_folder(self.folder, overwrite)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.dim, self.dtype, self.shard_size = int(dim), dtype, int(shard_size)
        self.classes, self.meta = list(classes), dict(meta or {})
        self.shards: list = []
        self._buf: list = []
        self._buffered = 0
        self._next = 0
        if append and (self.folder / MANIFEST).is_file():
            doc = read_manifest(self.folder)
            if (doc["dim"], doc["dtype"]) != (self.dim, self.dtype) or doc["classes"] != self.classes:
                raise UsageError(f"cannot append to {safe_str(str(self.folder))}: it holds {doc['dim']}-d "
                                 f"{doc['dtype']} features of classes {doc['classes']}, not {self.dim}-d {self.dtype} "
                                 f"of {self.classes}")
            self.shards = list(doc["shards"])
            self.meta = {**doc["meta"], **self.meta}
            self._next = max((s["index"] for s in self.shards), default=-1) + 1

    def add(self, features: np.ndarray, paths, labels=None, splits=None) -> None:
        features = np.asarray(features)
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise UsageError(f"rows of {self.dim} features expected, got shape {features.shape}")
        self._buf.append((features, list(paths), labels, splits))
        self._buffered += len(features)
        while self._buffered >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, k: int) -> None:
        take, rest, got = [], [], 0
        for part in self._buf:
            need = k - got
            if need <= 0:
                rest.append(part)
                continue
            if len(part[0]) <= need:
                take.append(part)
                got += len(part[0])
            else:
                take.append(tuple(None if v is None else v[:need] for v in part))
                rest.append(tuple(None if v is None else v[need:] for v in part))
                got += need
        self._buf, self._buffered = rest, self._buffered - got
        labels = None if any(t[2] is None for t in take) else np.concatenate([np.asarray(t[2]) for t in take])
        splits = None if any(t[3] is None for t in take) else np.concatenate([np.asarray(t[3]) for t in take])
        self.shards.append(write_shard(self.folder, self._next, np.concatenate([t[0] for t in take]),
                                       [x for t in take for x in t[1]], labels, splits, self.dtype))
        self._next += 1

    def close(self) -> Path:
        if self._buffered:
            self._flush(self._buffered)
        doc = _document(self.shards, self.dim, self.dtype, self.classes, self.meta)
        publish(self.folder, doc)
        return self.folder


def publish(folder: Path, doc: dict) -> None:
    """Write ``manifest.json`` atomically, then remove shard files of ours that it no longer lists."""
    write_json(folder / MANIFEST, doc)
    listed = {s["features"] for s in doc["shards"]} | {s["rows"] for s in doc["shards"]}
    for p in folder.iterdir():
        if (_FEATURES.fullmatch(p.name) or _ROWS.fullmatch(p.name)) and p.name not in listed:
            with contextlib.suppress(OSError):
                p.unlink()


def write_sharded(fs: FeatureSet, path, dtype: str = "float32", shard_size: int = DEFAULT_SHARD_SIZE) -> Path:
    """Write FeatureSet ``fs`` as a sharded store at folder ``path`` (save_features' writer for this format)."""
    w = ShardWriter(path, dim=fs.dim if len(fs) else fs.features.shape[1], classes=fs.classes, meta=fs.meta,
                    dtype=dtype, shard_size=shard_size)
    for lo in range(0, len(fs), shard_size):
        hi = lo + shard_size
        w.add(fs.features[lo:hi], fs.paths[lo:hi], None if fs.labels is None else fs.labels[lo:hi],
              None if fs.splits is None else fs.splits[lo:hi])
    return w.close()


def write_part(folder: Path, rank: int, world: int, doc: dict) -> Path:
    """A worker's share of the store (its shards, its skipped files), published as ``manifest-part-I-of-N.json``."""
    path = Path(folder) / part_name(rank, world)
    write_json(path, {"format": FORMAT, "format_version": FORMAT_VERSION, **doc, "part": [rank, world]})
    return path


@contextlib.contextmanager
def _merge_lock(folder: Path):
    """A blocking flock: the last two workers to finish take turns, so one of them always sees every part."""
    import fcntl

    lock = folder / f".{MANIFEST}.featx-merge-lock"
    while True:
        fd = open_beside(lock, os.O_RDWR | os.O_CREAT, what="lock file")
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)


def merge_parts(folder, world: int) -> Optional[Path]:
    """Merge the ``world`` part manifests into ``manifest.json`` once all are there (-> its path), else None.

    Every worker calls this when it finishes; the last one finds all parts and merges. Skipped files are listed in
    chunk order, so the merged store equals a single-process run's row for row and in its metadata.
    """
    folder = Path(folder)
    with _merge_lock(folder):
        names = [folder / part_name(r, world) for r in range(world)]
        if not all(p.is_file() for p in names):
            return None
        parts = [_read_json(p) for p in names]
        first = parts[0]
        if any(p.get("job") != first.get("job") for p in parts):
            raise ArtifactError(f"the workers' part manifests in {safe_str(str(folder))} come from different jobs "
                                f"(other files, backbone or chunk size); re-run every worker with the same command")
        try:
            shards = [dict(s) for p in parts for s in p["shards"]]
            chunk_errors = sorted((e for p in parts for e in p.get("chunk_errors", [])), key=lambda e: e[0])
            meta = dict(first["meta"])
            meta["skipped"] = list(first.get("discover_skipped", [])) + [x for _, errs in chunk_errors for x in errs]
            meta["n_images"] = int(sum(s["n"] for s in shards))
            meta["world_size"] = world
            doc = _document(shards, first["dim"], first["dtype"], first["classes"], meta)
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"a part manifest in {safe_str(str(folder))} is damaged ({type(exc).__name__}: "
                                f"{exc}); re-run its worker") from exc
        publish(folder, doc)
        for p in names:
            p.unlink()
        return folder / MANIFEST


# -- reading ----------------------------------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    shown = safe_str(str(path))
    try:
        size = path.stat().st_size
        if size > _MANIFEST_CAP:
            raise ArtifactError(f"refusing {shown}: {size:,} bytes is no manifest featx writes")
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
    except FileNotFoundError:
        raise ArtifactError(f"{shown} does not exist") from None
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{shown} is not a readable featx manifest ({type(exc).__name__}: {exc})") from exc
    if not isinstance(doc, dict):
        raise ArtifactError(f"{shown} is not a featx manifest (a JSON {type(doc).__name__})")
    return doc


def read_manifest(folder) -> dict:
    """The checked manifest of the sharded store at ``folder``: shard names featx writes (no path leaves the folder),
    sizes that add up, a known dtype; ArtifactError otherwise."""
    folder = Path(folder)
    shown = safe_str(str(folder))
    if folder.name == MANIFEST:
        folder = folder.parent
    if not folder.is_dir():
        raise ArtifactError(f"features store {shown} does not exist; run `featx extract IMAGES -o {shown}/` first")
    if not (folder / MANIFEST).is_file():
        parts = sorted(p.name for p in folder.glob("manifest-part-*.json"))
        hint = (f" ({len(parts)} worker part(s) found: the other workers of `featx extract --shard` have not "
                f"finished)" if parts else "")
        raise ArtifactError(f"{shown} is a folder without {MANIFEST}, not a finished featx feature store{hint}")
    doc = _read_json(folder / MANIFEST)
    if doc.get("format") != FORMAT:
        raise ArtifactError(f"{shown}/{MANIFEST} is not a featx sharded store manifest")
    version = doc.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(f"{shown} was written by a newer featx (sharded format {version!r}); upgrade featx")
    try:
        dim, dtype, n = int(doc["dim"]), str(doc["dtype"]), int(doc["n"])
        shards, classes, meta = list(doc["shards"]), [str(c) for c in doc["classes"]], dict(doc["meta"])
        total, last = 0, -1
        for s in shards:
            if not (_FEATURES.fullmatch(s["features"]) and _ROWS.fullmatch(s["rows"])) or int(s["index"]) <= last:
                raise ValueError(f"shard entry {s!r} is not one featx writes")
            if int(s["n"]) < 0:
                raise ValueError(f"shard {s['index']} has {s['n']} rows")
            last, total = int(s["index"]), total + int(s["n"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{shown}/{MANIFEST} is damaged ({exc}); re-create the store") from exc
    if dtype not in ("float32", "float16") or dim < 1 or total != n:
        raise ArtifactError(f"{shown}/{MANIFEST} is damaged (dtype {dtype}, dim {dim}, {n} rows listed as {total}); "
                            f"re-create the store")
    return {**doc, "dim": dim, "dtype": dtype, "n": n, "shards": shards, "classes": classes, "meta": meta}


def map_npy(path: Path, rows: int, dim: int, dtype: str) -> np.ndarray:
    """Memory-map the ``.npy`` shard at ``path`` after checking its header against the file's size and the
    manifest (rows x dim of dtype, C order): nothing is allocated or mapped from a size the file merely declares."""
    shown = safe_str(str(path))
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(_HEADER_READ)
    except OSError as exc:
        raise ArtifactError(f"cannot read the shard {shown} ({exc.strerror or exc}); re-create the store") from exc
    shape, fortran, dt, offset = npy_layout(head, "features", path, "feature shard", total=size)
    if tuple(shape) != (rows, dim) or fortran or dt != np.dtype(dtype).newbyteorder("<"):
        raise ArtifactError(f"refusing {shown}: it holds a {shape} {dt} array where the manifest lists {rows} x {dim} "
                            f"{dtype}; the store was edited or damaged. Re-create it")
    if not rows:
        return np.zeros((0, dim), dtype=dtype)
    return np.memmap(path, dtype=dt, mode="r", offset=offset, shape=(rows, dim))


@dataclass
class ShardedStore:
    """A sharded store opened lazily: the manifest in memory, each shard mapped or read when asked for."""

    folder: Path
    doc: dict
    shards: list = field(default_factory=list)

    @property
    def n(self) -> int:
        return self.doc["n"]

    @property
    def dim(self) -> int:
        return self.doc["dim"]

    @property
    def dtype(self) -> str:
        return self.doc["dtype"]

    @property
    def classes(self) -> list:
        return self.doc["classes"]

    @property
    def meta(self) -> dict:
        return self.doc["meta"]

    def features(self, i: int) -> np.ndarray:
        """Shard ``i``'s features, memory-mapped read-only (no copy; pages are read as they are touched)."""
        s = self.shards[i]
        return map_npy(self.folder / s["features"], int(s["n"]), self.dim, self.dtype)

    def rows(self, i: int) -> dict:
        """Shard ``i``'s paths, labels and splits (labels / splits None when the folder had none)."""
        s = self.shards[i]
        path = self.folder / s["rows"]
        try:
            arrays = read_npz(path, ("paths", "labels", "splits"), what="feature shard")
        except (OSError, ValueError, KeyError, EOFError) as exc:
            raise ArtifactError(f"{safe_str(str(path))} is not a readable feature shard ({exc})") from exc
        out = {k: _check_member(k, v, path) for k, v in arrays.items()}
        for k, v in out.items():
            if v is not None and len(v) != int(s["n"]):
                raise ArtifactError(f"{safe_str(str(path))} lists {len(v)} {k} for {s['n']} rows; re-create the store")
        return out

    def iter_shards(self) -> Iterator[tuple]:
        """(features memmap, rows dict) per shard, in row order."""
        for i in range(len(self.shards)):
            yield self.features(i), self.rows(i)

    def load(self) -> FeatureSet:
        """Every row in one float32 FeatureSet: the one copy fit and audit need, filled shard by shard."""
        x = np.empty((self.n, self.dim), dtype=np.float32)
        paths, labels, splits = [], [], []
        lo = 0
        for feats, rows in self.iter_shards():
            x[lo:lo + len(feats)] = feats
            lo += len(feats)
            del feats  # unmap this shard before the next is mapped: its pages leave this process's RSS
            paths.extend(rows["paths"].tolist())
            labels.append(rows["labels"])
            splits.append(rows["splits"])
        join = (lambda vs: None if not vs or any(v is None for v in vs) else np.concatenate(vs))
        return FeatureSet(features=x, paths=paths, labels=join(labels), splits=join(splits), classes=self.classes,
                          meta=self.meta)


def open_sharded(path) -> ShardedStore:
    doc = read_manifest(path)
    folder = Path(path)
    folder = folder.parent if folder.name == MANIFEST else folder
    return ShardedStore(folder=folder, doc=doc, shards=doc["shards"])


def read_sharded(path) -> FeatureSet:
    """load_features' reader for this format."""
    return open_sharded(path).load()


def sharded_written_by_featx(path) -> bool:
    """Recogniser for check_outputs: a folder whose manifest (or a worker's part) says featx wrote it."""
    path = Path(path)
    try:
        if path.is_dir():
            path = path / MANIFEST
        return _read_json(path).get("format") == FORMAT
    except Exception:  # not JSON, unreadable: not provably ours
        return False


def disk_bytes(folder) -> int:
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.is_file())


__all__ = ["ShardWriter", "ShardedStore", "open_sharded", "read_sharded", "write_sharded", "merge_parts",
           "write_part", "write_shard", "parse_shard", "part_name"]
