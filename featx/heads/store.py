"""The head file format (the only module that knows it): one skops zip holding the sklearn pipeline and JSON metadata.

Layout: ``skops.io.dump({"pipeline": Pipeline, "meta": "<json string>"})``. skops stores objects as a JSON schema plus
``.npy`` arrays and rebuilds only the types it is told to trust, so a head received from someone else cannot run code
on load the way a pickle can. On top of skops' own check we walk the schema and refuse any type outside the short list
of sklearn/numpy types featx heads are made of (skops would trust many more sklearn estimators by default).

``meta`` records: format, head kind, tuned parameters, classes, scores, CV summary, score kind, the provenance of the
features the head was fitted on (backbone, weights hash, preprocessing, layer, feature size, their versions) and the
library versions at fitting time, and for a calibrated head ``calibration`` (``temperature`` T: its probabilities are
``softmax(logits / T)``, see featx/heads/calibration.py). Such heads are written as format version 2 so that an older
featx, which would ignore the temperature, refuses them instead of printing uncalibrated scores.

Before skops sees the file, the zip's declared member sizes are checked (a small file declaring a huge member is refused
without inflating it) and every member is inflated under a cap that does not trust its declared size (featx._zipcap:
skops' own ``ZipFile.read`` would inflate a lying member whole before its CRC check).
"""
from __future__ import annotations

import json
import logging
import math
import platform
import zipfile
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from .._io import atomic_write
from ..errors import ArtifactError, StrictModeError
from .._zipcap import check_directory, read_member, verified_zip
from ..features.store import PROVENANCE_KEYS, check_finite, npy_layout, provenance_fingerprint, provenance_key

log = logging.getLogger(__name__)

FORMAT = "featx.head"
FORMAT_VERSION = 2  # the newest version this featx reads; plain heads are still written as 1
PLAIN_FORMAT_VERSION = 1
DEFAULT_HEAD_PATH = Path("featx-out") / "head.skops"
SUFFIX = ".skops"

# Every type a featx head file may contain. Anything else (another estimator, a function, a custom class) means the
# file was not written by featx, or was tampered with: refused unless the caller names it in ``trusted``.
TRUSTED_TYPES = frozenset({
    "builtins.dict", "builtins.list", "builtins.tuple", "builtins.str", "builtins.int", "builtins.float",
    "builtins.bool", "builtins.NoneType", "builtins.slice",
    "numpy.ndarray", "numpy.dtype", "numpy.float64", "numpy.float32", "numpy.int64", "numpy.int32",
    "numpy.bool_", "numpy.str_", "numpy.intc",
    "sklearn.pipeline.Pipeline",
    "sklearn.preprocessing._data.StandardScaler",
    "sklearn.preprocessing._data.Normalizer",
    "sklearn.preprocessing._label.LabelBinarizer",
    "sklearn.linear_model._logistic.LogisticRegression",
    "sklearn.linear_model._ridge.RidgeClassifier",
    "sklearn.svm._classes.LinearSVC",
    "sklearn.svm._classes.SVC",
    "sklearn.neighbors._classification.KNeighborsClassifier",
    "sklearn.neural_network._multilayer_perceptron.MLPClassifier",
})
_SCHEMA_MAX = 64 << 20  # bytes of schema.json we are willing to parse (real heads: a few kB)

# Provenance keys shown to users when features and head disagree (PROVENANCE_KEYS decide; these explain).
_SHOWN = ("backbone", "weights_sha256", "preprocess", "layer")


def library_versions() -> dict:
    import sklearn
    import skops

    from .. import __version__

    return {"featx": __version__, "sklearn": sklearn.__version__, "skops": skops.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def feature_provenance(meta: dict, dim: int | None = None) -> dict:
    """The part of a features file's meta a head keeps: enough to refuse features from anything else."""
    keep = dict(provenance_key(meta))
    keep["weights_source"] = meta.get("weights_source")
    keep["feature_dim"] = meta.get("feature_dim", dim)
    keep["fingerprint"] = provenance_fingerprint(meta)
    if meta.get("versions") is not None:
        keep["versions"] = meta["versions"]
    return keep


class Head:
    """A fitted head: a scikit-learn Pipeline whose ``classes_`` are class names, plus its metadata.

    ``predict(feature_set)`` refuses features whose provenance (backbone, weights, preprocessing, layer) differs from
    the features the head was fitted on, even when the feature size matches: other axes, meaningless answers.
    """

    def __init__(self, pipeline, meta: dict, path: Optional[Path] = None):
        self.pipeline = pipeline
        self.meta = meta
        self.path = Path(path) if path is not None else None

    # -- what it is
    @property
    def kind(self) -> str:
        return self.meta["kind"]

    @property
    def classes(self) -> list:
        return [str(c) for c in self.pipeline.classes_]

    @property
    def score_kind(self) -> str:
        if self.calibration:
            return "probability"
        return self.meta.get("score_kind", "probability" if hasattr(self.pipeline, "predict_proba") else "decision")

    @property
    def calibration(self) -> Optional[dict]:
        """``{"method": "temperature", "temperature": T, ...}`` for a calibrated head, else None."""
        return self.meta.get("calibration") or None

    @property
    def feature_meta(self) -> dict:
        return self.meta.get("features", {})

    @property
    def fingerprint(self) -> str:
        return self.feature_meta.get("fingerprint") or provenance_fingerprint(self.feature_meta)

    @property
    def feature_dim(self) -> Optional[int]:
        return getattr(self.pipeline, "n_features_in_", None) or self.feature_meta.get("feature_dim")

    def __repr__(self) -> str:
        return (f"Head(kind={self.kind!r}, classes={len(self.classes)}, backbone={self.feature_meta.get('backbone')!r}, "
                f"fingerprint={self.fingerprint!r})")

    # -- compatibility
    def check_compatible(self, feature_meta: dict, dim: Optional[int] = None) -> None:
        """Raise ArtifactError unless features with ``feature_meta`` (and ``dim`` columns) come from the same
        backbone, weights, preprocessing and layer as the features this head was fitted on."""
        mine = provenance_key(self.feature_meta)
        theirs = provenance_key(feature_meta or {})
        where = f"head {self.path}" if self.path else "the head"
        if mine != theirs:
            differ = [k for k in PROVENANCE_KEYS if mine.get(k) != theirs.get(k)]
            raise ArtifactError(
                f"{where} was fitted on features from backbone {mine.get('backbone')!r} "
                f"(fingerprint {provenance_fingerprint(self.feature_meta)}), but these features come from backbone "
                f"{theirs.get('backbone')!r} (fingerprint {provenance_fingerprint(feature_meta or {})}); they differ "
                f"in {', '.join(differ)}. Extract features with the head's backbone and weights, or fit a new head "
                f"on these features")
        want = self.feature_dim
        if dim is not None and want is not None and int(dim) != int(want):
            raise ArtifactError(f"{where} expects {want} features per image but got {dim}")

    # -- use
    def predict_scores(self, X) -> tuple:
        """``(scores N x C, score_kind)``: probabilities (logistic, knn, mlp, and every calibrated head) or decision
        scores (svm, svm-rbf, linear), columns in ``self.classes`` order. Two-class decision scores come back as
        ``[-s, s]`` so argmax agrees."""
        X = np.asarray(X, dtype=np.float32)
        if self.calibration:
            from .calibration import probabilities

            return probabilities(self.pipeline, X, float(self.calibration["temperature"])), "probability"
        if self.score_kind == "probability":
            return np.asarray(self.pipeline.predict_proba(X)), "probability"
        s = np.asarray(self.pipeline.decision_function(X), dtype=np.float64)
        if s.ndim == 1:
            s = np.column_stack([-s, s])
        return s, "decision"

    def predict(self, feature_set) -> np.ndarray:
        """Class names for every row of a loaded FeatureSet (after checking it is compatible)."""
        self.check_compatible(feature_set.meta, dim=feature_set.dim)
        check_finite(feature_set, "features")
        if len(feature_set) == 0:
            return np.zeros((0,), dtype=str)
        return np.asarray(self.pipeline.predict(feature_set.features)).astype(str)

    def save(self, path) -> Path:
        return save_head(self, path)


def save_head(head: Head, path) -> Path:
    """Write ``head`` as a skops file, atomically (an existing file stays valid until the new one is complete)."""
    import skops.io as sio

    path = Path(path)
    version = FORMAT_VERSION if head.meta.get("calibration") else PLAIN_FORMAT_VERSION
    meta = {**head.meta, "format": FORMAT, "format_version": version}
    data = sio.dumps({"pipeline": head.pipeline, "meta": json.dumps(meta, default=str)})
    with atomic_write(path, "wb") as fh:
        fh.write(data)
    head.path = path
    head.meta = meta
    return path


def _schema_types(node, found: set) -> None:
    """Collect ``module.Class`` of every object node in a skops schema."""
    if isinstance(node, dict):
        if "__class__" in node and "__module__" in node:
            found.add(f"{node['__module__']}.{node['__class__']}")
        for v in node.values():
            _schema_types(v, found)
    elif isinstance(node, list):
        for v in node:
            _schema_types(v, found)


def _refuse_not_skops(path: Path, data: bytes) -> None:
    looks_pickle = data[:1] == b"\x80" or data[:2] in (b"(d", b"(l", b"cc")
    what = "it looks like a pickle" if looks_pickle else "it is not a skops zip file"
    raise ArtifactError(f"{path} is not a featx head file ({what}); pickles are refused because loading one can run "
                        f"arbitrary code. Re-fit the head with `featx fit`")


def _read_schema(path: Path, data: bytes) -> tuple:
    """``(schema, safe bytes)``: the parsed schema.json of a skops zip, and bytes skops may read by itself, after every
    member was inflated under featx's caps (featx._zipcap: a member's declared size is never trusted)."""
    import io

    if not zipfile.is_zipfile(io.BytesIO(data)):
        _refuse_not_skops(path, data)
    try:
        safe = verified_zip(data, path, "head file", check=lambda name, body: _check_array(name, body, path))
        with zipfile.ZipFile(io.BytesIO(safe)) as zf:
            raw = read_member(zf, "schema.json", path, "head file", cap=_SCHEMA_MAX)
        return json.loads(bytes(raw)), safe
    except (KeyError, zipfile.BadZipFile, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ArtifactError(f"{path} is not a featx head file (zip without a valid skops schema: {exc})") from exc


def _check_array(name: str, body: bytearray, path: Path) -> None:
    """skops reads each array member with ``np.load(BytesIO)``, which allocates what the ``.npy`` header declares
    before reading the data: refuse a header that disagrees with the bytes that follow it."""
    if name.endswith(".npy"):
        npy_layout(body, name, path, "head file")


def is_head_file(path) -> bool:
    """True for a head file featx wrote (a skops zip whose schema carries featx's head format): featx may replace it.
    Only schema.json is read, under a cap on the bytes it inflates."""
    try:
        with zipfile.ZipFile(path) as zf:
            check_directory(zf, path, "head file")
            return FORMAT.encode() in read_member(zf, "schema.json", path, "head file", cap=_SCHEMA_MAX)
    except (OSError, KeyError, zipfile.BadZipFile, RuntimeError, ValueError, ArtifactError):
        return False


def load_head(path, *, trusted: Optional[Iterable[str]] = None, strict: bool = False) -> Head:
    """Load a head file safely.

    Refuses (ArtifactError): a missing file, anything that is not a skops zip (pickles included; nothing in it is
    executed), a file holding types outside :data:`TRUSTED_TYPES` (unless listed in ``trusted``), and files without
    featx metadata. A scikit-learn or featx version different from the one that fitted the head is logged as a
    warning, or raised as StrictModeError when ``strict``.
    """
    import skops.io as sio

    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"head file {path} does not exist; fit one with `featx fit FEATURES -o {path}`")
    if path.is_dir():
        raise ArtifactError(f"{path} is a folder, not a head file")
    schema, data = _read_schema(path, path.read_bytes())

    allowed = TRUSTED_TYPES | set(trusted or ())
    found: set = set()
    _schema_types(schema, found)
    try:
        untrusted_by_skops = set(sio.get_untrusted_types(data=data))
    except Exception as exc:  # a malformed schema must not get further than this
        raise ArtifactError(f"{path} is not a readable head file ({type(exc).__name__}: {exc})") from exc
    unexpected = sorted((found | untrusted_by_skops) - allowed)
    if unexpected:
        raise ArtifactError(
            f"refusing to load {path}: it contains types a featx head never uses ({', '.join(unexpected)}); "
            f"if you trust whoever made it, pass trusted=[...] listing them to featx.load_head")
    try:
        obj = sio.loads(data, trusted=sorted(untrusted_by_skops))
    except Exception as exc:  # skops raises various errors for corrupt or incompatible files
        raise ArtifactError(f"{path} could not be loaded ({type(exc).__name__}: {exc})") from exc

    if not isinstance(obj, dict) or "pipeline" not in obj or not isinstance(obj.get("meta"), str):
        raise ArtifactError(f"{path} is a skops file but not a featx head (no pipeline/meta)")
    try:
        meta = json.loads(obj["meta"])
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path} has unreadable metadata: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        shown = meta.get("format") if isinstance(meta, dict) else f"a JSON {type(meta).__name__}"
        raise ArtifactError(f"{path} is not a featx head file (format {shown!r})")
    _check_meta_shape(path, meta)
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ArtifactError(f"{path} was written by a newer featx (head format {meta.get('format_version')}); upgrade featx")
    pipeline = obj["pipeline"]
    if not hasattr(pipeline, "predict") or not hasattr(pipeline, "classes_"):
        raise ArtifactError(f"{path} does not hold a fitted classifier")

    _check_versions(path, meta.get("versions", {}), strict)
    calibration_temperature(meta.get("calibration"), f"head file {path}")
    return Head(pipeline, meta, path)


# The meta entries featx reads back, and the JSON type each must have: anything else was edited by hand.
_META_TYPES = {"format_version": int, "kind": str, "features": dict, "versions": dict, "params": dict,
               "score_kind": str}


def _check_meta_shape(path: Path, meta: dict) -> None:
    for key, kind in _META_TYPES.items():
        value = meta.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise ArtifactError(f"{path} is not a head file featx wrote: its metadata entry {key!r} is a "
                                f"{type(value).__name__}, not a {kind.__name__}; re-fit it with `featx fit`")
    if not isinstance(meta.get("kind"), str):
        raise ArtifactError(f"{path} is not a head file featx wrote: its metadata names no head kind; re-fit it with "
                            f"`featx fit`")


def calibration_temperature(cal, where: str = "the head") -> Optional[float]:
    """T of a calibration record (None when the head is not calibrated: no record, or an empty one), or
    ArtifactError for a record featx did not write: another method, or T that is not a finite number > 0, which
    would silently flip (T < 0) or break (a string) every probability ``softmax(logits / T)`` gives."""
    if not cal:
        return None
    ok = isinstance(cal, dict) and cal.get("method", "temperature") == "temperature"
    t = cal.get("temperature") if ok else None
    if not (isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t > 0):
        raise ArtifactError(f"{where} records a calibration featx cannot use ({repr(cal)[:200]}): expected method "
                            f"'temperature' with a temperature > 0; re-fit it with `featx fit --calibrate`")
    return float(t)


def _check_versions(path: Path, recorded: dict, strict: bool) -> None:
    now = library_versions()
    drift = [f"{lib} {recorded[lib]} -> {now[lib]}" for lib in ("sklearn", "featx")
             if recorded.get(lib) and recorded.get(lib) != now.get(lib)]
    if not drift:
        return
    msg = (f"head {path} was fitted with other library versions ({'; '.join(drift)}); predictions may differ "
           f"slightly. Re-fit it to be sure")
    if strict:
        raise StrictModeError(msg + " (refused under --strict)")
    log.warning(msg)
