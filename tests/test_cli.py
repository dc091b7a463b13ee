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
COMMANDS = ["models", "extract", "fit", "predict", "finetune", "scratch", "compare"]
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
