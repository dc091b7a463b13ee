"""The example scripts in examples/ run as documented (shell and Python), offline, and produce their outputs."""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env(tmp_path: Path) -> dict:
    """`featx` on PATH runs this interpreter's featx (the tree under test), whatever is installed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "featx"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m featx "$@"\n')
    shim.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", FEATX_NO_PROGRESS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


@pytest.fixture(scope="module")
def few_examples(tmp_path_factory) -> Path:
    """The bundled examples cut to 3 photos per class and split + 3 new images: the scripts' steps, in a third of
    the time (the bundled folder itself runs in the README's main-job command)."""
    root = tmp_path_factory.mktemp("examples")
    for cls_dir in sorted((ROOT / "examples" / "ants_bees").glob("*/*")):
        dst = root / "ants_bees" / cls_dir.relative_to(ROOT / "examples" / "ants_bees")
        dst.mkdir(parents=True)
        for f in sorted(cls_dir.iterdir())[:3]:
            shutil.copy(f, dst / f.name)
    (root / "new_images").mkdir()
    for f in sorted((ROOT / "examples" / "new_images").iterdir())[:3]:
        shutil.copy(f, root / "new_images" / f.name)
    return root


def _predictions(path: Path) -> list:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_quickstart_shell_script(tmp_path, few_examples):
    out = tmp_path / "sh"
    p = subprocess.run(["bash", str(ROOT / "examples" / "quickstart.sh"), str(out), str(few_examples)],
                       env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = _predictions(out / "predictions.csv")
    assert len(rows) == 3 and {r["label"] for r in rows} <= {"ants", "bees"}
    assert (out / "features.npz").exists() and (out / "head.skops").exists()


def test_quickstart_python_script(tmp_path, few_examples):
    out = tmp_path / "py"
    p = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), str(out), str(few_examples)],
                       env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = [ln for ln in p.stdout.splitlines() if ln.endswith(")") and ": " in ln]
    assert len(lines) == 3, p.stdout
    assert "12 images" in p.stdout and "val accuracy" in p.stdout
    assert len(_predictions(out / "predictions.csv")) == 3
