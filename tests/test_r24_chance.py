"""Issue 24.1 and 24.3: the majority-class rate beside every accuracy, one chance rule that flags a model not clearly
above it (fit, predict, scratch, compare, audit), and `fit --head all` scored on rows that did not choose it."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from featx.cli.app import app
from featx.features.store import FeatureSet, save_features

from .imagegen import make_folder

META = {"backbone": "efficientnet_lite0", "weights_sha256": "cd" * 32, "preprocess": {"input_size": 8},
        "layer": "pooled", "feature_dim": 64}

runner = CliRunner()


def _flat(text: str) -> str:
    """Terminal output with its wrapping undone, for phrases a table caption may break across lines."""
    return " ".join(text.split())


def digits_set(n=600, noise=False, seed=0) -> FeatureSet:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X, y = X[:n].astype(np.float64), y[:n]
    # three classes, one of them common: the majority rate is far from 1/k, so "chance" is not "1/k"
    labels = np.array(["zero_to_five" if v <= 5 else ("six_seven" if v <= 7 else "eight_nine") for v in y])
    if noise:  # features that carry no information about the labels
        X = np.random.default_rng(seed).normal(size=X.shape)
    return FeatureSet(X, [f"img/{i}.png" for i in range(len(X))], labels=labels, classes=sorted(set(labels)),
                      meta=dict(META))


# ----------------------------------------------------------------------------------------------- the one rule


def test_chance_check_flags_a_one_class_model_and_passes_a_good_one():
    from featx.report import chance_check

    y = np.array(["bees"] * 83 + ["ants"] * 70)
    one_class = chance_check(y, np.array(["bees"] * len(y)))  # the LeNet: every photo called "bees"
    assert one_class["majority_rate"] == pytest.approx(83 / 153)
    assert one_class["balanced_accuracy"] == pytest.approx(0.5)
    assert one_class["beats_chance"] is False and "majority-class rate 0.542" in one_class["note"]
    good = y.copy()
    good[:5] = "ants"  # 148 of 153 right
    ok = chance_check(y, good)
    assert ok["beats_chance"] is True and ok["note"] is None
    # a few lucky rows on a small folder are not a signal; 50.3 % against 50 % on many rows is not useful
    assert chance_check(["a", "b", "a", "b"], ["a", "b", "a", "b"])["beats_chance"] is False
    big = np.array(["a", "b"] * 50_000)
    right = np.random.default_rng(0).random(len(big)) < 0.006  # 50.3 % correct: "significant", not useful
    assert chance_check(big, np.where(right, big, "a"))["beats_chance"] is False


def test_classification_metrics_carry_the_majority_rate_and_the_verdict():
    from featx.report import classification_metrics, summary

    m = classification_metrics(["a"] * 60 + ["b"] * 40, ["a"] * 100)
    assert m["majority_rate"] == pytest.approx(0.6) and m["beats_chance"] is False
    assert {"majority_rate", "beats_chance"} <= set(summary(m))
    assert classification_metrics([], [])["beats_chance"] is None


def test_audit_uses_the_same_rule():
    from featx.audit.labels import chance_level
    from featx.report import chance_check

    rng = np.random.default_rng(0)
    y = rng.choice(["a", "b", "c"], size=300, p=[0.5, 0.3, 0.2])
    for pred in (np.array(["a"] * 300), np.where(rng.random(300) < 0.9, y, "a"),
                 np.where(rng.random(300) < 0.6, y, "a")):
        at_chance, majority = chance_level(y, pred)
        found = chance_check(y, pred)
        assert at_chance == (found["beats_chance"] is not True) and majority == pytest.approx(found["majority_rate"])


# ----------------------------------------------------------------------------------------------- fit


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    d = tmp_path_factory.mktemp("r24")
    save_features(digits_set(), d / "good.npz")
    save_features(digits_set(noise=True), d / "noise.npz")
    return d


def test_fit_flags_a_chance_level_head_in_the_table_json_and_report(stores, tmp_path):
    r = runner.invoke(app, ["fit", str(stores / "noise.npz"), "--head", "knn", "--k", "25", "--cv", "0",
                            "-o", str(tmp_path / "h.skops")])
    assert r.exit_code == 0, r.output
    assert "majority rate" in r.stdout and "chance" in r.stdout
    assert "not clearly above the majority-class rate" in _flat(r.stdout)
    rep = json.loads((tmp_path / "h.report.json").read_text())
    assert rep["scores"]["val"]["beats_chance"] is False
    assert rep["scores"]["val"]["majority_rate"] == pytest.approx(0.6, abs=0.05)


def test_fit_does_not_flag_a_good_head(stores, tmp_path):
    r = runner.invoke(app, ["fit", str(stores / "good.npz"), "--C", "1", "--cv", "0", "-o", str(tmp_path / "h.skops"),
                            "--json"])
    assert r.exit_code == 0, r.output
    val = json.loads(r.stdout)["scores"]["val"]
    assert val["beats_chance"] is True and val["accuracy"] > val["majority_rate"] + 0.2
    r = runner.invoke(app, ["fit", str(stores / "good.npz"), "--C", "1", "--cv", "0", "-o", str(tmp_path / "h.skops")])
    assert r.exit_code == 0 and "not clearly above" not in _flat(r.stdout) and "majority rate" in r.stdout


# ----------------------------------------------------------------------------------------------- fit --head all


def test_head_all_ranks_by_cv_on_train_and_reports_the_untouched_validation_score(stores):
    from featx.heads import HEADS, fit_head

    res = fit_head(stores / "good.npz", "all", cv=3, grid=None)
    assert res.selection["how"].startswith("3-fold cross-validated accuracy on the training rows")
    ranked = [res.selection["scores"][r.kind] for r in res.results]
    assert ranked == sorted(ranked, reverse=True) and set(res.selection["scores"]) == set(HEADS)
    assert res.selection["scores"][res.kind] == pytest.approx(res.results[0].cv["mean"])
    assert res.held_out["val"]["n"] == res.scores["val"]["n"]  # no validation row took part in choosing


def test_head_all_with_cv_off_chooses_on_half_of_val_and_scores_the_other_half(stores, tmp_path):
    from featx.data.split import plan_split
    from featx.features.store import load_features
    from featx.heads import fit_head
    from featx.heads.fit import _val_halves
    from featx.report import classification_metrics

    res = fit_head(stores / "good.npz", "all", cv=0, output=tmp_path / "b.skops")
    rows = res.selection["rows"]
    assert rows["choose"] + rows["score"] == res.scores["val"]["n"] and res.held_out["val"]["n"] == rows["score"]
    # the headline is the kept head on the validation rows that did not choose it: recompute it from those rows
    fs = load_features(stores / "good.npz")
    val = fs.subset(plan_split(fs.paths, fs.labels.tolist(), None, val_fraction=0.2, seed=0).val)
    choose, score = _val_halves(val.labels, 0)
    assert not set(choose) & set(score)
    pipe = res.head.pipeline
    want = classification_metrics(val.labels[score], pipe.predict(val.features[score]), res.head.classes)
    assert res.held_out["val"]["accuracy"] == pytest.approx(want["accuracy"])
    chose = {r.kind: classification_metrics(val.labels[choose], r.head.pipeline.predict(val.features[choose]),
                                            r.head.classes)["accuracy"] for r in res.results}
    assert max(chose.values()) == pytest.approx(chose[res.kind])
    rep = json.loads((tmp_path / "b.report.json").read_text())
    assert rep["selection"]["how"].startswith("accuracy on") and rep["held_out"]["val"]["n"] == rows["score"]


def test_fit_all_labels_the_per_head_table_as_selection_scores(stores, tmp_path):
    r = runner.invoke(app, ["fit", str(stores / "good.npz"), "--head", "all", "--cv", "0",
                            "-o", str(tmp_path / "b.skops")])
    assert r.exit_code == 0, r.output
    text = _flat(r.stdout)
    assert "sorted by their selection score (accuracy" in text and "selection score" in text
    assert "chosen by accuracy on" in text and "Scores of the kept head (held-out data that did not choose it)" in text


# ----------------------------------------------------------------------------------------------- compare, scratch


def test_compare_marks_and_notes_a_chance_level_method(tmp_path):
    from featx.comparison import CompareResult, CompareSettings, MethodResult
    from featx.comparison.methods import chance_notes, mark_chance
    from featx.comparison.render import render_report

    labels = ["bees"] * 83 + ["ants"] * 70
    rows = [MethodResult("heads:logistic", 0.94, 0.94, 1.0, 10, "heads", best_in_family=True),
            MethodResult("scratch:lenet5", 83 / 153, 0.5, 5.0, 1000, "scratch", best_in_family=True)]
    mark_chance(rows, labels)
    assert [r.beats_chance for r in rows] == [True, False]
    res = CompareResult(run_dir=tmp_path, rows=rows, report_path=tmp_path / "report.md", chart_path=None,
                        split="folders", n_train=245, n_val=153, seconds=1.5, settings=CompareSettings(quick=True),
                        notes=chance_notes(rows))
    md = render_report(res)
    assert "| scratch:lenet5 * | 0.5425 **chance** |" in md and "| heads:logistic * | 0.9400 |" in md
    assert "majority-class rate of the validation images: 0.5425" in md
    assert any(n.startswith("scratch:lenet5: at chance level") for n in res.notes)
    assert not any(n.startswith("heads:") for n in res.notes)
    assert res.to_dict()["methods"][1]["majority_rate"] == pytest.approx(83 / 153)


def test_shots_cells_at_chance_are_marked(tmp_path):
    from featx.comparison import CompareResult, MethodResult
    from featx.comparison.render import point_at_chance, point_cell

    rows = [MethodResult("heads:logistic", 0.94, 0.94, 1.0, 10, "heads", majority_rate=83 / 153)]
    res = CompareResult(run_dir=tmp_path, rows=rows, report_path=tmp_path / "report.md", chart_path=None,
                        split="folders", n_train=245, n_val=153, seconds=1.0)
    at_chance = point_at_chance(res)
    low = {"mean": 0.55, "std": 0.02, "n": 3}
    high = {"mean": 0.93, "std": 0.01, "n": 3}
    assert at_chance(low) and not at_chance(high) and not at_chance(None)
    assert point_cell(low, chance=True).endswith("**chance**") and point_cell(high) == "0.930 ± 0.010 (n=3)"
    assert point_cell(low, compact=True, with_n=False, chance=True) == "0.55±0.02 chance"


@pytest.mark.usefixtures("one_torch_thread")
def test_scratch_and_compare_flag_a_model_that_learned_nothing(tmp_path):
    """Three validation images cannot show that a model beats chance: the summary, report.md and compare say so."""
    data = make_folder(tmp_path / "data", classes=("a", "b", "c"), n_per_class=6, size=24, splits=None)
    r = runner.invoke(app, ["scratch", str(data), "--arch", "lenet5", "--epochs", "1", "--image-size", "16",
                            "--workers", "0", "--device", "cpu", "--runs-dir", str(tmp_path / "runs")])
    assert r.exit_code == 0, r.output
    out = _flat(r.stdout)
    assert "1 epoch in" in out and "1 epochs" not in out  # issue 24.9
    assert "val: majority-class rate" in out and "not clearly above the majority-class rate" in out
    report = (tmp_path / "runs" / "scratch" / "exp" / "report.md").read_text()
    assert "val majority-class rate" in report and "**at chance level" in report
    r = runner.invoke(app, ["compare", str(data), "--skip-heads", "--skip-finetune", "--arch", "lenet5",
                            "--scratch-epochs", "1", "--workers", "0", "--device", "cpu",
                            "--runs-dir", str(tmp_path / "runs")])
    assert r.exit_code == 0, r.output
    assert "chance" in r.stdout and "majority-class rate" in r.stdout
    assert "scratch:lenet5: at chance level" in _flat(r.stderr if hasattr(r, "stderr") else r.output)
    md = (tmp_path / "runs" / "compare" / "exp" / "report.md").read_text()
    assert "**chance**" in md and "## Notes" in md
