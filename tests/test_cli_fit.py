"""`featx fit` in-process: tables and files on success, --json keys, one-line errors that write nothing."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from featx.cli.app import app
from featx.features.store import DEFAULT_FEATURES_PATH, FeatureSet
from featx.heads import DEFAULT_HEAD_PATH, HEADS, load_head

META = {"backbone": "efficientnet_lite0", "weights_sha256": "cd" * 32, "preprocess": {"input_size": 8},
        "layer": "pooled", "feature_dim": 64}

runner = CliRunner()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny fits on a shared 2-core box: OpenMP/BLAS threads spinning against other processes make them ~50x slower
    (torch's pool too, for the svm and mlp heads)."""
    import torch
    from threadpoolctl import threadpool_limits

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def feats(tmp_path_factory):
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X, y = X[:450], y[:450]
    labels = np.array([f"digit{v}" for v in y])
    splits = np.array(["train", "val", "test"])[np.arange(len(X)) % 5 % 3]  # 40/40/20 %, interleaved
    d = tmp_path_factory.mktemp("feats")
    FeatureSet(X, [f"{i}.png" for i in range(len(X))], labels=labels, splits=splits, classes=sorted(set(labels)),
               meta=META).save(d / "f.npz")
    FeatureSet(X, [f"{i}.png" for i in range(len(X))], meta=META).save(d / "unlabeled.npz")
    return d


def test_cli_defaults_agree_with_the_library():
    from featx.cli import fit as cli_fit

    assert cli_fit.DEFAULT_FEATURES == DEFAULT_FEATURES_PATH
    assert cli_fit.DEFAULT_HEAD == DEFAULT_HEAD_PATH


def test_fit_prints_cv_scores_per_class_and_confusion(feats, tmp_path):
    out = tmp_path / "h.skops"
    r = runner.invoke(app, ["fit", str(feats / "f.npz"), "--head", "svm", "-o", str(out), "--cv", "3"])
    assert r.exit_code == 0, r.output
    text = r.stdout
    assert "CV (3-fold accuracy): C=" in text and "±" in text
    for word in ("val", "test", "balanced acc.", "macro-F1", "Per class, val", "Confusion matrix, test", "digit7"):
        assert word in text
    assert "not a score" in text  # training accuracy only under that label
    assert load_head(out).kind == "svm"
    assert (tmp_path / "h.report.json").is_file() and (tmp_path / "h.confusion-val.png").is_file()
    assert (tmp_path / "h.confusion-test.png").is_file()


def test_fit_json_summary(feats, tmp_path):
    r = runner.invoke(app, ["fit", str(feats / "f.npz"), "--head", "knn", "--k", "3", "-o", str(tmp_path / "k.skops"),
                            "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["head"] == "knn" and d["params"] == {"n_neighbors": 3}
    assert d["cv"]["fixed"] is True and d["cv"]["folds"] == 5
    for split in ("val", "test"):
        assert set(d["scores"][split]) == {"accuracy", "balanced_accuracy", "macro_f1", "n",
            "majority_rate", "beats_chance"}
    assert d["scores"]["val"]["n"] == 180 and d["scores"]["val"]["accuracy"] > 0.9
    assert d["path"].endswith("k.skops")


def test_fit_all_prints_a_sorted_comparison(feats, tmp_path):
    r = runner.invoke(app, ["fit", str(feats / "f.npz"), "--head", "all", "--cv", "0", "-o", str(tmp_path / "b.skops")])
    assert r.exit_code == 0, r.output
    assert "Heads, sorted by their selection score" in r.stdout and "Best:" in r.stdout
    for kind in HEADS:
        assert kind in r.stdout and (tmp_path / f"b-{kind}.skops").is_file()
    rep = json.loads((tmp_path / "b.report.json").read_text())
    accs = [x["selection_score"] for x in rep["comparison"]]  # issue 24.3: ranked on rows the headline does not use
    assert accs == sorted(accs, reverse=True) and rep["head"] == rep["comparison"][0]["head"]
    assert (tmp_path / "b.comparison.png").is_file()


@pytest.mark.parametrize("args, code, needle", [
    (["missing.npz"], 5, "does not exist"),
    (["{feats}/unlabeled.npz"], 3, "no labels"),
    (["{feats}/f.npz", "--head", "svn"], 2, "did you mean 'svm'"),
    (["{feats}/f.npz", "--head", "knn", "--C", "1"], 2, "--k"),
    (["{feats}/f.npz", "--val-split", "0"], 2, "val-split"),
    (["{feats}/f.npz", "--jobs", "0"], 2, "--jobs must be a number of parallel CV fits"),  # was a joblib traceback
    (["{feats}/f.npz", "--head", "mlp", "--C", "1"], 2, "--C does not apply to the mlp head"),
])
def test_bad_input_is_one_line_and_writes_nothing(feats, tmp_path, monkeypatch, args, code, needle):
    monkeypatch.chdir(tmp_path)
    args = [a.format(feats=feats) for a in args]
    r = runner.invoke(app, ["fit", *args, "-o", str(tmp_path / "out" / "h.skops")])
    assert r.exit_code == code, r.output
    assert r.stderr.startswith("Error:") and needle in " ".join(r.stderr.split())
    assert "Traceback" not in r.output
    assert r.stdout == ""
    assert not (tmp_path / "out").exists() and not (tmp_path / "featx-out").exists()


def test_help_lists_the_options():
    r = runner.invoke(app, ["fit", "--help"])
    assert r.exit_code == 0
    for opt in ("--head", "--output", "--C", "--k", "--class-weight", "--val-split", "--val", "--cv", "--seed",
                "--device", "--json", "--calibrate", "--overwrite", "mlp"):
        assert opt in r.stdout


def test_head_names_are_case_insensitive(feats, tmp_path):
    r = runner.invoke(app, ["fit", str(feats / "f.npz"), "--head", "SVM", "--C", "0.01", "--cv", "0", "-o",
                            str(tmp_path / "s.skops"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["head"] == "svm"


def test_calibrate_gives_svm_probabilities_ece_and_a_reliability_diagram(feats, tmp_path):
    out = tmp_path / "c.skops"
    r = runner.invoke(app, ["fit", str(feats / "f.npz"), "--head", "svm", "--C", "0.01", "--cv", "0", "--calibrate",
                            "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "calibrated (temperature" in r.stdout and "expected calibration error val" in r.stdout
    for name in ("c.reliability-val.png", "c.reliability-test.png", "c.confusion-val.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    head = load_head(out)
    assert head.score_kind == "probability"
    p, kind = head.predict_scores(np.eye(64)[:5])
    assert kind == "probability" and np.allclose(p.sum(1), 1.0)
    rep = json.loads((tmp_path / "c.report.json").read_text())
    assert set(rep["calibration"]["splits"]) == {"val", "test"}
    assert rep["files"]["reliability-test"].endswith("c.reliability-test.png")


def test_user_files_beside_the_head_are_refused_unless_overwrite(feats, tmp_path):
    """Issue 11.2: fit replaced an existing h2.report.json it had not written."""
    mine = tmp_path / "h2.report.json"
    mine.write_text('{"my": "notes"}')
    args = ["fit", str(feats / "f.npz"), "--head", "linear", "--cv", "0", "-o", str(tmp_path / "h2.skops")]
    r = runner.invoke(app, args)
    assert r.exit_code == 2 and "h2.report.json exists and was not written by featx" in " ".join(r.stderr.split())
    assert mine.read_text() == '{"my": "notes"}' and not (tmp_path / "h2.skops").exists()
    r = runner.invoke(app, [*args, "--overwrite"])
    assert r.exit_code == 0, r.output
    assert json.loads(mine.read_text())["head"] == "linear"
    r = runner.invoke(app, args)  # now featx's own: replaced without --overwrite
    assert r.exit_code == 0, r.output
