"""Atomic writes: a failing or full disk leaves the old file intact and no temp files; the store refuses pickles."""
from __future__ import annotations

import errno
import io
import json
import os
import zipfile

import numpy as np
import pytest

import featx
from featx._io import TMP_MARK, atomic_write, sweep_stale_temps
from featx.errors import ArtifactError, FeatxError
from featx.features.store import FeatureSet, save_features


def _fs(n=3):
    return FeatureSet(features=np.arange(n * 4, dtype=np.float32).reshape(n, 4), paths=[f"a/{i}.jpg" for i in range(n)],
                      labels=["a"] * n, classes=["a"], meta={"backbone": "x"})


def test_disk_full_keeps_the_old_store_and_leaves_no_temp(tmp_path, monkeypatch):
    out = tmp_path / "f.npz"
    save_features(_fs(3), out)
    before = out.read_bytes()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full)
    with pytest.raises(FeatxError, match="No space left"):
        save_features(_fs(5), out)
    assert out.read_bytes() == before
    assert not [p for p in os.listdir(tmp_path) if p.startswith(TMP_MARK)]
    assert len(featx.load_features(out)) == 3


def test_an_exception_mid_write_keeps_the_old_file(tmp_path):
    p = tmp_path / "x.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(p, "w") as fh:
            fh.write("half")
            raise RuntimeError("boom")
    assert p.read_text() == "old" and os.listdir(tmp_path) == ["x.txt"]


def test_temps_left_by_a_killed_writer_are_swept(tmp_path):
    (tmp_path / f"{TMP_MARK}f.npz.abc").write_bytes(b"partial")
    (tmp_path / "other.txt").write_text("keep")
    sweep_stale_temps(tmp_path, "f.npz")
    assert sorted(os.listdir(tmp_path)) == ["other.txt"]


def test_store_round_trip_keeps_odd_file_names(tmp_path):
    fs = _fs(2)
    fs.paths = ["caf\udce9.jpg", "日本/写真.png"]  # undecodable byte (surrogate) and non-ASCII
    out = save_features(fs, tmp_path / "f.npz")
    back = featx.load_features(out)
    assert back.paths == fs.paths and np.array_equal(back.features, fs.features)


def test_store_with_pickled_object_arrays_is_refused(tmp_path):
    bad = tmp_path / "bad.npz"
    np.savez(bad, features=np.zeros((1, 2), np.float32), paths=np.array([{"evil": 1}], dtype=object),
             meta=np.asarray("{}"))
    with pytest.raises(ArtifactError, match="not a safe featx features file"):
        featx.load_features(bad)
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(ArtifactError):
        featx.load_features(tmp_path / "junk.npz")
    with pytest.raises(ArtifactError, match="does not exist"):
        featx.load_features(tmp_path / "missing.npz")


def _npz_with(path, **members):
    """A zip laid out like a store, each member's raw bytes given (lets a test plant a pickle or odd arrays)."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, value in members.items():
            if isinstance(value, np.ndarray):
                buf = io.BytesIO()
                np.save(buf, value)
                value = buf.getvalue()
            zf.writestr(f"{name}.npy", value)
    return path


GOOD = {"features": np.zeros((1, 2), np.float32), "paths": np.array(["a.jpg"]), "meta": np.asarray(json.dumps({}))}


@pytest.mark.parametrize("change, needle", [
    ({"paths": b"\x80\x04]\x94X\x01\x00\x00\x00a\x94a."}, "'paths' is not a numpy array"),  # a raw pickle member
    ({"features": b"cos\nsystem\n(S'touch x'\ntR."}, "'features' is not a numpy array"),
    ({"meta": np.asarray(json.dumps([1, 2]))}, "metadata is a JSON list"),
    ({"meta": np.asarray("{not json")}, "unreadable metadata"),
    ({"features": np.array(["a", "b"])}, "'features' holds a 1-d"),
    ({"paths": np.zeros((1, 2))}, "'paths' holds a 2-d float64"),
    ({"labels": np.array([1.5])}, "'labels' holds"),
])
def test_store_layout_is_validated_on_load(tmp_path, change, needle):
    """Raw pickles as members and meta that is not a JSON object gave TypeError/AttributeError tracebacks (issue 11)."""
    bad = _npz_with(tmp_path / "bad.npz", **{**GOOD, **change})
    with pytest.raises(ArtifactError, match=needle):
        featx.load_features(bad)
    assert not (tmp_path / "x").exists()  # nothing in a pickle ran


def test_store_declaring_a_huge_member_is_refused_before_inflating(tmp_path, monkeypatch):
    path = _npz_with(tmp_path / "bomb.npz", **GOOD)
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("labels.npy", "w", force_zip64=True) as fh:  # ~100 MB of zeros deflate to ~100 kB
            chunk = bytes(1 << 20)
            for _ in range(100):
                fh.write(chunk)
    assert path.stat().st_size < 1 << 20
    monkeypatch.setattr(zipfile.ZipExtFile, "read", lambda *a, **k: pytest.fail("a member was inflated"))
    with pytest.raises(ArtifactError, match="declares 104,857,600 bytes"):
        featx.load_features(path)


def test_nonfinite_rows_are_found_not_dropped(tmp_path):
    fs = _fs(4)
    fs.features[1, 2] = np.nan
    fs.features[3, 0] = np.inf
    back = featx.load_features(save_features(fs, tmp_path / "f.npz"))
    assert len(back) == 4 and back.nonfinite_rows().tolist() == [1, 3]

# -- permissions, ownership, writability, locks ------------------------------------------------------------
import json
import stat
import subprocess
import sys

from featx._io import OutputLock, check_outputs, claim_outputs, write_json, write_markdown, written_by_featx
from featx.errors import OutputError, UsageError


def test_written_files_get_normal_permissions_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        p = tmp_path / "r.json"
        write_json(p, {"a": 1})
        assert stat.S_IMODE(p.stat().st_mode) == 0o644
        p.chmod(0o640)  # an existing file keeps its mode, as with open(..., "w")
        write_json(p, {"a": 2})
        assert stat.S_IMODE(p.stat().st_mode) == 0o640
    finally:
        os.umask(old)


def test_featx_files_are_recognised_and_foreign_ones_refused(tmp_path):
    from featx.report import save_bar_chart_png

    ours_json, ours_png, ours_md = tmp_path / "a.json", tmp_path / "a.png", tmp_path / "a.md"
    write_json(ours_json, {"x": 1})
    save_bar_chart_png([{"name": "a", "accuracy": 0.5}], ours_png)
    write_markdown(ours_md, "# hi\n")
    assert json.loads(ours_json.read_text())["written_by"].startswith("featx")
    for p in (ours_json, ours_png, ours_md, tmp_path / "absent.json"):
        assert written_by_featx(p), p
    check_outputs([ours_json, ours_png, ours_md])
    theirs = tmp_path / "theirs.json"
    theirs.write_text('{"mine": true}')
    (tmp_path / "theirs.png").write_bytes(b"\x89PNG\r\n\x1a\nnot ours")
    for p in (theirs, tmp_path / "theirs.png"):
        assert not written_by_featx(p)
        with pytest.raises(UsageError, match="not written by featx"):
            check_outputs([ours_json, p])
        check_outputs([p], overwrite=True)


def test_unwritable_output_folder_is_one_clear_error_before_work(tmp_path, monkeypatch):
    import tempfile

    def eacces(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", eacces)
    with pytest.raises(OutputError, match="cannot write to .*Permission denied"):
        check_outputs([tmp_path / "new" / "f.npz"])
    with pytest.raises(OutputError, match="Permission denied"):
        write_json(tmp_path / "x.json", {})
    assert not (tmp_path / "new").exists()


def test_output_under_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        check_outputs([tmp_path / "file" / "sub" / "f.npz"])


def test_a_second_run_on_the_same_output_is_refused_naming_the_first(tmp_path):
    out = tmp_path / "out" / "f.npz"
    with OutputLock(out):
        with pytest.raises(OutputError, match=r"another featx run \(pid %d" % os.getpid()):
            with OutputLock(out):
                pass
    with OutputLock(out):  # released: free again
        assert (out.parent / ".f.npz.featx-lock").exists()
    assert not out.parent.exists()  # no stale lock file; the folder the lock made is gone again


def test_lock_of_a_killed_process_is_not_stale(tmp_path):
    out = tmp_path / "f.npz"
    code = f"from featx._io import OutputLock; import os; l = OutputLock({str(out)!r}); l.acquire(); os._exit(0)"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / ".f.npz.featx-lock").exists()  # left behind by the dead process, but not held
    with OutputLock(out):
        pass


def test_claim_removes_folders_it_made_when_the_run_fails(tmp_path):
    out = tmp_path / "a" / "b" / "f.npz"
    with pytest.raises(RuntimeError):
        with claim_outputs([out]):
            raise RuntimeError("nothing written")
    assert not (tmp_path / "a").exists()
