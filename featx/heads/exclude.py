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
import logging
from pathlib import Path

import numpy as np

from ..errors import UsageError

log = logging.getLogger("featx.heads")


def read_exclusions(path) -> list:
    """The paths FILE asks to leave out, in file order (see the module docstring for the duplicates rule)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--exclude {p}: no such file (give a featx audit CSV or a text file of paths, one per line)")
    try:
        text = p.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as e:
        raise UsageError(f"--exclude {p}: cannot read it ({e.strerror or e})") from None
    lines = text.splitlines()
    first = next((ln for ln in lines if ln.strip()), "")
    if "path" in [c.strip() for c in next(csv.reader([first]), [])]:
        return _from_csv(lines, p)
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def _from_csv(lines: list, p: Path) -> list:
    rows = [r for r in csv.DictReader(lines) if (r.get("path") or "").strip()]
    if rows and "group" in rows[0]:  # featx audit's duplicates.csv: keep the first member of each group
        seen, out = set(), []
        for r in rows:
            if r["group"] in seen:
                out.append(r["path"].strip())
            seen.add(r["group"])
        return out
    return [r["path"].strip() for r in rows]


def apply_exclusions(fs, path) -> tuple:
    """``fs`` without the rows FILE lists, and a summary for the report: file, listed, excluded, by_split,
    not_found (count), first_not_found."""
    listed = read_exclusions(path)
    wanted = set(listed)
    drop = np.array([p in wanted for p in fs.paths], dtype=bool)
    found = {p for p, d in zip(fs.paths, drop) if d}
    missing = [p for p in dict.fromkeys(listed) if p not in found]
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
