"""Issues 11/12 for extract: one run per output, no debris, no orphaned workers, folder skips, memory-capped batches."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import featx
from featx.errors import DataError, OutputError, StrictModeError, UsageError
from tests.imagegen import make_folder

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bb():
    return featx.create_backbone("efficientnet_lite0", image_size=32)


@pytest.fixture()
def folder(tmp_path):
    return make_folder(tmp_path / "imgs", classes=("cat", "dog"), n_per_class=4, splits=None, size=36)


# -- issue 11.1: one run per output ------------------------------------------------------------------------------
def test_second_run_on_the_same_output_refuses_at_once_naming_the_first(bb, folder, tmp_path):
    other = make_folder(tmp_path / "other", classes=("x", "y"), n_per_class=3, splits=None, size=36, seed=5)
    out = tmp_path / "f.npz"
    seen = {}

    def second_run(done, total):
        if "err" not in seen:  # the first run holds the output: a second one must not touch it
            t = time.perf_counter()
            with pytest.raises(OutputError) as e:
                featx.extract_features(other, out, backbone=bb, workers=0, chunk_size=2)
            seen["err"], seen["s"] = str(e.value), time.perf_counter() - t

    res = featx.extract_features(folder, out, backbone=bb, workers=0, chunk_size=2, batch_size=2, progress=second_run)
    assert f"pid {os.getpid()}" in seen["err"] and "another featx run" in seen["err"]
    assert seen["s"] < 5  # at once, not after a model load or a wait
    fs = featx.load_features(out)
    assert fs.paths == sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.jpg"))  # the first run's rows
    assert res.n_images == 8 and not list(tmp_path.glob(".f.npz.featx-lock"))


def test_partial_folder_without_job_file_is_ours_and_restarted(bb, folder, tmp_path):
    # What a run killed between two writes (or an old concurrent run) leaves: chunks but no job.json.
    part = tmp_path / "f.npz.partial"
    part.mkdir()
    np.savez(part / "chunk-000000.npz", index=np.zeros(0, np.int64))
    res = featx.extract_features(folder, tmp_path / "f.npz", backbone=bb, workers=0)
    assert res.n_images == 8 and res.resumed_images == 0 and not part.exists()
    part.mkdir()
    (part / "my-notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="my-notes.txt"):
        featx.extract_features(folder, tmp_path / "f.npz", backbone=bb, workers=0)
    assert (part / "my-notes.txt").read_text() == "mine"


# -- issue 12.8: a run that did no work leaves nothing --------------------------------------------------------------
def test_failed_runs_leave_no_debris(bb, tmp_path):
    g = tmp_path / "garbage"
    g.mkdir()
    rng = np.random.default_rng(0)
    for i in range(70):
        (g / f"{i:03d}.jpg").write_bytes(rng.bytes(64))
    out = tmp_path / "new" / "g.npz"
    with pytest.raises(DataError, match="all failed to decode"):
        featx.extract_features(g, out, backbone=bb, workers=0, batch_size=16, chunk_size=8)
    assert not (tmp_path / "new").exists()  # no g.npz.partial/job.json, no lock file, no folder made for them


def test_interrupt_before_any_chunk_leaves_nothing_after_one_keeps_it(bb, folder, tmp_path):
    def stop_at(n):
        def progress(done, total):
            if done >= n:
                raise KeyboardInterrupt
        return progress

    with pytest.raises(KeyboardInterrupt):
        featx.extract_features(folder, tmp_path / "a.npz", backbone=bb, workers=0, chunk_size=8, batch_size=2,
                               progress=stop_at(2))
    assert not (tmp_path / "a.npz.partial").exists()
    with pytest.raises(KeyboardInterrupt):
        featx.extract_features(folder, tmp_path / "b.npz", backbone=bb, workers=0, chunk_size=2, batch_size=2,
                               progress=stop_at(4))
    assert len(list((tmp_path / "b.npz.partial").glob("chunk-*.npz"))) == 1  # the chunk finished before the stop


# -- issue 11.9 / 11.10: what discovery could not or would not use ------------------------------------------------
def _unreadable(monkeypatch, name):
    from featx.data import discover as disc

    real = disc._list_dir

    def list_dir(path, exts):
        if os.path.basename(path) == name:
            raise PermissionError(13, "Permission denied")
        return real(path, exts)

    monkeypatch.setattr(disc, "_list_dir", list_dir)


def test_unreadable_folder_is_a_skip_in_summary_store_and_strict(bb, folder, tmp_path, monkeypatch):
    (folder / "dog" / "sub").mkdir()
    (folder / "dog" / "sub" / "x.jpg").write_bytes((folder / "dog" / "dog_000.jpg").read_bytes())
    _unreadable(monkeypatch, "sub")
    res = featx.extract_features(folder, tmp_path / "f.npz", backbone=bb, workers=0)
    skip = {"path": "dog/sub", "reason": "cannot read folder: Permission denied", "stage": "discover"}
    assert skip in res.skipped and res.n_skipped == 1
    assert skip in featx.load_features(res.path).meta["skipped"]
    assert not any("cannot read" in w for w in res.warnings)  # listed once, as a skip
    import featx.backbones as backbones

    monkeypatch.setattr(backbones, "create_backbone", lambda *a, **k: pytest.fail("model loaded before --strict"))
    with pytest.raises(StrictModeError, match="dog/sub: cannot read folder"):
        featx.extract_features(folder, tmp_path / "s.npz", backbone="efficientnet_lite0", workers=0, strict=True)
    assert not (tmp_path / "s.npz").exists() and not (tmp_path / "s.npz.partial").exists()


def test_link_to_another_class_folder_never_gives_an_image_two_labels(bb, tmp_path):
    data = make_folder(tmp_path / "d", classes=("ants", "bees"), n_per_class=3, splits=None, size=36)
    os.symlink("../ants", data / "bees" / "link")
    res = featx.extract_features(data, tmp_path / "f.npz", backbone=bb, workers=0)
    fs = featx.load_features(res.path)
    assert sorted(fs.paths) == sorted(f"{c}/{c}_{i:03d}.jpg" for c in ("ants", "bees") for i in range(3))
    assert {s["path"] for s in res.skipped} == {f"bees/link/ants_{i:03d}.jpg" for i in range(3)}
    assert any("more than one class label" in w for w in res.warnings)


# -- issue 11: --batch-size 100000 -----------------------------------------------------------------------------
def test_huge_batch_is_capped_to_the_memory_with_a_warning(bb, folder, tmp_path, monkeypatch):
    from featx.features import engine

    sizes = []
    real = bb.forward_features
    monkeypatch.setattr(bb, "forward_features", lambda x: (sizes.append(len(x)), real(x))[1])
    monkeypatch.setattr(engine, "CHECK_ABOVE", 1)
    per_image = 3 * 32 * 32 * 5 + 4 * engine._largest_activation(bb.model, 32)  # workers=0
    monkeypatch.setattr(engine, "available_memory", lambda: 2 * 3 * per_image + 100)  # half of it: 3 images
    res = featx.extract_features(folder, tmp_path / "f.npz", backbone=bb, workers=0, batch_size=100000,
                                 runtime="torch")  # the patched torch forward sees the batches
    assert max(sizes) == 3 and res.n_images == 8
    assert any("--batch-size 100000" in w and "batches of 3" in w for w in res.warnings)


# -- issue 11.4: kill -9 of the main process -------------------------------------------------------------------
def _children(pid: int) -> list:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(entry))
    return kids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkill_of_the_main_process_leaves_no_worker_alive(tmp_path):
    data = make_folder(tmp_path / "d", classes=("a", "b"), n_per_class=150, splits=None, size=48)
    env = {**os.environ, "FEATX_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    # batches of 32 images of 32 px (~100 KB) cannot fit a 64 KB pipe: a worker whose reader died blocks for good
    p = subprocess.Popen([sys.executable, "-m", "featx", "extract", str(data), "-o", str(tmp_path / "f.npz"),
                          "--workers", "2", "--image-size", "32", "--batch-size", "32", "--no-pretrained",
                          "--runtime", "torch"],  # worker processes: the CPU runtime decodes in threads instead
                         env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    workers: list = []
    while time.time() < deadline and p.poll() is None and len(workers) < 2:
        workers = _children(p.pid)
        time.sleep(0.05)
    # Hold the run in the state under test: a stopped main process reads nothing more, so its workers stay alive
    # (blocked on a full pipe) however fast the extraction would otherwise finish. SIGKILL works on a stopped process.
    p.send_signal(signal.SIGSTOP)
    if p.poll() is not None:
        pytest.fail(f"the run ended before its workers were seen: {p.stderr.read()[-500:]}")
    workers = _children(p.pid)
    assert len(workers) >= 2 and all(_alive(w) for w in workers), workers
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    deadline = time.time() + 8
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.1)
    left = [w for w in workers if _alive(w)]
    for w in left:  # do not leave them behind for the rest of the suite
        os.kill(w, signal.SIGKILL)
    assert workers and not left


# -- issue 12.10: Ctrl-C explains what was kept, as SIGTERM does ----------------------------------------------------
def test_ctrl_c_says_finished_chunks_were_kept_and_how_to_resume(folder, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from featx.cli.app import app
    from featx.features import engine

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "_run_chunks", ctrl_c)
    r = CliRunner().invoke(app, ["extract", str(folder), "-o", str(tmp_path / "f.npz"), "--image-size", "32",
                                 "--workers", "0", "--no-pretrained"])
    assert r.exit_code == 130, r.output
    assert "stopped by Ctrl-C; finished chunks were kept; re-run the same command to resume" in r.output
    assert not list(tmp_path.glob("f.npz*")) and not list(tmp_path.glob(".f.npz*"))  # nothing was finished
