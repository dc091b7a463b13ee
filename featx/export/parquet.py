"""`featx export` for feature stores: convert between the formats of ``featx.features.formats`` (npz <-> Parquet).

The Parquet layout itself (columns, metadata, the checks on reading) lives in ``featx.features.parquet``; the names
below are re-exported so that ``featx.export.read_features`` / ``write_features`` keep working.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .._deps import require
from .._io import OutputLock, check_outputs, safe_str
from ..errors import UsageError
from ..features.parquet import (COLUMNS, DEFAULT_PARQUET_OUTPUT, FORMAT, FORMAT_VERSION, META_KEY,  # noqa: F401
                                parquet_written_by_featx, read_features, write_features)


@dataclass
class FeaturesExportResult:
    output: Path
    format: str  # parquet | npz | sharded
    n: int
    dim: int
    classes: list
    bytes: int
    seconds: float

    def to_dict(self) -> dict:
        return {"output": safe_str(str(self.output)), "format": self.format, "n": self.n, "dim": self.dim,
                "classes": self.classes, "bytes": self.bytes, "seconds": round(self.seconds, 3)}


def export_features(features, output=DEFAULT_PARQUET_OUTPUT, *, overwrite: bool = False,
                    format: Optional[str] = None) -> FeaturesExportResult:
    """Convert a feature store (a path in any format of ``featx.features.formats``, or a FeatureSet) to another:
    ``.parquet``, ``.npz``, or a sharded folder (``format="sharded"``, an existing folder, or a path ending in "/")."""
    from ..features import formats
    from ..features.store import FeatureSet, load_features, save_features

    t0 = time.perf_counter()
    fmt = formats.format_of(output, format)
    output = Path(output)
    if fmt == "npz" and output.suffix.lower() != ".npz":
        raise UsageError(f"a feature store exports to .parquet, .npz or a sharded folder, not {safe_str(str(output))}")
    if fmt == "parquet":
        require("pyarrow")
    if not isinstance(features, FeatureSet) and Path(features).resolve() == output.resolve():
        raise UsageError("the output is the input file; choose another -o")
    target = output / formats.MANIFEST if fmt == "sharded" else output  # a folder is claimed by its manifest
    if fmt == "sharded" and output.exists() and not output.is_dir():
        raise UsageError(f"{safe_str(str(output))} is a file; a sharded store is a folder")
    check_outputs({target: formats.recogniser(fmt)}, overwrite=overwrite)
    with OutputLock(target):
        fs = features if isinstance(features, FeatureSet) else load_features(features)
        save_features(fs, output, format=fmt)
    size = sum(p.stat().st_size for p in output.iterdir() if p.is_file()) if fmt == "sharded" else output.stat().st_size
    return FeaturesExportResult(output=output, format=fmt, n=len(fs), dim=fs.dim, classes=list(fs.classes),
                                bytes=size, seconds=time.perf_counter() - t0)
