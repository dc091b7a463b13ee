"""Folders of images -> an ordered list of records (path, relative path, label, split), plus train/val leakage checks.

Layouts understood (first match wins):
- ``root/train/`` next to ``root/val/`` (or ``valid/``, ``validation/``, ``test/``), or a root holding nothing but
  such folders: splits, recorded per image as "train" / "val" / "test";
- inside each split (or inside root without splits), first-level folders are classes; deeper folders belong to
  their first-level class;
- images directly inside (with no class folders) are unlabeled.

Order is deterministic: records are sorted by relative path (code point order), whatever the file system returns.
Hidden files and folders (name starting with ".") and macOS ``__MACOSX`` resource folders are ignored; files are
chosen by extension (case-insensitive), so notes, CSVs and JSON next to the images are skipped silently. Symlinked
folders are followed; a link back to one of its own ancestors (a loop) is not, so the walk always ends.
"""
from __future__ import annotations

import hashlib
import os
import stat
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from .._io import safe_str
from ..errors import DataError

# Always looked at, whatever Pillow reports. HEIC/HEIF/AVIF are listed so that, without their plugin, they show up
# as skipped with an install hint instead of being silently missed.
BASE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                             ".heic", ".heif", ".avif"})
# Pillow registers these, but cannot decode them here (identify-only or stub plugins, documents):
# listing them would only produce a skip per file.
_UNDECODABLE_FORMATS = {"BUFR", "GRIB", "HDF5", "WMF", "MPEG", "PDF", "PALM"}

SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}
_IGNORED_DIRS = {"__MACOSX"}
_MAX_DEPTH = 64  # guards against pathological (non-loop) symlink chains; real trees are far shallower

_extensions_cache: Optional[frozenset] = None


def image_extensions() -> frozenset:
    """Lower-case extensions (with dot) treated as images: the common ones plus what the installed Pillow decodes."""
    global _extensions_cache
    if _extensions_cache is None:
        from PIL import EpsImagePlugin, Image

        Image.init()
        skip = set(_UNDECODABLE_FORMATS)
        if not EpsImagePlugin.has_ghostscript():
            skip.add("EPS")
        exts = {e.lower() for e, fmt in Image.registered_extensions().items()
                if fmt not in skip and (fmt in Image.OPEN or fmt == "MPO")}
        _extensions_cache = frozenset(exts | BASE_EXTENSIONS)
    return _extensions_cache


@dataclass
class ImageRecord:
    """One image file. ``relpath`` is posix and relative to the folder root (undecodable name bytes kept as
    surrogate escapes; use ``featx._io.safe_str`` before writing it to UTF-8 text)."""

    path: Path
    relpath: str
    label: Optional[str] = None
    split: Optional[str] = None


@dataclass
class ImageFolder:
    """The result of :func:`discover`: records in deterministic order plus what the layout said."""

    root: Path
    records: List[ImageRecord]
    classes: List[str] = field(default_factory=list)
    has_labels: bool = False
    has_splits: bool = False
    warnings: List[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[ImageRecord]:
        return iter(self.records)

    def paths(self) -> List[Path]:
        return [r.path for r in self.records]

    def relpaths(self) -> List[str]:
        return [r.relpath for r in self.records]

    def labels(self) -> Optional[List[Optional[str]]]:
        """Per-record class names, or None for an unlabeled folder. In a folder where one split has class folders
        and another does not (train/<class>/... next to a flat test/), the unlabeled records hold None."""
        return [r.label for r in self.records] if self.has_labels else None

    def splits(self) -> Optional[List[str]]:
        return [r.split for r in self.records] if self.has_splits else None

    def split_names(self) -> List[str]:
        return sorted({r.split for r in self.records if r.split}, key=lambda s: (_SPLIT_ORDER.get(s, 9), s))

    def subset(self, split: str) -> "ImageFolder":
        recs = [r for r in self.records if r.split == split]
        return ImageFolder(self.root, recs, list(self.classes), self.has_labels, self.has_splits, list(self.warnings))

    def counts(self) -> Dict[str, Dict[str, int]]:
        """{split or "all": {class or "(unlabeled)": n}} for summaries."""
        out: Dict[str, Dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for r in self.records:
            out[r.split or "all"][r.label if r.label is not None else "(unlabeled)"] += 1
        return {s: dict(c) for s, c in out.items()}


def discover(root, *, allow_empty: bool = False) -> ImageFolder:
    """Find the images under ``root`` and read labels and splits from the folder layout (see module docstring).

    Raises:
        DataError: root missing or not a folder, unreadable, images mixed with class folders at one level,
            or no images at all (unless ``allow_empty``).
    """
    root_str = os.fspath(root)
    if isinstance(root_str, bytes):
        root_str = os.fsdecode(root_str)
    shown = safe_str(root_str)
    try:
        st = os.stat(root_str)
    except FileNotFoundError:
        raise DataError(f"image folder {shown} does not exist") from None
    except OSError as exc:
        raise DataError(f"cannot read image folder {shown}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise DataError(f"{shown} is a file; expected a folder of images (class subfolders give labels)")
    root_str = os.path.abspath(root_str)  # records carry absolute paths; symlinks in them are kept, not resolved
    root_path = Path(root_str)
    warnings: List[str] = []
    exts = image_extensions()

    try:
        top_dirs, top_files, top_other = _list_dir(root_str, exts)
    except OSError as exc:
        raise DataError(f"cannot read image folder {shown}: {exc.strerror}") from None

    split_dirs = {name: SPLIT_ALIASES[name.lower()] for name in top_dirs if name.lower() in SPLIT_ALIASES}
    split_kinds = set(split_dirs.values())
    is_split = bool(split_dirs) and (("train" in split_kinds and len(split_kinds) > 1) or len(split_dirs) == len(top_dirs))

    records: List[ImageRecord] = []
    labelled_parts: List[bool] = []
    all_classes: set = set()
    if is_split:
        others = [d for d in top_dirs if d not in split_dirs]
        if others or top_files:
            what = ", ".join(_q(x) for x in (others + top_files)[:5])
            raise DataError(
                f"{shown} holds split folders ({', '.join(sorted(split_dirs))}) and also {what}; "
                "move those into a split's class folders or out of the image folder")
        for name in sorted(split_dirs):
            split = split_dirs[name]
            labelled, classes = _collect_level(root_str, name, split, exts, records, warnings)
            labelled_parts.append(labelled)
            all_classes.update(classes)
    else:
        labelled, classes = _collect_level(root_str, "", None, exts, records, warnings,
                                           listing=(top_dirs, top_files))
        labelled_parts.append(labelled)
        all_classes.update(classes)

    if not records and not allow_empty:
        hint = ""
        if top_other:
            sample = ", ".join(sorted({os.path.splitext(n)[1] or n for n in top_other})[:5])
            hint = f" (found other files: {safe_str(sample)})"
        raise DataError(
            f"no images found in {shown}{hint}; looked for {', '.join(sorted(BASE_EXTENSIONS - {'.jpeg', '.tif'}))} "
            "and other formats Pillow reads (hidden files and folders are ignored)")

    records.sort(key=lambda r: r.relpath)
    has_labels = any(r.label is not None for r in records) if records else any(labelled_parts)
    if has_labels and any(r.label is None for r in records):
        unl = sorted({r.split for r in records if r.label is None and r.split})
        warnings.append(f"split(s) {', '.join(unl)} have no class folders: their images are unlabeled")
    return ImageFolder(
        root=root_path,
        records=records,
        classes=sorted(all_classes) if has_labels else [],
        has_labels=has_labels,
        has_splits=is_split,
        warnings=warnings,
    )


discover_images = discover  # the name featx/__init__.py exports (``featx.discover_images``)


def _collect_level(root: str, sub: str, split: Optional[str], exts, records: List[ImageRecord],
                   warnings: List[str], listing=None) -> Tuple[bool, List[str]]:
    """Collect one split (or the root): class folders or loose images. Returns (labelled, non-empty classes)."""
    base = os.path.join(root, sub) if sub else root
    where = _q(sub) if sub else "the image folder"
    if listing is None:
        try:
            listing = _list_dir(base, exts)[:2]
        except OSError as exc:
            warnings.append(f"cannot read {where}: {exc.strerror}; skipped")
            return False, []
    dirs, files = listing[0], listing[1]
    ancestors = frozenset({_dir_key(root)} | ({_dir_key(base)} if sub else set()))
    per_class: List[Tuple[str, List[str]]] = []
    for cls in dirs:
        rel_cls = f"{sub}/{cls}" if sub else cls
        per_class.append((cls, list(_walk(root, rel_cls, exts, ancestors, warnings, depth=1))))
    nonempty = [(c, rels) for c, rels in per_class if rels]
    if files and nonempty:
        raise DataError(
            f"{where} holds both images ({', '.join(_q(f) for f in files[:3])}) and class folders "
            f"({', '.join(_q(c) for c, _ in nonempty[:3])}); put every image inside a class folder, or use a flat "
            "folder without subfolders for unlabeled images")
    for cls, rels in per_class:
        if not rels:
            rel_cls = f"{sub}/{cls}" if sub else cls
            warnings.append(f"{'folder' if files else 'class folder'} {_q(rel_cls)} holds no images; ignored")
    if not nonempty:
        for f in files:
            rel = f"{sub}/{f}" if sub else f
            records.append(ImageRecord(Path(root, rel), rel, None, split))
        return (False, []) if files or not dirs else (True, [])
    for cls, rels in nonempty:
        records.extend(ImageRecord(Path(root, rel), rel, cls, split) for rel in rels)
    classes = [c for c, _ in nonempty]
    return True, classes


def _walk(root: str, rel: str, exts, ancestors: frozenset, warnings: List[str], depth: int) -> Iterator[str]:
    """Relative paths of images under root/rel, following symlinked folders but never into an ancestor."""
    full = os.path.join(root, rel)
    key = _dir_key(full)
    if key is None:
        return
    if key in ancestors:
        warnings.append(f"symlink loop at {_q(rel)}; not followed")
        return
    if depth > _MAX_DEPTH:
        warnings.append(f"folders nested deeper than {_MAX_DEPTH} levels at {_q(rel)}; not followed")
        return
    try:
        dirs, files, _ = _list_dir(full, exts)
    except OSError as exc:
        warnings.append(f"cannot read {_q(rel)}: {exc.strerror}; skipped")
        return
    for f in files:
        yield f"{rel}/{f}"
    inner = ancestors | {key}
    for d in dirs:
        yield from _walk(root, f"{rel}/{d}", exts, inner, warnings, depth + 1)


def _list_dir(path: str, exts) -> Tuple[List[str], List[str], List[str]]:
    """(sub-folders, image files, other files) of one folder, hidden entries dropped, each sorted."""
    dirs, files, other = [], [], []
    with os.scandir(path) as it:
        for entry in it:
            name = entry.name
            if name.startswith(".") or name in _IGNORED_DIRS:
                continue
            try:
                if entry.is_dir():  # follows symlinks
                    dirs.append(name)
                elif entry.is_file():
                    (files if os.path.splitext(name)[1].lower() in exts else other).append(name)
                # broken symlinks, sockets, FIFOs: neither, ignored
            except OSError:
                continue
    return sorted(dirs), sorted(files), sorted(other)


def _dir_key(path: str):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _q(name: str) -> str:
    return repr(safe_str(name))


# -- leakage -----------------------------------------------------------------------------------------------------------
def find_leakage(folder: ImageFolder) -> List[dict]:
    """Byte-identical files that appear in more than one split (e.g. the same photo in train and val).

    Fast on large folders: files are grouped by size first, only size collisions across splits are read, first the
    leading 64 KiB and then, for the few that still collide, the whole file.

    Returns a list of ``{"sha256": hex, "paths": [relpath, ...], "splits": ["train", "val", ...]}``, sorted by the
    first path. Files that cannot be read are left out (decoding reports them).
    """
    if not folder.has_splits:
        return []
    by_size: Dict[int, List[ImageRecord]] = defaultdict(list)
    for r in folder.records:
        try:
            by_size[os.stat(r.path).st_size].append(r)
        except OSError:
            continue
    groups: List[dict] = []
    for recs in by_size.values():
        if len(recs) < 2 or len({r.split for r in recs}) < 2:
            continue
        by_head = _group(recs, lambda p: _digest(p, 1 << 16))
        for head_group in by_head:
            if len({r.split for r in head_group}) < 2:
                continue
            for same, digest in _group_with_key(head_group, lambda p: _digest(p, None)):
                splits = {r.split for r in same}
                if len(splits) > 1:
                    groups.append({
                        "sha256": digest,
                        "paths": sorted(r.relpath for r in same),
                        "splits": sorted(splits, key=lambda s: (_SPLIT_ORDER.get(s, 9), s)),
                    })
    groups.sort(key=lambda g: g["paths"][0])
    return groups


def _group(recs, keyfn) -> List[List[ImageRecord]]:
    return [g for g, _ in _group_with_key(recs, keyfn)]


def _group_with_key(recs, keyfn):
    buckets: Dict[str, List[ImageRecord]] = defaultdict(list)
    for r in recs:
        k = keyfn(r.path)
        if k is not None:
            buckets[k].append(r)
    return [(g, k) for k, g in buckets.items() if len(g) > 1]


def _digest(path: Path, limit: Optional[int]) -> Optional[str]:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            if limit is not None:
                h.update(fh.read(limit))
            else:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
    except OSError:
        return None
    return h.hexdigest()
