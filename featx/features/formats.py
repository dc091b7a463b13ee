"""The one registry of feature-store formats: which format a path is, and the reader and writer of each.

    npz      one ``.npz`` file (featx.features.store): the default, right for a folder of up to ~100k images
    parquet  one ``.parquet`` file (featx.features.parquet, needs ``featx[parquet]``): for pandas / DuckDB / Spark
    sharded  a folder of fixed-size ``.npy`` shards + ``manifest.json`` (featx.features.sharded): memory-mappable,
             written by many workers at once (``featx extract --shard I/N``), appendable; for millions of images

The readers and writers are named as ``module:function`` strings and imported on first use, so this module imports
nothing (no circle with the modules it names, no pyarrow at start-up). ``load_features`` / ``save_features`` in
``featx.features.store`` and ``featx export`` dispatch through :func:`format_of` and :func:`reader` / :func:`writer`.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from ..errors import UsageError

MANIFEST = "manifest.json"  # the file that makes a folder a sharded store


@dataclass(frozen=True)
class StoreFormat:
    name: str
    reader: str  # "module:function": path -> FeatureSet (unchecked paths; load_features checks them)
    writer: str  # "module:function": (FeatureSet, path, dtype=) -> path, atomically
    recogniser: str  # "module:function": path -> bool, "this existing output was written by featx"
    suffix: str  # "" for a folder
    dtypes: tuple = ("float32",)  # feature storage types the writer accepts


FORMATS = {
    "npz": StoreFormat("npz", "featx.features.store:_load_npz", "featx.features.store:_save_npz",
                       "featx.features.store:npz_written_by_featx", ".npz", ("float32", "float16")),
    "parquet": StoreFormat("parquet", "featx.features.parquet:read_features", "featx.features.parquet:write_features",
                           "featx.features.parquet:parquet_written_by_featx", ".parquet"),
    "sharded": StoreFormat("sharded", "featx.features.sharded:read_sharded", "featx.features.sharded:write_sharded",
                           "featx.features.sharded:sharded_written_by_featx", "", ("float32", "float16")),
}
DTYPES = ("float32", "float16")


def _resolve(spec: str) -> Callable:
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def reader(fmt: str) -> Callable:
    return _resolve(FORMATS[fmt].reader)


def writer(fmt: str) -> Callable:
    return _resolve(FORMATS[fmt].writer)


def recogniser(fmt: str) -> Callable:
    return _resolve(FORMATS[fmt].recogniser)


def format_of(path, requested: Optional[str] = None) -> str:
    """The format of the store at ``path`` (to read), or to write there when ``requested`` is None.

    An explicit ``requested`` format wins. Otherwise: an existing folder, a path written with a trailing ``/`` or a
    folder holding ``manifest.json`` is sharded; a ``.parquet`` name is Parquet; anything else (``.npz`` and, as
    before, a name without a suffix) is the single-file ``.npz``.
    """
    if requested is not None:
        fmt = str(requested).lower()
        if fmt not in FORMATS:
            raise UsageError(f"--format must be one of {', '.join(FORMATS)}, not {requested!r}")
        return fmt
    text = os.fspath(path)
    p = Path(text)
    if text.endswith(("/", os.sep)) or p.is_dir():
        return "sharded"
    if p.name == MANIFEST:
        return "sharded"
    if p.suffix.lower() == ".parquet":
        return "parquet"
    return "npz"


def check_dtype(fmt: str, dtype: Optional[str]) -> str:
    """``dtype`` (default float32) if the format can store it, else UsageError."""
    dtype = "float32" if dtype is None else str(dtype).lower()
    if dtype not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if dtype not in FORMATS[fmt].dtypes:
        raise UsageError(f"a {fmt} store holds {' or '.join(FORMATS[fmt].dtypes)} features, not {dtype}; "
                         f"choose --format npz or sharded for {dtype}")
    return dtype
