"""The CLI as users meet it: every command has --help and is documented; errors are one line with an exit code."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from featx.cli.app import app
from tests.imagegen import make_bad_files, make_folder

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["models", "extract", "fit", "predict", "finetune", "scratch", "compare", "export", "audit"]
runner = CliRunner()


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help_and_is_in_the_readme(cmd):
    r = _run(cmd, "--help")
    assert r.exit_code == 0, r.output
    assert "Usage" in r.output
    readme = (ROOT / "README.md").read_text()
    assert re.search(rf"featx {cmd}\b", readme), f"README does not document `featx {cmd}`"


def test_top_level_help_lists_commands():
    r = _run("--help")
    assert r.exit_code == 0
    for cmd in COMMANDS:
        assert cmd in r.output


def test_models_json_lists_embedded_backbones():
    r = _run("models", "--json")
    assert r.exit_code == 0, r.output
    rows = {b["name"]: b for b in json.loads(r.stdout)["backbones"]}
    assert rows["efficientnet_lite0"]["weights_available"] is True


def test_extract_json_summary_and_strict_exit(tmp_path):
    folder = make_folder(tmp_path / "imgs", classes=("a", "b"), n_per_class=3, splits=("train", "val"), size=32)
    make_bad_files(folder / "train" / "a")
    out = tmp_path / "f.npz"
    r = _run("extract", folder, "-o", out, "--workers", "0", "--json")
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["n_images"] == 12 and summary["n_skipped"] == 5 and summary["feature_dim"] == 1280
    assert summary["path"] == str(out) and out.exists()
    out2 = tmp_path / "g.npz"
    r = _run("extract", folder, "-o", out2, "--workers", "0", "--strict")
    assert r.exit_code != 0 and "--strict" in r.output and not out2.exists()


@pytest.mark.parametrize("args,code,needle", [
    (["extract", "/definitely/not/here"], 3, "Error:"),
    (["extract", ".", "--backbone", "efficientnet_lite9"], 2, "did you mean"),
    (["extract", ".", "--device", "tpu"], 2, "--device"),
])
def test_bad_input_is_one_line_and_nonzero(tmp_path, args, code, needle):
    folder = make_folder(tmp_path / "imgs", classes=("a",), n_per_class=1, splits=None, size=16)
    args = [str(folder) if a == "." else a for a in args]
    r = _run(*args, "-o", tmp_path / "x.npz")
    assert r.exit_code == code, r.output
    assert needle in r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "x.npz").exists()


def test_version_prints_and_exits_zero():
    import subprocess
    import sys

    from featx import __version__

    r = _run("--version")
    assert r.exit_code == 0 and r.output.strip() == f"featx {__version__}"
    p = subprocess.run([sys.executable, "-m", "featx", "--version"], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.strip() == f"featx {__version__}"


def test_traceback_flag_is_accepted_after_the_subcommand(monkeypatch):
    from featx.cli import app as app_mod

    monkeypatch.setitem(app_mod._state, "traceback", False)
    assert app_mod._lift_traceback_flag(["extract", "x", "--traceback"]) == ["extract", "x"]
    assert app_mod._state["traceback"] is True
    assert app_mod._lift_traceback_flag(["extract", "--", "--traceback"]) == ["extract", "--", "--traceback"]


def test_user_text_is_never_read_as_markup(tmp_path):
    """Error lines, warnings and table cells print file and class names exactly as they are."""
    from featx.cli.common import err, error_line, out, styled, warn

    with out.capture() as cap:
        out.print("holiday[final].jpg [/bold] ant [formicidae]")
        out.print(styled("[bold]{}[/bold] head", "svm [rbf]"))
    assert cap.get().splitlines() == ["holiday[final].jpg [/bold] ant [formicidae]", "svm [rbf] head"]
    with err.capture() as cap:
        err.print(error_line("pip install 'featx[embedded]'"))
        warn("skipped a[/b].jpg")
    assert "pip install 'featx[embedded]'" in cap.get() and "skipped a[/b].jpg" in cap.get()
    missing = tmp_path / "holiday[final]" / "[/bold]"
    r = _run("extract", missing, "-o", tmp_path / "f.npz")
    assert r.exit_code == 3 and str(missing) in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("kind", ["missing", "folder"])
def test_weights_that_are_missing_or_a_folder_are_one_line(tmp_path, kind):
    folder = make_folder(tmp_path / "imgs", classes=("a",), n_per_class=1, splits=None, size=16)
    w = tmp_path / "w.safetensors"
    if kind == "folder":
        w.mkdir()
    r = _run("extract", folder, "-o", tmp_path / "f.npz", "--weights", w)
    assert r.exit_code == 4, r.output
    assert ("no such file" if kind == "missing" else "is a folder") in r.output and "Traceback" not in r.output


def test_unwritable_output_is_one_line_with_exit_7(tmp_path, monkeypatch):
    import featx._io as io_mod

    def eacces(*a, **k):
        raise PermissionError(13, "Permission denied")

    folder = make_folder(tmp_path / "imgs", classes=("a",), n_per_class=1, splits=None, size=16)
    monkeypatch.setattr(io_mod.tempfile, "mkstemp", eacces)
    r = _run("extract", folder, "-o", tmp_path / "out" / "f.npz", "--workers", "0")
    assert r.exit_code == 7, r.output
    assert "Permission denied" in r.output and "Traceback" not in r.output


def test_extract_leakage_warning_points_at_audit(tmp_path):
    import shutil

    folder = make_folder(tmp_path / "imgs", classes=("a", "b"), n_per_class=2, splits=("train", "val"), size=24)
    src = next((folder / "train" / "a").iterdir())
    shutil.copy(src, folder / "val" / "a" / "copy.png")
    r = _run("extract", folder, "-o", tmp_path / "f.npz", "--workers", "0", "--image-size", "32")
    assert r.exit_code == 0, r.output
    assert "leakage" in r.output and "featx audit" in r.output
