"""fit_head on small real features (sklearn digits): every head kind, validation rules, CV search, torch heads,
calibration, and the outputs it claims."""
from __future__ import annotations

import logging
import os

import numpy as np
import pytest

from featx.errors import ArtifactError, DataError, UsageError
from featx.features.store import FeatureSet
from featx.heads import HEADS, fit_head, load_head

META = {"backbone": "efficientnet_lite0", "weights_sha256": "ab" * 32, "weights_source": "test",
        "preprocess": {"input_size": 8, "resize": 8}, "layer": "pooled", "feature_dim": 64,
        "versions": {"torch": "x"}}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny fits on a shared 2-core box: OpenMP/BLAS threads spinning against other processes make them ~50x slower
    (torch's own pool too: an mlp fit on 560 digits took 35 s with 2 threads, 1.9 s with 1)."""
    import torch
    from threadpoolctl import threadpool_limits

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(old)


def digits(n=None, splits=False, seed=0, meta=META) -> FeatureSet:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    if n is not None:
        X, y = X[:n], y[:n]
    labels = np.array([f"digit{v}" for v in y])
    sp = None
    if splits:
        rng = np.random.default_rng(seed)
        sp = rng.choice(["train", "val", "test"], size=len(X), p=[0.6, 0.2, 0.2])
    return FeatureSet(X, [f"img/{i}.png" for i in range(len(X))], labels=labels, splits=sp,
                      classes=sorted(set(labels)), meta=dict(meta))


@pytest.fixture(scope="module")
def small():
    return digits(n=700)


# Short grids per kind keep the CV cheap; they still bracket the best values on digits.
GRIDS = {"logistic": [0.01, 0.1, 1.0], "svm": [0.001, 0.01, 0.1], "svm-rbf": [1.0, 10.0], "linear": [1.0, 10.0, 100.0],
         "knn": [1, 3, 5], "mlp": [(32, 0.5, 1e-2)]}


@pytest.mark.parametrize("kind", HEADS)
def test_every_head_kind_fits_and_scores_on_held_out_rows(kind, small):
    res = fit_head(small, kind, cv=3, grid=GRIDS[kind])
    assert res.head.kind == kind
    assert res.validation.startswith("a stratified 20% hold-out")
    val = res.scores["val"]
    assert val["n"] == 140 and res.training["n"] == 560  # 20% of 700 held out, never trained on
    assert val["accuracy"] > 0.85, val
    assert set(res.head.classes) == set(small.labels.tolist())
    # CV reported with mean and std over 3 folds; the chosen value is one of the grid values
    assert res.cv["folds"] == 3 and res.cv["best"] in res.cv["grid"]
    assert 0.5 < res.cv["mean"] <= 1.0 and res.cv["std"] >= 0.0
    # scores agree with predict, in class-name order; kinds say which scores they give
    scores, kind_of = res.head.predict_scores(small.features[:50])
    assert scores.shape == (50, 10)
    assert kind_of == ("probability" if kind in ("logistic", "knn", "mlp") else "decision")
    pred = res.head.predict(small.subset(np.arange(50)))
    assert pred.dtype.kind == "U"
    np.testing.assert_array_equal(np.asarray(res.head.classes)[scores.argmax(1)], pred)
    d = res.to_dict()
    assert set(d["scores"]["val"]) == {"accuracy", "balanced_accuracy", "macro_f1", "n",
            "majority_rate", "beats_chance"}


def test_splits_train_on_train_and_report_val_and_test():
    fs = digits(n=900, splits=True)
    res = fit_head(fs, "logistic", C=0.1, cv=3)
    assert set(res.scores) == {"val", "test"}
    assert res.training["n"] == int((fs.splits == "train").sum())
    assert res.scores["val"]["n"] == int((fs.splits == "val").sum())
    assert res.scores["test"]["n"] == int((fs.splits == "test").sum())
    assert res.validation == "the features' 'val' split"
    assert res.cv["fixed"] and res.cv["grid"] == [0.1] and res.head.meta["params"] == {"C": 0.1}
    assert res.scores["val"]["accuracy"] > 0.9


def test_train_only_splits_carve_a_validation_set_from_train():
    fs = digits(n=500)
    fs.splits = np.array(["train"] * 400 + ["test"] * 100)
    res = fit_head(fs, "linear", cv=0)
    assert set(res.scores) == {"val", "test"}
    assert res.scores["val"]["n"] == 80 and res.training["n"] == 320


def test_hold_out_is_stratified_and_seeded(small):
    a = fit_head(small, "knn", k=3, cv=0, seed=1)
    b = fit_head(small, "knn", k=3, cv=0, seed=1)
    c = fit_head(small, "knn", k=3, cv=0, seed=2)
    assert a.scores["val"]["confusion"] == b.scores["val"]["confusion"]
    assert a.scores["val"]["confusion"] != c.scores["val"]["confusion"]
    supports = [r["support"] for r in a.scores["val"]["per_class"].values()]
    assert min(supports) >= 12 and max(supports) <= 16  # ~14 per class: stratified, not random


def test_explicit_val_features_and_provenance_check():
    fs = digits()
    train, val = fs.subset(np.arange(0, 1200)), fs.subset(np.arange(1200, 1797))
    res = fit_head(train, "svm", C=0.01, cv=0, val=val)
    assert res.scores["val"]["n"] == 597 and res.training["n"] == 1200
    other = FeatureSet(val.features, val.paths, labels=val.labels, meta={**META, "backbone": "timm/resnet18"})
    with pytest.raises(ArtifactError, match="timm/resnet18"):
        fit_head(train, "svm", C=0.01, cv=0, val=other)


def test_unlabeled_single_class_and_tiny_classes_are_data_errors(small):
    unlabeled = FeatureSet(small.features, small.paths, meta=META)
    with pytest.raises(DataError, match="no labels"):
        fit_head(unlabeled)
    one = small.subset(small.labels == "digit3")
    with pytest.raises(DataError, match="single class"):
        fit_head(one, cv=0)
    lonely = small.subset(np.r_[np.flatnonzero(small.labels != "digit7"), np.flatnonzero(small.labels == "digit7")[:1]])
    with pytest.raises(DataError, match="digit7"):
        fit_head(lonely, cv=3)


def test_class_too_small_for_k_folds_lowers_k(small, caplog):
    keep = np.r_[np.flatnonzero(small.labels != "digit5"), np.flatnonzero(small.labels == "digit5")[:3]]
    fs = small.subset(keep)
    fs.splits = np.array(["train"] * len(fs))
    fs.splits[np.flatnonzero(fs.labels == "digit1")[:10]] = "val"
    with caplog.at_level(logging.WARNING, logger="featx"):
        res = fit_head(fs, "linear", cv=5, grid=[10.0])
    assert res.cv["folds"] == 3  # digit5 has 3 training rows
    assert "3-fold instead of 5-fold" in caplog.text


def test_bad_options_are_usage_errors(small):
    with pytest.raises(UsageError, match="did you mean 'svm'"):
        fit_head(small, "svn")
    with pytest.raises(UsageError, match="--k"):
        fit_head(small, "knn", C=1.0)
    with pytest.raises(UsageError, match="knn"):
        fit_head(small, "logistic", k=3)
    with pytest.raises(UsageError, match="val-split"):
        fit_head(small, val_split=1.5)
    with pytest.raises(UsageError, match="balanced"):
        fit_head(small, class_weight="heavy")
    with pytest.raises(UsageError):
        fit_head(small, backend="torch", head="linear")  # torch solvers exist for logistic, svm and mlp only


def test_grid_widens_when_the_best_value_is_at_an_edge(small):
    # ridge on digits wants alpha ~ 10-100: a grid of far too weak values must grow upwards
    res = fit_head(small, "linear", cv=3, grid=[0.001, 0.01])
    assert res.cv["widened"] >= 1
    assert max(res.cv["grid"]) > 0.01 and res.cv["best"] > 0.01
    means = {r["value"]: r["mean"] for r in res.cv["per_value"]}
    assert means[res.cv["best"]] == max(means.values()) and means[res.cv["best"]] > means[0.001]
    # knn: k=1 is a floor, never reported as an edge to widen past
    knn = fit_head(small, "knn", cv=3, grid=[1, 3])
    assert knn.cv["best"] != 1 or not knn.cv["at_edge"]


def test_class_weight_balanced_reaches_the_estimator_and_the_metric(small):
    keep = np.r_[np.flatnonzero(small.labels != "digit0"), np.flatnonzero(small.labels == "digit0")[:12]]
    res = fit_head(small.subset(keep), "svm", class_weight="balanced", cv=3, grid=[0.01])
    assert res.head.pipeline[-1].class_weight == "balanced"
    assert res.cv["metric"] == "balanced_accuracy"
    assert res.head.meta["class_weight"] == "balanced"


def test_cv_off_uses_the_default_value(small):
    res = fit_head(small, "svm-rbf", cv=0)
    assert res.cv is None and res.head.meta["params"] == {"C": 1.0}


def test_training_accuracy_is_labelled_not_a_score(small):
    res = fit_head(small, "knn", k=1, cv=0)
    d = res.to_dict()
    assert d["training"]["training_data_accuracy"] == 1.0  # 1-NN memorises: exactly why it is not a score
    assert "train" not in d["scores"] and d["scores"]["val"]["accuracy"] < 1.0


def test_nothing_is_written_without_output(small, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = fit_head(small, "linear", cv=0)
    assert res.path is None and res.report_path is None
    assert list(tmp_path.iterdir()) == []


def test_output_never_replaces_a_file_that_is_not_a_head(small, tmp_path):
    data = tmp_path / "features.npz"
    small.save(data)
    before = data.read_bytes()
    with pytest.raises(UsageError, match="refusing to overwrite"):
        fit_head(small, "linear", cv=0, output=data)
    assert data.read_bytes() == before
    res = fit_head(small, "linear", cv=0, output=tmp_path / "h.skops")
    fit_head(small, "knn", k=1, cv=0, output=res.path)  # an existing head is simply replaced
    assert load_head(res.path).kind == "knn"


def test_report_files_beside_the_head(small, tmp_path):
    import json

    res = fit_head(small, "logistic", C=0.1, cv=0, output=tmp_path / "h.skops")
    assert res.path == tmp_path / "h.skops" and res.path.is_file()
    rep = json.loads((tmp_path / "h.report.json").read_text())
    assert rep["head"] == "logistic" and rep["metrics"]["val"]["confusion"]
    assert rep["metrics"]["val"]["per_class"]["digit0"]["support"] > 0
    assert (tmp_path / "h.confusion-val.png").read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in tmp_path.iterdir() if ".featx-tmp-" in p.name]


def test_all_heads_sorted_by_validation_and_each_saved(tmp_path):
    fs = digits(n=500)
    res = fit_head(fs, "all", cv=0, output=tmp_path / "best.skops")
    assert [r.kind for r in res.results] and sorted(r.kind for r in res.results) == sorted(HEADS)
    accs = [res.selection["scores"][r.kind] for r in res.results]  # issue 24.3: chosen on half of val
    assert accs == sorted(accs, reverse=True)
    assert res.kind == res.results[0].kind and res.path == tmp_path / "best.skops"
    for kind in HEADS:
        assert load_head(tmp_path / f"best-{kind}.skops").kind == kind
    assert load_head(tmp_path / "best.skops").kind == res.kind
    assert (tmp_path / "best.comparison.png").is_file()
    assert [r["head"] for r in res.to_dict()["results"]] == [r.kind for r in res.results]


# --------------------------------------------------------------------------------------------- torch head


@pytest.fixture
def torch_one_thread():
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _sk_vs_torch(fs, C):
    sk = fit_head(fs, "logistic", C=C, cv=0, backend="sklearn")
    th = fit_head(fs, "logistic", C=C, cv=0, backend="torch", device="cpu")
    return sk, th


def test_torch_logistic_matches_sklearn_on_cpu(tmp_path, torch_one_thread):
    from sklearn.linear_model import LogisticRegression

    sk, th = _sk_vs_torch(digits(), C=0.1)
    assert th.training["backend"] == "torch" and sk.training["backend"] == "sklearn"
    assert abs(sk.scores["val"]["accuracy"] - th.scores["val"]["accuracy"]) <= 0.005
    # same objective -> (nearly) the same solution, not just the same accuracy
    np.testing.assert_allclose(th.head.pipeline[-1].coef_, sk.head.pipeline[-1].coef_, atol=0.02)
    # stored as an ordinary sklearn pipeline, loadable and usable without torch
    assert type(th.head.pipeline[-1]) is LogisticRegression
    th.head.save(tmp_path / "t.skops")
    loaded = load_head(tmp_path / "t.skops")
    X = digits().features[:100]
    np.testing.assert_allclose(loaded.pipeline.predict_proba(X), th.head.pipeline.predict_proba(X))
    assert loaded.meta["backend"] == "torch"


def test_torch_logistic_two_classes_and_class_weight(torch_one_thread):
    fs = digits()
    two = fs.subset(np.isin(fs.labels, ["digit1", "digit7"]))
    sk, th = _sk_vs_torch(two, C=0.05)
    assert th.head.pipeline[-1].coef_.shape == (1, 64)  # sklearn's binary layout
    np.testing.assert_allclose(th.head.pipeline[-1].coef_, sk.head.pipeline[-1].coef_, atol=0.02)
    wt = fit_head(two, "logistic", C=0.05, cv=0, backend="torch", class_weight="balanced")
    ws = fit_head(two, "logistic", C=0.05, cv=0, class_weight="balanced")
    np.testing.assert_allclose(wt.head.pipeline[-1].coef_, ws.head.pipeline[-1].coef_, atol=0.02)


def test_torch_backend_cv_search_runs(small, torch_one_thread):
    res = fit_head(small.subset(np.arange(300)), "logistic", cv=2, grid=[0.1, 1.0], backend="torch", device="cpu")
    assert res.cv["folds"] == 2 and len(res.cv["per_value"]) >= 2
    assert res.cv["best"] in res.cv["grid"] and res.scores["val"]["accuracy"] > 0.85


def test_cuda_request_without_cuda_is_a_usage_error(small):
    import torch

    if torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES") != "":
        pytest.skip("CUDA present")
    with pytest.raises(UsageError, match="CUDA"):
        fit_head(small, "logistic", device="cuda")


@pytest.mark.gpu
def test_gpu_logistic_head_matches_sklearn():
    sk = fit_head(digits(), "logistic", C=0.1, cv=0)
    gpu = fit_head(digits(), "logistic", C=0.1, cv=0, device="cuda")
    assert gpu.training["device"].startswith("cuda")
    assert abs(sk.scores["val"]["accuracy"] - gpu.scores["val"]["accuracy"]) <= 0.005


def test_unlabeled_rows_of_a_labelled_store_are_left_out():
    """A flat test/ beside train/CLASS/ gives rows with label "": they must not be scored as a class."""
    from sklearn.datasets import load_digits

    from featx.features.store import FeatureSet
    from featx.heads import fit_head

    X, y = load_digits(n_class=3, return_X_y=True)
    labels = np.array([f"d{v}" for v in y], dtype=object)
    splits = np.array(["train"] * len(y), dtype=object)
    splits[::4] = "val"
    splits[1::8] = "test"
    labels[splits == "test"] = ""
    fs = FeatureSet(features=X, paths=[f"{i}.png" for i in range(len(y))], labels=labels, splits=splits,
                    classes=["d0", "d1", "d2"], meta={"backbone": "digits"})
    res = fit_head(fs, head="logistic", C=1.0, cv=0)
    assert set(res.head.classes) == {"d0", "d1", "d2"}
    assert "test" not in res.scores and res.scores["val"]["n"] == int((splits == "val").sum())


# --------------------------------------------------------------------------------------------- issues 11-13


def test_nan_or_inf_rows_are_refused_with_a_count_and_paths(small):
    """A NaN row used to crash inside scikit-learn with a traceback (issue 11)."""
    fs = small.subset(np.arange(200))
    fs.features[[5, 17], 3] = np.nan
    fs.features[40, 0] = np.inf
    with pytest.raises(DataError, match=r"3 of 200 rows of the features hold NaN or Inf values \(img/5.png, "
                                        r"img/17.png, img/40.png\)"):
        fit_head(fs, "logistic", C=1.0, cv=0)
    good = digits(n=100)
    with pytest.raises(DataError, match="validation features"):
        fit_head(good, "logistic", C=1.0, cv=0, val=fs)


def test_jobs_zero_and_head_names_in_any_case(small):
    with pytest.raises(UsageError, match="--jobs"):
        fit_head(small, "knn", k=3, cv=3, n_jobs=0)
    res = fit_head(small.subset(np.arange(300)), "SVM", C=0.01, cv=0)
    assert res.kind == "svm"


def test_hold_out_is_featx_data_split_the_same_images_as_finetune():
    """fit's validation rows are exactly plan_split's (which finetune and scratch use), keyed on the paths."""
    from featx.data.split import plan_split

    fs = digits(n=600)
    fs.paths = [f"train/{lab}/{i}.png" for i, lab in enumerate(fs.labels)]
    res = fit_head(fs, "linear", cv=0, seed=3, val_split=0.25)
    sp = plan_split(fs.paths, fs.labels.tolist(), None, val_fraction=0.25, seed=3)
    assert res.scores["val"]["n"] == len(sp.val) and res.training["n"] == len(sp.train)
    val_paths = {fs.paths[i] for i in sp.val}
    # a store missing some other image keeps every other image on its side (not so with train_test_split)
    fewer = fs.subset(np.arange(1, 600))
    sp2 = plan_split(fewer.paths, fewer.labels.tolist(), None, val_fraction=0.25, seed=3)
    assert {fewer.paths[i] for i in sp2.val} == val_paths - {fs.paths[0]}
    # the validation rows really are those paths: refit on them alone gives the reported confusion matrix
    val = fs.subset(sp.val)
    assert res.scores["val"]["confusion"] == _confusion(res.head, val)


def _confusion(head, fs):
    from featx.report import classification_metrics

    return classification_metrics(fs.labels, head.predict(fs), head.classes)["confusion"]


def test_train_and_test_without_val_select_on_train_and_score_test_once():
    fs = digits(n=500)
    fs.splits = np.array(["train"] * 400 + ["test"] * 100)
    fs.paths = [f"{sp}/{lab}/{i}.png" for i, (sp, lab) in enumerate(zip(fs.splits, fs.labels))]
    res = fit_head(fs, "all", cv=0)
    assert res.validation.startswith("a stratified 20% hold-out of 'train'")
    assert res.scores["test"]["n"] == 100 and res.selection_split == "val"
    assert res.scores["val"]["n"] + res.training["n"] == 400


def test_grid_search_scores_match_a_plain_fit_and_score_loop(small):
    """GridSearchCV replaced the hand-written fold loop: same folds, same per-value scores."""
    from sklearn.base import clone
    from sklearn.model_selection import StratifiedKFold

    from featx.heads.pipelines import make_estimator

    res = fit_head(small, "linear", cv=4, seed=5, grid=[1.0, 10.0, 100.0])
    X, y = res_train(small, seed=5)
    for row in res.cv["per_value"]:
        est = make_estimator("linear", row["value"])
        scores = [clone(est).fit(X[tr], y[tr]).score(X[te], y[te])
                  for tr, te in StratifiedKFold(4, shuffle=True, random_state=5).split(X, y)]
        assert row["mean"] == pytest.approx(np.mean(scores), abs=1e-12)
        assert row["std"] == pytest.approx(np.std(scores), abs=1e-12)


def res_train(fs, seed):
    from featx.data.split import plan_split

    sp = plan_split(fs.paths, fs.labels.tolist(), None, val_fraction=0.2, seed=seed)
    return fs.features[sp.train], fs.labels[sp.train]


# --------------------------------------------------------------------------------------------- torch svm


@pytest.mark.parametrize("classes, class_weight", [(["digit1", "digit7"], None), (["digit1", "digit7"], "balanced"),
                                                   (None, None), (None, "balanced")])
def test_torch_svm_reaches_linearsvc_optimum(classes, class_weight):
    """Same objective as LinearSVC (squared hinge, penalised intercept, liblinear's class weights)."""
    from sklearn.svm import LinearSVC

    fs = digits(n=600)
    if classes:
        fs = fs.subset(np.isin(fs.labels, classes))
        keep = np.r_[np.flatnonzero(fs.labels == classes[0])[:20], np.flatnonzero(fs.labels != classes[0])]
        fs = fs.subset(keep)  # imbalanced, so class weights matter
    res = fit_head(fs, "svm", C=0.05, cv=0, class_weight=class_weight, backend="torch")
    assert res.training["backend"] == "torch"
    scaler, svc = res.head.pipeline[0], res.head.pipeline[-1]
    assert type(svc) is LinearSVC
    X, y = res_train(fs, seed=0)
    ref = LinearSVC(C=0.05, class_weight=class_weight, dual=False, tol=1e-8, max_iter=100_000)
    ref.fit(scaler.transform(X), y)
    np.testing.assert_allclose(svc.coef_, ref.coef_, atol=2e-3)
    np.testing.assert_allclose(svc.intercept_, ref.intercept_, atol=2e-3)
    liblinear = fit_head(fs, "svm", C=0.05, cv=0, class_weight=class_weight, backend="sklearn")
    assert liblinear.training["backend"] == "sklearn"
    assert abs(liblinear.scores["val"]["accuracy"] - res.scores["val"]["accuracy"]) <= 0.01


# --------------------------------------------------------------------------------------------- mlp


@pytest.fixture(scope="module")
def mlp_fit():
    fs = digits(n=500)
    return fs, fit_head(fs, "mlp", cv=0, seed=1)


def test_mlp_is_seeded_deterministic_and_saved_as_plain_sklearn(mlp_fit, tmp_path):
    from sklearn.neural_network import MLPClassifier

    fs, res = mlp_fit
    again = fit_head(fs, "mlp", cv=0, seed=1)
    for a, b in zip(res.head.pipeline[-1].coefs_, again.head.pipeline[-1].coefs_):
        np.testing.assert_array_equal(a, b)  # same seed, same rows, same threads: identical weights on the CPU
    assert res.scores["val"]["accuracy"] > 0.85
    assert type(res.head.pipeline[-1]) is MLPClassifier and res.head.meta["params"] == {
        "hidden": 128, "dropout": 0.5, "weight_decay": 0.01}
    res.head.save(tmp_path / "m.skops")
    loaded = load_head(tmp_path / "m.skops")
    np.testing.assert_allclose(loaded.predict_scores(fs.features)[0], res.head.predict_scores(fs.features)[0])
    assert loaded.score_kind == "probability"


def test_mlp_saved_form_folds_from_the_documented_attributes(mlp_fit):
    """scale.mean_/scale_, coefs_[0]/intercepts_[0], relu, coefs_[1]/intercepts_[1], softmax: what an exporter reads."""
    from scipy.special import softmax

    fs, res = mlp_fit
    scale, clf = res.head.pipeline.named_steps["scale"], res.head.pipeline.named_steps["clf"]
    x = (fs.features[:40] - scale.mean_) / scale.scale_
    h = np.maximum(x @ clf.coefs_[0] + clf.intercepts_[0], 0)
    p = softmax(h @ clf.coefs_[1] + clf.intercepts_[1], axis=1)
    assert clf.activation == "relu" and clf.out_activation_ == "softmax"
    np.testing.assert_allclose(p, res.head.predict_scores(fs.features[:40])[0], atol=1e-6)


def test_mlp_two_classes_store_the_logit_difference():
    from featx.heads.mlp import TorchMLPClassifier

    fs = digits(n=400)
    two = fs.subset(np.isin(fs.labels, ["digit3", "digit8"]))
    est = TorchMLPClassifier(hidden=16, max_epochs=20, seed=0).fit(two.features, two.labels)
    pipe = est.to_sklearn_pipeline()
    assert pipe[-1].out_activation_ == "logistic" and pipe[-1].coefs_[1].shape == (16, 1)
    np.testing.assert_allclose(pipe.predict_proba(two.features), est.predict_proba(two.features), atol=1e-10)
    np.testing.assert_array_equal(pipe.predict(two.features), est.predict(two.features))


def test_mlp_grid_search_and_bad_options(small):
    res = fit_head(small.subset(np.arange(300)), "mlp", cv=2, grid=[(16, 0.5, 0.1), (32, 0.25, 1e-3)])
    assert res.cv["param"] == "hidden/dropout/weight_decay" and res.cv["grid"] == ["16/0.5/0.1", "32/0.25/0.001"]
    assert res.cv["best"] in res.cv["grid"] and not res.cv["widened"]
    with pytest.raises(UsageError, match="--C does not apply to the mlp"):
        fit_head(small, "mlp", C=1.0)
    with pytest.raises(UsageError, match="torch"):
        fit_head(small, "mlp", backend="sklearn")


# --------------------------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("kind", ["svm", "logistic", "knn", "mlp"])
def test_calibrated_probabilities_are_sklearns_temperature_scaling(kind):
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.frozen import FrozenEstimator

    fs = digits(n=500)
    fixed = {"svm": {"C": 0.01}, "logistic": {"C": 1.0}, "knn": {"k": 5}, "mlp": {}}[kind]
    res = fit_head(fs, kind, cv=0, calibrate=True, **fixed)
    cal = res.head.calibration
    assert cal["method"] == "temperature" and cal["temperature"] > 0 and res.head.score_kind == "probability"
    X, y = fs.features, fs.labels
    from featx.data.split import plan_split

    sp = plan_split(fs.paths, y.tolist(), None)
    ref = CalibratedClassifierCV(FrozenEstimator(res.head.pipeline), method="temperature", ensemble=False)
    ref.fit(X[sp.val], y[sp.val])
    probs, kind_of = res.head.predict_scores(X[:60])
    assert kind_of == "probability"
    np.testing.assert_allclose(probs, ref.predict_proba(X[:60]), atol=1e-6)
    # one temperature never changes a prediction
    np.testing.assert_array_equal(np.asarray(res.head.classes)[probs.argmax(1)], res.head.pipeline.predict(X[:60]))
    ece = cal["ece"]["val"]  # "after" on val is cross-fitted (issue 22.4); the in-sample ECE is labelled as such
    assert ece["after_in_sample"] <= ece["before"] + 1e-9 and 0 <= ece["after"] <= 1


def test_calibrate_works_on_a_validation_split_of_a_few_images_per_class():
    """sklearn's default 5-fold cv inside the calibrator needed >= 5 validation rows of every class (a raw
    ValueError on small folders); the head is frozen, so the temperature is fitted on all rows at once. At featx's
    own minimum (issue 22.4: MIN_ROWS_PER_CLASS validation rows a class) it works, its val ECE cross-fitted."""
    from featx.heads.calibration import MIN_ROWS_PER_CLASS

    fs = digits(n=300)
    classes = sorted(set(fs.labels.tolist()))
    val = np.zeros(len(fs), dtype=bool)
    for c in classes:
        val[np.flatnonzero(fs.labels == c)[:MIN_ROWS_PER_CLASS]] = True
    fs.splits = np.where(val, "val", "train")
    res = fit_head(fs, "logistic", C=0.001, cv=0, calibrate=True)  # weak enough to make a mistake on val
    assert res.head.calibration["temperature"] > 0 and res.scores["val"]["n"] == MIN_ROWS_PER_CLASS * len(classes)
    assert res.head.calibration["ece"]["val"]["after_in_sample"] is not None


def test_calibrated_svm_head_round_trips_as_format_2(tmp_path):
    fs = digits(n=400)
    res = fit_head(fs, "svm", C=0.01, cv=0, calibrate=True, output=tmp_path / "h.skops")
    import json

    rep = json.loads((tmp_path / "h.report.json").read_text())
    assert rep["calibration"]["splits"]["val"]["before"]["bins"] and rep["score_kind"] == "probability"
    assert (tmp_path / "h.reliability-val.png").read_bytes()[:4] == b"\x89PNG"
    loaded = load_head(res.path)
    assert loaded.meta["format_version"] == 2 and loaded.score_kind == "probability"
    p, _ = loaded.predict_scores(fs.features[:20])
    np.testing.assert_allclose(p.sum(1), 1.0)
    plain = fit_head(fs, "svm", C=0.01, cv=0, output=tmp_path / "p.skops")
    assert load_head(plain.path).meta["format_version"] == 1  # older featx versions still read plain heads


# --------------------------------------------------------------------------------------------- outputs


def test_report_files_featx_did_not_write_are_refused_before_any_work(small, tmp_path, monkeypatch):
    """fit used to replace a user's h.report.json / h.confusion-val.png (issue 11.2)."""
    import featx.heads.fit as fit_mod

    mine = tmp_path / "h.confusion-val.png"
    mine.write_bytes(b"\x89PNG my own picture")
    monkeypatch.setattr(fit_mod, "_fit_one", lambda *a, **k: pytest.fail("fitting started"))
    with pytest.raises(UsageError, match="h.confusion-val.png exists and was not written by featx"):
        fit_head(small, "linear", cv=0, output=tmp_path / "h.skops")
    assert mine.read_bytes() == b"\x89PNG my own picture" and not (tmp_path / "h.skops").exists()
    monkeypatch.undo()
    (tmp_path / "b-knn.report.json").write_text('{"mine": true}')
    with pytest.raises(UsageError, match="b-knn.report.json"):
        fit_head(small, "all", cv=0, output=tmp_path / "b.skops")
    res = fit_head(small, "linear", cv=0, output=tmp_path / "h.skops", overwrite=True)
    assert res.path.is_file() and mine.read_bytes()[:4] == b"\x89PNG" and b"my own" not in mine.read_bytes()


def test_a_second_fit_on_the_same_head_is_refused_naming_the_first(small, tmp_path):
    from featx._io import OutputLock
    from featx.errors import OutputError

    with OutputLock(tmp_path / "h.skops"):
        with pytest.raises(OutputError, match="being written by another featx run"):
            fit_head(small, "linear", cv=0, output=tmp_path / "h.skops")
    assert not (tmp_path / "h.skops").exists()


def test_svm_rbf_on_a_precomputed_kernel_is_the_direct_fit(small):
    """The fast path (libsvm on a precomputed kernel) stores the very model a direct SVC(rbf) fit gives."""
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    res = fit_head(small, "svm-rbf", C=10.0, cv=0)
    assert res.training["backend"] == "precomputed" and type(res.head.pipeline[-1]) is SVC
    X, y = res_train(small, seed=0)
    direct = Pipeline([("scale", StandardScaler()), ("clf", SVC(C=10.0, kernel="rbf", gamma="scale"))]).fit(X, y)
    # equal up to libsvm's tolerance (1e-3): the kernel is built from float64 standardised rows, the direct fit's
    # from float32 ones (on float64 data the two agree exactly)
    np.testing.assert_allclose(res.head.pipeline.decision_function(small.features),
                               direct.decision_function(small.features), atol=1e-3)
    np.testing.assert_array_equal(res.head.pipeline.predict(small.features), direct.predict(small.features))
    plain = fit_head(small, "svm-rbf", C=10.0, cv=0, backend="sklearn")
    assert plain.training["backend"] == "sklearn"
    assert plain.scores["val"]["confusion"] == res.scores["val"]["confusion"]


@pytest.mark.gpu
def test_gpu_svm_and_mlp_heads_match_the_cpu():
    fs = digits(n=900)
    for kind, kw in (("svm", {"C": 0.01, "backend": "torch"}), ("mlp", {})):
        cpu = fit_head(fs, kind, cv=0, device="cpu", **kw)
        gpu = fit_head(fs, kind, cv=0, device="cuda", **kw)
        assert gpu.training["device"].startswith("cuda") and gpu.training["backend"] == "torch"
        assert abs(cpu.scores["val"]["accuracy"] - gpu.scores["val"]["accuracy"]) <= 0.02, kind


@pytest.mark.parametrize("kind", ["logistic", "svm", "linear", "svm-rbf", "mlp"])
def test_few_training_rows_per_class_are_centred_not_scaled_per_feature(kind):
    """A per-feature std from a few rows is noise (benchmarks/bench_fewshot_scaling.py): below FEW_ROWS training rows
    in the smallest class the head centres only; the saved pipeline says so and the report names it."""
    from featx.heads.fit import FEW_ROWS

    fs = digits(n=1000)
    fixed = {"mlp": {}}.get(kind, {"C": 1.0})
    keep = np.zeros(len(fs), dtype=bool)
    for c in sorted(set(fs.labels.tolist())):
        keep[np.flatnonzero(fs.labels == c)[:12]] = True  # ~9-10 training rows per class after the hold-out
    few = fit_head(fs.subset(keep), kind, cv=0, **fixed)
    scaler = few.head.pipeline.steps[0][1]
    assert scaler.with_std is False and few.head.meta["training"]["scaling"].startswith("centred")
    assert few.training["n"] < 10 * FEW_ROWS
    many = fit_head(fs, kind, cv=0, **fixed)
    assert many.head.pipeline.steps[0][1].with_std is True and many.head.meta["training"]["scaling"] == "standardised"
