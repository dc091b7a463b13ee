"""Issue 24 items 6 and 7 (rest): `featx predict photo.jpg` (files, a list file), `featx export` from an installed
featx (no source tree), `--image-size auto` on every command that has `--image-size`, audit's `--neighbours`."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from featx.cli.app import app
from tests.imagegen import make_folder
from tests.test_r24_vocabulary import _capture  # records the library call a command makes, then stops

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A logistic head on a random-init timm test network at 32 px, and the images it was fitted on."""
    import featx
    from featx.heads import fit_head

    root = tmp_path_factory.mktemp("head")
    folder = make_folder(root / "imgs", classes=("a", "b"), n_per_class=4, splits=None, size=32)
    ex = featx.extract_features(folder, root / "f.npz", backbone="timm/test_resnet", pretrained=False,
                                image_size=32, workers=0)
    res = fit_head(featx.load_features(ex.path), head="logistic", cv=0, C=1.0, output=root / "head.skops")
    return {"path": res.path, "images": folder, "root": root}


def _predict(*args):
    return CliRunner().invoke(app, ["predict", *map(str, args), "--workers", "0"], terminal_width=200)


# ------------------------------------------------------------------------------------------ item 6: predict photo.jpg
def test_predict_one_file_prints_its_prediction_and_writes_no_table(head, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    img = head["images"] / "a" / sorted(os.listdir(head["images"] / "a"))[0]
    r = _predict(img, "-m", head["path"])
    assert r.exit_code == 0, r.output
    assert img.name in r.output and "Predictions" in r.output and "1 images classified" in r.output
    assert not (tmp_path / "featx-out").exists()  # printed, as yolo / timm do; a table only with -o


def test_predict_several_files_and_a_list_file(head, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, b = sorted((head["images"] / "a").iterdir())[:2]
    c = sorted((head["images"] / "b").iterdir())[0]
    r = _predict(a, c, "-m", head["path"], "--json")
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["rows"]
    assert [row["path"] for row in rows] == [f"a/{a.name}", f"b/{c.name}"]  # input order, relative to the common folder
    assert all(row["label"] in ("a", "b") and row["error"] is None for row in rows)
    # a list file: paths relative to the list's folder, comments and blank lines ignored; @name or a .txt file
    listed = head["images"] / "pick.txt"
    listed.write_text(f"# two images\n\na/{a.name}\n{b}\n")
    try:
        for arg in (f"@{listed}", listed):
            r = _predict(arg, "-m", head["path"], "-o", tmp_path / "p.csv")
            assert r.exit_code == 0, r.output
            assert a.name in r.output and b.name in r.output
            lines = (tmp_path / "p.csv").read_text().splitlines()
            assert len(lines) == 3 and lines[1].startswith(a.name)
    finally:
        listed.unlink()


def test_predict_a_missing_named_file_fails_before_any_work(head, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = _predict(tmp_path / "nope.jpg", "-m", head["path"])
    assert r.exit_code == 3 and "nope.jpg" in r.output  # neither a file nor a folder: as a missing folder
    a = sorted((head["images"] / "a").iterdir())[0]
    r = _predict(a, tmp_path / "gone.jpg", "-m", head["path"])
    assert r.exit_code == 3 and "no such image file" in r.output and "gone.jpg" in r.output


# --------------------------------------------------------------------------- item 6: export from an installed featx
def test_check_images_ship_as_package_data():
    import tomllib

    from featx.export.onnx_export import bundled_examples

    pkg = Path(__import__("featx").__file__).resolve().parent
    folder = bundled_examples()
    assert folder.is_dir() and pkg in folder.parents  # inside the package, not the source tree's examples/
    photos = sorted(folder.glob("*.jpg"))
    assert len(photos) >= 9
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    rel = folder.relative_to(pkg / "export").as_posix()
    assert any(Path(rel, p.name).match(pat) for pat in data["featx.export"] for p in photos)


def test_export_works_without_the_source_tree(head, tmp_path):
    """A copy of the featx package alone (what `pip install .` puts in site-packages), run from another folder."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    site = tmp_path / "site"
    shutil.copytree(ROOT / "featx", site / "featx", ignore=shutil.ignore_patterns("__pycache__"))
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "FEATX_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "featx", "export", str(head["path"]), "-o", "model.onnx", "--json"],
                       cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["parity"]["passed"] and res["parity"]["images"] >= 9
    assert res["parity"]["folder"].startswith(str(site / "featx"))
    assert (work / "model.onnx").is_file()


# ------------------------------------------------------------------------------- item 7: --image-size auto everywhere
@pytest.mark.parametrize("command,module,name,args", [
    ("finetune", "featx.training", "finetune", ["efficientnet_lite0"]),
    ("scratch", "featx.training", "train_scratch", []),
    ("compare", "featx.comparison", "compare", []),
    ("predict", "featx.predict", "predict_folder", []),
])
def test_image_size_auto_is_accepted_wherever_image_size_exists(tmp_path, monkeypatch, command, module, name, args):
    got = _capture(monkeypatch, module, name)
    r = CliRunner().invoke(app, [command, *args, str(tmp_path), "--image-size", "auto"])
    assert isinstance(r.exception, got["_stop"]), r.output
    assert got["image_size"] in ("auto", None)  # predict: auto = the model's own (None)
    r = CliRunner().invoke(app, [command, *args, str(tmp_path), "--image-size", "big"])
    assert r.exit_code == 2 and "auto" in r.output
    assert "auto" in CliRunner().invoke(app, [command, "--help"], terminal_width=200).output


def test_image_size_auto_resolves_from_the_images():
    from featx.data.preprocess import Preprocess
    from featx.training.config import FinetuneConfig, ScratchConfig
    from featx.features.sizing import resolve_size

    pp = Preprocess(input_size=256, resize=292, interpolation="bicubic")
    small = [ROOT / "examples" / "new_images" / n for n in ("1073564163_225a64f170.jpg",)]
    if not small[0].is_file():
        pytest.skip("examples/ is not here")
    assert resolve_size("auto", small, pp) == 256  # 192 px photos: 2x upsampling reaches 292, the backbone's own
    assert resolve_size(None, small, pp) == 256 and resolve_size(128, small, pp) == 128
    for cfg in (FinetuneConfig(image_size="auto"), ScratchConfig(image_size="auto")):
        cfg.check()  # accepted, kept as "auto" until the images are known


def test_finetune_and_scratch_pick_a_smaller_crop_for_small_images(tmp_path):
    from featx.data.preprocess import Preprocess
    from featx.features.sizing import resolve_size

    folder = make_folder(tmp_path / "tiny", n_per_class=2, splits=None, size=40)
    paths = sorted(folder.rglob("*.jpg"))
    lite0 = Preprocess(input_size=256, resize=292, interpolation="bicubic")
    assert resolve_size("auto", paths, lite0) == 64  # 40 px photos: the smallest crop auto allows, not 256
    lenet = Preprocess(input_size=32, resize=32, interpolation="bicubic")
    assert resolve_size("auto", paths, lenet) == 32  # never above the architecture's own


def test_scratch_runs_with_image_size_auto(tmp_path):
    from featx.training import train_scratch

    folder = make_folder(tmp_path / "imgs", n_per_class=3, size=24)
    res = train_scratch(folder, arch="lenet5", image_size="auto", epochs=1, runs_dir=str(tmp_path / "runs"),
                        device="cpu", workers=0, verbose=False)
    info = json.loads((Path(res.run_dir) / "model.json").read_text())
    assert info["image_size"] == 32


# ------------------------------------------------------------------------------------- item 7: audit --neighbours
def test_audit_neighbours_option_with_k_as_a_hidden_alias(tmp_path, monkeypatch):
    got = _capture(monkeypatch, "featx.audit", "audit")
    for flag, want in ((["--neighbours", "7"], 7), (["--k", "4"], 4), ([], 10)):
        r = CliRunner().invoke(app, ["audit", str(tmp_path / "f.npz"), *flag])
        assert isinstance(r.exception, got["_stop"]), r.output
        assert got["k"] == want
    help_text = CliRunner().invoke(app, ["audit", "--help"], terminal_width=200).output
    assert "--neighbours" in help_text and "--k " not in help_text


def test_compare_resolves_auto_once_for_extraction_and_finetuning(tmp_path):
    from featx.comparison.core import _backbone
    from featx.comparison.types import CompareSettings
    from featx.data.discover import discover
    from featx.data.split import split_records

    folder = make_folder(tmp_path / "imgs", n_per_class=3, size=40)
    s = CompareSettings(backbone="timm/test_resnet", pretrained=False, image_size="auto")
    bb = _backbone(s, split_records(discover(folder), 0.2, 0))
    assert s.image_size == bb.preprocess.input_size == 64  # a number now: every method runs at the same size
