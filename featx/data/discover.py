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
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

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
    ident: Optional[tuple] = field(default=None, repr=False, compare=False)  # (st_dev, st_ino): one file, one row


@dataclass
class ImageFolder:
    """The result of :func:`discover`: records in deterministic order plus what the layout said."""

    root: Path
    records: List[ImageRecord]
    classes: List[str] = field(default_factory=list)
    has_labels: bool = False
    has_splits: bool = False
    warnings: List[str] = field(default_factory=list)
    # files and folders featx did not read, each {"path", "reason", "stage": "discover"}: unreadable or too deep
    # folders, paths too long for the OS, extra copies of one file reached through links
    skipped: List[dict] = field(default_factory=list)
    skip_warnings: List[str] = field(default_factory=list, repr=False)  # warnings that announce one of those skips

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
        skipped = [s for s in self.skipped if SPLIT_ALIASES.get(s["path"].split("/", 1)[0].lower()) == split]
        return ImageFolder(self.root, recs, list(self.classes), self.has_labels, self.has_splits, list(self.warnings),
                           skipped, list(self.skip_warnings))

    def counts(self) -> Dict[str, Dict[str, int]]:
        """{split or "all": {class or "(unlabeled)": n}} for summaries."""
        out: Dict[str, Dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for r in self.records:
            out[r.split or "all"][r.label if r.label is not None else "(unlabeled)"] += 1
        return {s: dict(c) for s, c in out.items()}


def discover(root, *, allow_empty: bool = False) -> ImageFolder:
    """Find the images under ``root`` and read labels and splits from the folder layout (see module docstring).

    Folders that cannot be entered (no permission, a path longer than the OS allows, nesting past the depth
    limit) and files that would be used twice are listed in ``ImageFolder.skipped`` with their reason, like files
    that fail to decode later; class folder names that differ only in case are warned about.

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
    rep = _Report()
    exts = image_extensions()

    try:
        top = _list_dir(root_str, exts)
    except OSError as exc:
        raise DataError(f"cannot read image folder {shown}: {exc.strerror}") from None
    for name, why in top.problems:
        rep.skip(name, f"cannot read: {why}")

    records, labelled_parts, all_classes, is_split = _collect(root_str, shown, top, exts, rep)

    if not records and not allow_empty:
        hint = ""
        if top.other:
            sample = ", ".join(sorted({os.path.splitext(n)[1] or n for n in top.other})[:5])
            hint = f" (found other files: {safe_str(sample)})"
        raise DataError(
            f"no images found in {shown}{hint}; looked for {', '.join(sorted(BASE_EXTENSIONS - {'.jpeg', '.tif'}))} "
            "and other formats Pillow reads (hidden files and folders are ignored)")

    records = _used_once(records, root_str, rep)
    records.sort(key=lambda r: r.relpath)
    has_labels = any(r.label is not None for r in records) if records else any(labelled_parts)
    if has_labels and any(r.label is None for r in records):
        unl = sorted({r.split for r in records if r.label is None and r.split})
        rep.warnings.append(f"split(s) {', '.join(unl)} have no class folders: their images are unlabeled")
    _warn_case_twins(all_classes, rep)
    return ImageFolder(
        root=Path(root_str),
        records=records,
        classes=sorted(all_classes) if has_labels else [],
        has_labels=has_labels,
        has_splits=is_split,
        warnings=rep.warnings,
        skipped=sorted(rep.skipped, key=lambda s: s["path"]),
        skip_warnings=rep.skip_warnings,
    )


def _collect(root_str: str, shown: str, top: "_Listing", exts, rep: "_Report"):
    """Records by layout (splits or not) -> (records, labelled per part, class names, is_split)."""
    split_dirs = {name: SPLIT_ALIASES[name.lower()] for name in top.dirs if name.lower() in SPLIT_ALIASES}
    split_kinds = set(split_dirs.values())
    is_split = bool(split_dirs) and (("train" in split_kinds and len(split_kinds) > 1) or len(split_dirs) == len(top.dirs))

    records: List[ImageRecord] = []
    labelled_parts: List[bool] = []
    all_classes: set = set()
    if is_split:
        others = [d for d in top.dirs if d not in split_dirs]
        if others or top.files:
            what = ", ".join(_q(x) for x in (others + top.files)[:5])
            raise DataError(
                f"{shown} holds split folders ({', '.join(sorted(split_dirs))}) and also {what}; "
                "move those into a split's class folders or out of the image folder")
        for name in sorted(split_dirs):
            labelled, classes = _collect_level(root_str, name, split_dirs[name], exts, records, rep)
            labelled_parts.append(labelled)
            all_classes.update(classes)
    else:
        labelled, classes = _collect_level(root_str, "", None, exts, records, rep, listing=top)
        labelled_parts.append(labelled)
        all_classes.update(classes)
    return records, labelled_parts, all_classes, is_split


discover_images = discover  # the name featx/__init__.py exports (``featx.discover_images``)


@dataclass
class _Report:
    """What discovery says besides the records: warnings, and skips (``{"path", "reason", "stage"}``)."""

    warnings: List[str] = field(default_factory=list)
    skipped: List[dict] = field(default_factory=list)
    skip_warnings: List[str] = field(default_factory=list)  # the warnings that announce a skip

    def skip(self, rel: str, reason: str, warning: Optional[str] = None) -> None:
        self.skipped.append({"path": rel, "reason": reason, "stage": "discover"})
        if warning:
            self.warnings.append(warning)
            self.skip_warnings.append(warning)


class _Listing(NamedTuple):
    """One folder's entries, hidden ones dropped, each list sorted."""

    dirs: List[str]
    files: List[str]  # image files by extension
    other: List[str]
    problems: List[Tuple[str, str]]  # (name, why) of entries that could not even be stat-ed
    idents: Dict[str, tuple]  # file name -> (st_dev, st_ino) of the file itself (links followed)


def _collect_level(root: str, sub: str, split: Optional[str], exts, records: List[ImageRecord],
                   rep: _Report, listing: Optional[_Listing] = None) -> Tuple[bool, List[str]]:
    """Collect one split (or the root): class folders or loose images. Returns (labelled, non-empty classes)."""
    base = os.path.join(root, sub) if sub else root
    where = _q(sub) if sub else "the image folder"
    if listing is None:
        try:
            listing = _list_dir(base, exts)
        except OSError as exc:
            rep.skip(sub, f"cannot read folder: {exc.strerror}", f"cannot read {where}: {exc.strerror}; skipped")
            return False, []
        for name, why in listing.problems:
            rep.skip(f"{sub}/{name}", f"cannot read: {why}")
    dirs, files = listing.dirs, listing.files
    ancestors = frozenset({_dir_key(root)} | ({_dir_key(base)} if sub else set()))
    per_class: List[Tuple[str, List[tuple]]] = []
    for cls in dirs:
        rel_cls = f"{sub}/{cls}" if sub else cls
        per_class.append((cls, list(_walk(root, rel_cls, exts, ancestors, rep, depth=1))))
    nonempty = [(c, rels) for c, rels in per_class if rels]
    if files and nonempty:
        raise DataError(
            f"{where} holds both images ({', '.join(_q(f) for f in files[:3])}) and class folders "
            f"({', '.join(_q(c) for c, _ in nonempty[:3])}); put every image inside a class folder, or use a flat "
            "folder without subfolders for unlabeled images")
    for cls, rels in per_class:
        if not rels:
            rel_cls = f"{sub}/{cls}" if sub else cls
            rep.warnings.append(f"{'folder' if files else 'class folder'} {_q(rel_cls)} holds no images; ignored")
    if not nonempty:
        for f in files:
            rel = f"{sub}/{f}" if sub else f
            records.append(ImageRecord(Path(root, rel), rel, None, split))
        return (False, []) if files or not dirs else (True, [])
    for cls, rels in nonempty:
        for rel, ident in rels:
            records.append(ImageRecord(Path(root, rel), rel, cls, split, ident))
    return True, [c for c, _ in nonempty]


def _walk(root: str, rel: str, exts, ancestors: frozenset, rep: _Report, depth: int) -> Iterator[tuple]:
    """(relative path, file identity) of images under root/rel, following symlinked folders but never into an
    ancestor. A folder that cannot be entered is a skip with its reason."""
    full = os.path.join(root, rel)
    try:
        st = os.stat(full)
        key = (st.st_dev, st.st_ino)
    except OSError as exc:  # e.g. a path longer than the OS allows (ENAMETOOLONG), a dangling link
        rep.skip(rel, f"cannot read folder: {exc.strerror}", f"cannot read {_q(rel)}: {exc.strerror}; skipped")
        return
    if key in ancestors:
        rep.warnings.append(f"symlink loop at {_q(rel)}; not followed")
        return
    if depth > _MAX_DEPTH:
        rep.skip(rel, f"folders nested deeper than {_MAX_DEPTH} levels; not followed",
                 f"folders nested deeper than {_MAX_DEPTH} levels at {_q(rel)}; not followed")
        return
    try:
        listing = _list_dir(full, exts)
    except OSError as exc:
        rep.skip(rel, f"cannot read folder: {exc.strerror}", f"cannot read {_q(rel)}: {exc.strerror}; skipped")
        return
    for name, why in listing.problems:
        rep.skip(f"{rel}/{name}", f"cannot read: {why}")
    for f in listing.files:
        yield f"{rel}/{f}", listing.idents.get(f)
    inner = ancestors | {key}
    for d in listing.dirs:
        yield from _walk(root, f"{rel}/{d}", exts, inner, rep, depth + 1)


def _list_dir(path: str, exts) -> _Listing:
    """The entries of one folder (see :class:`_Listing`)."""
    dirs, files, other, problems, idents = [], [], [], [], {}
    with os.scandir(path) as it:
        for entry in it:
            name = entry.name
            if name.startswith(".") or name in _IGNORED_DIRS:
                continue
            try:
                if entry.is_dir():  # follows symlinks
                    dirs.append(name)
                elif entry.is_file():
                    if os.path.splitext(name)[1].lower() in exts:
                        files.append(name)
                        st = entry.stat()  # the target of a link; st_ino, not d_ino (overlay file systems differ)
                        idents[name] = (st.st_dev, st.st_ino)
                    else:
                        other.append(name)
                # broken symlinks, sockets, FIFOs: neither, ignored
            except OSError as exc:
                problems.append((name, exc.strerror or type(exc).__name__))
    return _Listing(sorted(dirs), sorted(files), sorted(other), sorted(problems), idents)


def _dir_key(path: str):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _q(name: str) -> str:
    return repr(safe_str(name))


# -- one file, one label --------------------------------------------------------------------------------------------
def _used_once(records: List[ImageRecord], root: str, rep: _Report) -> List[ImageRecord]:
    """Drop the extra copies of a labelled file reached more than once (links, hard links); never train a file
    under two labels.

    A file reached under two class labels (``bees/link -> ../ants``) is kept where it lives (its real path is
    inside its class folder) and skipped elsewhere; when that cannot be told (hard links in two class folders),
    every copy is skipped. A file reached twice under one label in one split is kept once. The same file in two
    splits under one label is left to :func:`find_leakage`, which reports it.
    """
    groups: Dict[tuple, List[ImageRecord]] = defaultdict(list)
    for r in records:
        ident = r.ident
        if ident is not None and r.label is not None:
            groups[ident].append(r)
    drop: set = set()
    crossed = []
    for group in groups.values():
        if len(group) < 2:
            continue
        group.sort(key=lambda r: r.relpath)
        if len({r.label for r in group}) == 1:
            for same in _by_split(group):
                keep = next((r for r in same if _lives_in_class(r, root)), same[0])
                for r in same:
                    if r is not keep:
                        drop.add(id(r))
                        rep.skip(r.relpath, f"the same file as {safe_str(keep.relpath)} (reached twice through a "
                                            "link); used once")
            continue
        homes = [r for r in group if _lives_in_class(r, root)]
        keep = homes[0] if homes and len({r.label for r in homes}) == 1 else None
        for r in group:
            if keep is not None and (r is keep or (r.label == keep.label and r.split != keep.split)):
                continue
            drop.add(id(r))
            if keep is None:
                labels = ", ".join(sorted({_q(g.label) for g in group}))
                rep.skip(r.relpath, f"the same file is in class folders {labels}; featx cannot tell its class, "
                                    "so it is not used")
            else:
                rep.skip(r.relpath, f"the same file as {safe_str(keep.relpath)} (class {safe_str(keep.label)}), "
                                    f"reached through a link from class folder {_q(r.label)}; not used as {_q(r.label)}")
        crossed.append((group, keep))
    if crossed:
        group, keep = crossed[0]
        other = next(r for r in group if r is not keep)
        rep.warnings.append(
            f"{len(crossed)} file(s) are reached under more than one class label through links (e.g. "
            f"{_q(other.relpath)} is {_q(group[0].relpath if keep is None else keep.relpath)}); each is used "
            "only under the class folder it lives in, or not at all when that cannot be told")
    return [r for r in records if id(r) not in drop] if drop else records


def _by_split(group: List[ImageRecord]) -> List[List[ImageRecord]]:
    out: Dict[Optional[str], List[ImageRecord]] = defaultdict(list)
    for r in group:
        out[r.split].append(r)
    return [g for g in out.values() if len(g) > 1]


def _lives_in_class(r: ImageRecord, root: str) -> bool:
    """The file's real path lies inside the real path of its own class folder (no link led elsewhere)."""
    parts = r.relpath.split("/")
    cls_dir = os.path.join(root, *parts[: 2 if r.split is not None else 1])
    try:
        real_dir = os.path.realpath(cls_dir)
        return os.path.commonpath([os.path.realpath(r.path), real_dir]) == real_dir
    except (OSError, ValueError):
        return False


def _warn_case_twins(classes: set, rep: _Report) -> None:
    """Class folders whose names differ only in case (Ants, ants) are distinct classes: say so."""
    by_fold: Dict[str, List[str]] = defaultdict(list)
    for c in classes:
        by_fold[c.casefold()].append(c)
    for names in sorted(v for v in by_fold.values() if len(v) > 1):
        rep.warnings.append(f"class folders {', '.join(_q(n) for n in sorted(names))} differ only in case: they are "
                            "separate classes; merge them if they are one class")


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
