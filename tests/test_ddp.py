"""torchrun with 2 CPU processes (gloo): one run folder, written once, from data sharded across the ranks."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .imagegen import make_folder

ROOT = Path(__file__).resolve().parents[1]


def test_two_gloo_processes_train_one_run(tmp_path):
    pytest.importorskip("torch.distributed")
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch was built without gloo")
    data = make_folder(tmp_path / "data", classes=("a", "b"), n_per_class=8, size=24)
    runs = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "FEATX_NO_PROGRESS": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "featx", "scratch", str(data), "--epochs", "2", "--image-size", "16", "--batch-size", "4",
           "--workers", "0", "--device", "cpu", "--runs-dir", str(runs), "--name", "ddp", "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    # rank 0 alone prints: exactly one JSON document on stdout
    summary = json.loads(p.stdout)
    run = Path(summary["run_dir"])
    assert run == runs / "scratch" / "ddp"
    assert [d.name for d in (runs / "scratch").iterdir()] == ["ddp"]
    assert {"config.json", "metrics.csv", "best.safetensors", "last.safetensors", "model.json", "report.md",
            "learning_curve.png", "confusion.png"} <= {f.name for f in run.iterdir()}
    assert not [f for f in run.iterdir() if f.name.startswith(".featx-tmp-")]
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    # 16 training images, 4 per batch, 2 ranks: 2 steps per rank per epoch; validation gathered from both ranks
    assert summary["n_train"] == 16 and summary["n_val"] == 16
    tm_classes = json.loads((run / "model.json").read_text())["classes"]
    assert tm_classes == ["a", "b"]
    assert summary["best"]["accuracy"] is not None and 0.0 <= summary["best"]["accuracy"] <= 1.0
    assert p.stderr.count("phase train") == 1  # log lines from rank 0 only
