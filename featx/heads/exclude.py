"""`featx fit --exclude FILE`: leave images that `featx audit` (or the user) listed out of fitting and validation.

FILE is a CSV with a ``path`` column (any of the audit's CSVs, or a user's own) or a text file with one path per line
(blank lines and ``#`` comments ignored). Paths are as the feature store records them: relative to the image folder
that was extracted (what the audit CSVs hold). The rule per file:
- ``duplicates.csv`` (it has a ``group`` column): every member of a group but the first listed is left out. The audit
  lists train before val before test, so a group that leaks across splits keeps its training image and loses the
  copies that would have been scored; exact and near copies inside one split stop counting twice.
- any other file: every listed path is left out (likely label errors, outliers, a hand-made list).
Listed paths the store does not hold are counted and named in a warning (a stale list); a list that matches none
of the store's paths is a UsageError (almost always paths relative to another folder).
"""
from __future__ import annotations

import csv
import io
import logging
import re
from pathlib import Path

import numpy as np

from .._io import safe_str
from ..errors import UsageError

log = logging.getLogger("featx.heads")


def read_exclusions(path) -> list:
    """The paths FILE asks to leave out, in file order (see the module docstring for the duplicates rule)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--exclude {p}: no such file (give a featx audit CSV or a text file of paths, one per line)")
    try:
        # newline="": a quoted name holding "\r" or "\n" reaches the csv module as it was written (universal newlines
        # would turn "\r" into "\n"); surrogateescape: a hand-made list may hold a name's raw non-UTF-8 bytes
        with open(p, encoding="utf-8", errors="surrogateescape", newline="") as fh:
            text = fh.read()
    except OSError as e:
        raise UsageError(f"--exclude {p}: cannot read it ({e.strerror or e})") from None
    text = text.lstrip("\ufeff")  # a BOM from a spreadsheet's "CSV UTF-8"
    header = next((row for row in csv.reader(io.StringIO(text, newline="")) if any(c.strip() for c in row)), [])
    if "path" in [c.strip() for c in header]:
        return _from_csv(text, p)
    # a plain list: split on line ends only (str.splitlines also splits on U+2028, \x85, \x0c ..., which names hold)
    lines = re.split(r"\r\n|\r|\n", text)
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def _from_csv(text: str, p: Path) -> list:
    # csv over the whole text, not line by line: a quoted field may span line ends (featx quotes any name holding one)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    reader.fieldnames = [c.strip() for c in (reader.fieldnames or [])]
    # featx writes names exactly (no padding), so only a name that is blank is skipped; a user's list may pad them
    rows = [r for r in reader if (r.get("path") or "").strip()]
    if rows and "group" in rows[0]:  # featx audit's duplicates.csv: keep the first member of each group
        seen, out = set(), []
        for r in rows:
            if r["group"] in seen:
                out.append(r["path"])
            seen.add(r["group"])
        return out
    return [r["path"] for r in rows]


def apply_exclusions(fs, path) -> tuple:
    """``fs`` without the rows FILE lists, and a summary for the report: file, listed, excluded, by_split,
    not_found (count), first_not_found."""
    listed = read_exclusions(path)
    drop = np.zeros(len(fs.paths), dtype=bool)
    index: dict = {}
    for i, p in enumerate(fs.paths):
        index.setdefault(p, []).append(i)
        if safe_str(p) != p:  # the form featx's CSVs hold for a name that is not valid UTF-8 (U+FFFD per bad byte)
            index.setdefault(safe_str(p), []).append(i)
    missing, ambiguous = [], []
    for name in dict.fromkeys(listed):
        rows = index.get(name) or index.get(name.strip())  # exact first: names may begin or end with spaces
        if not rows:
            missing.append(name)
            continue
        if len({fs.paths[i] for i in rows}) > 1:  # two stored names that differ only in undecodable bytes print the same
            ambiguous.append(name)
        drop[rows] = True
    if ambiguous:
        log.warning("--exclude: %d listed path(s) match more than one stored name that is not valid UTF-8 (e.g. %s); "
                    "all of them are left out", len(ambiguous), repr(ambiguous[0]))
    if listed and not drop.any():
        raise UsageError(f"--exclude {path}: none of its {len(set(listed))} paths is in the features (e.g. "
                         f"{listed[0]!r} vs the store's {fs.paths[0]!r}); paths must be relative to the extracted "
                         f"image folder, as featx audit writes them")
    if missing:
        log.warning("--exclude: %d listed path(s) are not in the features (e.g. %s); a list from other features?",
                    len(missing), ", ".join(repr(m) for m in missing[:3]))
    splits = fs.splits[drop].tolist() if fs.splits is not None else ["all"] * int(drop.sum())
    by_split = {s: splits.count(s) for s in sorted(set(splits))}
    summary = {"file": str(path), "listed": len(set(listed)), "excluded": int(drop.sum()), "by_split": by_split,
               "not_found": len(missing), "first_not_found": missing[:5]}
    if drop.any():
        log.info("--exclude: left out %d image(s) (%s)", int(drop.sum()),
                 ", ".join(f"{k} {v}" for k, v in by_split.items()))
    return fs.subset(~drop), summary
