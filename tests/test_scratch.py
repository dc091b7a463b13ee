"""`featx scratch`: digits with LeNet-5, the CLI contract, skipped images, streaming vs in-memory."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from featx.cli.app import app
from featx.training import load_model, train_scratch
from featx.training.zoo import list_archs

from .imagegen import make_bad_files, make_folder


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """scikit-learn's 1797 8x8 digits exported as PNG class folders (0-16 grey levels scaled to 0-255)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits")
    d = load_digits()
    for i, (img, y) in enumerate(zip(d.images, d.target)):
        p = root / str(y) / f"{i:04d}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray((img * 255 / 16).astype(np.uint8)).save(p)
    return root


def test_lenet5_learns_digits_to_97_percent(digits, tmp_path):
    # crop-only augmentation: a mirrored 2 or 5 is not the same digit
    res = train_scratch(digits, arch="lenet5", epochs=10, augment="light", workers=0, runs_dir=str(tmp_path))
    assert res.n_train + res.n_val == 1797 and 350 <= res.n_val <= 370  # stratified 20 % hold-out
    assert res.best["accuracy"] >= 0.97, res.rows
    assert res.rows[-1]["train_loss"] < res.rows[0]["train_loss"]
    # the saved model reproduces the validation accuracy through the public loader
    tm = load_model(res.run_dir)
    assert tm.preprocess.input_size == 32 and tm.classes == [str(i) for i in range(10)]
    assert tm.meta["best"]["accuracy"] == pytest.approx(res.best["accuracy"])


def test_scratch_help_lists_the_archs():
    r = CliRunner().invoke(app, ["scratch", "--help"])
    assert r.exit_code == 0
    for name in list_archs():
        assert name in r.output
    assert "lenet5" in list_archs()


def test_scratch_cli_json_summary_and_skipped_images(tmp_path):
    data = make_folder(tmp_path / "data", classes=("a", "b"), n_per_class=6, size=24)
    bad = make_bad_files(data / "train" / "a")
    runs = tmp_path / "runs"
    r = CliRunner().invoke(app, ["scratch", str(data), "--arch", "resnet20", "--epochs", "2", "--image-size", "16",
                                 "--workers", "0", "--runs-dir", str(runs), "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert {"run_dir", "model", "best"} <= set(summary)
    assert {"accuracy", "balanced_accuracy", "epoch"} <= set(summary["best"])
    assert Path(summary["run_dir"]) == runs / "scratch" / "exp"
    skipped = {Path(s["path"]).name for s in summary["skipped"]}
    assert skipped == set(bad)
    assert summary["n_train"] == 12 and summary["n_val"] == 12  # the bad files never replaced a good image
    report = (Path(summary["run_dir"]) / "report.md").read_text()
    assert "Skipped images (5)" in report and "empty file" in report
    assert load_model(summary["model"]).meta["arch"] == "resnet20"
    # training on the CPU runs channels_last (measured faster for every net, BENCHMARKS.md), recorded in config.json
    assert json.loads((Path(summary["run_dir"]) / "config.json").read_text())["memory_format"] == "channels_last"


def test_streaming_and_in_memory_paths_train_the_same_kind_of_run(tmp_path):
    data = make_folder(tmp_path / "data", classes=("a", "b", "c"), n_per_class=8, size=24, splits=None)
    a = train_scratch(data, arch="lenet5", epochs=2, image_size=16, workers=0, runs_dir=str(tmp_path / "r"),
                      in_memory=True)
    b = train_scratch(data, arch="lenet5", epochs=2, image_size=16, workers=0, runs_dir=str(tmp_path / "r"),
                      in_memory=False)
    assert a.n_train == b.n_train == 18 and a.n_val == b.n_val == 6  # round(0.2 * 8) = 2 per class
    assert json.loads((a.run_dir / "config.json").read_text())["in_memory"] is True
    assert json.loads((b.run_dir / "config.json").read_text())["in_memory"] is False
    assert json.loads((a.run_dir / "config.json").read_text())["memory_format"] == "channels_last"
    for res in (a, b):
        assert (res.run_dir / "best.safetensors").is_file() and res.best["epoch"] in (1, 2)


def test_bad_options_exit_2(tmp_path):
    data = make_folder(tmp_path / "data", classes=("a", "b"), n_per_class=2, size=16)
    r = CliRunner().invoke(app, ["scratch", str(data), "--arch", "lenet", "--runs-dir", str(tmp_path / "r")])
    assert r.exit_code == 2 and "did you mean lenet5" in r.output
    r = CliRunner().invoke(app, ["scratch", str(data), "--augment", "strong", "--runs-dir", str(tmp_path / "r")])
    assert r.exit_code == 2


def test_train_and_test_without_val_select_on_a_train_holdout_and_score_test_once(tmp_path):
    from featx.data.discover import discover
    from featx.data.split import plan_split
    from featx.data.split import split_records

    data = make_folder(tmp_path / "data", classes=("a", "b"), n_per_class=10, splits=("train", "test"), size=20)
    res = train_scratch(data, arch="lenet5", epochs=2, image_size=16, workers=0, runs_dir=str(tmp_path / "r"),
                        verbose=False)
    # the one split rule (what `featx fit` uses): 20 % of train/ selects the epoch; test/ is never used to select
    folder = discover(data)
    plan = plan_split(folder.relpaths(), folder.labels(), folder.splits(), val_fraction=0.2, seed=0)
    ours = split_records(folder, 0.2, 0)
    assert [r.relpath for r in ours.val] == [folder.records[i].relpath for i in plan.val]
    assert {r.split for r in ours.val} == {"train"} and len(ours.val) == 4
    assert (res.n_train, res.n_val, res.n_test) == (16, 4, 20)
    s = res.summary()
    assert s["test"]["n"] == 20 and 0.0 <= s["test"]["accuracy"] <= 1.0 and s["n_test"] == 20
    assert res.metrics["n"] == 4  # the best weights re-scored on the 4 held-out train images, not on test
    meta = json.loads((res.run_dir / "model.json").read_text())
    assert "hold-out of 'train'" in meta["split"]
    report = (res.run_dir / "report.md").read_text()
    assert "test (scored once, best weights)" in report and (res.run_dir / "confusion-test.png").is_file()


def test_featx_help_summarises_scratch_in_one_sentence():
    r = CliRunner().invoke(app, ["--help"])
    assert "the no-pretraining baseline." in r.output
    assert "Architectures" not in r.output  # the list belongs to `featx scratch --help`, not to the summary line
    assert "Architectures (--arch):" in CliRunner().invoke(app, ["scratch", "--help"]).output
