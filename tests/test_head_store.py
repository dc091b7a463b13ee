"""The head file: skops round trip, refusal of pickles and unexpected types (no code runs), provenance and version checks."""
from __future__ import annotations

import json
import logging
import pickle
import zipfile

import numpy as np
import pytest

from featx.errors import ArtifactError, DataError, StrictModeError
from featx.features.store import FeatureSet
from featx.heads import DEFAULT_HEAD_PATH, Head, fit_head, load_head, save_head
from featx.heads.store import TRUSTED_TYPES

META = {"backbone": "efficientnet_lite0", "weights_sha256": "e1" * 32, "weights_source": "package",
        "preprocess": {"input_size": 224, "resize": 256, "mean": [0.5] * 3, "std": [0.5] * 3}, "layer": "pooled",
        "feature_dim": 64, "versions": {"torch": "2.x", "pillow": "13"}}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny fits on a shared 2-core box: OpenMP/BLAS threads spinning against other processes make them ~50x slower
    (torch's pool too, for the mlp head)."""
    import torch
    from threadpoolctl import threadpool_limits

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(old)


def features(meta=META, n=400) -> FeatureSet:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    labels = np.array([f"c{v}" for v in y[:n]])
    return FeatureSet(X[:n], [f"{i}.png" for i in range(n)], labels=labels, classes=sorted(set(labels)),
                      meta=dict(meta))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    path = tmp_path_factory.mktemp("head") / "head.skops"
    res = fit_head(features(), "logistic", C=0.1, cv=0)
    res.head.save(path)  # the head file alone (fit_head's reports are tested in test_heads.py)
    return res, path


def test_default_path():
    assert str(DEFAULT_HEAD_PATH) == "featx-out/head.skops"


def test_round_trip_keeps_pipeline_and_self_description(fitted):
    res, path = fitted
    raw = path.read_bytes()
    assert raw[:2] == b"PK" and zipfile.is_zipfile(path)  # a skops zip, not a pickle
    head = load_head(path)
    fs = features()
    np.testing.assert_array_equal(head.predict(fs), res.head.predict(fs))
    np.testing.assert_allclose(head.predict_scores(fs.features)[0], res.head.predict_scores(fs.features)[0])
    assert head.classes == [f"c{i}" for i in range(10)] and head.kind == "logistic"
    m = head.meta
    assert m["format"] == "featx.head" and m["params"] == {"C": 0.1} and m["classes"] == head.classes
    assert set(m["scores"]["val"]) == {"accuracy", "balanced_accuracy", "macro_f1", "n",
            "majority_rate", "beats_chance"}
    prov = m["features"]
    assert prov["backbone"] == "efficientnet_lite0" and prov["weights_sha256"] == "e1" * 32
    assert prov["preprocess"]["resize"] == 256 and prov["feature_dim"] == 64 and prov["versions"]["pillow"] == "13"
    assert {"featx", "sklearn", "skops", "numpy"} <= set(m["versions"])
    assert head.score_kind == "probability" and head.path == path


def test_a_pickle_renamed_to_skops_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "head.skops"
    bad.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ArtifactError, match="pickles are refused"):
        load_head(bad)
    assert not marker.exists()
    # sanity: the payload would have run had it been unpickled
    pickle.loads(bad.read_bytes()).close()
    assert marker.exists()


def test_other_junk_is_refused(tmp_path):
    txt = tmp_path / "a.skops"
    txt.write_text("hello")
    with pytest.raises(ArtifactError, match="not a featx head file"):
        load_head(txt)
    z = tmp_path / "b.skops"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("readme.txt", "no schema")
    with pytest.raises(ArtifactError, match="skops schema"):
        load_head(z)
    with pytest.raises(ArtifactError, match="does not exist"):
        load_head(tmp_path / "missing.skops")


class Payload:
    """A type no featx head contains; skops would rebuild it through __setstate__ if it were trusted."""

    marker = None

    def __setstate__(self, state):
        open(state["marker"], "w").close()


def test_unexpected_types_are_refused_by_name_and_never_run(tmp_path, fitted):
    import skops.io as sio

    res, _ = fitted
    marker = tmp_path / "pwned"
    p = Payload()
    p.marker = str(marker)
    evil = tmp_path / "evil.skops"
    evil.write_bytes(sio.dumps({"pipeline": res.head.pipeline, "meta": json.dumps({"format": "featx.head"}), "x": p}))
    with pytest.raises(ArtifactError, match="Payload") as exc:
        load_head(evil)
    assert "trusted" in str(exc.value)
    assert not marker.exists()


def test_sklearn_types_outside_the_list_need_explicit_trust(tmp_path, fitted):
    """skops trusts every sklearn estimator by default; featx heads only a handful."""
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.tree import DecisionTreeClassifier

    res, _ = fitted
    fs = features()
    tree = Pipeline([("scale", StandardScaler()), ("clf", DecisionTreeClassifier(max_depth=3, random_state=0))])
    tree.fit(fs.features, fs.labels)
    path = save_head(Head(tree, dict(res.head.meta)), tmp_path / "tree.skops")
    with pytest.raises(ArtifactError, match="DecisionTreeClassifier"):
        load_head(path)
    import skops.io as sio

    extra = [t for t in sio.get_untrusted_types(file=path) if t not in TRUSTED_TYPES]
    extra.append("sklearn.tree._classes.DecisionTreeClassifier")
    head = load_head(path, trusted=extra)
    assert isinstance(head.pipeline[-1], DecisionTreeClassifier)


def test_provenance_mismatch_is_refused_even_with_equal_size(fitted):
    res, path = fitted
    head = load_head(path)
    for change in ({"backbone": "timm/resnet18"}, {"weights_sha256": "00" * 32},
                   {"preprocess": {**META["preprocess"], "resize": 240}}, {"layer": "stage3"}):
        other = features(meta={**META, **change})
        assert other.dim == head.feature_dim
        with pytest.raises(ArtifactError) as exc:
            head.predict(other)
        msg = str(exc.value)
        assert head.fingerprint in msg and other.fingerprint in msg and "efficientnet_lite0" in msg
        assert list(change)[0] in msg
    with pytest.raises(ArtifactError, match="timm/resnet18"):  # both backbones are named
        head.check_compatible({**META, "backbone": "timm/resnet18"})
    head.check_compatible(dict(META))  # identical provenance passes; versions do not matter
    head.check_compatible({**META, "versions": {"torch": "other"}})


def test_feature_size_mismatch_is_refused(fitted):
    _, path = fitted
    head = load_head(path)
    narrow = FeatureSet(np.zeros((3, 32)), ["a", "b", "c"], meta=dict(META))
    with pytest.raises(ArtifactError, match="expects 64 features"):
        head.predict(narrow)


def test_version_drift_warns_and_strict_refuses(tmp_path, fitted, caplog):
    res, _ = fitted
    meta = dict(res.head.meta)
    meta["versions"] = {**meta["versions"], "sklearn": "0.0.1"}
    path = save_head(Head(res.head.pipeline, meta), tmp_path / "old.skops")
    with caplog.at_level(logging.WARNING, logger="featx"):
        head = load_head(path)
    assert "sklearn 0.0.1 ->" in caplog.text and head.kind == "logistic"
    with pytest.raises(StrictModeError, match="sklearn 0.0.1"):
        load_head(path, strict=True)


def test_a_skops_file_that_is_not_a_head_is_refused(tmp_path):
    import skops.io as sio

    p = tmp_path / "plain.skops"
    sio.dump({"a": [1, 2, 3]}, p)
    with pytest.raises(ArtifactError, match="not a featx head"):
        load_head(p)


def test_two_class_decision_scores_have_one_column_per_class(tmp_path):
    fs = features(n=400)
    two = fs.subset(np.isin(fs.labels, ["c0", "c1"]))
    res = fit_head(two, "svm", C=0.01, cv=0, output=tmp_path / "svm.skops")
    head = load_head(res.path)
    scores, kind = head.predict_scores(two.features)
    assert kind == "decision" and scores.shape == (len(two), 2)
    np.testing.assert_array_equal(np.asarray(head.classes)[scores.argmax(1)], head.predict(two))


def test_a_small_file_declaring_a_huge_member_is_refused_without_inflating(tmp_path, fitted, monkeypatch):
    """Issue 11.12: a 1 MB head declaring a 1 GiB member was refused only after 2.75 GB of memory and 22 s."""
    _, path = fitted
    bomb = tmp_path / "bomb.skops"
    bomb.write_bytes(path.read_bytes())
    # ~100 MB of zeros behind one name, deflated to ~100 kB: a real bomb, not just a lying header
    with zipfile.ZipFile(bomb, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open("huge.npy", "w", force_zip64=True) as fh:
            for _ in range(100):
                fh.write(bytes(1 << 20))
    assert bomb.stat().st_size < 1 << 20
    monkeypatch.setattr(zipfile.ZipExtFile, "read", lambda *a, **k: pytest.fail("a member was inflated"))
    with pytest.raises(ArtifactError, match="'huge.npy' declares 104,857,600 bytes"):
        load_head(bomb)


def test_featx_recognises_its_own_head_files(tmp_path, fitted):
    from featx.heads.store import is_head_file

    _, path = fitted
    assert is_head_file(path)
    import skops.io as sio

    sio.dump({"a": 1}, tmp_path / "other.skops")
    (tmp_path / "x.skops").write_bytes(b"PK\x03\x04 not really")
    assert not is_head_file(tmp_path / "other.skops") and not is_head_file(tmp_path / "x.skops")
    assert not is_head_file(tmp_path / "missing.skops")


def test_mlp_heads_load_through_the_trusted_type_check(tmp_path):
    assert "sklearn.neural_network._multilayer_perceptron.MLPClassifier" in TRUSTED_TYPES
    fs = features(n=300)
    res = fit_head(fs, "mlp", cv=0, output=tmp_path / "m.skops")
    head = load_head(res.path)
    assert head.kind == "mlp" and head.score_kind == "probability"
    np.testing.assert_array_equal(head.predict(fs), res.head.predict(fs))


def test_nan_features_are_refused_at_predict(fitted):
    _, path = fitted
    fs = features(n=10)
    fs.features[2, 0] = np.nan
    with pytest.raises(DataError, match=r"1 of 10 rows of the features hold NaN or Inf values \(2.png\)"):
        load_head(path).predict(fs)
