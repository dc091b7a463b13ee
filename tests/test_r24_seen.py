"""Issue 24.2: `featx predict` on labelled images a head was fitted on scores them apart ("seen in training", matched by
file content so a copied folder is caught) and the headline covers only the images the head never saw."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

import featx
from featx.cli.app import app

from .imagegen import make_folder

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """(folder with train/ and val/, head fitted on train/ only): 6 + 4 images per class."""
    base = tmp_path_factory.mktemp("seen")
    data = make_folder(base / "data", classes=("ant", "bee"), n_per_class=6, splits=("train",), size=32)
    make_folder(base / "data", classes=("ant", "bee"), n_per_class=4, splits=("val",), size=32, seed=7)
    bb = featx.create_backbone("efficientnet_lite0", image_size=32)
    featx.extract_features(data / "train", base / "features.npz", backbone=bb, workers=0)
    featx.fit_head(base / "features.npz", output=base / "head.skops", C=1.0, cv=0)
    return data, base / "head.skops"


def test_the_head_records_its_training_images_compactly(fitted):
    data, head = fitted
    rec = featx.load_head(head).meta["seen"]
    # 10 of train/'s 12 images: fit held 2 out for validation (a 20 % hold-out), and those did not train it
    assert rec["hash"] == "sha256[:8]" and rec["n_trained"] == 10 and "trained_paths" not in rec
    assert len(rec["trained"]) <= 10 * 8 * 4 / 3 + 4  # base64 of 8 bytes an image
    assert "selected" not in rec  # validation rows neither chose nor calibrated this head


def test_a_copied_folder_is_caught_by_content_and_scored_apart(fitted, tmp_path):
    data, head = fitted
    copy = shutil.copytree(data, tmp_path / "copy")
    for p in sorted((copy / "train").rglob("*.jpg")):  # renamed files are the same images: matched by content
        p.rename(p.with_name("renamed_" + p.name))
    res = featx.predict_folder(copy, model=head, output=tmp_path / "p.csv", workers=0)
    train = {str(p.relative_to(copy)) for p in (copy / "train").rglob("*.jpg")}
    assert len(res.seen_paths) == 10 and set(res.seen_paths) <= train
    assert all(p.split("/")[-1].startswith("renamed_") for p in res.seen_paths)
    assert res.metrics["n"] == 10 and res.seen_metrics["n"] == 10  # the headline: val/ + train/'s 2 held-out images
    assert res.split_metrics["train"]["n"] == 2 and res.split_metrics["val"]["n"] == 8
    assert any("10 of the 20 labelled images were used to train or choose this model" in w for w in res.warnings)
    rep = json.loads((tmp_path / "p.report" / "metrics.json").read_text())
    assert rep["n"] == 10 and rep["seen_in_training"]["n"] == 10
    assert not {m["path"] for m in rep["misclassified"]} & set(res.seen_paths)  # the gallery shows unseen images only


def test_predict_cli_prints_unseen_and_seen_rows_and_warns(fitted, tmp_path):
    data, head = fitted
    r = runner.invoke(app, ["predict", str(data), "--model", str(head), "-o", str(tmp_path / "p.csv"),
                            "--workers", "0"])
    assert r.exit_code == 0, r.output
    assert "seen in training" in r.stdout and "unseen" in r.stdout and "majority rate" in r.stdout  # 24.1 too
    assert "scored apart as 'seen in training'" in " ".join(r.output.split())


def test_unseen_images_give_no_warning(fitted, tmp_path):
    data, head = fitted
    res = featx.predict_folder(data / "val", model=head, output=tmp_path / "p.csv", workers=0)
    assert res.seen_paths == [] and res.metrics["n"] == 8 and not any("seen" in w for w in res.warnings)


def test_a_head_without_the_record_says_so(fitted, tmp_path):
    data, head = fitted
    old = featx.load_head(head)
    old.meta.pop("seen")  # what a head fitted before issue 24 holds
    res = featx.predict_folder(data, model=old, output=tmp_path / "p.csv", workers=0)
    assert res.metrics["n"] == 20 and any("records no training images" in w for w in res.warnings)


def test_unreadable_training_files_are_kept_by_path(tmp_path):
    from featx.data.seen import make_record, match

    (tmp_path / "a.jpg").write_bytes(b"one")
    rec = make_record(tmp_path, ["a.jpg", "gone.jpg"])
    assert rec["trained_paths"] == ["gone.jpg"]
    (tmp_path / "b.jpg").write_bytes(b"one")  # same content, another name
    (tmp_path / "c.jpg").write_bytes(b"two")
    found = match(rec, [tmp_path / "b.jpg", tmp_path / "c.jpg", tmp_path / "gone.jpg"], ["b.jpg", "c.jpg", "gone.jpg"])
    assert found["seen"].tolist() == [True, False, True] and found["by_path"] == 1
    assert match({"hash": "md5"}, [tmp_path / "b.jpg"], ["b.jpg"]) is None
    assert np.asarray(found["seen"]).dtype == bool


def test_a_scratch_run_records_train_and_val_and_predict_headlines_the_test_images(tmp_path):
    data = make_folder(tmp_path / "data", classes=("a", "b"), n_per_class=4, splits=("train", "val", "test"), size=24)
    run = featx.train_scratch(data, arch="lenet5", epochs=1, image_size=16, workers=0, device="cpu",
                              runs_dir=str(tmp_path / "runs"))
    rec = json.loads((run.run_dir / "model.json").read_text())["seen"]
    assert rec["n_trained"] == 8 and rec["n_selected"] == 8  # val chose the best epoch
    res = featx.predict_folder(data, model=run.run_dir, output=tmp_path / "p.csv", workers=0)
    assert len(res.seen_paths) == 16 and res.metrics["n"] == 8 and set(res.split_metrics) == {"test"}
    assert res.seen_metrics["n"] == 16
    # a run made before runs recorded their images: its split is rebuilt from config.json and matched by path
    mj = run.run_dir / "model.json"
    doc = json.loads(mj.read_text())
    doc.pop("seen")
    mj.write_text(json.dumps(doc))
    res = featx.predict_folder(data, model=run.run_dir, output=tmp_path / "p2.csv", workers=0)
    assert len(res.seen_paths) == 16 and res.metrics["n"] == 8
    assert any("matched by path only: the run records no file hashes" in w for w in res.warnings)


def test_a_folder_of_training_images_only_has_no_headline(fitted, tmp_path):
    data, head = fitted
    first = featx.predict_folder(data / "train", model=head, output=False, workers=0)
    assert first.seen_metrics["n"] == 10 and first.metrics["n"] == 2  # the 2 that fit held out
    only = tmp_path / "only_seen"
    for rel in first.seen_paths:  # exactly the images that trained the head
        dest = only / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes((data / "train" / rel).read_bytes())
    res = featx.predict_folder(only, model=head, output=False, workers=0)
    assert res.metrics is None and res.seen_metrics["n"] == 10
    assert any("every labelled image was seen in training" in w for w in res.warnings)
    r = runner.invoke(app, ["predict", str(only), "--model", str(head), "-o", str(tmp_path / "q.csv"),
                            "--workers", "0"])
    assert r.exit_code == 0, r.output
    assert "seen in training" in r.stdout and "unseen" not in r.stdout


def test_a_set_too_large_to_hash_is_recorded_as_such_and_predict_warns(fitted, tmp_path, monkeypatch):
    from featx.data import seen

    data, head = fitted
    monkeypatch.setattr(seen, "MAX_FILES", 5)
    fit = featx.fit_head(head.parent / "features.npz", C=1.0, cv=0)
    rec = fit.head.meta["seen"]
    assert "trained_unrecorded" in rec and rec["n_trained"] == 10 and not rec.get("trained")
    res = featx.predict_folder(data, model=fit.head, output=False, workers=0)
    assert res.seen_paths == [] and any("record of its training images is incomplete" in w for w in res.warnings)
