"""Images named one by one: `featx predict photo.jpg`, several files, or a list file (`@list.txt` or `list.txt`).

What timm's inference script and `yolo predict source=...` users expect: a file is classified as it is, a ``.txt``
source holds one path a line. Decided here:
- a list file is ``@FILE`` (any name) or a ``.txt`` file; blank lines and lines starting with ``#`` are ignored; a
  relative path is read against the list file's folder first (as YOLO does), then against the current folder;
- a named file is decoded by content whatever its suffix (the user chose it), and one that cannot be decoded gets an
  error row, as in a folder; a name that does not exist is refused before any work, naming it;
- the same file named twice gets one row (first place kept) and a warning;
- the records are unlabelled, relative to the deepest folder holding them all (one file: its name).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

from .._io import safe_str
from ..errors import DataError, UsageError
from .discover import ImageFolder, ImageRecord

LIST_SUFFIXES = (".txt",)


def is_file_source(images) -> bool:
    """True for a file, a list file, ``@list``, or a sequence of paths (the forms `discover_files` takes)."""
    if isinstance(images, (list, tuple)):
        return True
    text = os.fspath(images)
    return text.startswith("@") or Path(text).is_file()


def _read_list(list_file: Path) -> list:
    try:
        lines = list_file.read_text(encoding="utf-8", errors="surrogateescape").splitlines()
    except OSError as exc:
        raise DataError(f"cannot read the list file {safe_str(str(list_file))}: {exc.strerror or exc}") from None
    paths = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        p = Path(line)
        if not p.is_absolute() and (list_file.parent / p).exists():
            p = list_file.parent / p
        paths.append(p)
    if not paths:
        raise DataError(f"the list file {safe_str(str(list_file))} names no images")
    return paths


def expand(images: Union[str, os.PathLike, Sequence]) -> list:
    """The image paths ``images`` names, list files read, in the order given."""
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    if not items:
        raise UsageError("no images given")
    paths = []
    for item in items:
        text = os.fspath(item)
        if text.startswith("@") and not Path(text).exists():
            paths += _read_list(Path(text[1:]))
        elif Path(text).is_dir():
            raise UsageError(f"{safe_str(text)} is a folder: give one folder on its own, or image files (or a list "
                             "file of them)")
        elif Path(text).suffix.lower() in LIST_SUFFIXES and Path(text).is_file():
            paths += _read_list(Path(text))
        else:
            paths.append(Path(text))
    return paths


def discover_files(images) -> ImageFolder:
    """An unlabelled `ImageFolder` of the files ``images`` names (see the module docstring)."""
    paths = expand(images)
    missing = [p for p in paths if not p.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"no such image file: {safe_str(str(missing[0]))}{more}")
    seen, unique, warnings = set(), [], []
    for p in paths:
        key = os.path.realpath(p)
        if key in seen:
            warnings.append(f"{safe_str(str(p))} is named more than once; it is classified once")
            continue
        seen.add(key)
        unique.append(Path(os.path.abspath(p)))
    root = Path(os.path.commonpath([str(p.parent) for p in unique]))
    records = [ImageRecord(path=p, relpath=p.relative_to(root).as_posix()) for p in unique]
    return ImageFolder(root=root, records=records, warnings=warnings)
