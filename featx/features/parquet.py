"""Feature stores as one Parquet file (read and written here; `featx export` and ``load_features`` both come through
``featx.features.formats``).

Columns: ``path`` (string, relative to the image root), ``label`` and ``split`` (string, null when the folder had
none), ``embedding`` (fixed-size list of float32, one per image). The store's meta (backbone, weights hash,
preprocessing, ...) and its class list are JSON under the schema metadata key ``featx``, so a store read back is
the same FeatureSet and heads keep refusing features from other backbones. pandas (``read_parquet``), pyarrow,
DuckDB, Polars, Spark and Hugging Face ``datasets`` read it without featx.

A file name that is not valid UTF-8 cannot be a Parquet string: ``path`` then holds it with U+FFFD (as featx's CSV
tables do) and an extra ``path_bytes`` column holds the exact bytes, which featx reads back.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .._deps import require
from .._io import atomic_write, safe_str
from ..errors import ArtifactError, UsageError

FORMAT = "featx.features.parquet"
FORMAT_VERSION = 1
META_KEY = b"featx"
DEFAULT_PARQUET_OUTPUT = Path("featx-out") / "features.parquet"
COLUMNS = ("path", "label", "split", "embedding")


def write_features(fs, path, dtype: str = "float32") -> Path:
    """Write FeatureSet ``fs`` to ``path`` as Parquet, atomically (float32 only: readers disagree on float16)."""
    if dtype != "float32":
        raise UsageError(f"a Parquet store holds float32 features; {dtype} storage is for .npz and sharded stores")
    pa = require("pyarrow")
    pq = require("pyarrow.parquet")
    n, dim = fs.features.shape
    flat = pa.array(np.ascontiguousarray(fs.features, dtype=np.float32).reshape(-1), type=pa.float32())
    cols, exact = {}, {}
    for name, values in (("path", fs.paths), ("label", fs.labels), ("split", fs.splits)):
        if values is None:
            cols[name] = pa.nulls(n, type=pa.string())
            continue
        values = [str(v) for v in values]
        shown = [safe_str(v) for v in values]
        cols[name] = pa.array(shown, type=pa.string())
        if shown != values:  # not valid UTF-8 (surrogate-escaped bytes of a file name): keep the exact bytes too
            exact[f"{name}_bytes"] = pa.array([v.encode("utf-8", "surrogateescape") for v in values], type=pa.binary())
    cols["embedding"] = pa.FixedSizeListArray.from_arrays(flat, dim)
    cols.update(exact)
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "classes": list(fs.classes), "dim": int(dim),
           "meta": fs.meta}
    table = pa.table(cols).replace_schema_metadata({META_KEY: json.dumps(doc, default=str).encode("utf-8")})
    path = Path(path)
    with atomic_write(path, "wb") as fh:
        pq.write_table(table, fh)
    return path


def parquet_written_by_featx(path: Path) -> bool:
    """Recogniser for check_outputs: a Parquet file whose schema metadata carries featx's key (footer only)."""
    try:
        pq = require("pyarrow.parquet")
        md = pq.read_schema(path).metadata or {}
    except Exception:  # not Parquet, unreadable, or pyarrow missing: not provably ours
        return False
    return META_KEY in md


def read_features(path):
    """Read a Parquet feature store written by featx into a FeatureSet (``load_features`` calls this)."""
    from .store import FeatureSet

    pq = require("pyarrow.parquet")
    path = Path(path)
    shown = safe_str(str(path))
    if not path.exists():
        raise ArtifactError(f"features file {shown} does not exist")
    try:
        _check_declared_size(pq.read_metadata(path), path.stat().st_size, shown)
        table = pq.read_table(path)
    except ArtifactError:
        raise
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError subclasses for corrupt or foreign files
        raise ArtifactError(f"{shown} is not a readable Parquet file ({type(exc).__name__}: {exc})") from exc
    raw = (table.schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise ArtifactError(f"{shown} is a Parquet file but not a featx feature store (no featx metadata); "
                            "write one with `featx export FEATURES.npz -o FILE.parquet`")
    try:
        doc = json.loads(raw)
        meta, classes = dict(doc["meta"]), list(doc["classes"])
        version = int(doc.get("format_version", 0))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ArtifactError(f"{shown} has unreadable featx metadata ({exc})") from exc
    if version > FORMAT_VERSION:
        raise ArtifactError(f"{shown} was written by a newer featx (format {doc['format_version']}); upgrade featx")
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise ArtifactError(f"{shown} is not a featx feature store (missing columns {', '.join(missing)})")
    return FeatureSet(features=_embeddings(table, shown), paths=_strings(table, "path", shown),
                      labels=_strings(table, "label", shown), splits=_strings(table, "split", shown),
                      classes=classes, meta=meta)


# What the footer may declare per byte of file, above a floor: float embeddings barely compress, so a footer claiming
# 100x the file (10^10 rows of a 4 kB file) is forged, and pyarrow would allocate for it before any check of ours.
_RATIO = 100
_FLOOR = 64 << 20


def _check_declared_size(md, file_size: int, shown: str) -> None:
    """Refuse, from the footer alone, a file declaring far more decoded data than it could hold."""
    declared = sum(max(int(md.row_group(i).total_byte_size), 0) for i in range(md.num_row_groups))
    dim = 1
    try:
        emb = md.schema.to_arrow_schema().field("embedding").type
        dim = max(int(getattr(emb, "list_size", 1)), 1)
    except (KeyError, ValueError, AttributeError):  # no embedding column: refused later, with its own message
        pass
    rows = int(md.num_rows)
    limit = max(_FLOOR, _RATIO * file_size)
    if rows < 0 or declared > limit or rows * (4 * dim + 1) > limit:
        raise ArtifactError(f"refusing {shown}: its footer declares {rows:,} rows ({declared:,} bytes) in a file of "
                            f"{file_size:,} bytes (a forged or damaged file); re-create it with `featx export`")


def _embeddings(table, shown: str) -> np.ndarray:
    import pyarrow as pa

    col = table.column("embedding").combine_chunks()
    value_type = col.type.value_type if pa.types.is_fixed_size_list(col.type) else None
    numeric = value_type is not None and (pa.types.is_floating(value_type) or pa.types.is_integer(value_type))
    if not numeric or col.null_count:
        raise ArtifactError(f"{shown}: the embedding column must be a fixed-size list of numbers with no nulls (it "
                            f"holds {col.type}); re-create it with `featx export`")
    dim = col.type.list_size
    flat = col.flatten().to_numpy(zero_copy_only=False)
    return np.asarray(flat, dtype=np.float32).reshape(len(col), dim)


def _strings(table, name: str, shown: str):
    """A string column as a list (exact bytes from ``<name>_bytes`` when present); None when it is all null."""
    col = table.column(f"{name}_bytes") if f"{name}_bytes" in table.column_names else table.column(name)
    if col.null_count == len(col) and name != "path":
        return None
    if col.null_count:
        raise ArtifactError(f"{shown}: the {name} column has {col.null_count} empty rows; featx writes all or none")
    values = col.to_pylist()
    return [v.decode("utf-8", "surrogateescape") if isinstance(v, bytes) else str(v) for v in values]


