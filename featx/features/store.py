"""The feature store: one ``.npz`` file (no pickle) holding features, paths, labels, splits and provenance.

This module is the only place that knows the file layout. numpy users read it with
``np.load(path, allow_pickle=False)``; pandas users with ``pd.DataFrame(z["features"]).assign(path=z["paths"])``.

Keys: ``features`` (N x D float32), ``paths`` (N, str: posix paths relative to the image root),
``labels`` (N, str class names; absent if unlabeled), ``splits`` (N, str; absent if no splits),
``classes`` (C, str), ``meta`` (0-d str: JSON provenance, see :func:`provenance_key`).
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .._io import atomic_write, fingerprint
from ..errors import ArtifactError, DataError

FORMAT = "featx.features"
FORMAT_VERSION = 1
DEFAULT_FEATURES_PATH = Path("featx-out") / "features.npz"

# The meta keys that decide whether two sets of features are comparable (a head fitted on one may be
# applied to the other). Same feature size is not enough: another backbone or weights give other axes.
PROVENANCE_KEYS = ("backbone", "weights_sha256", "preprocess", "layer")


def provenance_key(meta: dict) -> dict:
    return {k: meta.get(k) for k in PROVENANCE_KEYS}


def provenance_fingerprint(meta: dict) -> str:
    return fingerprint(provenance_key(meta))


@dataclass
class FeatureSet:
    """Features of a folder of images, one row per successfully decoded image, in discovery order."""

    features: np.ndarray
    paths: list
    labels: Optional[np.ndarray] = None  # str class names, or None when the folder is unlabeled
    splits: Optional[np.ndarray] = None  # "train" / "val" / "test" per row, or None
    classes: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.features = np.asarray(self.features, dtype=np.float32)
        if self.features.ndim != 2:
            raise ArtifactError(f"features must be a 2-D matrix, got shape {self.features.shape}")
        n = len(self.features)
        self.paths = [str(p) for p in self.paths]
        if len(self.paths) != n:
            raise ArtifactError(f"{len(self.paths)} paths for {n} feature rows")
        for name in ("labels", "splits"):
            v = getattr(self, name)
            if v is not None:
                v = np.asarray(v).astype(str)
                if len(v) != n:
                    raise ArtifactError(f"{len(v)} {name} for {n} feature rows")
                setattr(self, name, v)
        self.classes = [str(c) for c in self.classes]

    def __len__(self) -> int:
        return len(self.features)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def fingerprint(self) -> str:
        return provenance_fingerprint(self.meta)

    def subset(self, mask_or_index) -> "FeatureSet":
        idx = np.asarray(mask_or_index)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        return FeatureSet(
            features=self.features[idx],
            paths=[self.paths[i] for i in idx],
            labels=None if self.labels is None else self.labels[idx],
            splits=None if self.splits is None else self.splits[idx],
            classes=list(self.classes),
            meta=dict(self.meta),
        )

    def split(self, name: str) -> "FeatureSet":
        if self.splits is None:
            raise ArtifactError("these features carry no splits")
        return self.subset(self.splits == name)

    @property
    def split_names(self) -> list:
        return [] if self.splits is None else sorted(set(self.splits.tolist()), key=_split_order)

    def nonfinite_rows(self) -> np.ndarray:
        """Indices of rows holding NaN or Inf (a broken extraction or an edited file): no head can use them."""
        return np.flatnonzero(~np.isfinite(self.features).all(axis=1))

    def save(self, path) -> Path:
        return save_features(self, path)


def check_finite(fs: FeatureSet, what: str = "features") -> None:
    """Refuse rows holding NaN/Inf (DataError with their count and first paths): no head can fit or score them.

    Refused rather than dropped: such a row means a broken extraction or an edited file, and quietly training on
    fewer images than the store lists would hide that.
    """
    bad = fs.nonfinite_rows()
    if not len(bad):
        return
    first = ", ".join(str(fs.paths[i]) for i in bad[:3]) + (", ..." if len(bad) > 3 else "")
    raise DataError(f"{len(bad)} of {len(fs)} rows of the {what} hold NaN or Inf values ({first}); re-extract "
                    f"those images (featx extract ... --overwrite), or drop the rows in Python with "
                    f"fs.subset(np.setdiff1d(np.arange(len(fs)), fs.nonfinite_rows()))")


def _split_order(name: str):
    order = {"train": 0, "val": 1, "valid": 1, "validation": 1, "test": 2}
    return (order.get(name, 9), name)


def _str_array(values) -> np.ndarray:
    # Fixed-width unicode arrays need no pickle. Undecodable bytes in file names (surrogates) survive.
    arr = np.asarray([str(v) for v in values], dtype=str)
    return arr if len(arr) else np.zeros((0,), dtype="<U1")


def save_features(fs: FeatureSet, path) -> Path:
    """Write ``fs`` to ``path`` atomically (the old file stays valid until the new one is complete)."""
    path = Path(path)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **fs.meta}
    arrays = {
        "features": fs.features.astype(np.float32, copy=False),
        "paths": _str_array(fs.paths),
        "classes": _str_array(fs.classes),
        "meta": np.asarray(json.dumps(meta, default=str)),
    }
    if fs.labels is not None:
        arrays["labels"] = _str_array(fs.labels)
    if fs.splits is not None:
        arrays["splits"] = _str_array(fs.splits)
    with atomic_write(path) as fh:
        np.savez(fh, **arrays)
    return path


# A zip member may declare at most this many bytes per byte it occupies in the file, once it is larger than
# _BOMB_FLOOR: featx writes stored (uncompressed) members, and np.savez_compressed of real features shrinks them ~2-5x,
# while a 1 MB file declaring a 1 GiB member (ratio 1000) would otherwise be inflated into memory before any check.
_BOMB_RATIO = 100
_BOMB_FLOOR = 64 << 20


def check_zip_sizes(zf: zipfile.ZipFile, path, what: str) -> None:
    """Refuse a zip (features store, head file) whose members declare sizes out of proportion to the file.

    Only the central directory is read: no member is decompressed. zipfile enforces the declared size when a
    member is read later (a member longer than it declares fails its CRC check), so checking it here is enough.
    """
    for info in zf.infolist():
        declared = int(info.file_size)
        if declared > _BOMB_FLOOR and declared > _BOMB_RATIO * max(int(info.compress_size), 1):
            raise ArtifactError(
                f"refusing {path}: its member {info.filename!r} declares {declared:,} bytes from "
                f"{info.compress_size:,} compressed bytes (a zip bomb or a damaged file); it is not a {what} "
                f"featx would write. Re-create it")


# What each member of a store must be: (required, array kind letters allowed, number of dimensions).
_LAYOUT = {
    "features": (True, "fiu", 2),
    "paths": (True, "U", 1),
    "meta": (True, "U", 0),
    "labels": (False, "U", 1),
    "splits": (False, "U", 1),
    "classes": (False, "U", 1),
}


def _member(z, key: str, path) -> Optional[np.ndarray]:
    """The array stored under ``key``, checked against the layout; None for an absent optional member."""
    required, kinds, ndim = _LAYOUT[key]
    if key not in z.files:
        if required:
            raise ArtifactError(f"{path} is not a featx features file (missing {key!r}); re-extract it with "
                                f"`featx extract`")
        return None
    value = z[key]
    if not isinstance(value, np.ndarray):  # numpy hands back raw bytes for a member that is not a .npy array
        raise ArtifactError(f"{path} is not a safe featx features file: member {key!r} is not a numpy array "
                            f"(raw bytes, e.g. a pickle); nothing in it was run. Re-extract it with `featx extract`")
    if value.dtype.kind not in kinds or value.ndim != ndim:
        want = {"fiu": "numbers", "U": "text"}[kinds]
        raise ArtifactError(f"{path} is not a featx features file: {key!r} holds a {value.ndim}-d {value.dtype} "
                            f"array where featx writes {ndim}-d {want}. Re-extract it with `featx extract`")
    return value


def _meta(raw: np.ndarray, path) -> dict:
    try:
        meta = json.loads(str(raw[()]))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} has unreadable metadata ({exc}); re-extract it with `featx extract`") from exc
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path} is not a featx features file: its metadata is a JSON {type(meta).__name__}, "
                            f"not an object. Re-extract it with `featx extract`")
    return meta


def load_features(path) -> FeatureSet:
    """Read a feature store written by ``featx extract``.

    The layout is checked before anything is used: a zip whose members declare absurd sizes, a member that is not
    a plain numpy array (raw bytes such as a pickle), pickled object arrays, arrays of the wrong kind or shape, and
    metadata that is not a JSON object are refused with ArtifactError. Rows of NaN/Inf are kept (see
    :meth:`FeatureSet.nonfinite_rows`); ``fit_head`` refuses them.
    """
    path = Path(path)
    if path.suffix.lower() == ".parquet":  # hook: the Parquet layout lives in featx.export.parquet (featx[parquet])
        from ..export.parquet import read_features

        return read_features(path)
    if not path.exists():
        raise ArtifactError(f"features file {path} does not exist; run `featx extract IMAGES -o {path}` first")
    if path.is_dir():
        raise ArtifactError(f"{path} is a folder, not a features file")
    try:
        with zipfile.ZipFile(path) as zf:
            check_zip_sizes(zf, path, "features file")
        with np.load(path, allow_pickle=False) as z:
            arrays = {key: _member(z, key, path) for key in _LAYOUT}
        meta = _meta(arrays["meta"], path)
        return FeatureSet(
            features=arrays["features"],
            paths=arrays["paths"].tolist(),
            labels=arrays["labels"],
            splits=arrays["splits"],
            classes=[] if arrays["classes"] is None else arrays["classes"].tolist(),
            meta=meta,
        )
    except ArtifactError:
        raise
    except ValueError as exc:  # includes "Object arrays cannot be loaded when allow_pickle=False"
        raise ArtifactError(f"{path} is not a safe featx features file: {exc}") from exc
    except (OSError, zipfile.BadZipFile, KeyError, EOFError) as exc:
        raise ArtifactError(f"{path} is not a readable featx features file ({type(exc).__name__}: {exc})") from exc
