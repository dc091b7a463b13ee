"""featx.report: metrics against scikit-learn's, and every PNG helper (valid PNG, atomic, robust to bad images)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from featx import report


def test_metrics_match_sklearn_and_rows_are_true_classes():
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score

    y_true = ["cat", "cat", "cat", "dog", "dog", "owl"]
    y_pred = ["cat", "dog", "cat", "dog", "cat", "owl"]
    m = report.classification_metrics(y_true, y_pred, ["owl", "dog", "cat"])
    assert m["classes"] == ["owl", "dog", "cat"]  # caller's order kept
    assert m["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    assert m["n"] == 6
    assert m["confusion"] == [[1, 0, 0], [0, 1, 1], [0, 1, 2]]  # row "cat": 1 predicted dog, 2 cat
    assert m["per_class"]["cat"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert m["per_class"]["owl"]["support"] == 1
    assert report.summary(m) == {k: m[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "n", "majority_rate",
                                                 "beats_chance")}


def test_labels_outside_classes_are_appended_not_dropped():
    m = report.classification_metrics(["a", "b", "zz"], ["a", "yy", "zz"], ["a", "b"])
    assert m["classes"] == ["a", "b", "yy", "zz"]
    assert np.asarray(m["confusion"]).sum() == 3
    assert m["per_class"]["yy"]["support"] == 0 and m["per_class"]["yy"]["precision"] == 0.0
    # balanced accuracy averages over classes that have true samples (a, b, zz), not yy
    assert m["balanced_accuracy"] == pytest.approx((1 + 0 + 1) / 3)


def test_empty_input_gives_nan_not_a_crash():
    m = report.classification_metrics([], [], ["a", "b"])
    assert m["n"] == 0 and math.isnan(m["accuracy"]) and m["confusion"] == [[0, 0], [0, 0]]


def _is_png(p):
    return p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_confusion_png_small_and_many_classes(tmp_path):
    m = report.classification_metrics(["a", "b", "b"], ["a", "a", "b"])
    assert _is_png(report.save_confusion_png(m, tmp_path / "cm.png", title="t"))
    classes = [f"class_{i:02d}" for i in range(35)]
    rng = np.random.default_rng(0)
    y = rng.choice(classes, 300)
    big = report.classification_metrics(y, np.where(rng.random(300) < 0.8, y, rng.choice(classes, 300)), classes)
    assert _is_png(report.save_confusion_png(big, tmp_path / "sub" / "big.png"))  # folders are created
    assert not list(tmp_path.rglob(".featx-tmp-*"))


def test_png_write_is_atomic(tmp_path, monkeypatch):
    import matplotlib.figure

    target = tmp_path / "cm.png"
    target.write_bytes(b"old")
    m = report.classification_metrics(["a"], ["a"])

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", boom)
    with pytest.raises(OSError):
        report.save_confusion_png(m, target)
    assert target.read_bytes() == b"old"
    assert not list(tmp_path.glob(".featx-tmp-*"))


def test_learning_curve_with_gaps(tmp_path):
    rows = [{"epoch": 1, "train_loss": 1.0, "val_loss": 1.2, "val_accuracy": 0.5},
            {"epoch": 2, "train_loss": 0.6, "val_loss": None, "val_accuracy": None},
            {"epoch": 3, "train_loss": 0.4, "val_loss": 0.7, "val_accuracy": 0.8}]
    assert _is_png(report.save_learning_curve_png(rows, tmp_path / "curve.png"))
    assert _is_png(report.save_learning_curve_png([{"epoch": 1, "train_loss": 0.3}], tmp_path / "c2.png"))


def test_gallery_shows_unreadable_images_as_tiles(tmp_path):
    from PIL import Image

    good = tmp_path / "good.jpg"
    Image.fromarray(np.full((40, 60, 3), 200, dtype=np.uint8)).save(good)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    items = [{"path": good, "true": "ant", "pred": "bee", "confidence": 0.91},
             {"path": broken, "true": "bee", "pred": "bee", "confidence": 0.5},
             (tmp_path / "missing.jpg", "ant", "ant", None)]
    assert _is_png(report.save_gallery_png(items, tmp_path / "gallery.png", "worst mistakes"))
    assert _is_png(report.save_gallery_png([], tmp_path / "empty.png", "nothing"))


def test_bar_chart(tmp_path):
    rows = [{"name": "svm", "accuracy": 0.95}, {"name": "knn", "accuracy": 0.9}, {"name": "bad", "accuracy": None}]
    assert _is_png(report.save_bar_chart_png(rows, tmp_path / "bars.png", key="accuracy", label_key="name", title="x"))
    assert _is_png(report.save_bar_chart_png([], tmp_path / "none.png", key="accuracy", label_key="name"))


def test_matplotlib_is_imported_lazily():
    import subprocess
    import sys

    code = "import sys, featx.report; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_names_a_file_system_allows_render_in_every_png(tmp_path):
    from PIL import Image

    img = tmp_path / "ok.jpg"
    Image.fromarray(np.full((20, 20, 3), 90, dtype=np.uint8)).save(img)
    odd = ["caf\udce9", "x$\\frac{$", "$a$_b", "ant [formicidae]"]  # not UTF-8; broken and valid mathtext; brackets
    items = [{"path": tmp_path / f"{n}.jpg", "true": n, "pred": "bee", "confidence": 0.5} for n in odd]
    items.append({"path": img, "true": odd[0], "pred": odd[1], "confidence": 0.9})
    assert _is_png(report.save_gallery_png(items, tmp_path / "g.png", title=odd[0]))
    m = report.classification_metrics(odd, odd[1:] + odd[:1], odd)
    assert _is_png(report.save_confusion_png(m, tmp_path / "cm.png", title=odd[1]))
    assert _is_png(report.save_bar_chart_png([{"name": n, "accuracy": 0.5} for n in odd], tmp_path / "b.png"))


def test_save_evaluation_writes_the_three_files_and_drops_a_stale_gallery(tmp_path):
    import json

    m = report.classification_metrics(["a", "b", "b"], ["a", "a", "b"])
    mistake = {"path": "b/x\udce9.jpg", "file": tmp_path / "missing.jpg", "true": "b", "pred": "a", "confidence": 0.7}
    files = report.save_evaluation(tmp_path / "rep", m, [mistake], info={"model": "m"}, extra={"n_errors": 0})
    assert set(files) == {"confusion", "gallery", "metrics"} and _is_png(files["gallery"])
    doc = json.loads(files["metrics"].read_bytes().decode("utf-8"))
    assert doc["model"] == "m" and doc["misclassified"][0]["path"] == "b/x\ufffd.jpg" and doc["n_errors"] == 0
    files = report.save_evaluation(tmp_path / "rep", report.classification_metrics(["a"], ["a"]), [])
    assert files["gallery"] is None and not (tmp_path / "rep" / "misclassified.png").exists()
