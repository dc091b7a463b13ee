"""Atomic writes: a failing or full disk leaves the old file intact and no temp files; the store refuses pickles."""
from __future__ import annotations

import errno
import os

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
