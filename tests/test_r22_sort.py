"""Issue 22 items 1, 8 and 10 for `--sort-into`: the move journal never follows links, a rerun after a --move killed
after its last move says the images were already sorted, and case-twin classes are refused before any work."""
from __future__ import annotations

import csv
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import featx
from featx.cli.app import app
from featx.errors import Interrupted, OutputError, UsageError
from featx.predict import sort as S
from tests.test_predict import tiny_head  # noqa: F401  (session fixture: one tiny head for all predict tests)
from tests.test_predict_reliability import engine_must_not_run, val  # noqa: F401  (shared fixtures)

runner = CliRunner()
PRECIOUS = b'{"not": "a featx journal"}\n'


def images_in(folder: Path) -> list:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg"))


# ------------------------------------------------------------------------------------------------ journal links
@pytest.mark.parametrize("how", ["symlink", "hardlink"])
def test_a_linked_move_journal_is_refused_before_any_work_and_its_target_untouched(
        tiny_head, val, tmp_path, engine_must_not_run, how):  # noqa: F811
    precious = tmp_path / "precious.jsonl"
    precious.write_bytes(PRECIOUS)
    sorted_ = tmp_path / "sorted"
    sorted_.mkdir()
    (os.symlink if how == "symlink" else os.link)(precious, sorted_ / S.JOURNAL_NAME)
    before = images_in(val)
    r = runner.invoke(app, ["predict", str(val), "-m", str(tiny_head[1]), "-o", str(tmp_path / "p.csv"),
                            "--sort-into", str(sorted_), "--move", "--workers", "0"])
    assert r.exit_code == 7, r.output
    assert S.JOURNAL_NAME in r.stderr and ("symbolic link" if how == "symlink" else "hard link") in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert precious.read_bytes() == PRECIOUS and images_in(val) == before and not (tmp_path / "p.csv").exists()
    assert sorted(p.name for p in sorted_.iterdir()) == [S.JOURNAL_NAME]


def test_a_fifo_journal_is_refused_without_hanging(tiny_head, val, tmp_path, engine_must_not_run):  # noqa: F811
    sorted_ = tmp_path / "sorted"
    sorted_.mkdir()
    os.mkfifo(sorted_ / S.JOURNAL_NAME)
    with pytest.raises(OutputError, match="FIFO") as e:
        featx.predict_folder(val, tiny_head[1], output=tmp_path / "p.csv", sort_into=sorted_, mode="move", workers=0)
    assert e.value.exit_code == 7 and stat.S_ISFIFO(os.lstat(sorted_ / S.JOURNAL_NAME).st_mode)


def test_the_journal_never_appends_through_a_link_planted_after_the_check(tmp_path):
    """The check before the run is not the only guard: the journal itself opens with O_NOFOLLOW."""
    precious = tmp_path / "precious.jsonl"
    precious.write_bytes(PRECIOUS)
    (tmp_path / "sorted").mkdir()
    src = tmp_path / "img.jpg"
    src.write_bytes(b"x")
    journal = S.MoveJournal(tmp_path / "sorted", tmp_path)
    os.symlink(precious, journal.path)
    with pytest.raises(OutputError, match="symbolic link"):
        journal.intend(src, tmp_path / "sorted" / "a" / "img.jpg", {"path": "img.jpg"})
    with pytest.raises(OutputError, match="symbolic link"):  # nor reads another file as its entries
        journal.earlier()
    assert precious.read_bytes() == PRECIOUS and src.exists()


# ------------------------------------------------------------------------------------------------ killed after the last move
def test_a_rerun_after_a_move_killed_after_its_last_move_says_already_sorted_and_removes_the_journal(
        tiny_head, val, tmp_path, monkeypatch):  # noqa: F811
    import featx.predict.folder as F

    sorted_, out = tmp_path / "sorted", tmp_path / "p.csv"
    names = images_in(val)
    with monkeypatch.context() as m:  # stopped after every image was moved, before the table was written
        m.setattr(F, "_write", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(Interrupted):
            featx.predict_folder(val, tiny_head[1], output=out, sort_into=sorted_, mode="move", workers=0)
    assert images_in(val) == [] and len(images_in(sorted_)) == len(names) and not out.exists()
    assert (sorted_ / S.JOURNAL_NAME).is_file()

    r = runner.invoke(app, ["predict", str(val), "-m", str(tiny_head[1]), "-o", str(out), "--sort-into",
                            str(sorted_), "--move", "--workers", "0"])
    assert r.exit_code == 0, r.output
    assert "no images found" not in r.output
    assert f"all {len(names)} images were already sorted into {sorted_}" in r.stdout
    assert "0 images classified" not in r.stdout
    with open(out, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["path"] for r in rows) == names
    assert {r["sort_status"] for r in rows} == {S.EARLIER}
    assert all(Path(r["sorted_to"]).is_file() and r["label"] in ("ant", "bee") for r in rows)
    assert not (sorted_ / S.JOURNAL_NAME).exists()

    with pytest.raises(featx.errors.DataError, match="no images found"):  # reported once: nothing is left to say
        featx.predict_folder(val, tiny_head[1], output=out, sort_into=sorted_, mode="move", workers=0)


# ------------------------------------------------------------------------------------------------ case twins
def test_case_twin_classes_are_refused_before_any_work(tiny_head, val, tmp_path, engine_must_not_run):  # noqa: F811
    fs = featx.load_features(tiny_head[1].parent / "features.npz")
    fs.labels = np.where(fs.labels == "ant", "Ants", "ants")
    fs.classes = ["Ants", "ants"]
    head = tmp_path / "twins.skops"
    featx.fit_head(fs, output=head, C=1.0, cv=0)
    for kw in ({}, {"min_confidence": 0.5}):
        with pytest.raises(UsageError, match=r"'Ants' and 'ants'.*case") as e:
            featx.predict_folder(val, head, output=tmp_path / "p.csv", sort_into=tmp_path / "sorted", workers=0,
                                 **kw)
        assert e.value.exit_code == 2
    assert not (tmp_path / "sorted").exists() and not (tmp_path / "p.csv").exists()


def test_case_folded_folder_names_are_compared_for_every_class(tmp_path):
    S.check_sort_targets(tmp_path / "s", tmp_path / "img", ["ant", "bee"], uncertain=True)
    for classes in (["Ants", "ants"], ["BEE", "ant", "bee"], ["Straße", "STRASSE"]):
        with pytest.raises(UsageError, match="share the folder"):
            S.check_sort_targets(tmp_path / "s", tmp_path / "img", classes, uncertain=False)
