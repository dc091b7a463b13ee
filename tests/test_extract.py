"""Extraction engine and feature store: order, labels/splits, bad files, strict mode, resume, signals, OOM retry."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import featx
from featx.errors import DataError, FeatxError, StrictModeError, UsageError
from tests.imagegen import make_bad_files, make_folder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bb():
    # The real embedded network at a tiny input size: fast on the CPU, same code path as 224 px.
    return featx.create_backbone("efficientnet_lite0", image_size=32)


@pytest.fixture()
def folder(tmp_path):
    return make_folder(tmp_path / "imgs", classes=("cat", "dog"), n_per_class=5, splits=("train", "val"), size=40)


def _same(a, b):
    assert a.paths == b.paths
    assert np.array_equal(a.features, b.features)
    assert (a.labels is None and b.labels is None) or list(a.labels) == list(b.labels)
    assert (a.splits is None and b.splits is None) or list(a.splits) == list(b.splits)


def test_store_has_rows_labels_splits_and_provenance(bb, folder, tmp_path):
    res = featx.extract_features(folder, tmp_path / "f.npz", backbone=bb, workers=0)
    fs = featx.load_features(res.path)
    assert res.n_images == len(fs) == 20 and res.n_skipped == 0
    assert fs.features.shape == (20, 1280) and fs.features.dtype == np.float32
    assert fs.classes == ["cat", "dog"]
    assert set(fs.splits) == {"train", "val"} and sorted(set(fs.labels)) == ["cat", "dog"]
    assert fs.paths == sorted(fs.paths)  # deterministic discovery order, relative posix paths
    assert all(not p.startswith("/") for p in fs.paths)
    for key in ("backbone", "weights_sha256", "preprocess", "layer", "versions", "created", "skipped"):
        assert key in fs.meta
    assert fs.meta["preprocess"]["input_size"] == 32 and fs.meta["layer"] == "pooled"
    assert len(fs.meta["weights_sha256"]) == 64
    # numpy users read it without pickle
    with np.load(res.path, allow_pickle=False) as z:
        assert z["features"].shape == (20, 1280)


def test_features_do_not_depend_on_workers_or_batch_size(bb, folder, tmp_path):
    a = featx.load_features(featx.extract_features(folder, tmp_path / "a.npz", backbone=bb, workers=0, batch_size=3).path)
    b = featx.load_features(featx.extract_features(folder, tmp_path / "b.npz", backbone=bb, workers=2, batch_size=7).path)
    assert a.paths == b.paths
    np.testing.assert_allclose(a.features, b.features, rtol=1e-4, atol=1e-5)


def test_flat_folder_is_unlabeled(bb, tmp_path):
    root = make_folder(tmp_path / "flat", classes=("x",), n_per_class=3, splits=None, size=32)
    flat = tmp_path / "flatter"
    flat.mkdir()
    for p in sorted((root / "x").iterdir()):
        p.rename(flat / p.name)
    fs = featx.load_features(featx.extract_features(flat, tmp_path / "u.npz", backbone=bb, workers=0).path)
    assert fs.labels is None and fs.splits is None and len(fs) == 3


def test_bad_files_are_skipped_and_listed_exactly(bb, folder, tmp_path):
    bad = make_bad_files(folder / "train" / "cat")
    res = featx.extract_features(folder, tmp_path / "f.npz", backbone=bb, workers=1)
    fs = featx.load_features(res.path)
    skipped = {Path(s["path"]).name: s["reason"] for s in res.skipped}
    assert set(skipped) == set(bad)
    for name, expect in bad.items():
        assert expect.lower() in skipped[name].lower()
    assert len(fs) == 20 and not any(Path(p).name in bad for p in fs.paths)
    assert {Path(s["path"]).name for s in fs.meta["skipped"]} == set(bad)


def test_bad_file_never_gets_another_files_feature(bb, folder, tmp_path):
    clean = featx.load_features(featx.extract_features(folder, tmp_path / "a.npz", backbone=bb, workers=0).path)
    make_bad_files(folder / "train" / "cat")
    dirty = featx.load_features(featx.extract_features(folder, tmp_path / "b.npz", backbone=bb, workers=0, batch_size=4).path)
    assert dirty.paths == clean.paths
    np.testing.assert_allclose(dirty.features, clean.features, rtol=1e-4, atol=1e-5)


def test_strict_turns_a_skip_into_an_error_and_writes_nothing(bb, folder, tmp_path):
    (folder / "train" / "dog" / "empty.jpg").write_bytes(b"")
    with pytest.raises(StrictModeError, match="empty.jpg"):
        featx.extract_features(folder, tmp_path / "f.npz", backbone=bb, workers=0, strict=True)
    assert not (tmp_path / "f.npz").exists()


def test_a_folder_of_garbage_stops_early(bb, tmp_path):
    g = tmp_path / "garbage"
    g.mkdir()
    rng = np.random.default_rng(0)
    for i in range(200):
        (g / f"{i:03d}.jpg").write_bytes(rng.bytes(64))
    calls = []
    with pytest.raises(DataError, match="all failed to decode"):
        featx.extract_features(g, tmp_path / "f.npz", backbone=bb, workers=0, batch_size=16,
                               progress=lambda d, t: calls.append(d))
    assert max(calls) < 200  # it stopped before grinding through everything
    assert not (tmp_path / "f.npz").exists()


def test_output_inside_input_and_foreign_files_are_refused(bb, folder, tmp_path):
    with pytest.raises(FeatxError, match="inside the input folder"):
        featx.extract_features(folder, folder / "f.npz", backbone=bb, workers=0)
    foreign = tmp_path / "notes.npz"
    foreign.write_text("my precious notes")
    with pytest.raises(UsageError, match="not a featx features file"):
        featx.extract_features(folder, foreign, backbone=bb, workers=0)
    assert foreign.read_text() == "my precious notes"


def test_empty_folder_is_a_clear_error(bb, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError):
        featx.extract_features(tmp_path / "empty", tmp_path / "f.npz", backbone=bb, workers=0)
    assert not (tmp_path / "f.npz").exists()


def test_interrupted_extraction_resumes_to_identical_store(bb, folder, tmp_path):
    full = featx.load_features(featx.extract_features(folder, tmp_path / "full.npz", backbone=bb, workers=0,
                                                      chunk_size=4, batch_size=3).path)
    out = tmp_path / "resumed.npz"

    def stop_after_two_chunks(done, total):
        if done >= 9:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        featx.extract_features(folder, out, backbone=bb, workers=0, chunk_size=4, batch_size=3, progress=stop_after_two_chunks)
    assert not out.exists()
    chunks = sorted((tmp_path / "resumed.npz.partial").glob("chunk-*.npz"))
    assert len(chunks) == 2
    res = featx.extract_features(folder, out, backbone=bb, workers=0, chunk_size=4, batch_size=3)
    assert res.resumed_images == 8
    _same(featx.load_features(out), full)
    assert not (tmp_path / "resumed.npz.partial").exists()


def test_changed_inputs_do_not_reuse_stale_chunks(bb, folder, tmp_path):
    out = tmp_path / "f.npz"
    with pytest.raises(KeyboardInterrupt):
        featx.extract_features(folder, out, backbone=bb, workers=0, chunk_size=4,
                               progress=lambda d, t: (_ for _ in ()).throw(KeyboardInterrupt) if d >= 4 else None)
    from tests.imagegen import make_image

    make_image(folder / "train" / "cat" / "000-new.png", size=(32, 32), seed=99)
    res = featx.extract_features(folder, out, backbone=bb, workers=0, chunk_size=4)
    assert res.resumed_images == 0 and res.n_images == 21


def test_cuda_oom_retries_in_halves_with_same_output(bb, folder, tmp_path, monkeypatch):
    import torch

    ref = featx.load_features(featx.extract_features(folder, tmp_path / "a.npz", backbone=bb, workers=0, batch_size=8).path)
    real = bb.forward_features
    sizes = []

    def flaky(x):
        sizes.append(len(x))
        if len(x) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(x)

    monkeypatch.setattr(bb, "forward_features", flaky)
    # the OOM retry is torch's (CUDA): run the patched network in torch, not as a CPU graph
    got = featx.load_features(featx.extract_features(folder, tmp_path / "b.npz", backbone=bb, workers=0, batch_size=8,
                                                     runtime="torch").path)
    assert max(sizes) == 8 and 2 in sizes
    np.testing.assert_allclose(got.features, ref.features, rtol=1e-4, atol=1e-5)


def test_earlier_stage_is_pooled(folder, tmp_path):
    bb2 = featx.create_backbone("efficientnet_lite0", image_size=32, layer="stage2")
    fs = featx.load_features(featx.extract_features(folder, tmp_path / "s.npz", backbone=bb2, workers=0).path)
    assert fs.features.shape == (20, 40) and fs.meta["layer"] == "blocks.2"


def test_leakage_between_splits_is_reported(bb, folder, tmp_path):
    src = sorted((folder / "train" / "cat").iterdir())[0]
    (folder / "val" / "cat" / "copy.jpg").write_bytes(src.read_bytes())
    res = featx.extract_features(folder, tmp_path / "f.npz", backbone=bb, workers=0)
    assert len(res.leakage) == 1
    assert sorted(res.leakage[0]["paths"]) == sorted([f"train/cat/{src.name}", "val/cat/copy.jpg"])
    assert featx.load_features(res.path).meta["leakage"] == res.leakage


def _cli(*args, timeout=240, env_extra=None):
    env = {**os.environ, "FEATX_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, "-m", "featx", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig,code", [(signal.SIGKILL, -9), (signal.SIGTERM, 143)])
def test_killed_process_resumes_to_identical_store(folder, tmp_path, sig, code):
    """A real process killed part-way (SIGKILL or SIGTERM) leaves no final file; the re-run completes it identically.
    SIGTERM says that finished chunks were kept and how to resume (Ctrl-C: test_extract_reliability.py)."""
    for i in range(90):  # more images so the kill lands mid-run
        src = sorted((folder / "train" / "dog").iterdir())[i % 5]
        (folder / "train" / "dog" / f"extra{i:02d}.jpg").write_bytes(src.read_bytes())
    # torch, not the faster onnxruntime: 20 chunks, so the run cannot finish between two polls of the loop below
    args = [str(folder), "--chunk-size", "5", "--batch-size", "5", "--workers", "0", "--json", "--image-size", "32",
            "--runtime", "torch"]
    ref = tmp_path / "ref.npz"  # the same extraction in this process (the same kernels and batches: equal features)
    featx.extract_features(folder, ref, backbone="efficientnet_lite0", chunk_size=5, batch_size=5, workers=0,
                           image_size=32, runtime="torch")
    out = tmp_path / "out.npz"
    part = tmp_path / "out.npz.partial"
    p = _cli("extract", *args, "-o", str(out))
    deadline = time.time() + 200
    while time.time() < deadline and len(list(part.glob("chunk-*.npz"))) < 2 and p.poll() is None:
        time.sleep(0.005)  # the polling interval of the condition
    # Freeze the run before it can finish, queue the signal, then let it go on: the signal lands mid-run every time
    # (the old version skipped when a fast machine finished first).
    p.send_signal(signal.SIGSTOP)
    assert p.poll() is None, p.stderr.read()
    p.send_signal(sig)
    p.send_signal(signal.SIGCONT)
    rc = p.wait(timeout=60)
    assert rc == code, p.stderr.read()
    assert not out.exists()
    if sig != signal.SIGKILL:
        said = p.stderr.read()
        assert "finished chunks were kept; re-run the same command to resume" in said, said
    p = _cli("extract", *args, "-o", str(out))
    assert p.wait(timeout=240) == 0
    summary = json.loads(p.stdout.read())
    assert summary["resumed_images"] >= 10
    _same(featx.load_features(out), featx.load_features(ref))
    assert not list(tmp_path.glob(".featx-tmp-*")) and not part.exists()


def test_torchrun_two_ranks_write_one_store_identical_to_single_process(folder, tmp_path):
    """Issue 7: ranks shard chunks round-robin; rank 0 assembles one store equal to a single-process run."""
    single = tmp_path / "single.npz"  # in this process: compared within a tolerance below
    args = [str(folder), "--chunk-size", "3", "--batch-size", "3", "--workers", "0", "--image-size", "32"]
    featx.extract_features(folder, single, backbone="efficientnet_lite0", chunk_size=3, batch_size=3, workers=0,
                           image_size=32)
    env = {**os.environ, "FEATX_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    multi = tmp_path / "multi.npz"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                        "-m", "featx", "extract", *args, "-o", str(multi)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = featx.load_features(single), featx.load_features(multi)
    assert a.paths == b.paths
    np.testing.assert_allclose(a.features, b.features, rtol=1e-4, atol=1e-5)
    assert b.meta["world_size"] == 2
