"""featx.predict_folder with a tiny head (EfficientNet-Lite0 at 32 px on colour-coded images): rows, tables, evaluation, safety."""
from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import featx
from featx.errors import ArtifactError, DataError, StrictModeError, UsageError, WeightsError
from tests.imagegen import class_color, make_folder, make_image


@pytest.fixture(scope="session")
def tiny_head(tmp_path_factory):
    """(data root with train/ and val/, head path): a logistic head fitted on 32-px features of 2 colour classes."""
    base = tmp_path_factory.mktemp("predict_head")
    data = make_folder(base / "data", classes=("ant", "bee"), n_per_class=6, splits=("train", "val"), size=32)
    bb = featx.create_backbone("efficientnet_lite0", image_size=32)
    featx.extract_features(data / "train", base / "features.npz", backbone=bb, workers=0)
    featx.fit_head(base / "features.npz", output=base / "head.skops", C=1.0, cv=0)
    return data, base / "head.skops"


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def copy_val(tiny_head, tmp_path) -> Path:
    data, _ = tiny_head
    return Path(shutil.copytree(data / "val", tmp_path / "val"))


def test_rows_columns_order_and_top_k(tiny_head, tmp_path):
    data, head = tiny_head
    out = tmp_path / "preds.csv"
    res = featx.predict_folder(data / "val", head, output=out, top_k=5, workers=0)
    expected = sorted(f"{c}/{c}_{i:03d}.jpg" for c in ("ant", "bee") for i in range(6))
    assert [r["path"] for r in res] == expected and len(res) == 12
    assert res.confidence_kind == "probability" and res.n_errors == 0
    table = read_csv(out)
    # top-k is clipped to the 2 classes; labelled input adds true_label before error
    assert table[0] == ["path", "label", "probability", "top1", "top1_score", "top2", "top2_score", "true_label", "error"]
    assert [r[0] for r in table[1:]] == expected
    for line, row in zip(table[1:], res):
        assert line[1] == row["label"] == line[3]  # label is the top-1 class
        p1, p2 = float(line[4]), float(line[6])
        assert p1 >= p2 and abs(p1 + p2 - 1.0) < 1e-4  # two probabilities, best first
        assert float(line[2]) == pytest.approx(row["confidence"], rel=1e-5)
        assert line[7] == line[0].split("/")[0] and line[8] == ""
    assert res.counts == {"ant": sum(r["label"] == "ant" for r in res), "bee": sum(r["label"] == "bee" for r in res)}


def test_labels_agree_with_reported_accuracy_and_report_is_written(tiny_head, tmp_path):
    val = copy_val(tiny_head, tmp_path)
    # an ant-coloured picture filed under bee: a confident mistake for the gallery
    make_image(val / "bee" / "odd.jpg", size=32, color=class_color(0), seed=999)
    out = tmp_path / "preds.csv"
    res = featx.predict_folder(val, tiny_head[1], output=out, workers=0)
    table = read_csv(out)[1:]
    acc = np.mean([line[1] == line[7] for line in table])
    assert res.metrics["accuracy"] == pytest.approx(acc)
    assert res.metrics["n"] == 13 and acc < 1.0  # odd.jpg is wrong
    assert res.metrics["accuracy"] >= 0.9
    rep = tmp_path / "preds.report"
    assert res.report_dir == rep and (rep / "confusion.png").stat().st_size > 0
    assert res.gallery_png == rep / "misclassified.png" and res.gallery_png.is_file()
    doc = json.loads((rep / "metrics.json").read_text())
    assert any(m["path"] == "bee/odd.jpg" and m["pred"] == "ant" for m in doc["misclassified"])
    cm = np.asarray(res.metrics["confusion"])
    assert cm.sum() == 13 and cm[1, 0] >= 1  # rows = true (bee), columns = predicted (ant)


def test_corrupt_file_gives_an_error_row_and_strict_raises_after_writing(tiny_head, tmp_path):
    val = copy_val(tiny_head, tmp_path)
    (val / "ant" / "broken.jpg").write_text("not a jpeg")
    out = tmp_path / "p.csv"
    res = featx.predict_folder(val, tiny_head[1], output=out, workers=0)
    bad = [r for r in res if r["path"] == "ant/broken.jpg"][0]
    assert bad["label"] is None and bad["confidence"] is None and "not an image" in bad["error"]
    assert res.n_errors == 1 and res.metrics["n"] == 12  # unreadable images are not scored
    line = [r for r in read_csv(out) if r[0] == "ant/broken.jpg"][0]
    assert line[1] == "" and "not an image" in line[-1]
    out.unlink()
    with pytest.raises(StrictModeError) as exc:
        featx.predict_folder(val, tiny_head[1], output=out, workers=0, strict=True)
    assert exc.value.exit_code != 0 and "1 of 13" in str(exc.value)
    assert len(read_csv(out)) == 14  # written before failing


def test_unlabeled_folder_jsonl_and_odd_file_names(tiny_head, tmp_path):
    data, head = tiny_head
    flat = tmp_path / "inbox"
    flat.mkdir()
    for p in sorted((data / "val" / "bee").iterdir())[:2]:
        shutil.copy(p, flat / p.name)
    odd = os.fsencode(str(flat)) + b"/caf\xe9.jpg"  # not valid UTF-8
    shutil.copy(data / "val" / "ant" / "ant_000.jpg", odd)
    out = tmp_path / "p.jsonl"
    res = featx.predict_folder(flat, head, output=out, workers=0, top_k=1)
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3 and res.metrics is None and not res.labelled
    objs = [json.loads(x) for x in lines]
    assert all("true_label" not in o for o in objs)
    assert [len(o["top_k"]) for o in objs] == [1, 1, 1]
    assert {o["label"] for o in objs} <= {"ant", "bee"}
    assert any(o["path"] == "caf\ufffd.jpg" for o in objs)


def test_unknown_true_classes_are_reported_not_crashed_on(tiny_head, tmp_path):
    val = copy_val(tiny_head, tmp_path)
    make_image(val / "wasp" / "w1.jpg", size=32, color=(40, 180, 60), seed=5)
    res = featx.predict_folder(val, tiny_head[1], output=tmp_path / "p.csv", workers=0)
    assert res.unknown_classes == ["wasp"]
    assert "wasp" in res.metrics["classes"] and res.metrics["per_class"]["wasp"]["recall"] == 0.0
    assert any("wasp" in w for w in res.warnings)


def test_dry_run_writes_nothing(tiny_head, tmp_path):
    data, head = tiny_head
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    res = featx.predict_folder(data / "val", head, output=tmp_path / "p.csv", workers=0,
                               sort_into=tmp_path / "sorted", dry_run=True)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert len(res.sort_actions) == 12 and {a.status for a in res.sort_actions} == {"planned"}
    assert res.metrics is not None  # predictions and scores are still computed


def test_sorting_copies_into_predicted_class_folders(tiny_head, tmp_path):
    val = copy_val(tiny_head, tmp_path)
    res = featx.predict_folder(val, tiny_head[1], output=False, workers=0, sort_into=tmp_path / "sorted",
                               min_confidence=0.0)
    for row, act in zip(res, res.sort_actions):
        assert act.dest == tmp_path / "sorted" / row["label"] / Path(row["path"]).name
        assert act.dest.read_bytes() == (val / row["path"]).read_bytes()
    # threshold above every probability: everything is uncertain
    res = featx.predict_folder(val, tiny_head[1], output=False, workers=0, sort_into=tmp_path / "unsure",
                               min_confidence=1.0)
    assert {a.folder for a in res.sort_actions} <= {"_uncertain", "ant", "bee"}
    assert all(a.folder == "_uncertain" for r, a in zip(res, res.sort_actions) if r["confidence"] < 1.0)


def test_refusals_before_any_work(tiny_head, tmp_path):
    data, head = tiny_head
    val = copy_val(tiny_head, tmp_path)
    with pytest.raises(Exception) as exc:
        featx.predict_folder(val, head, output=tmp_path / "p.csv", sort_into=val / "sorted", workers=0)
    assert exc.value.exit_code == 2 and not (tmp_path / "p.csv").exists() and not (val / "sorted").exists()
    with pytest.raises(Exception) as exc:
        featx.predict_folder(val, head, output=val / "p.csv", workers=0)
    assert exc.value.exit_code == 2
    foreign = tmp_path / "notes.csv"
    foreign.write_text("my,own,data\n1,2,3\n")
    with pytest.raises(UsageError, match="refusing to overwrite"):
        featx.predict_folder(val, head, output=foreign, workers=0)
    assert foreign.read_text() == "my,own,data\n1,2,3\n"
    with pytest.raises(UsageError, match="probability"):
        featx.predict_folder(val, head, output=False, sort_into=tmp_path / "s", min_confidence=3.0, workers=0)
    with pytest.raises(ArtifactError, match="is not a model"):
        featx.predict_folder(val, foreign, output=False, workers=0)
    # our own file is overwritten without --overwrite
    featx.predict_folder(val, head, output=tmp_path / "p.csv", workers=0)
    featx.predict_folder(val, head, output=tmp_path / "p.csv", workers=0, top_k=1)
    assert read_csv(tmp_path / "p.csv")[0][:5] == ["path", "label", "probability", "top1", "top1_score"]


def test_head_with_other_backbone_provenance_is_refused(tiny_head, tmp_path):
    from featx.heads import Head, load_head

    head = load_head(tiny_head[1])
    fm = dict(head.feature_meta)
    other = Head(head.pipeline, {**head.meta, "features": {**fm, "weights_sha256": "0" * 64}})
    with pytest.raises(WeightsError, match="differ"):
        featx.predict_folder(tiny_head[0] / "val", other, output=False, workers=0)
    # Same backbone and weights but another layer: other features, refused
    stage = Head(head.pipeline, {**head.meta, "features": {**fm, "layer": "stage1"}})
    with pytest.raises(ArtifactError, match="differ in layer|expects 1280 features"):
        featx.predict_folder(tiny_head[0] / "val", stage, output=False, workers=0)


def test_garbage_folder_stops_with_a_clear_error(tiny_head, tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    for i in range(3):
        (junk / f"{i}.jpg").write_bytes(os.urandom(100))
    with pytest.raises(DataError, match="is this an image folder"):
        featx.predict_folder(junk, tiny_head[1], output=tmp_path / "p.csv", workers=0)
    assert not (tmp_path / "p.csv").exists()


def test_trained_scratch_model_predicts(tiny_head, tmp_path):
    training = pytest.importorskip("featx.training")
    data, _ = tiny_head
    run = training.train_scratch(data, arch="lenet5", epochs=1, image_size=32, runs_dir=str(tmp_path / "runs"),
                                 workers=0, device="cpu")
    res = featx.predict_folder(data / "val", run.run_dir, output=tmp_path / "p.csv", workers=0)
    assert len(res) == 12 and res.confidence_kind == "probability" and res.model_kind == "scratch"
    for r in res:
        assert r["label"] in ("ant", "bee") and 0.5 <= r["confidence"] <= 1.0
        assert sum(t["score"] for t in r["top_k"]) == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(UsageError, match="--weights"):
        featx.predict_folder(data / "val", run.run_dir, output=False, weights=tmp_path / "w.safetensors", workers=0)
