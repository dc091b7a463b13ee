"""predict_folder's promises about outputs (issue 11): locks, every file checked up front, failed sorts exit 7, odd
names in every report, the `_uncertain` folder, --move onto identical files and after an interruption."""
from __future__ import annotations

import copy
import csv
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

import featx
from featx._io import OutputLock, written_by_featx
from featx.errors import Interrupted, OutputError, UsageError
from featx.predict.tables import is_featx_table
from tests.imagegen import class_color, make_image
from tests.test_predict import tiny_head  # noqa: F401  (session fixture: one tiny head for all predict tests)


@pytest.fixture
def val(tiny_head, tmp_path):  # noqa: F811
    return Path(shutil.copytree(tiny_head[0] / "val", tmp_path / "val"))


@pytest.fixture
def engine_must_not_run(monkeypatch):
    """Fail the test if predict reaches the model: the refusal under test must come before any work."""
    import featx.features.engine as engine

    def boom(*a, **k):
        raise AssertionError("the model ran before the refusal")

    monkeypatch.setattr(engine, "iter_outputs", boom)


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# ------------------------------------------------------------------------------------------------ locks
def test_a_second_run_on_the_same_table_or_sort_folder_is_refused_at_once(tiny_head, val, tmp_path,
                                                                          engine_must_not_run):
    out = tmp_path / "p.csv"
    with OutputLock(out):  # another run holds the table
        with pytest.raises(OutputError, match="being written by another featx run"):
            featx.predict_folder(val, tiny_head[1], output=out, workers=0)
    assert not out.exists()
    sorted_ = tmp_path / "sorted"
    with OutputLock(sorted_):  # another run is sorting into the same folder (with another table)
        with pytest.raises(OutputError, match="being written by another featx run"):
            featx.predict_folder(val, tiny_head[1], output=tmp_path / "other.csv", sort_into=sorted_, workers=0)
    assert not sorted_.exists() and not (tmp_path / "other.csv").exists()


# ------------------------------------------------------------------------------------------------ every file checked
def test_report_files_featx_did_not_write_are_refused_before_any_work(tiny_head, val, tmp_path, monkeypatch):
    out = tmp_path / "pr.csv"
    rep = tmp_path / "pr.report"
    rep.mkdir()
    (rep / "metrics.json").write_text('{"mine": true}\n')
    with monkeypatch.context() as m:
        m.setattr("featx.features.engine.iter_outputs", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
        with pytest.raises(UsageError, match="metrics.json exists and was not written by featx"):
            featx.predict_folder(val, tiny_head[1], output=out, workers=0)
        (rep / "metrics.json").unlink()
        (rep / "confusion.png").write_bytes(b"\x89PNG\r\n\x1a\n my own picture")
        with pytest.raises(UsageError, match="confusion.png exists and was not written by featx"):
            featx.predict_folder(val, tiny_head[1], output=out, workers=0)
    assert (rep / "confusion.png").read_bytes() == b"\x89PNG\r\n\x1a\n my own picture" and not out.exists()
    # with --overwrite they are replaced, by files featx recognises as its own (a later run may replace them)
    featx.predict_folder(val, tiny_head[1], output=out, workers=0, overwrite=True)
    assert json.loads((rep / "metrics.json").read_text())["written_by"].startswith("featx")
    assert all(written_by_featx(p) for p in rep.iterdir()) and written_by_featx(out, is_featx_table)


def test_an_unwritable_output_folder_is_refused_before_running_the_model(tiny_head, val, tmp_path, monkeypatch,
                                                                         engine_must_not_run):
    ro = tmp_path / "readonly"
    ro.mkdir()
    real = tempfile.mkstemp

    def mkstemp(*a, dir=None, **k):  # a read-only mount (tests run as root, so chmod would not stop writes)
        if dir is not None and Path(dir) == ro:
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*a, dir=dir, **k)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    with pytest.raises(OutputError, match="Read-only file system"):
        featx.predict_folder(val, tiny_head[1], output=ro / "p.csv", workers=0)
    with pytest.raises(OutputError, match="Read-only file system"):
        featx.predict_folder(val, tiny_head[1], output=False, sort_into=ro / "sorted", workers=0)
    target = tmp_path / "a_file"
    target.write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        featx.predict_folder(val, tiny_head[1], output=False, sort_into=target, workers=0)


# ------------------------------------------------------------------------------------------------ sort failures
def test_files_that_cannot_be_sorted_exit_7_after_writing_and_strict_stops_at_the_first(tiny_head, val, tmp_path):
    sorted_ = tmp_path / "sorted"
    sorted_.mkdir()
    (sorted_ / "ant").write_text("a file where the ant folder should be")
    out = tmp_path / "p.csv"
    with pytest.raises(OutputError) as exc:
        featx.predict_folder(val, tiny_head[1], output=out, sort_into=sorted_, workers=0)
    assert exc.value.exit_code == 7 and "could not be sorted" in str(exc.value)
    res = exc.value.result
    n_ant = res.counts["ant"]
    assert n_ant > 0 and sum(a.status == "failed" for a in res.sort_actions) == n_ant
    rows = read_csv(out)  # the table was written, and says what happened to each file
    assert all(r["sort_status"].startswith("failed") for r in rows if r["label"] == "ant")
    assert all(r["sort_status"] == "copied" and Path(r["sorted_to"]).is_file() for r in rows if r["label"] == "bee")

    shutil.rmtree(sorted_ / "bee")
    with pytest.raises(OutputError, match="--strict stopped the sort at the first failure") as exc:
        featx.predict_folder(val, tiny_head[1], output=out, sort_into=sorted_, workers=0, strict=True)
    acts = exc.value.result.sort_actions
    assert acts[-1].status == "failed" and {a.status for a in acts[:-1]} <= {"done"}
    statuses = [r["sort_status"] for r in read_csv(out)]
    # rows are in path order: the bee/ images come after the first ant that fails, so they were never tried
    assert statuses.count("not attempted") == 12 - len(acts) >= 6


def test_a_full_disk_during_sorting_exits_7(tiny_head, val, tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", full)
    with pytest.raises(OutputError, match="12 of 12 images could not be sorted.*No space left"):
        featx.predict_folder(val, tiny_head[1], output=False, sort_into=tmp_path / "s", workers=0)
    assert not [p for p in (tmp_path / "s").rglob("*") if p.is_file()]


# ------------------------------------------------------------------------------------------------ names
def test_names_that_are_not_utf8_or_look_like_math_render_in_every_report(tiny_head, val, tmp_path):
    # misclassified images (ant-coloured under bee/) whose names matplotlib could not draw before
    for raw in (b"caf\xe9.jpg", b"x$\\frac{$.jpg"):
        tmp = make_image(val / "bee" / "tmp.jpg", size=32, color=class_color(0), seed=7)
        os.rename(os.fsencode(tmp), os.fsencode(str(val / "bee")) + b"/" + raw)
    # a true class the model does not know, whose folder name is not UTF-8 either
    wasp = os.fsencode(str(val)) + b"/w\xe9sp"
    os.mkdir(wasp)
    os.rename(os.fsencode(make_image(val / "w.jpg", size=32, color=class_color(2), seed=3)), wasp + b"/w.jpg")

    out = tmp_path / "p.jsonl"  # JSON lines: true labels that are not UTF-8 once made the table fail to encode
    res = featx.predict_folder(val, tiny_head[1], output=out, workers=0)
    rows = [json.loads(line) for line in out.read_bytes().decode("utf-8").splitlines()]  # strict UTF-8
    assert {"w\ufffdsp"} == {r["true_label"] for r in rows if r["path"].startswith("w")}
    assert res.gallery_png.is_file() and res.confusion_png.is_file()
    doc = json.loads((res.report_dir / "metrics.json").read_bytes().decode("utf-8"))
    wrong = {m["path"] for m in doc["misclassified"]}
    assert {"bee/caf\ufffd.jpg", "bee/x$\\frac{$.jpg"} <= wrong
    assert "w\ufffdsp" in doc["classes"] and "w\ufffdsp" in res.unknown_classes
    assert "\\udc" not in (res.report_dir / "metrics.json").read_text()  # no lone surrogates escaped into JSON


# ------------------------------------------------------------------------------------------------ _uncertain
def test_a_class_named_like_the_uncertain_folder_is_refused_when_it_would_be_used(tiny_head, val, tmp_path):
    from featx.heads import load_head

    head = copy.deepcopy(load_head(tiny_head[1]))
    head.pipeline[-1].classes_ = np.array(["_uncertain", "bee"])
    with pytest.raises(UsageError, match="_uncertain"):
        featx.predict_folder(val, head, output=False, sort_into=tmp_path / "s", min_confidence=0.9, workers=0)
    assert not (tmp_path / "s").exists()
    # without --min-confidence there is no low-confidence folder to collide with
    res = featx.predict_folder(val, head, output=False, sort_into=tmp_path / "s", workers=0)
    assert {a.folder for a in res.sort_actions} <= {"_uncertain", "bee"}


def test_class_folders_that_would_merge_are_refused(tmp_path):
    from featx.predict import sort as S

    with pytest.raises(UsageError, match="share the folder"):
        S.check_sort_targets(tmp_path / "s", tmp_path / "in", ["a/b", "a_b"], uncertain=False)
    with pytest.raises(UsageError, match="_uncertain"):
        S.check_sort_targets(tmp_path / "s", tmp_path / "in", ["_Uncertain", "x"], uncertain=True)
    S.check_sort_targets(tmp_path / "s", tmp_path / "in", ["_uncertain", "x"], uncertain=False)


# ------------------------------------------------------------------------------------------------ --move
def test_move_onto_an_identical_file_says_the_source_was_removed(tiny_head, val, tmp_path):
    name = "ant_000.jpg"
    for label in ("ant", "bee"):  # the same photo was sorted before, into whichever class it is predicted as
        (tmp_path / "sorted" / label).mkdir(parents=True)
        shutil.copy2(val / "ant" / name, tmp_path / "sorted" / label / name)
    res = featx.predict_folder(val, tiny_head[1], output=tmp_path / "p.csv", sort_into=tmp_path / "sorted",
                               mode="move", workers=0)
    assert [a.source.name for a in res.removed_duplicates()] == [name]
    line = [r for r in read_csv(tmp_path / "p.csv") if r["path"] == f"ant/{name}"][0]
    assert line["sort_status"].startswith("already there; an identical file was already there")
    assert line["sorted_to"] == str(tmp_path / "sorted" / line["label"] / name)
    assert not (val / "ant" / name).exists()


def test_a_rerun_after_an_interrupted_move_reports_the_files_already_moved(tiny_head, val, tmp_path, monkeypatch):
    from featx.predict import sort as S

    real_rename = os.rename
    calls = {"n": 0}

    def dying_rename(src, dst, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt  # Ctrl-C after three moves
        return real_rename(src, dst, *a, **k)

    sorted_, out = tmp_path / "sorted", tmp_path / "p.csv"
    monkeypatch.setattr(os, "rename", dying_rename)
    with pytest.raises(Interrupted, match="stopped by Ctrl-C; nothing is half-written") as exc:
        featx.predict_folder(val, tiny_head[1], output=out, sort_into=sorted_, mode="move", workers=0)
    assert exc.value.exit_code == 130
    monkeypatch.setattr(os, "rename", real_rename)
    assert not out.exists() and len(list(val.rglob("*.jpg"))) == 9
    assert (sorted_ / S.JOURNAL_NAME).is_file()

    res = featx.predict_folder(val, tiny_head[1], output=out, sort_into=sorted_, mode="move", workers=0)
    assert len(res) == 9 and len(res.earlier_moves) == 3
    rows = read_csv(out)
    assert len(rows) == 12 and [r["path"] for r in rows] == sorted(r["path"] for r in rows)
    earlier = [r for r in rows if r["sort_status"] == S.EARLIER]
    assert len(earlier) == 3 and all(Path(r["sorted_to"]).is_file() and r["label"] for r in earlier)
    assert {r["sort_status"] for r in rows} == {S.EARLIER, "moved"}
    assert not (sorted_ / S.JOURNAL_NAME).exists()  # reported once: a third run has nothing earlier to report
    assert len(list(sorted_.rglob("*.jpg"))) == 12


# ------------------------------------------------------------------------------------------------ --image-size
def test_image_size_only_confirms_the_recorded_size(tiny_head, val, engine_must_not_run):
    with pytest.raises(UsageError, match="made at 32 px"):
        featx.predict_folder(val, tiny_head[1], output=False, image_size=64, workers=0)
