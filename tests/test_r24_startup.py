"""Issue 24 item 11: `featx --version`, `featx --help` and every `featx CMD --help` answer without importing torch
(nor timm, torchvision, scikit-learn, numpy, Pillow, matplotlib); the lazy public API still works."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision", "timm", "sklearn", "scipy", "numpy", "PIL", "matplotlib", "skops", "safetensors",
         "onnxruntime", "cleanlab")

# one process for every invocation: each help must leave the heavy libraries unimported
_SCRIPT = """
import contextlib, io, json, sys
import typer.main
from featx.cli.app import app, main
calls = [["--version"], ["--help"]] + [[c, "--help"] for c in sorted(typer.main.get_command(app).commands)]
seen = {}
for argv in calls:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            main(argv)
        except SystemExit as exc:
            code = exc.code
        else:
            code = 0
    seen[" ".join(argv)] = {"code": code, "out": buf.getvalue()[:200],
                            "heavy": sorted(m for m in HEAVY if m in sys.modules)}
print(json.dumps(seen))
"""


def test_version_and_every_help_import_no_heavy_library():
    code = f"HEAVY = {HEAVY!r}\n" + _SCRIPT
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "100"})
    assert r.returncode == 0, r.stderr
    seen = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(seen) >= 11
    assert seen["--version"]["out"].startswith("featx ")
    for argv, got in seen.items():
        assert got["code"] in (0, None), (argv, got)
        assert got["heavy"] == [], f"`featx {argv}` imported {got['heavy']}"


def test_the_public_api_is_lazy_and_complete():
    code = ("import sys, featx; assert 'torch' not in sys.modules; "
            "f = featx.extract_features; from featx import fit_head, compare; "
            "import featx.features.engine as e; assert f is e.extract_features; "
            "assert set(featx.__all__) <= set(dir(featx)); print(callable(f) and callable(fit_head))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "True"
