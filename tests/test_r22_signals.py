"""Issue 22 item 5: SIGTERM stops every command the same way: one line, exit 143, no lock, temp file or empty
folder left behind. Real processes and real signals; each is held inside its run (between taking its lock and
writing its output) by a FIFO it reads, so the signal lands in a known state without any fixed sleep."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from featx.features.store import FeatureSet
from tests.imagegen import make_folder

ROOT = Path(__file__).resolve().parents[1]
META = {"backbone": "efficientnet_lite0", "weights_sha256": "cd" * 32, "preprocess": {"input_size": 8},
        "layer": "pooled", "feature_dim": 16}

# The child patches one step of the command so that it reads a FIFO first (blocking until the test holds the other
# end), then runs featx's real CLI entry point with the real signal handling.
CHILD = """
import sys, importlib
module, attr, fifo = sys.argv[1:4]
mod = importlib.import_module(module)
real = getattr(mod, attr)
def held(*a, **k):
    import select
    with open(fifo, "rb") as fh:  # held until the test closes its end; back in Python every 20 ms, as featx's own
        while not select.select([fh], [], [], 0.02)[0]:  # code is: a signal the kernel gave to another thread
            pass  # (onnxruntime's, torch's) runs its handler here, as it would between featx's batches
        fh.read()
    return real(*a, **k)
setattr(mod, attr, held)
from featx.cli.app import main
main(sys.argv[4:])
"""


def store(path: Path) -> Path:
    rng = np.random.default_rng(0)
    y = np.repeat(np.array(["a", "b"]), 20)
    X = np.abs(rng.normal(0, 1, (40, 16))).astype(np.float32) + (y == "b")[:, None] * 3.0
    FeatureSet(X, [f"{c}/{i}.png" for i, c in enumerate(y)], labels=y, splits=np.array(["train", "val"] * 20),
               classes=["a", "b"], meta=META).save(path)
    return path


def leftovers(root: Path) -> list:
    """Lock files, temp files and empty folders anywhere under ``root``."""
    bad = [p for p in root.rglob("*") if ".featx-lock" in p.name or ".featx-tmp-" in p.name]
    bad += [p for p in root.rglob("*") if p.is_dir() and not p.is_symlink() and not any(p.iterdir())]
    return sorted(map(str, bad))


def run_until_held(tmp_path: Path, step: str, args: list):
    """Start featx with ``step`` (module:attr) held on a FIFO; return (process, FIFO write end) once it is held."""
    fifo = tmp_path / "hold.fifo"
    os.mkfifo(fifo)
    module, attr = step.split(":")
    env = {**os.environ, "FEATX_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-c", CHILD, module, attr, str(fifo), *map(str, args)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while True:
        try:  # succeeds only once the child has the FIFO open for reading: it is inside the held step
            return p, os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            pass
        if p.poll() is not None:
            _, err = p.communicate()
            pytest.fail(f"featx exited ({p.returncode}) before reaching {step}: {err[-3000:]}")
        if time.monotonic() > deadline:
            p.kill()
            pytest.fail(f"featx did not reach {step}")
        time.sleep(0.02)  # polling interval of the condition, not a wait for the child to get anywhere


def terminate(p, hold_fd: int) -> tuple:
    """SIGTERM while held -> (exit code, stderr, its non-empty lines); the FIFO's write end is closed afterwards."""
    p.send_signal(signal.SIGTERM)
    try:
        out, err = p.communicate(timeout=120)
    finally:
        os.close(hold_fd)
    return p.returncode, err, [line for line in err.splitlines() if line.strip()]


def assert_stopped_cleanly(rc: int, err: str, lines: list, tmp_path: Path):
    assert rc == 143, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert lines and lines[-1].startswith("Error: stopped by SIGTERM"), err
    assert [line for line in lines if line.startswith("Error:")] == [lines[-1]]
    (tmp_path / "hold.fifo").unlink()
    assert leftovers(tmp_path) == [], leftovers(tmp_path)


def test_sigterm_during_fit(tmp_path):
    features = store(tmp_path / "f.npz")
    out = tmp_path / "new" / "heads" / "h.skops"
    p, fd = run_until_held(tmp_path, "featx.heads.fit:_fit_one",
                           ["fit", features, "-o", out, "--C", "1", "--cv", "0"])
    assert (out.parent / ".h.skops.featx-lock").exists()  # held inside the run, lock taken
    rc, err, lines = terminate(p, fd)
    assert_stopped_cleanly(rc, err, lines, tmp_path)
    assert not (tmp_path / "new").exists()


def test_sigterm_during_audit(tmp_path):
    features = store(tmp_path / "f.npz")
    rep = tmp_path / "f-audit"
    p, fd = run_until_held(tmp_path, "featx.audit:run_checks", ["audit", features, "--checks", "duplicates,outliers"])
    assert (rep / ".report.md.featx-lock").exists()
    rc, err, lines = terminate(p, fd)
    assert_stopped_cleanly(rc, err, lines, tmp_path)
    assert not rep.exists()  # no empty report folder


def test_sigterm_during_export(tmp_path):
    features = store(tmp_path / "f.npz")
    out = tmp_path / "exported" / "f.parquet"
    p, fd = run_until_held(tmp_path, "featx.features.parquet:write_features", ["export", features, "-o", out])
    rc, err, lines = terminate(p, fd)
    assert_stopped_cleanly(rc, err, lines, tmp_path)
    assert not out.parent.exists()


def test_sigterm_during_compares_head_phase(tmp_path):
    images = make_folder(tmp_path / "img", classes=("a", "b"), n_per_class=4, splits=("train", "val"), size=32)
    runs = tmp_path / "runs"
    p, fd = run_until_held(tmp_path, "featx.heads.fit:_fit_one",
                           ["compare", images, "--skip-finetune", "--skip-scratch", "--image-size", "32",
                            "--workers", "0", "--runs-dir", runs])
    rc, err, lines = terminate(p, fd)
    assert_stopped_cleanly(rc, err, lines, tmp_path)
