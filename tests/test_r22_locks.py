"""Issue 22 items 1 and 8: lock files never follow links or open FIFOs, and a failure while taking a lock leaves
nothing behind and names the file (RELIABILITY.md, "Files featx creates beside the user's")."""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import featx
from featx._io import LOCK_SUFFIX, OutputLock, claim_outputs
from featx.cli.app import app
from featx.errors import OutputError
from featx.features.store import FeatureSet
from tests.test_predict import tiny_head  # noqa: F401  (session fixture: one tiny head for all predict tests)

runner = CliRunner()
META = {"backbone": "efficientnet_lite0", "weights_sha256": "cd" * 32, "preprocess": {"input_size": 8},
        "layer": "pooled", "feature_dim": 16}
PRECIOUS = b"the user's own file: featx must never write here\n"


@pytest.fixture
def store(tmp_path) -> Path:
    """A small labelled synthetic store (fit and audit need no network and no images for it)."""
    rng = np.random.default_rng(0)
    y = np.repeat(np.array(["a", "b"]), 20)
    X = rng.normal(0, 1, (40, 16)).astype(np.float32) + (y == "b")[:, None] * 3.0
    splits = np.array(["train", "val"])[np.arange(40) % 2]
    path = tmp_path / "f.npz"
    FeatureSet(X, [f"{c}/{i}.png" for i, c in enumerate(y)], labels=y, splits=splits, classes=["a", "b"],
               meta=META).save(path)
    return path


@pytest.fixture
def precious(tmp_path) -> Path:
    p = tmp_path / "precious.txt"
    p.write_bytes(PRECIOUS)
    return p


def lock_of(output: Path) -> Path:
    return output.parent / f".{output.name}{LOCK_SUFFIX}"


def untouched(p: Path) -> bool:
    return p.read_bytes() == PRECIOUS


# ------------------------------------------------------------------------------------------------ links
def test_a_symlinked_lock_is_refused_by_extract_fit_and_predict_and_its_target_is_untouched(
        tiny_head, store, precious, tmp_path):  # noqa: F811
    data, head = tiny_head
    out = tmp_path / "out"
    out.mkdir()
    for output in (out / "f.npz", out / "h.skops", out / "p.csv"):
        os.symlink(precious, lock_of(output))
    with pytest.raises(OutputError, match=r"\.f\.npz\.featx-lock.*symbolic link") as e:
        featx.extract_features(data / "train", out / "f.npz", backbone="efficientnet_lite0", image_size=32,
                               workers=0)
    assert e.value.exit_code == 7
    with pytest.raises(OutputError, match=r"\.h\.skops\.featx-lock.*symbolic link"):
        featx.fit_head(store, output=out / "h.skops", C=1.0, cv=0)
    with pytest.raises(OutputError, match=r"\.p\.csv\.featx-lock.*symbolic link"):
        featx.predict_folder(data / "val", head, output=out / "p.csv", workers=0)
    assert untouched(precious)
    assert sorted(p.name for p in out.iterdir()) == sorted(lock_of(o).name for o in (out / "f.npz", out / "h.skops",
                                                                                       out / "p.csv"))
    assert all(lock_of(o).is_symlink() for o in (out / "f.npz", out / "h.skops", out / "p.csv"))


def test_a_dangling_symlink_lock_is_refused_and_nothing_is_created_at_its_target(store, tmp_path):
    target = tmp_path / "elsewhere" / "created-by-featx.txt"
    target.parent.mkdir()
    os.symlink(target, lock_of(tmp_path / "h.skops"))
    with pytest.raises(OutputError, match="symbolic link"):
        featx.fit_head(store, output=tmp_path / "h.skops", C=1.0, cv=0)
    assert not target.exists() and not (tmp_path / "h.skops").exists()


def test_a_hard_linked_lock_is_refused_on_the_command_line(store, precious, tmp_path):
    out = tmp_path / "h.skops"
    os.link(precious, lock_of(out))
    r = runner.invoke(app, ["fit", str(store), "-o", str(out), "--C", "1", "--cv", "0"])
    assert r.exit_code == 7, r.output
    assert "hard link" in r.stderr and str(lock_of(out)) in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert untouched(precious) and os.stat(precious).st_nlink == 2 and not out.exists()


def test_a_fifo_lock_is_one_line_not_a_traceback_and_does_not_hang(store, tmp_path):
    out = tmp_path / "h.skops"
    os.mkfifo(lock_of(out))
    r = runner.invoke(app, ["fit", str(store), "-o", str(out), "--C", "1", "--cv", "0"])
    assert r.exit_code == 7, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
    assert "FIFO" in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output
    assert stat.S_ISFIFO(os.lstat(lock_of(out)).st_mode) and not out.exists()


def test_a_folder_at_the_lock_path_is_one_line_exit_7_and_left_as_it_was(store, tmp_path):
    out = tmp_path / "h.skops"
    lock_of(out).mkdir()
    (lock_of(out) / "mine.txt").write_text("x")
    r = runner.invoke(app, ["fit", str(store), "-o", str(out), "--C", "1", "--cv", "0"])
    assert r.exit_code == 7, r.output
    assert "folder" in r.stderr and str(lock_of(out)) in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert (lock_of(out) / "mine.txt").read_text() == "x" and not out.exists()


def test_an_unwritable_lock_is_one_line_and_leaves_no_folder(tmp_path, monkeypatch):
    """Permission denied on the lock (a read-only lock file or folder; monkeypatched: root may write anywhere)."""
    real_open = os.open
    out = tmp_path / "new" / "deeper" / "f.npz"

    def denied(path, flags, *a, **k):
        if str(path).endswith(LOCK_SUFFIX):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(OutputError, match=r"\.f\.npz\.featx-lock.*Permission denied") as e:
        with OutputLock(out):
            pass
    assert e.value.exit_code == 7 and not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------------------------ disk full
@pytest.mark.parametrize("call", ["write", "ftruncate"])
def test_disk_full_while_taking_the_lock_removes_it_and_the_folders_it_made_and_names_the_file(
        tmp_path, monkeypatch, call):
    real = getattr(os, call)

    def full(fd, *a):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(LOCK_SUFFIX):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, *a)

    out = tmp_path / "report" / "report.md"
    monkeypatch.setattr(os, call, full)
    with pytest.raises(OutputError, match=r"report/\.report\.md\.featx-lock.*No space left on device") as e:
        with claim_outputs([out]):
            raise AssertionError("the run must not start")
    monkeypatch.setattr(os, call, real)
    assert e.value.exit_code == 7
    assert not (tmp_path / "report").exists()  # neither the lock nor the (empty) folder it made
    with OutputLock(out):  # and nothing stale blocks the next run
        pass


def test_disk_full_at_lock_time_in_audit_leaves_no_lock_and_no_empty_report_folder(store, tmp_path, monkeypatch):
    real = os.write

    def full(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(LOCK_SUFFIX):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(os, "write", full)
    rep = tmp_path / "audit-report"
    r = runner.invoke(app, ["audit", str(store), "--checks", "duplicates,outliers", "--report-dir", str(rep)])
    monkeypatch.setattr(os, "write", real)
    assert r.exit_code == 7, r.output
    assert "No space left on device" in r.stderr and "featx-lock" in r.stderr
    assert not rep.exists()
