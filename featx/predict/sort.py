"""Safe sorting of classified images into ``<root>/<class>/``: never overwrite, never half a file, resumable.

Hand-written on purpose: ``shutil.copy2`` / ``shutil.move`` replace an existing destination and leave a partial file
when interrupted, and no library featx depends on places files "only if the name is free". Here:
- each file is copied to a temp name inside the target folder and hard-linked into place (an atomic create-if-absent);
- a byte-identical file (or a link to the source) already at a candidate name counts as "already sorted", so a re-run
  after an interruption completes the tree instead of duplicating it; with ``move`` the source is then removed (its
  bytes are at the destination) and the action says so;
- ``move`` keeps a journal in the sort folder: files moved by a run that was then interrupted are gone from the
  image folder, so no table lists them; the next run reads them from the journal and reports them.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from .._io import TMP_MARK, atomic_write, check_beside, open_beside, refuse_inside, safe_str
from ..errors import UsageError

log = logging.getLogger("featx")

MODES = ("copy", "link", "move")
# Folder for predictions below --min-confidence. A model class that maps to the same folder is refused up front
# (check_sort_targets): its images and the uncertain ones would silently share one folder.
UNCERTAIN = "_uncertain"
JOURNAL_NAME = ".featx-moves.jsonl"  # hidden: discovery skips it if the sort folder is classified again later
EARLIER = "moved by an earlier run"  # sort_status of files an interrupted earlier --move had already moved


@dataclass
class SortAction:
    """One planned or performed file operation of ``--sort-into``."""

    source: Path
    folder: str  # class folder name or "_uncertain"
    dest: Optional[Path]  # final path (None if the plan could not place it)
    action: str  # copy | link | symlink | move
    status: str  # planned | done | already (identical file was there) | failed
    error: Optional[str] = None
    note: Optional[str] = None  # what happened beyond the status (e.g. a --move source removed as a duplicate)
    index: Optional[int] = None  # position of the item in the list given to sort_images

    def to_dict(self) -> dict:
        return {"source": safe_str(str(self.source)), "folder": safe_str(self.folder),
                "dest": safe_str(str(self.dest)) if self.dest else None, "action": self.action,
                "status": self.status, "error": self.error, "note": self.note}

    def describe(self) -> str:
        """The table's ``sort_status``: copied / linked / symlinked / moved / already there[; ...] / failed: why."""
        if self.status == "done":
            return {"copy": "copied", "link": "linked", "symlink": "symlinked", "move": "moved"}[self.action]
        if self.status == "already":
            return "already there" + (f"; {self.note}" if self.note else "")
        if self.status == "failed":
            return f"failed: {self.error}"
        return self.status


def folder_for(label: str) -> str:
    """A class name as one safe path component (a head from elsewhere could name a class '../x')."""
    name = safe_str(str(label)).replace("/", "_").replace("\\", "_").replace("\x00", "_")
    return name if name not in ("", ".", "..") else f"_{name or 'empty'}"


def check_sort_targets(sort_root: Path, images_root: Path, classes: Sequence[str], uncertain: bool) -> None:
    """Refuse, before any work, class folders that would merge or lie inside the image folder.

    Two classes whose folder names coincide (``a/b`` and ``a_b``), also only up to case (``Ants`` and ``ants``: macOS
    and Windows file systems ignore case), would be mixed in one folder; a class whose folder is ``_uncertain``
    (compared case-insensitively too) would be mixed with the low-confidence images of ``--min-confidence``.
    """
    seen: dict = {}
    for c in classes:
        f = folder_for(c)
        # Case-folded: on macOS and Windows file systems (and a Linux sort folder synced or copied there later)
        # `Ants/` and `ants/` are one folder, so two classes would silently share it.
        key = f.casefold()
        if key in seen:
            same = f == folder_for(seen[key])
            raise UsageError(f"classes {seen[key]!r} and {c!r} would share the folder {f!r} under --sort-into"
                             + ("" if same else " (folder names that differ only in case are one folder on "
                                "case-insensitive file systems such as macOS and Windows)")
                             + "; rename one class folder and re-fit, or predict without --sort-into")
        seen[key] = c
        if uncertain and f.casefold() == UNCERTAIN.casefold():
            raise UsageError(f"the model has a class {c!r}, whose folder would be the {UNCERTAIN}/ folder that "
                             "--min-confidence fills with low-confidence images; sort without --min-confidence, or "
                             "rename that class folder and re-fit")
    for c in list(classes) + ([UNCERTAIN] if uncertain else []):
        refuse_inside(sort_root / folder_for(c), images_root, f"--sort-into class folder for {c!r}")


def sort_counts(actions: Sequence[SortAction]) -> dict:
    """{folder: {status: n}} of a sort plan or outcome."""
    out: dict = {}
    for a in actions:
        out.setdefault(a.folder, {}).setdefault(a.status, 0)
        out[a.folder][a.status] += 1
    return out


def sort_images(items, sort_root, *, mode: str = "copy", min_confidence: Optional[float] = None,
                dry_run: bool = False, stop_on_failure: bool = False,
                journal: Optional["MoveJournal"] = None) -> List[SortAction]:
    """Place images into ``sort_root/<label>/`` (or ``_uncertain/``) without ever overwriting anything.

    ``items``: ``(source path, row)`` pairs in a fixed order; rows with an error are skipped. For each image, names are
    tried in order ``name.jpg``, ``name_1.jpg``, ...: a free name is taken, a byte-identical file (or a link to the
    source) means it is already there, anything else is left alone. Because the order and this rule are fixed, an
    interrupted run re-run with the same inputs yields the same tree with no duplicates. ``dry_run`` only reads.
    A file that cannot be placed is a ``failed`` action and the others continue, unless ``stop_on_failure``.
    ``journal`` (move only): where each move is recorded before it happens (see `MoveJournal`).
    """
    if mode not in MODES:
        raise UsageError(f"sort mode must be one of {', '.join(MODES)}, not {mode!r}")
    sort_root = Path(sort_root)
    claimed: set = set()  # names this run has taken (a dry run must not give two files one name)
    swept: set = set()
    actions: List[SortAction] = []
    for index, (src, row) in enumerate(items):
        if row.get("error") is not None or row.get("label") is None:
            continue
        src = Path(src)
        uncertain = min_confidence is not None and row["confidence"] < min_confidence
        folder = UNCERTAIN if uncertain else folder_for(row["label"])
        target = sort_root / folder
        if not dry_run and target not in swept:
            _sweep_temps(target)
            swept.add(target)
        act = SortAction(src, folder, None, mode, "planned", index=index)
        try:
            _place(src, target, mode, act, claimed, dry_run, _Recorder(journal, row) if mode == "move" else None)
        except OSError as exc:  # one unwritable file must not stop the other 9,999; it is listed as failed
            act.status, act.error = "failed", f"{type(exc).__name__}: {exc.strerror or exc}"
            log.debug("could not sort %s: %s", safe_str(str(src)), act.error)
        actions.append(act)
        if stop_on_failure and act.status == "failed":
            break
    return actions


class _Recorder:
    """Writes a move into the journal just before it happens (a no-op without a journal)."""

    def __init__(self, journal, row):
        self.journal, self.row = journal, row

    def __call__(self, src: Path, dest: Path) -> None:
        if self.journal is not None:
            self.journal.intend(src, dest, self.row)


def _sweep_temps(directory: Path) -> None:
    """Temp files a killed sort left behind (ours by their prefix) are removed before writing there again.
    Safe because predict holds the sort folder's lock: no other featx run is writing there."""
    if directory.is_dir():
        for p in directory.glob(TMP_MARK + "*"):
            _unlink_quiet(p)


def _candidates(name: str):
    stem, ext = os.path.splitext(name)
    if not stem:  # ".jpg": treat the whole thing as the stem
        stem, ext = name, ""
    yield name
    i = 1
    while True:
        yield f"{stem}_{i}{ext}"
        i += 1


def _place(src: Path, target: Path, mode: str, act: SortAction, claimed: set, dry_run: bool, record) -> None:
    for cand in _candidates(src.name):
        dest = target / cand
        if dest in claimed:
            continue
        if os.path.lexists(dest):
            if _same_file(src, dest):
                act.dest, act.status = dest, "already"
                claimed.add(dest)
                if mode == "move" and not dry_run and not _is_same_inode(src, dest):
                    # Its bytes are at `dest` already (an earlier move copied it across file systems and was stopped
                    # before removing the source, or the same photo was sorted before): remove the source and say so.
                    record(src, dest)
                    os.unlink(src)
                    act.note = "an identical file was already there, so the source was removed"
                return
            continue
        if dry_run:
            act.dest = dest
            claimed.add(dest)
            return
        target.mkdir(parents=True, exist_ok=True)
        if record is not None:
            record(src, dest)
        if _put(src, dest, mode, act):
            act.dest, act.status = dest, "done"
            claimed.add(dest)
            return
        # someone created `dest` between our check and our write: try the next name


def _same_file(a: Path, b: Path) -> bool:
    """b is a, a link to a, or byte-identical to a."""
    try:
        if os.path.samefile(a, b):
            return True
        if not os.path.isfile(b):
            return False
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    if sa.st_size != sb.st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


def _is_same_inode(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _put(src: Path, dest: Path, mode: str, act: SortAction) -> bool:
    """Create ``dest`` from ``src`` without overwriting; False when ``dest`` appeared meanwhile."""
    if mode == "link":
        return _put_link(src, dest, act)
    if mode == "move":
        return _put_move(src, dest)
    tmp = _copy_to_temp(src, dest.parent, dest.name)
    try:
        return _link_into_place(tmp, dest)
    finally:
        _unlink_quiet(tmp)


def _put_link(src: Path, dest: Path, act: SortAction) -> bool:
    try:
        os.link(src, dest)
        act.action = "link"
        return True
    except FileExistsError:
        return False
    except OSError:  # other file system, or links not supported: a symbolic link (absolute) instead
        try:
            os.symlink(os.path.abspath(src), dest)
        except FileExistsError:
            return False
        act.action = "symlink"
        return True


def _put_move(src: Path, dest: Path) -> bool:
    if os.path.lexists(dest):
        return False
    try:
        os.rename(src, dest)  # same file system: atomic, nothing copied
        return True
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    # Across file systems: copy to a temp file there, verify it, put it in place, then remove the source.
    tmp = _copy_to_temp(src, dest.parent, dest.name)
    try:
        if os.path.getsize(tmp) != os.path.getsize(src) or not _same_file(src, tmp):
            raise OSError(errno.EIO, f"the copy of {src} at {dest.parent} does not match the source; source kept")
        if not _link_into_place(tmp, dest):
            return False
    finally:
        _unlink_quiet(tmp)
    os.unlink(src)
    return True


def _copy_to_temp(src: Path, directory: Path, name: str) -> Path:
    tmp = directory / f"{TMP_MARK}{name}.{uuid.uuid4().hex[:8]}"
    try:
        shutil.copyfile(src, tmp)
        shutil.copystat(src, tmp)  # keep the photo's timestamps (sorting by date still works afterwards)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
    except BaseException:
        _unlink_quiet(tmp)
        raise
    return tmp


def _link_into_place(tmp: Path, dest: Path) -> bool:
    """Give the complete temp file its final name only if that name is free (link = atomic create-if-absent)."""
    try:
        os.link(tmp, dest)
        return True
    except FileExistsError:
        return False
    except OSError:  # file systems without hard links (FAT, some network shares): check, then rename
        if os.path.lexists(dest):
            return False
        os.replace(tmp, dest)
        return True


def _unlink_quiet(p) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


class MoveJournal:
    """``<sort folder>/.featx-moves.jsonl``: each move of ``--move``, written just before it happens.

    A move removes its source, so the files moved by a run that is then interrupted are in no table. The next run over
    the same image folder reports them (`earlier`: entries whose source is gone and whose destination is there; an
    entry for a move that never happened fails that test and is ignored). When a run's table is written, that image
    folder's entries are dropped (`finish`); the file goes when it is empty. One JSON object per line, ASCII (any file
    name round-trips); a torn last line from a killed run is ignored. It is only ever opened by `open_beside`: a
    symbolic or hard link, a FIFO or a folder planted at its name is refused (exit 7), never written through.
    """

    def __init__(self, sort_root, images_root):
        self.path = Path(sort_root) / JOURNAL_NAME
        self.images = os.path.abspath(images_root)
        self._fh = None

    def check(self) -> None:
        """Refuse (OutputError, exit 7), before any work, a journal path that is a link, a FIFO or a folder."""
        check_beside(self.path, "move journal")

    def _open(self, flags: int):
        """The journal as a text file, opened by `open_beside`: never through a link, never a FIFO (no hang)."""
        fd = open_beside(self.path, flags, what="move journal")
        reading = flags == os.O_RDONLY
        return os.fdopen(fd, "r" if reading else "a", encoding="ascii", errors="replace" if reading else "strict")

    def _entries(self) -> list:
        try:
            with self._open(os.O_RDONLY) as fh:
                lines = fh.read().splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if isinstance(e, dict) and isinstance(e.get("source"), str) and isinstance(e.get("dest"), str):
                out.append(e)
        return out

    def earlier(self) -> List[dict]:
        """Moves an earlier run made from this image folder and no table reported: ``{source, dest, row}``."""
        found, seen = [], set()
        for e in self._entries():
            if e.get("images") != self.images or e["dest"] in seen or not isinstance(e.get("row"), dict):
                continue
            if os.path.lexists(e["source"]) or not os.path.isfile(e["dest"]):
                continue
            seen.add(e["dest"])
            found.append(e)
        return found

    def intend(self, src, dest, row: dict) -> None:
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self._open(os.O_RDWR | os.O_APPEND | os.O_CREAT)
            if not self._ends_with_newline():
                self._fh.write("\n")  # a killed run's torn last line must not swallow our first entry
        entry = {"images": self.images, "source": os.path.abspath(src), "dest": os.path.abspath(dest), "row": row}
        self._fh.write(json.dumps(entry) + "\n")
        # flush, no fsync: the journal must survive the process being killed (the OS keeps written pages); an fsync
        # per image would cost a disk round trip each, and a power cut loses at most the last few lines.
        self._fh.flush()

    def _ends_with_newline(self) -> bool:
        """Empty, or its last byte is a newline (read through the descriptor already open: the same file)."""
        fd = self._fh.fileno()
        size = os.fstat(fd).st_size
        return size == 0 or os.pread(fd, 1, size - 1) == b"\n"

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def finish(self) -> None:
        """This image folder's moves are all in a written table now: drop its entries."""
        self.close()
        if not self.path.exists():
            return
        keep = [e for e in self._entries() if e.get("images") != self.images]
        if not keep:
            _unlink_quiet(self.path)
            return
        with atomic_write(self.path, "w") as fh:
            fh.write("".join(json.dumps(e) + "\n" for e in keep))
