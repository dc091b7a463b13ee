"""Issue 22.4: `fit --calibrate` refuses validation data too small to fit a temperature on, and never reports the ECE
of the rows that fitted the temperature as the result (the headline is cross-fitted)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from featx.cli.app import app
from featx.errors import DataError
from featx.features.store import FeatureSet
from featx.heads import calibration as cal
from featx.heads import fit_head

META = {"backbone": "efficientnet_lite0", "weights_sha256": "cd" * 32, "preprocess": {"input_size": 8},
        "layer": "pooled", "feature_dim": 64}
runner = CliRunner()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


def _store(val_per_class: int, classes=(3, 8), n_train=40, noise=0.0, seed=0) -> FeatureSet:
    """Digits of ``classes``: ``n_train`` training rows and ``val_per_class`` validation rows of each class."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    rows, splits = [], []
    for c in classes:
        idx = rng.permutation(np.flatnonzero(y == c))
        rows += idx[:n_train].tolist() + idx[n_train:n_train + val_per_class].tolist()
        splits += ["train"] * n_train + ["val"] * val_per_class
    X = X[rows] + noise * rng.standard_normal((len(rows), X.shape[1]))
    labels = np.array([f"d{v}" for v in y[rows]])
    return FeatureSet(X, [f"{i}.png" for i in range(len(rows))], labels=labels, splits=np.array(splits),
                      classes=sorted(set(labels)), meta=dict(META))


def test_two_validation_images_are_refused_naming_the_minimum(tmp_path):
    """The report's case: one validation image a class fitted T = 0.0105 and claimed ECE 0.285 -> 0.000."""
    fs = _store(val_per_class=1)
    out = tmp_path / "h.skops"
    with pytest.raises(DataError, match=rf"at least {cal.MIN_ROWS_PER_CLASS} validation images of every class"):
        fit_head(fs, "logistic", C=1.0, cv=0, calibrate=True, output=out)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_cli_refusal_is_one_line_and_writes_nothing(tmp_path):
    fs = _store(val_per_class=cal.MIN_ROWS_PER_CLASS - 1, noise=6.0)
    fs.save(tmp_path / "f.npz")
    r = runner.invoke(app, ["fit", str(tmp_path / "f.npz"), "--cv", "0", "--C", "1", "--calibrate",
                            "-o", str(tmp_path / "h.skops")])
    assert r.exit_code == 3, r.output
    assert "class d3 has 4" in r.output and "Traceback" not in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.npz"]


def test_validation_rows_without_a_mistake_are_refused():
    """Every validation row right: the log-loss keeps falling as T -> 0, so the fitted T is the optimiser's bound
    and every later prediction would claim confidence 1.000."""
    fs = _store(val_per_class=12)  # 3 vs 8 on clean digits: the head gets every validation row right
    with pytest.raises(DataError, match="no mistake"):
        fit_head(fs, "logistic", C=1.0, cv=0, calibrate=True)


def test_headline_val_ece_is_cross_fitted_and_the_in_sample_one_is_labelled():
    fs = _store(val_per_class=30, noise=6.0)
    res = fit_head(fs, "logistic", C=1.0, cv=0, calibrate=True)
    ece = res.head.calibration["ece"]["val"]
    val = fs.splits == "val"
    oof, y = cal.cross_fitted(res.head.pipeline, fs.features[val], fs.labels[val], seed=0)
    honest = cal.reliability(oof, y, res.head.classes)["ece"]
    T = res.head.calibration["temperature"]
    in_sample = cal.reliability(cal.probabilities(res.head.pipeline, fs.features[val], T), fs.labels[val],
                                res.head.classes)["ece"]
    assert ece["after"] == pytest.approx(honest) and ece["after_in_sample"] == pytest.approx(in_sample)
    assert "after_cross_fitted" not in ece
    assert res.calibration["splits"]["val"]["after"]["ece"] == pytest.approx(honest)


def test_cli_line_says_which_ece_is_which(tmp_path):
    fs = _store(val_per_class=30, noise=6.0)
    fs.save(tmp_path / "f.npz")
    r = runner.invoke(app, ["fit", str(tmp_path / "f.npz"), "--cv", "0", "--C", "1", "--calibrate",
                            "-o", str(tmp_path / "h.skops")])
    assert r.exit_code == 0, r.output
    text = " ".join(r.stdout.split())
    e = json.loads((tmp_path / "h.report.json").read_text())["calibration"]["splits"]["val"]
    want = f"val {e['before']['ece']:.3f} -> {e['after']['ece']:.3f} cross-fitted"
    assert want in text, text
    assert f"{e['after_in_sample']['ece']:.3f} in-sample, on the rows that fitted T" in text
