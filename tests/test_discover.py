"""Tests for featx.data.discover: layouts, hidden/empty folders, symlink loops, odd names, and train/val leakage."""
from __future__ import annotations

import os
import shutil

import pytest
from PIL import Image

from featx.data.decode import load_rgb
from featx.data.discover import ImageFolder, discover, find_leakage, image_extensions
from featx.errors import DataError
from tests.imagegen import make_folder, make_image


def _rel(folder: ImageFolder) -> list:
    return [r.relpath for r in folder.records]


# -- layouts -----------------------------------------------------------------------------------------------------------
def test_split_and_label_layout(tmp_path):
    make_folder(tmp_path, classes=("cat", "dog"), n_per_class=2, splits=("train", "val"), size=16)
    f = discover(tmp_path)
    assert f.has_splits and f.has_labels and f.classes == ["cat", "dog"]
    assert len(f) == 8 and f.warnings == []
    assert _rel(f)[:2] == ["train/cat/cat_000.jpg", "train/cat/cat_001.jpg"]
    assert f.splits() == ["train"] * 4 + ["val"] * 4
    assert f.labels() == ["cat", "cat", "dog", "dog"] * 2
    assert f.counts() == {"train": {"cat": 2, "dog": 2}, "val": {"cat": 2, "dog": 2}}
    assert f.split_names() == ["train", "val"]
    assert len(f.subset("val")) == 4
    for r in f.records:
        assert r.path.is_absolute() and r.path.is_file()
        assert r.path == f.root / r.relpath


@pytest.mark.parametrize("alias,norm", [("valid", "val"), ("validation", "val"), ("test", "test"), ("Val", "val")])
def test_split_aliases_are_normalised(tmp_path, alias, norm):
    make_image(tmp_path / "train" / "a" / "1.png", size=16)
    make_image(tmp_path / alias / "a" / "2.png", size=16, seed=1)
    f = discover(tmp_path)
    assert f.has_splits
    assert [(r.relpath, r.split) for r in f.records] == sorted([("train/a/1.png", "train"), (f"{alias}/a/2.png", norm)])


def test_only_a_test_split(tmp_path):
    make_image(tmp_path / "test" / "a" / "1.png", size=16)
    f = discover(tmp_path)
    assert f.has_splits and f.classes == ["a"] and f.splits() == ["test"]


def test_class_folders_without_splits_and_deeper_folders(tmp_path):
    make_image(tmp_path / "ants" / "a.jpg", size=16)
    make_image(tmp_path / "ants" / "2019" / "summer" / "b.jpg", size=16)
    make_image(tmp_path / "bees" / "c.jpg", size=16)
    f = discover(tmp_path)
    assert not f.has_splits and f.splits() is None
    assert f.classes == ["ants", "bees"]
    assert [(r.relpath, r.label) for r in f.records] == [
        ("ants/2019/summer/b.jpg", "ants"), ("ants/a.jpg", "ants"), ("bees/c.jpg", "bees")]


def test_flat_folder_is_unlabeled(tmp_path):
    for i in range(3):
        make_image(tmp_path / f"img{i}.png", size=16, seed=i)
    f = discover(tmp_path)
    assert not f.has_labels and f.labels() is None and f.classes == []
    assert _rel(f) == ["img0.png", "img1.png", "img2.png"]
    assert all(r.label is None and r.split is None for r in f.records)


def test_labelled_train_with_flat_test(tmp_path):
    make_image(tmp_path / "train" / "a" / "1.png", size=16)
    make_image(tmp_path / "test" / "x.png", size=16, seed=1)
    f = discover(tmp_path)
    assert f.has_labels and f.classes == ["a"]
    assert [(r.relpath, r.label, r.split) for r in f.records] == [("test/x.png", None, "test"),
                                                                  ("train/a/1.png", "a", "train")]
    assert any("unlabeled" in w for w in f.warnings)


def test_images_next_to_class_folders_is_an_error(tmp_path):
    make_image(tmp_path / "cats" / "1.png", size=16)
    make_image(tmp_path / "stray.png", size=16)
    with pytest.raises(DataError) as ei:
        discover(tmp_path)
    msg = str(ei.value)
    assert "stray.png" in msg and "cats" in msg and "class folder" in msg
    assert ei.value.exit_code == 3


def test_images_next_to_split_folders_is_an_error(tmp_path):
    make_folder(tmp_path, n_per_class=1, size=16)
    make_image(tmp_path / "extra" / "x.png", size=16)
    with pytest.raises(DataError, match="split folders"):
        discover(tmp_path)


def test_flat_folder_with_an_empty_subfolder_stays_unlabeled(tmp_path):
    make_image(tmp_path / "a.png", size=16)
    (tmp_path / "thumbs").mkdir()
    f = discover(tmp_path)
    assert not f.has_labels and _rel(f) == ["a.png"]
    assert any("thumbs" in w for w in f.warnings)


# -- what counts as an image -------------------------------------------------------------------------------------------
def test_extensions_case_insensitive_and_non_images_ignored(tmp_path):
    make_image(tmp_path / "a" / "UPPER.JPG", size=16, fmt="JPEG")
    make_image(tmp_path / "a" / "Mixed.PnG", size=16, fmt="PNG")
    make_image(tmp_path / "a" / "pic.ppm", size=16)  # registered by Pillow, not in the basic list
    for junk in ("notes.txt", "labels.csv", "meta.json", "Thumbs.db", "noext"):
        (tmp_path / "a" / junk).write_text("x")
    f = discover(tmp_path)
    assert _rel(f) == ["a/Mixed.PnG", "a/UPPER.JPG", "a/pic.ppm"]
    assert f.warnings == []


def test_public_alias():
    import featx

    assert featx.discover_images is discover


def test_extension_list_follows_pillow():
    exts = image_extensions()
    for e in (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".heic", ".ppm", ".tga"):
        assert e in exts
    for e in (".txt", ".csv", ".json", ".pdf", ".h5"):
        assert e not in exts


def test_hidden_files_and_folders_ignored(tmp_path):
    make_image(tmp_path / "a" / "1.png", size=16)
    make_image(tmp_path / "a" / ".ipynb_checkpoints" / "1-checkpoint.png", size=16)
    make_image(tmp_path / "a" / "._1.png", size=16)  # macOS resource fork
    make_image(tmp_path / ".cache" / "x.png", size=16)  # hidden would-be class
    make_image(tmp_path / "__MACOSX" / "a" / "y.png", size=16)
    f = discover(tmp_path)
    assert _rel(f) == ["a/1.png"] and f.classes == ["a"]
    assert f.warnings == []


def test_empty_class_folder_is_dropped_with_warning(tmp_path):
    make_image(tmp_path / "a" / "1.png", size=16)
    (tmp_path / "b").mkdir()
    (tmp_path / "c" / ".ipynb_checkpoints").mkdir(parents=True)
    (tmp_path / "c" / "readme.txt").write_text("only notes")
    f = discover(tmp_path)
    assert f.classes == ["a"] and len(f) == 1
    assert any("'b'" in w and "no images" in w for w in f.warnings)
    assert any("'c'" in w for w in f.warnings)


def test_empty_root_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no images found"):
        discover(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("x")
    (tmp_path / "list.csv").write_text("x")
    with pytest.raises(DataError, match=r"no images found.*\.csv"):
        discover(tmp_path)
    f = discover(tmp_path, allow_empty=True)
    assert len(f) == 0 and f.records == []


def test_missing_root_and_file_root(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        discover(tmp_path / "nope")
    p = make_image(tmp_path / "one.jpg", size=16)
    with pytest.raises(DataError, match="expected a folder"):
        discover(p)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read any folder")
def test_unreadable_subfolder_is_warned_and_skipped(tmp_path):
    make_image(tmp_path / "a" / "1.png", size=16)
    make_image(tmp_path / "b" / "2.png", size=16)
    (tmp_path / "b").chmod(0)
    try:
        f = discover(tmp_path)
        assert _rel(f) == ["a/1.png"]
        assert any("cannot read" in w for w in f.warnings)
    finally:
        (tmp_path / "b").chmod(0o755)


def test_unreadable_subfolder_simulated(tmp_path, monkeypatch):
    # The same as above, runnable as root: the OS refuses to list one class folder.
    from featx.data import discover as disc

    make_image(tmp_path / "a" / "1.png", size=16)
    make_image(tmp_path / "b" / "2.png", size=16)
    real = disc._list_dir

    def list_dir(path, exts):
        if os.path.basename(path) == "b":
            raise PermissionError(13, "Permission denied")
        return real(path, exts)

    monkeypatch.setattr(disc, "_list_dir", list_dir)
    f = discover(tmp_path)
    assert _rel(f) == ["a/1.png"] and f.classes == ["a"]
    assert any("cannot read 'b': Permission denied" in w for w in f.warnings)


# -- order, links, names -----------------------------------------------------------------------------------------------
def test_order_is_by_code_point_whatever_creation_order(tmp_path):
    names = ["b/z.png", "a/B.png", "a/a.png", "a/a.b.png", "a/_x.png", "a/sub/c.png", "a/Z.png"]
    for i, n in enumerate(reversed(names)):
        make_image(tmp_path / n, size=16, seed=i)
    rel = _rel(discover(tmp_path))
    assert rel == sorted(names)
    assert rel == _rel(discover(tmp_path))


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_symlink_loop_terminates_without_duplicates(tmp_path):
    make_folder(tmp_path, classes=("a", "b"), n_per_class=2, splits=None, size=16)
    os.symlink("..", tmp_path / "a" / "loop")  # a/loop -> root
    os.symlink(".", tmp_path / "b" / "self")  # b/self -> b
    f = discover(tmp_path)
    assert _rel(f) == ["a/a_000.jpg", "a/a_001.jpg", "b/b_000.jpg", "b/b_001.jpg"]
    assert len({os.path.realpath(r.path) for r in f.records}) == len(f)
    assert any("loop" in w for w in f.warnings)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_symlinked_class_folder_is_followed(tmp_path):
    outside = tmp_path / "elsewhere"
    make_image(outside / "x.png", size=16)
    root = tmp_path / "data"
    make_image(root / "a" / "1.png", size=16)
    os.symlink(outside, root / "b")
    os.symlink(tmp_path / "missing", root / "a" / "dangling.png")  # broken link: ignored
    f = discover(root)
    assert [(r.relpath, r.label) for r in f.records] == [("a/1.png", "a"), ("b/x.png", "b")]
    assert f.records[1].path == root / "b" / "x.png"  # the link path is kept, not resolved


def test_non_utf8_file_name_is_listed_and_decodable(tmp_path):
    make_image(tmp_path / "a" / "ok.png", size=16)
    raw = os.fsencode(tmp_path / "a") + b"/caf\xe9.png"
    try:
        with open(raw, "wb") as fh:
            Image.new("RGB", (8, 8), (1, 2, 3)).save(fh, format="PNG")
    except (OSError, UnicodeError):
        pytest.skip("file system refuses non-UTF-8 names")
    f = discover(os.fsencode(tmp_path))  # bytes root works too
    rels = _rel(f)
    assert "a/caf\udce9.png" in rels and "a/ok.png" in rels
    rec = next(r for r in f.records if r.relpath == "a/caf\udce9.png")
    assert os.fsencode(rec.path).endswith(b"caf\xe9.png")
    assert load_rgb(rec.path).getpixel((0, 0)) == (1, 2, 3)


# -- leakage -----------------------------------------------------------------------------------------------------------
def test_leakage_finds_identical_files_across_splits_only(tmp_path):
    make_folder(tmp_path, classes=("a", "b"), n_per_class=3, splits=("train", "val", "test"), size=16)
    shutil.copy(tmp_path / "train/a/a_000.jpg", tmp_path / "val/b/copy.jpg")  # leaks train -> val (other class)
    shutil.copy(tmp_path / "train/a/a_000.jpg", tmp_path / "test/a/copy2.jpg")
    shutil.copy(tmp_path / "train/b/b_001.jpg", tmp_path / "train/a/same_split.jpg")  # duplicate inside train: fine
    # Same size, different bytes (uncompressed BMPs of equal dimensions): a size collision that is no leak.
    Image.new("RGB", (8, 8), (1, 1, 1)).save(tmp_path / "train/a/s1.bmp")
    Image.new("RGB", (8, 8), (2, 2, 2)).save(tmp_path / "val/a/s2.bmp")
    assert os.path.getsize(tmp_path / "train/a/s1.bmp") == os.path.getsize(tmp_path / "val/a/s2.bmp")
    leaks = find_leakage(discover(tmp_path))
    assert len(leaks) == 1
    g = leaks[0]
    assert g["paths"] == ["test/a/copy2.jpg", "train/a/a_000.jpg", "val/b/copy.jpg"]
    assert g["splits"] == ["train", "val", "test"]
    import hashlib

    assert g["sha256"] == hashlib.sha256((tmp_path / "train/a/a_000.jpg").read_bytes()).hexdigest()


def test_no_leakage_without_splits_or_duplicates(tmp_path):
    make_folder(tmp_path / "s", n_per_class=3, size=16)
    assert find_leakage(discover(tmp_path / "s")) == []
    make_folder(tmp_path / "n", n_per_class=2, splits=None, size=16)
    shutil.copy(tmp_path / "n/a/a_000.jpg", tmp_path / "n/b/dup.jpg")
    assert find_leakage(discover(tmp_path / "n")) == []


def test_hymenoptera_layout(hymenoptera):
    f = discover(hymenoptera)
    assert len(f) == 398 and f.classes == ["ants", "bees"] and f.split_names() == ["train", "val"]
    assert f.counts()["val"] == {"ants": 70, "bees": 83}
    assert f.warnings == []
    assert find_leakage(f) == []


# -- issue 11.9-11.11: folders featx cannot enter, one file under two labels, classes that differ in case ------------
def test_nesting_past_the_depth_limit_is_a_skip(tmp_path):
    from featx.data.discover import _MAX_DEPTH

    make_image(tmp_path / "a" / "1.png", size=16)
    deep = tmp_path / "b" / "/".join(["d"] * (_MAX_DEPTH + 2))
    make_image(deep / "far.png", size=16)
    make_image(tmp_path / "b" / "near.png", size=16)
    f = discover(tmp_path)
    assert _rel(f) == ["a/1.png", "b/near.png"]
    (s,) = f.skipped
    assert s["path"] == "b/" + "/".join(["d"] * _MAX_DEPTH) and "nested deeper" in s["reason"]
    assert s["stage"] == "discover"


def test_path_longer_than_the_os_allows_is_a_skip(tmp_path):
    make_image(tmp_path / "a" / "ok.png", size=16)
    make_image(tmp_path / "b" / "ok.png", size=16)
    fd = os.open(tmp_path / "b", os.O_RDONLY)
    try:  # build the deep path relative to open folders: no single call ever sees the whole path
        for i in range(20):
            name = f"{i:02d}" + "x" * 240
            os.mkdir(name, dir_fd=fd)
            nfd = os.open(name, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = nfd
        with open(os.open("deep.png", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as fh:
            fh.write((tmp_path / "a" / "ok.png").read_bytes())
    finally:
        os.close(fd)
    f = discover(tmp_path)
    assert _rel(f) == ["a/ok.png", "b/ok.png"]
    assert len(f.skipped) == 1 and "name too long" in f.skipped[0]["reason"].lower()
    shutil.rmtree(tmp_path / "b", ignore_errors=True)  # rmtree works on fds; leaves nothing for pytest to trip on


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_link_into_another_class_is_used_under_its_own_class_only(tmp_path):
    make_folder(tmp_path, classes=("ants", "bees"), n_per_class=2, splits=None, size=16)
    os.symlink("../ants", tmp_path / "bees" / "link_to_ants")
    f = discover(tmp_path)
    assert [(r.relpath, r.label) for r in f.records] == [
        ("ants/ants_000.jpg", "ants"), ("ants/ants_001.jpg", "ants"),
        ("bees/bees_000.jpg", "bees"), ("bees/bees_001.jpg", "bees")]
    assert [s["path"] for s in f.skipped] == ["bees/link_to_ants/ants_000.jpg", "bees/link_to_ants/ants_001.jpg"]
    assert "not used as 'bees'" in f.skipped[0]["reason"]
    assert any("more than one class label" in w for w in f.warnings)


def test_hard_link_in_two_classes_is_not_used_and_a_repeat_in_one_class_is_used_once(tmp_path):
    make_folder(tmp_path, classes=("ants", "bees"), n_per_class=2, splits=None, size=16)
    os.link(tmp_path / "ants" / "ants_000.jpg", tmp_path / "bees" / "same.jpg")  # which class? featx cannot tell
    os.link(tmp_path / "bees" / "bees_000.jpg", tmp_path / "bees" / "again.jpg")  # twice in one class
    f = discover(tmp_path)
    assert _rel(f) == ["ants/ants_001.jpg", "bees/again.jpg", "bees/bees_001.jpg"]
    why = {s["path"]: s["reason"] for s in f.skipped}
    assert "cannot tell its class" in why["ants/ants_000.jpg"] and "cannot tell its class" in why["bees/same.jpg"]
    assert "used once" in why["bees/bees_000.jpg"]


def test_class_folders_that_differ_only_in_case_are_warned_about(tmp_path):
    for c in ("Ants", "ants", "bees"):
        make_image(tmp_path / c / "1.png", size=16)
    f = discover(tmp_path)
    assert f.classes == ["Ants", "ants", "bees"]
    assert any("'Ants', 'ants' differ only in case" in w for w in f.warnings)
