"""Issue 24 item 4: --min-confidence is refused (exit 2, one line, hint `fit --calibrate`) for a head whose scores
are not probabilities, before any work; the table's score column is named for what it holds."""
from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

import featx
from featx.cli.app import app
from featx.errors import UsageError

from .imagegen import make_folder

TINY = "timm/test_resnet.r160_in1k"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def heads(tmp_path_factory):
    """(val folder, {kind: head path}): logistic (probabilities), svm and ridge (decision scores), and an svm
    calibrated with --calibrate, all on 32-px random-init features of 2 colour classes."""
    base = tmp_path_factory.mktemp("r24_heads")
    data = make_folder(base / "data", classes=("ant", "bee"), n_per_class=6, splits=("train", "val"), size=32)
    # one ant-coloured image filed under bee: a mistake on val, without which --calibrate has nothing to learn from
    (data / "val" / "ant" / "ant_000.jpg").rename(data / "val" / "bee" / "ant_000.jpg")
    featx.extract_features(data, base / "f.npz", backbone=TINY, pretrained=False, image_size=32, workers=0,
                           device="cpu")
    out = {}
    for kind, extra in (("logistic", {}), ("svm", {}), ("linear", {}), ("svm-cal", {"calibrate": True})):
        out[kind] = base / f"{kind}.skops"
        featx.fit_head(base / "f.npz", head=kind.removesuffix("-cal"), output=out[kind], cv=0, **extra)
    return data / "val", out


@pytest.mark.parametrize("kind", ["svm", "linear"])
def test_min_confidence_is_refused_for_decision_scores_before_any_work(heads, tmp_path, kind):
    val, paths = heads
    table, sort = tmp_path / "p.csv", tmp_path / "sorted"
    r = CliRunner().invoke(app, ["predict", str(val), "--model", str(paths[kind]), "-o", str(table),
                                 "--sort-into", str(sort), "--min-confidence", "0.9", "--workers", "0"])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "decision scores" in lines[0] and "fit --calibrate" in lines[0], r.stderr
    assert not table.exists() and not sort.exists() and sorted(tmp_path.iterdir()) == []
    with pytest.raises(UsageError, match="fit --calibrate"):  # the library refuses it too
        featx.predict_folder(val, paths[kind], output=False, sort_into=sort, min_confidence=0.9, workers=0)


def test_min_confidence_works_for_probabilities_and_calibrated_heads(heads, tmp_path):
    val, paths = heads
    for kind in ("logistic", "svm-cal"):
        res = featx.predict_folder(val, paths[kind], output=False, sort_into=tmp_path / kind, min_confidence=0.5,
                                   workers=0)
        assert res.confidence_kind == "probability" and len(res.sort_actions) == len(res) == 12


def test_the_table_column_is_named_for_what_it_holds(heads, tmp_path):
    val, paths = heads
    for kind, column in (("logistic", "probability"), ("svm", "decision_score"), ("linear", "decision_score"),
                         ("svm-cal", "probability")):
        table = tmp_path / f"{kind}.csv"
        res = featx.predict_folder(val, paths[kind], output=table, workers=0, top_k=1)
        with open(table, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
        assert rows[0][:5] == ["path", "label", column, "top1", "top1_score"], kind
        assert float(rows[1][2]) == pytest.approx(res[0]["confidence"], rel=1e-5)
        jl = tmp_path / f"{kind}.jsonl"
        featx.predict_folder(val, paths[kind], output=jl, workers=0)
        first = json.loads(jl.read_text(encoding="utf-8").splitlines()[0])
        assert list(first)[:3] == ["path", "label", column] and "confidence" not in first
        # a re-run replaces featx's own table of either kind without --overwrite
        featx.predict_folder(val, paths["logistic" if column != "probability" else "svm"], output=table, workers=0)
        featx.predict_folder(val, paths["logistic" if column != "probability" else "svm"], output=jl, workers=0)


def test_an_exported_svm_is_refused_too_and_told_to_export_again(heads, tmp_path):
    pytest.importorskip("onnxruntime")
    val, paths = heads
    onnx = featx.export_model(paths["svm"], tmp_path / "svm.onnx", check=val, exporter="torchscript").output
    r = CliRunner().invoke(app, ["predict", str(val), "--model", str(onnx), "-o", str(tmp_path / "p.csv"),
                                 "--sort-into", str(tmp_path / "s"), "--min-confidence", "0.5", "--workers", "0"])
    assert r.exit_code == 2 and "fit --calibrate` and export it again" in r.stderr, r.output
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "s").exists()
    featx.predict_folder(val, onnx, output=tmp_path / "p.csv", workers=0, top_k=0)
    assert (tmp_path / "p.csv").read_text(encoding="utf-8").startswith("path,label,decision_score,")
