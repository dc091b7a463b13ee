"""Issue 24 item 7 (part): one vocabulary. `--overwrite` everywhere (`--exist-ok` a hidden alias), no `{images}` or
`<bool>` in any --help, and a hint for swapped `featx finetune IMAGES BACKBONE` arguments."""
from __future__ import annotations

import re

import pytest
import typer.main
from typer.testing import CliRunner

from featx.cli.app import app

COMMANDS = sorted(typer.main.get_command(app).commands)
PLACEHOLDER = re.compile(r"\{[a-z_]+\}|<bool>")


@pytest.mark.parametrize("args", [["--help"], *[[c, "--help"] for c in COMMANDS]], ids=" ".join)
def test_no_type_placeholders_in_any_help(args):
    r = CliRunner().invoke(app, args, terminal_width=200)
    assert r.exit_code == 0, r.output
    assert not PLACEHOLDER.search(r.output), PLACEHOLDER.findall(r.output)
    assert "Usage: featx" in r.output and "--help" in r.output


def test_every_command_has_a_help():
    assert set(COMMANDS) >= {"audit", "compare", "export", "extract", "finetune", "fit", "models", "predict", "scratch"}


def _capture(monkeypatch, module: str, name: str) -> dict:
    """Replace the library function a command calls with one that records its keyword arguments, then stops."""
    import importlib

    got = {}

    class Stop(Exception):
        pass

    def record(*args, **kw):
        got.update(kw)
        raise Stop

    monkeypatch.setattr(importlib.import_module(module), name, record)
    got["_stop"] = Stop
    return got


@pytest.mark.parametrize("command,module,name,args", [
    ("finetune", "featx.training", "finetune", ["efficientnet_lite0"]),
    ("scratch", "featx.training", "train_scratch", []),
    ("compare", "featx.comparison", "compare", []),
])
@pytest.mark.parametrize("flag,expected", [([], False), (["--overwrite"], True), (["--exist-ok"], True)])
def test_overwrite_everywhere_with_exist_ok_as_a_hidden_alias(tmp_path, monkeypatch, command, module, name, args,
                                                             flag, expected):
    got = _capture(monkeypatch, module, name)
    r = CliRunner().invoke(app, [command, *args, str(tmp_path), *flag])
    assert isinstance(r.exception, got["_stop"]), r.output  # the options parsed; the library was called
    assert got["exist_ok"] is expected
    help_text = CliRunner().invoke(app, [command, "--help"], terminal_width=200).output
    assert "--overwrite" in help_text and "--exist-ok" not in help_text


def test_no_command_offers_exist_ok_by_name():
    for name, cmd in typer.main.get_command(app).commands.items():
        for p in cmd.params:
            if "--exist-ok" in p.opts:
                assert p.hidden and "--overwrite" in {o for q in cmd.params for o in q.opts}, name


def test_swapped_finetune_arguments_get_a_hint(tmp_path):
    images = tmp_path / "photos"
    (images / "ant").mkdir(parents=True)
    r = CliRunner().invoke(app, ["finetune", str(images), "efficientnet_lite0"])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"featx finetune efficientnet_lite0 {images}" in lines[0], r.stderr
    assert not (tmp_path / "runs").exists() and not __import__("pathlib").Path("runs").exists()


def test_a_folder_named_like_nothing_gets_no_swap_hint(tmp_path):
    images = tmp_path / "photos"
    images.mkdir()
    r = CliRunner().invoke(app, ["finetune", str(images), "not_a_backbone_name", "--runs-dir", str(tmp_path / "r")])
    assert r.exit_code != 0 and "featx finetune not_a_backbone_name" not in r.output
