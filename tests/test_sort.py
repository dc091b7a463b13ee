"""Sorting predictions into class folders (featx.predict.sort_images): never overwrite, never modify sources, resumable."""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import pytest

from featx import predict as P
from featx._io import TMP_MARK, sha256_file


def _src(tmp_path) -> list:
    """Five sources: two different files both named IMG_0001.jpg, one low-confidence, one unreadable, one plain."""
    root = tmp_path / "src"
    files = {
        "x/IMG_0001.jpg": b"first photo" * 50,
        "y/IMG_0001.jpg": b"second, different photo" * 40,
        "y/IMG_0002.jpg": b"third photo" * 30,
        "y/unsure.jpg": b"blurry" * 20,
        "z/broken.jpg": b"not decodable",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    rows = [
        (root / "x/IMG_0001.jpg", {"label": "cat", "confidence": 0.9, "error": None}),
        (root / "y/IMG_0001.jpg", {"label": "cat", "confidence": 0.8, "error": None}),
        (root / "y/IMG_0002.jpg", {"label": "dog", "confidence": 0.95, "error": None}),
        (root / "y/unsure.jpg", {"label": "dog", "confidence": 0.4, "error": None}),
        (root / "z/broken.jpg", {"label": None, "confidence": None, "error": "truncated"}),
    ]
    return rows


def tree(root: Path) -> dict:
    """{relative path: bytes, or 'dir', or ('link', target)} of everything under root (hidden files included)."""
    out = {}
    if not root.exists():
        return out
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            rel = os.path.relpath(p, root)
            out[rel] = ("link", os.readlink(p)) if os.path.islink(p) else Path(p).read_bytes()
    return out


def snapshot_sources(rows) -> dict:
    return {str(p): (sha256_file(p), os.stat(p).st_mtime_ns, os.stat(p).st_size) for p, _ in rows}


def test_copy_places_by_label_suffixes_collisions_and_leaves_sources_untouched(tmp_path):
    rows = _src(tmp_path)
    before = snapshot_sources(rows)
    dest = tmp_path / "sorted"
    acts = P.sort_images(rows, dest, mode="copy", min_confidence=0.5)
    assert before == snapshot_sources(rows)  # byte-identical, same mtime
    t = tree(dest)
    assert t["cat/IMG_0001.jpg"] == b"first photo" * 50
    assert t["cat/IMG_0001_1.jpg"] == b"second, different photo" * 40  # same name, other photo: suffix
    assert t["dog/IMG_0002.jpg"] == b"third photo" * 30
    assert t["_uncertain/unsure.jpg"] == b"blurry" * 20
    assert not any("broken" in k for k in t)  # unreadable images go nowhere
    assert not any(TMP_MARK in k for k in t)
    assert [a.status for a in acts] == ["done"] * 4 and len(acts) == 4
    assert all(a.action == "copy" for a in acts)


def test_existing_file_is_never_overwritten(tmp_path):
    rows = _src(tmp_path)
    dest = tmp_path / "sorted"
    (dest / "cat").mkdir(parents=True)
    (dest / "cat/IMG_0001.jpg").write_bytes(b"the user's own file")
    P.sort_images(rows, dest)
    t = tree(dest)
    assert t["cat/IMG_0001.jpg"] == b"the user's own file"
    assert t["cat/IMG_0001_1.jpg"] == b"first photo" * 50
    assert t["cat/IMG_0001_2.jpg"] == b"second, different photo" * 40


def test_dry_run_touches_nothing_and_plans_what_a_real_run_does(tmp_path):
    rows = _src(tmp_path)
    dest = tmp_path / "sorted"
    (dest / "cat").mkdir(parents=True)
    (dest / "cat/IMG_0001.jpg").write_bytes(b"occupied")
    before = tree(tmp_path)
    plan = P.sort_images(rows, dest, mode="move", min_confidence=0.5, dry_run=True)
    assert tree(tmp_path) == before  # nothing created, moved or removed
    assert {a.status for a in plan} == {"planned"}
    real = P.sort_images(rows, dest, mode="move", min_confidence=0.5)
    assert [a.dest for a in plan] == [a.dest for a in real]
    assert [a.dest.name for a in plan][:2] == ["IMG_0001_1.jpg", "IMG_0001_2.jpg"]


def test_dry_run_does_not_create_the_sort_folder(tmp_path):
    rows = _src(tmp_path)
    dest = tmp_path / "new" / "sorted"
    P.sort_images(rows, dest, dry_run=True)
    assert not (tmp_path / "new").exists()


def test_rerun_is_idempotent(tmp_path):
    rows = _src(tmp_path)
    dest = tmp_path / "sorted"
    P.sort_images(rows, dest)
    first = tree(dest)
    again = P.sort_images(rows, dest)
    assert tree(dest) == first
    assert {a.status for a in again} == {"already"}


def test_interrupted_sort_rerun_gives_the_same_tree_without_duplicates(tmp_path, monkeypatch):
    rows = _src(tmp_path)
    reference = tmp_path / "reference"
    P.sort_images(rows, reference, min_confidence=0.5)

    dest = tmp_path / "sorted"
    real_copy = shutil.copyfile
    calls = {"n": 0}

    def dying_copy(src, dst, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:  # killed half-way through the third copy: a partial temp file is left behind
            Path(dst).write_bytes(b"partial")
            raise KeyboardInterrupt
        return real_copy(src, dst, *a, **kw)

    monkeypatch.setattr(shutil, "copyfile", dying_copy)
    with pytest.raises(KeyboardInterrupt):
        P.sort_images(rows, dest, min_confidence=0.5)
    monkeypatch.setattr(shutil, "copyfile", real_copy)
    partial = tree(dest)
    assert len([k for k in partial if k.endswith(".jpg")]) == 2
    # Also a temp file as a SIGKILL would leave it (the KeyboardInterrupt path cleans its own).
    (dest / "dog").mkdir(exist_ok=True)
    (dest / "dog" / f"{TMP_MARK}IMG_0002.jpg.deadbeef").write_bytes(b"partial")

    P.sort_images(rows, dest, min_confidence=0.5)
    assert tree(dest) == tree(reference)


def test_move_is_the_only_mode_that_removes_sources(tmp_path):
    for mode in ("copy", "link"):
        rows = _src(tmp_path / mode)
        P.sort_images(rows, tmp_path / mode / "sorted", mode=mode)
        assert all(p.exists() for p, _ in rows), mode
    rows = _src(tmp_path / "move")
    data = {p: p.read_bytes() for p, _ in rows}
    acts = P.sort_images(rows, tmp_path / "move" / "sorted", mode="move")
    for a in acts:
        assert not a.source.exists()
        assert a.dest.read_bytes() == data[a.source]
    assert (tmp_path / "move/src/z/broken.jpg").exists()  # unreadable: left where it was


def test_link_mode_hard_links_and_falls_back_to_symlinks(tmp_path, monkeypatch):
    rows = _src(tmp_path)
    acts = P.sort_images(rows[:1], tmp_path / "hard", mode="link")
    assert acts[0].action == "link" and os.path.samefile(acts[0].dest, rows[0][0])
    assert not os.path.islink(acts[0].dest)

    def no_hardlinks(*a, **kw):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_hardlinks)
    acts = P.sort_images(rows[:1], tmp_path / "soft", mode="link")
    assert acts[0].action == "symlink" and os.path.islink(acts[0].dest)
    assert acts[0].dest.read_bytes() == rows[0][0].read_bytes()


def test_move_across_file_systems_copies_verifies_then_unlinks(tmp_path, monkeypatch):
    rows = _src(tmp_path)
    data = {p: p.read_bytes() for p, _ in rows}

    def exdev(*a, **kw):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "rename", exdev)
    dest = tmp_path / "sorted"
    acts = P.sort_images(rows, dest, mode="move")
    assert [a.status for a in acts] == ["done"] * 4
    for a in acts:
        assert not a.source.exists() and a.dest.read_bytes() == data[a.source]
    assert not any(TMP_MARK in k for k in tree(dest))


def test_move_keeps_the_source_when_the_copy_does_not_verify(tmp_path, monkeypatch):
    rows = _src(tmp_path)[:1]
    src = rows[0][0]
    original = src.read_bytes()

    def exdev(*a, **kw):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    def bad_copy(s, d, *a, **kw):
        Path(d).write_bytes(b"corrupted on the way")

    monkeypatch.setattr(os, "rename", exdev)
    monkeypatch.setattr(shutil, "copyfile", bad_copy)
    dest = tmp_path / "sorted"
    acts = P.sort_images(rows, dest, mode="move")
    assert acts[0].status == "failed" and "does not match" in acts[0].error
    assert src.read_bytes() == original
    assert [k for k in tree(dest) if not k == "cat"] == []  # no partial destination, no temp file


def test_move_interrupted_after_the_copy_completes_on_rerun(tmp_path):
    rows = _src(tmp_path)[:1]
    src = rows[0][0]
    dest = tmp_path / "sorted"
    (dest / "cat").mkdir(parents=True)
    shutil.copy2(src, dest / "cat" / src.name)  # the copy landed, the source was not yet removed
    acts = P.sort_images(rows, dest, mode="move")
    assert acts[0].status == "already" and not src.exists()
    assert sorted(tree(dest)) == ["cat", "cat/IMG_0001.jpg"]


def test_a_link_in_place_is_not_deleted_by_a_later_move(tmp_path):
    rows = _src(tmp_path)[:1]
    src = rows[0][0]
    dest = tmp_path / "sorted"
    (dest / "cat").mkdir(parents=True)
    os.symlink(src, dest / "cat" / src.name)
    P.sort_images(rows, dest, mode="move")
    assert src.exists()  # removing it would leave the symlink dangling


def test_class_names_cannot_escape_the_sort_folder(tmp_path):
    src = tmp_path / "a.jpg"
    src.write_bytes(b"x")
    acts = P.sort_images([(src, {"label": "../evil", "confidence": 1.0, "error": None})], tmp_path / "out")
    assert (tmp_path / "out").resolve() in acts[0].dest.resolve().parents
    assert not (tmp_path / "evil").exists()


def test_stop_on_failure_stops_at_the_first_file_that_cannot_be_sorted(tmp_path):
    rows = _src(tmp_path)
    dest = tmp_path / "sorted"
    dest.mkdir()
    (dest / "cat").write_text("a file where the class folder should be")
    acts = P.sort_images(rows, dest, stop_on_failure=True)
    assert [a.status for a in acts] == ["failed"] and not (dest / "dog").exists()
    acts = P.sort_images(rows, dest)  # without it, the others are still sorted
    assert [a.status for a in acts] == ["failed", "failed", "done", "done"]


def test_move_onto_an_identical_file_removes_the_source_and_says_so(tmp_path):
    rows = _src(tmp_path)[:1]
    src = rows[0][0]
    dest = tmp_path / "sorted"
    (dest / "cat").mkdir(parents=True)
    shutil.copy2(src, dest / "cat" / src.name)
    acts = P.sort_images(rows, dest, mode="move")
    assert acts[0].status == "already" and "source was removed" in acts[0].note
    assert acts[0].describe().startswith("already there; ")
    copy_acts = P.sort_images(_src(tmp_path / "again")[:1], dest, mode="copy")
    assert copy_acts[0].status == "already" and copy_acts[0].note is None  # copy never removes anything


def test_move_journal_reports_an_interrupted_runs_moves_once(tmp_path, monkeypatch):
    from featx.predict.sort import EARLIER, JOURNAL_NAME, MoveJournal

    rows = _src(tmp_path)
    images, dest = tmp_path / "src", tmp_path / "sorted"
    real_rename = os.rename
    calls = {"n": 0}

    def dying_rename(s, d, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_rename(s, d, *a, **k)

    monkeypatch.setattr(os, "rename", dying_rename)
    journal = MoveJournal(dest, images)
    with pytest.raises(KeyboardInterrupt):
        P.sort_images(rows, dest, mode="move", journal=journal)
    journal.close()
    monkeypatch.setattr(os, "rename", real_rename)
    with open(dest / JOURNAL_NAME, "a") as fh:
        fh.write('{"images": "torn by a kill')  # a half-written last line
    other = MoveJournal(dest, tmp_path / "elsewhere")
    other.intend(tmp_path / "gone.jpg", dest / "cat" / "IMG_0001.jpg", {"path": "gone.jpg"})
    other.close()

    again = MoveJournal(dest, images)
    earlier = again.earlier()  # the third move was announced but never happened: not reported
    assert [e["row"]["confidence"] for e in earlier] == [0.9, 0.8]
    assert all(not Path(e["source"]).exists() and Path(e["dest"]).is_file() for e in earlier)
    again.finish()
    assert MoveJournal(dest, images).earlier() == []
    assert len(other.earlier()) == 1  # another image folder's entries are kept for its own next run
    assert EARLIER == "moved by an earlier run"
