"""The feature store: ``FeatureSet``, ``load_features`` / ``save_features`` for every format, and the ``.npz`` layout.

The formats (npz here, Parquet, sharded folders) are chosen in ``featx.features.formats``; this module owns the
in-memory ``FeatureSet``, the checks every loaded store passes, and the single-file layout. numpy users read it with
``np.load(path, allow_pickle=False)``; pandas users with ``pd.DataFrame(z["features"]).assign(path=z["paths"])``.

Keys: ``features`` (N x D float32), ``paths`` (N, str: posix paths relative to the image root),
``labels`` (N, str class names; absent if unlabeled), ``splits`` (N, str; absent if no splits),
``classes`` (C, str), ``meta`` (0-d str: JSON provenance, see :func:`provenance_key`).
"""
from __future__ import annotations

import io
import json
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from .._io import atomic_write, fingerprint, safe_str
from .._zipcap import check_directory, read_member
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
        if n and not self.features.shape[1]:  # no head or audit can use them (sklearn ValueError, ZeroDivisionError)
            raise ArtifactError(f"the features hold 0 values per image ({n} rows); they are not features a backbone "
                                f"gives. Re-extract them with `featx extract`")
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


def save_features(fs: FeatureSet, path, *, format: Optional[str] = None, dtype: Optional[str] = None) -> Path:
    """Write ``fs`` to ``path`` atomically (the old store stays valid until the new one is complete), in ``format``
    (default: decided by the path, see :func:`featx.features.formats.format_of`), with features stored as ``dtype``
    (float32, or float16 for npz and sharded stores: half the disk, see BENCHMARKS.md for the accuracy cost)."""
    from . import formats

    fmt = formats.format_of(path, format)
    dtype = formats.check_dtype(fmt, dtype)
    if fmt == "npz":
        return _save_npz(fs, path, dtype=dtype)
    return formats.writer(fmt)(fs, path, dtype=dtype)


def cast_features(features: np.ndarray, dtype: str) -> np.ndarray:
    """``features`` as the storage ``dtype``; DataError when a finite value does not fit (float16 tops at 65504)."""
    with np.errstate(over="ignore"):  # refused just below, with the number that caused it
        stored = np.ascontiguousarray(features, dtype=dtype)
    if stored.dtype != features.dtype and not np.isfinite(stored).all() and np.isfinite(features).all():
        big = float(np.abs(features).max())
        raise DataError(f"features as large as {big:.4g} do not fit in {dtype} (at most {np.finfo(dtype).max:.0f}); "
                        f"store them as float32")
    return stored


def _save_npz(fs: FeatureSet, path, dtype: str = "float32") -> Path:
    path = Path(path)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **fs.meta}
    arrays = {
        "features": cast_features(fs.features, dtype),
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


# What each member of a store must be: (required, array kind letters allowed, number of dimensions).
_LAYOUT = {
    "features": (True, "fiu", 2),
    "paths": (True, "U", 1),
    "meta": (True, "U", 0),
    "labels": (False, "U", 1),
    "splits": (False, "U", 1),
    "classes": (False, "U", 1),
}


def read_npz(path, keys, what: str = "features file") -> dict:
    """``{key: array or None}`` for each of ``keys`` (members ``<key>.npy`` or ``<key>``) of an ``.npz``, read without
    numpy's ``np.load``: every member is inflated under a cap (featx._zipcap) and its ``.npy`` header must describe
    exactly the bytes that came out, so no array is ever allocated from a size the file merely declares.

    ArtifactError for anything else: a member that is not a ``.npy`` array (raw bytes, e.g. a pickle), pickled object
    arrays, a header that disagrees with the data; OSError / BadZipFile for a file that is not a zip.
    """
    path = Path(path)
    out = {}
    with zipfile.ZipFile(path) as zf:
        check_directory(zf, path, what, archive_size=path.stat().st_size)
        names = set(zf.namelist())
        for key in keys:
            name = f"{key}.npy" if f"{key}.npy" in names else key if key in names else None
            out[key] = None if name is None else _read_npy(zf, name, key, path, what)
    return out


_NPY_HEADER_MAX = 1 << 16  # numpy refuses .npy headers above 10,000 bytes unless told otherwise


def npy_layout(raw, key: str, path, what: str, total: Optional[int] = None) -> tuple:
    """``(shape, fortran_order, dtype, data offset)`` of the ``.npy`` bytes ``raw`` (a member read under the zip caps),
    or ArtifactError: not a ``.npy`` array (raw bytes, e.g. a pickle), an unreadable header, pickled objects, or a
    header that declares another amount of data than follows it (so nothing is ever allocated from the header).
    ``total``: the size of the whole ``.npy`` when ``raw`` is only its first bytes (a file about to be mapped)."""
    fmt = np.lib.format
    if bytes(raw[:len(fmt.MAGIC_PREFIX)]) != fmt.MAGIC_PREFIX:
        raise ArtifactError(f"{path} is not a safe featx {what}: member {key!r} is not a numpy array (raw bytes, e.g. "
                            f"a pickle); nothing in it was run. Re-create it")
    head = io.BytesIO(bytes(raw[:_NPY_HEADER_MAX]))
    try:
        version = fmt.read_magic(head)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(head)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(head)
        else:
            raise ValueError(f".npy format version {version[0]}.{version[1]}, which featx does not write")
    except (ValueError, TypeError, SyntaxError) as exc:
        raise ArtifactError(f"{path} is not a featx {what}: member {key!r} has an unreadable array header ({exc}); "
                            f"re-create it") from exc
    if dtype.hasobject:
        raise ArtifactError(f"{path} is not a safe featx {what}: member {key!r} holds pickled Python objects (Object "
                            f"arrays cannot be loaded when allow_pickle=False); nothing in it was run. Re-create it")
    count = math.prod(int(d) for d in shape)
    need, have = count * dtype.itemsize, (len(raw) if total is None else total) - head.tell()
    if need != have or (count and not dtype.itemsize):
        shown = " x ".join(str(d) for d in shape) or "0-d"
        raise ArtifactError(f"refusing {path}: its member {key!r} declares a {shown} {dtype} array ({need:,} bytes) "
                            f"but holds {have:,} bytes of data; it is damaged or forged. Re-create it")
    return shape, fortran, dtype, head.tell()


def _read_npy(zf: zipfile.ZipFile, name: str, key: str, path: Path, what: str) -> np.ndarray:
    raw = read_member(zf, name, path, what)
    shape, fortran, dtype, offset = npy_layout(raw, key, path, what)
    count = math.prod(int(d) for d in shape)
    if not count:
        return np.zeros(shape, dtype=dtype)
    # a view of the bytes actually read: no second copy, and no allocation sized by the header
    arr = np.frombuffer(raw, dtype=dtype, count=count, offset=offset)
    return arr.reshape(shape[::-1]).transpose() if fortran else arr.reshape(shape)


def _check_member(key: str, value: Optional[np.ndarray], path) -> Optional[np.ndarray]:
    """``value`` checked against the store layout; None for an absent optional member."""
    required, kinds, ndim = _LAYOUT[key]
    if value is None:
        if required:
            raise ArtifactError(f"{path} is not a featx features file (missing {key!r}); re-extract it with "
                                f"`featx extract`")
        return None
    if value.dtype.kind not in kinds or value.ndim != ndim:
        want = {"fiu": "numbers", "U": "text"}[kinds]
        raise ArtifactError(f"{path} is not a featx features file: {key!r} holds a {value.ndim}-d {value.dtype} "
                            f"array where featx writes {ndim}-d {want}. Re-extract it with `featx extract`")
    return value


def check_paths(paths, where) -> None:
    """Refuse paths a featx store never holds (ArtifactError naming the first): an absolute path, one that climbs out
    of the image root with ``..``, an empty one or one holding NUL (each would make audit, or anything else that
    joins it to the image root, read a file outside the images), and a path listed twice (one image, two rows: a
    head would train and validate on it, ``--exclude`` could not tell the rows apart).

    Refused rather than confined or dropped: ``featx extract`` writes only unique paths relative to the image root, so
    such a store was edited or forged, and quietly using part of it would hide that.
    """
    seen: dict = {}
    for i, p in enumerate(paths):
        if not p or p.startswith("/") or "\x00" in p or (".." in p and ".." in p.split("/")):
            raise ArtifactError(f"{where} lists {safe_str(repr(p))}, which is not a path inside the image root "
                                f"(absolute, empty, or climbing out with '..'); featx stores only paths relative to "
                                f"the image root. Re-extract it with `featx extract`")
        j = seen.setdefault(p, i)
        if j != i:
            raise ArtifactError(f"{where} lists {safe_str(repr(p))} twice (rows {j} and {i}); featx stores each image "
                                f"once. Re-extract it with `featx extract`")


def _meta(raw: np.ndarray, path) -> dict:
    try:
        meta = json.loads(str(raw[()]))
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} has unreadable metadata ({exc}); re-extract it with `featx extract`") from exc
    if not isinstance(meta, dict):
        raise ArtifactError(f"{path} is not a featx features file: its metadata is a JSON {type(meta).__name__}, "
                            f"not an object. Re-extract it with `featx extract`")
    version = meta.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
        raise ArtifactError(f"{path} was written by a newer featx (features format {version!r}; this featx reads "
                            f"{FORMAT_VERSION}): upgrade featx, or re-extract it")
    return meta


def npz_written_by_featx(path) -> bool:
    """Recogniser for check_outputs: an ``.npz`` whose meta says featx wrote it (only that member is read)."""
    meta = read_meta(path)
    return bool(meta) and meta.get("format") == FORMAT


def read_meta(path) -> Optional[dict]:
    """The metadata of the ``.npz`` at ``path`` (only that member is read, under the same caps as a full load), or
    None for anything that is not a readable featx-style store."""
    try:
        arrays = read_npz(path, ("meta",))
        meta = json.loads(str(_check_member("meta", arrays["meta"], path)[()]))
    except Exception:  # not a zip, no meta, a pickled or forged member, not JSON...
        return None
    return meta if isinstance(meta, dict) else None


def load_features(path) -> FeatureSet:
    """Read a feature store written by ``featx extract``.

    The layout is checked before anything is used: a zip whose members declare absurd sizes or inflate past them, a
    member that is not a plain numpy array (raw bytes such as a pickle), pickled object arrays, an array header that
    disagrees with its data, arrays of the wrong kind or shape, metadata that is not a JSON object, and paths that are
    absolute, climb out of the image root or repeat are refused with ArtifactError. Rows of NaN/Inf are kept (see
    :meth:`FeatureSet.nonfinite_rows`); ``fit_head`` refuses them.
    """
    from . import formats

    path = Path(path)
    fmt = formats.format_of(path)
    if fmt == "npz":
        return _checked(_load_npz(path), str(path))
    try:
        fs = formats.reader(fmt)(path)
    except ArtifactError as exc:
        shown = safe_str(str(path))
        raise (exc if shown in str(exc) else ArtifactError(f"{shown}: {exc}")) from None
    return _checked(fs, safe_str(str(path)))


def _load_npz(path: Path) -> FeatureSet:
    """The ``.npz`` layout, read under featx's caps (see :func:`load_features`); paths not yet checked."""
    if not path.exists():
        raise ArtifactError(f"features file {path} does not exist; run `featx extract IMAGES -o {path}` first")
    if path.is_dir():
        raise ArtifactError(f"{path} is a folder, not a features file")
    try:
        arrays = {key: _check_member(key, value, path) for key, value in read_npz(path, _LAYOUT).items()}
    except (OSError, zipfile.BadZipFile, KeyError, EOFError, ValueError) as exc:
        raise ArtifactError(f"{path} is not a readable featx features file ({type(exc).__name__}: {exc})") from exc
    meta = _meta(arrays["meta"], path)
    try:
        fs = FeatureSet(
            features=arrays["features"],
            paths=arrays["paths"].tolist(),
            labels=arrays["labels"],
            splits=arrays["splits"],
            classes=[] if arrays["classes"] is None else arrays["classes"].tolist(),
            meta=meta,
        )
    except ArtifactError as exc:  # rows and columns that do not fit together: say which file
        raise ArtifactError(f"{path}: {exc}") from None
    return fs


def _checked(fs: FeatureSet, where: str) -> FeatureSet:
    """What every loaded store must also be: paths inside the image root, each once."""
    check_paths(fs.paths, where)
    return fs


def check_feature_dim(fs: FeatureSet, where: str) -> None:
    """Refuse features with another number of values per image than their metadata says the backbone gives: a head
    fitted on them would fail on every image at predict time (the rebuilt backbone gives meta's number)."""
    said = fs.meta.get("feature_dim")
    if isinstance(said, (int, float)) and not isinstance(said, bool) and len(fs) and int(said) != fs.dim:
        raise ArtifactError(f"{where} say their backbone gives {int(said)} values per image (meta feature_dim) but "
                            f"hold {fs.dim}; they were edited or damaged. Re-extract them with `featx extract`")
