"""Issue 24.9, small things: duplicates.png counts what it draws, `--copy` is an option, `featx models TEXT` answers the
search, piped tables are not cut at 80 columns, an empty --exclude list says so, "1 epoch", leakage names its splits."""
from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from featx.cli.app import app
from featx.features.store import FeatureSet, save_features

from .imagegen import make_folder

runner = CliRunner()
META = {"backbone": "efficientnet_lite0", "weights_sha256": "cd" * 32, "preprocess": {"input_size": 8},
        "layer": "pooled", "feature_dim": 64}


def test_duplicates_png_title_counts_the_groups_it_draws(monkeypatch, tmp_path):
    from featx.audit import report

    titles = []
    monkeypatch.setattr(report, "_gallery", lambda rows, title, path, empty: titles.append((len(rows), title)))
    member = {"path": "a/x.jpg", "role": "train", "split": "train", "label": "a", "exact": True, "similarity": 1.0}
    groups = [{"group": i, "leakage": False, "members": [member, member]} for i in range(report.GALLERY_ROWS + 1)]
    report._duplicates_png(groups, tmp_path / "d.png", None)
    report._duplicates_png(groups[:3], tmp_path / "d.png", None)
    assert titles[0] == (12, "near-duplicate groups: 12 of 13 (across splits = leakage, in red)")
    assert titles[1] == (3, "near-duplicate groups: 3 (across splits = leakage, in red)")


def test_copy_is_the_sort_mode_it_reads_as(tmp_path):
    r = runner.invoke(app, ["predict", str(tmp_path), "--copy"])
    assert r.exit_code == 2 and "--sort-into" in r.output and "top-k" not in r.output
    r = runner.invoke(app, ["predict", str(tmp_path), "--copy", "--move", "--sort-into", str(tmp_path / "s")])
    assert r.exit_code == 2 and "exclude each other" in r.output


def test_models_search_does_not_reprint_the_default_table():
    r = runner.invoke(app, ["models", "convnext"])
    assert r.exit_code == 0, r.output
    assert "efficientnet_lite0" not in r.stdout and "names contain 'convnext'" in r.stdout
    r = runner.invoke(app, ["models"])
    assert "efficientnet_lite0" in r.stdout


def _store(tmp_path, long_class: str):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X, y = X[:300], y[:300]
    labels = np.array([long_class if v < 5 else "short" for v in y])
    fs = FeatureSet(X, [f"img/{i}.png" for i in range(len(X))], labels=labels, classes=sorted(set(labels)),
                    meta=dict(META))
    save_features(fs, tmp_path / "f.npz")
    return tmp_path / "f.npz"


def test_piped_tables_are_not_cut_at_80_columns(tmp_path):
    name = "a_class_name_that_is_long_enough_to_push_any_table_well_past_eighty_columns_wide"
    r = runner.invoke(app, ["fit", str(_store(tmp_path, name)), "--C", "1", "--cv", "0",
                            "-o", str(tmp_path / "h.skops")])
    assert r.exit_code == 0, r.output
    # whole in the per-class table (the confusion matrix's headers abbreviate names on purpose)
    assert any(name in line and "│" in line for line in r.stdout.splitlines())


def test_an_empty_exclude_list_says_nothing_was_left_out(tmp_path):
    store = _store(tmp_path, "long")
    empty = tmp_path / "none.txt"
    empty.write_text("# nothing to leave out\n")
    r = runner.invoke(app, ["fit", str(store), "--C", "1", "--cv", "0", "-o", str(tmp_path / "h.skops"),
                            "--exclude", str(empty)])
    assert r.exit_code == 0, r.output
    assert "left out 0" not in r.stdout and "()" not in r.stdout and "nothing left out" in r.stdout


def test_one_epoch_phase_and_patience_lines_are_singular():
    from types import SimpleNamespace

    from featx.training.callbacks import EarlyStopping, EpochLog

    lines = []
    phase = SimpleNamespace(name="train", epochs=1)
    trainer = SimpleNamespace(phases=[phase], phase_index=0, trainable=10, precision=SimpleNamespace(name="fp32"))
    EpochLog(lines.append, None).on_phase_start(trainer, phase)
    assert "phase train: epoch 1," in lines[0]
    stopped = []
    trainer = SimpleNamespace(val_batches=object(), phase=SimpleNamespace(early_stop=True),
                              state={"since_best": 1, "done": False}, stop=lambda why, msg: stopped.append(msg))
    EarlyStopping(1).on_epoch_end(trainer, {})
    assert stopped == ["early stopping: no better validation accuracy for 1 epoch"]


def test_leakage_warning_names_the_splits_it_spans(tmp_path):
    import shutil

    data = make_folder(tmp_path / "data", classes=("a", "b"), n_per_class=3, splits=("train", "test"), size=24)
    shutil.copy(data / "train" / "a" / "a_000.jpg", data / "test" / "a" / "copy.jpg")
    r = runner.invoke(app, ["extract", str(data), "-o", str(tmp_path / "f.npz"), "--image-size", "32",
                            "--workers", "0", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "train/test leakage: identical files" in text and "train/val" not in text
