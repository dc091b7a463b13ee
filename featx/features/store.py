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
from ..errors import ArtifactError

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

    def save(self, path) -> Path:
        return save_features(self, path)


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


def load_features(path) -> FeatureSet:
    """Read a feature store written by ``featx extract`` (refuses pickled content)."""
    path = Path(path)
    if path.suffix.lower() == ".parquet":  # hook: the Parquet layout lives in featx.export.parquet (featx[parquet])
        from ..export.parquet import read_features

        return read_features(path)
    if not path.exists():
        raise ArtifactError(f"features file {path} does not exist; run `featx extract IMAGES -o {path}` first")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            missing = {"features", "paths", "meta"} - keys
            if missing:
                raise ArtifactError(f"{path} is not a featx features file (missing {', '.join(sorted(missing))})")
            meta = json.loads(str(z["meta"][()]))
            return FeatureSet(
                features=z["features"],
                paths=z["paths"].tolist(),
                labels=z["labels"] if "labels" in keys else None,
                splits=z["splits"] if "splits" in keys else None,
                classes=z["classes"].tolist() if "classes" in keys else [],
                meta=meta,
            )
    except ArtifactError:
        raise
    except ValueError as exc:  # includes "Object arrays cannot be loaded when allow_pickle=False"
        raise ArtifactError(f"{path} is not a safe featx features file: {exc}") from exc
    except (OSError, zipfile.BadZipFile, json.JSONDecodeError, KeyError, EOFError) as exc:
        raise ArtifactError(f"{path} is not a readable featx features file ({type(exc).__name__}: {exc})") from exc
