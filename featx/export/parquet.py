"""`featx export` for feature stores: convert between the formats of ``featx.features.formats`` (npz <-> Parquet).

The Parquet layout itself (columns, metadata, the checks on reading) lives in ``featx.features.parquet``; the names
below are re-exported so that ``featx.export.read_features`` / ``write_features`` keep working.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._deps import require
from .._io import OutputLock, check_outputs, safe_str
from ..errors import UsageError
from ..features.parquet import (COLUMNS, DEFAULT_PARQUET_OUTPUT, FORMAT, FORMAT_VERSION, META_KEY,  # noqa: F401
                                parquet_written_by_featx, read_features, write_features)


@dataclass
class FeaturesExportResult:
    output: Path
    format: str  # parquet | npz
    n: int
    dim: int
    classes: list
    bytes: int
    seconds: float

    def to_dict(self) -> dict:
        return {"output": safe_str(str(self.output)), "format": self.format, "n": self.n, "dim": self.dim,
                "classes": self.classes, "bytes": self.bytes, "seconds": round(self.seconds, 3)}


def _npz_written_by_featx(path: Path) -> bool:
    """Recogniser for check_outputs: an .npz with featx's store keys (reads only the zip directory)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {"features", "paths", "meta"} <= set(z.files)
    except Exception:  # not an npz at all
        return False


def export_features(features, output=DEFAULT_PARQUET_OUTPUT, *, overwrite: bool = False) -> FeaturesExportResult:
    """Convert a feature store: ``.npz`` (or a FeatureSet) to ``.parquet``, or a featx ``.parquet`` back to ``.npz``."""
    from ..features.store import FeatureSet, load_features, save_features

    t0 = time.perf_counter()
    output = Path(output)
    fmt = output.suffix.lower().lstrip(".")
    if fmt not in ("parquet", "npz"):
        raise UsageError(f"a feature store exports to .parquet (or back to .npz), not {safe_str(str(output))}")
    if fmt == "parquet":
        require("pyarrow")
    if not isinstance(features, FeatureSet) and Path(features).resolve() == output.resolve():
        raise UsageError("the output is the input file; choose another -o")
    recognise = parquet_written_by_featx if fmt == "parquet" else _npz_written_by_featx
    check_outputs({output: recognise}, overwrite=overwrite)
    with OutputLock(output):
        fs = features if isinstance(features, FeatureSet) else load_features(features)
        (write_features if fmt == "parquet" else save_features)(fs, output)
    return FeaturesExportResult(output=output, format=fmt, n=len(fs), dim=fs.dim, classes=list(fs.classes),
                                bytes=output.stat().st_size, seconds=time.perf_counter() - t0)
