"""Issue 26.3: `fit` on stores larger than memory streams them (featx.heads.large) and refuses the heads that cannot."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import featx
from featx.errors import UsageError
from featx.features.sharded import ShardedStore, ShardWriter
from featx.heads import large

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # many small torch ops: 2 threads on 2 shared cores crawl


def _store(path, n=3000, dim=24, classes=3, shard=500, seed=0, counts=None, dtype="float32"):
    """A sharded store of Gaussian clusters that overlap (accuracy well below 1, so solvers can disagree), 80/20
    train/val by row, ``shard`` rows per shard."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, dim)).astype(np.float32)
    if counts is None:
        y = rng.integers(0, classes, size=n)
    else:
        y = rng.permutation(np.repeat(np.arange(classes), counts))
        n = len(y)
    x = centers[y] * 0.6 + rng.normal(size=(n, dim)).astype(np.float32) + 2.0  # offset: the scaler must centre
    names = [f"c{k}" for k in range(classes)]
    w = ShardWriter(path, dim=dim, classes=names, meta={"backbone": "synthetic", "feature_dim": dim},
                    shard_size=shard, dtype=dtype)
    w.add(x, [f"{names[k]}/{i:06d}.jpg" for i, k in enumerate(y)], [names[k] for k in y],
          np.where(np.arange(n) % 5 == 0, "val", "train"))
    w.close()
    return path


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(large, "CHUNK_ROWS", 400)  # shards of 500 rows: two chunks each, the second shorter


@pytest.mark.parametrize("kind,classes,class_weight", [("logistic", 3, None), ("logistic", 2, "balanced"),
                                                       ("svm", 3, "balanced"), ("svm", 2, None),
                                                       ("linear", 3, "balanced"), ("linear", 2, None)])
def test_streaming_fit_matches_sklearn_on_the_same_split(tmp_path, small_chunks, kind, classes, class_weight):
    counts = [1500, 400, 300][:classes] if class_weight else None
    store = _store(tmp_path / "s", classes=classes, counts=counts)
    kw = dict(head=kind, C=0.5, cv=0, class_weight=class_weight, device="cpu")
    got = featx.fit_head(store, backend="stream", **kw)
    ref = featx.fit_head(store, backend="sklearn", **kw)
    assert got.training["backend"] == "stream" and got.training["passes"] >= (1 if kind == "linear" else 2)
    assert got.training["n"] == ref.training["n"] and got.scores["val"]["n"] == ref.scores["val"]["n"]
    assert abs(got.scores["val"]["accuracy"] - ref.scores["val"]["accuracy"]) <= 0.005
    x = featx.load_features(store).split("val").features
    agree = np.mean(got.head.pipeline.predict(x) == ref.head.pipeline.predict(x))
    assert agree >= 0.99
    a, b = (r.head.pipeline.named_steps["clf"].coef_ for r in (got, ref))
    assert a.shape == b.shape
    # the same objective: ridge exactly (float32 products), logistic to lbfgs' tolerance; the svm against
    # liblinear's dual solver, looser
    assert np.abs(a - b).max() <= {"linear": 1e-4, "logistic": 2e-3, "svm": 2e-2}[kind] * np.abs(b).max()
    if kind == "linear":
        np.testing.assert_allclose(got.head.pipeline.named_steps["clf"].intercept_,
                                   ref.head.pipeline.named_steps["clf"].intercept_, atol=1e-4)
    sa, sb = (r.head.pipeline.named_steps["scale"] for r in (got, ref))
    np.testing.assert_allclose(sa.mean_, sb.mean_, rtol=1e-6)
    np.testing.assert_allclose(sa.scale_, sb.scale_, rtol=1e-5)


def test_auto_streams_above_the_threshold_without_loading_the_store(tmp_path, small_chunks, monkeypatch):
    """The switch is automatic from STREAM_MIN values; no step reads the store whole or holds a copy of it."""
    store = _store(tmp_path / "s", n=6000, dim=512, shard=1000)
    monkeypatch.setattr(large, "STREAM_MIN", 6000 * 512)

    def whole(self):
        raise AssertionError("the streaming path read every row at once")

    monkeypatch.setattr(ShardedStore, "load", whole)
    asked = []
    features = ShardedStore.features
    monkeypatch.setattr(ShardedStore, "features", lambda self, i: asked.append(i) or features(self, i))
    featx.fit_head(store, head="logistic", C=1.0, cv=0, device="cpu")  # imports and first-use caches: not traced
    asked.clear()
    tracemalloc.start()
    try:
        res = featx.fit_head(store, head="logistic", C=1.0, cv=0, device="cpu")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert res.training["backend"] == "stream"
    features_bytes = 6000 * 512 * 4
    # a chunk (400 of the 6,000 rows) and its float64 copies in sklearn's scaler and predict, and per-row data
    # (paths, labels, the split: ~1.5 MB here); one copy of the store would be 12 MB
    assert peak < features_bytes / 3, f"peak {peak:,} bytes of numpy/Python allocations for {features_bytes:,}"
    # each pass maps the shards one after another: passes (+ the scaler's and the scoring pass) x 6 shards
    assert len(asked) == 6 * (res.training["passes"] + 2)


def test_head_file_is_the_ordinary_pipeline_and_predicts(tmp_path, small_chunks):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    store = _store(tmp_path / "s")
    out = tmp_path / "head.skops"
    res = featx.fit_head(store, head="logistic", C=1.0, cv=0, backend="stream", device="cpu", output=out)
    head = featx.load_head(out)
    assert isinstance(head.pipeline, Pipeline)
    assert [type(s) for _, s in head.pipeline.steps] == [StandardScaler, LogisticRegression]
    assert head.meta["backend"] == "stream" and head.classes == ["c0", "c1", "c2"]
    fs = featx.load_features(store)
    val = fs.split("val")
    pred = head.pipeline.predict(val.features)
    assert np.isclose(np.mean(pred == val.labels), res.scores["val"]["accuracy"])
    proba, how = head.predict_scores(val.features)
    assert how == "probability" and proba.shape == (len(val), 3) and np.allclose(proba.sum(axis=1), 1.0, atol=1e-6)
    assert (tmp_path / "head.report.json").is_file() and (tmp_path / "head.confusion-val.png").is_file()


def test_cli_streams_with_backend_stream_and_refuses_what_cannot(tmp_path, small_chunks, monkeypatch):
    from typer.testing import CliRunner

    from featx.cli.app import app

    store = _store(tmp_path / "s")
    runner = CliRunner()
    out = tmp_path / "h.skops"
    r = runner.invoke(app, ["fit", str(store), "--backend", "stream", "--C", "1", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    assert '"backend": "stream"' in r.output and out.is_file()
    # a search of C would pass over every row folds x grid values times: refused, naming what to do
    r = runner.invoke(app, ["fit", str(store), "--backend", "stream", "-o", str(tmp_path / "x.skops")])
    assert r.exit_code == 2 and "--C" in r.output and "--cv 0" in r.output
    res = featx.fit_head(store, head="linear", C=1.0, cv=0, backend="stream")  # ridge: one pass, exact
    assert res.training["backend"] == "stream" and res.training["passes"] == 1
    monkeypatch.setattr(large, "STREAM_MIN", 1000)  # the store (3000 x 24) is now "large"
    for head in ("svm-rbf", "knn", "mlp", "all"):
        r = runner.invoke(app, ["fit", str(store), "--head", head, "-o", str(tmp_path / f"{head}.skops")])
        assert r.exit_code == 2, (head, r.output)
        line = r.output.strip()
        assert line.startswith("Error:") and "\n" not in line and "--head logistic" in line, line
        assert not (tmp_path / f"{head}.skops").exists()
    # naming a backend loads every row as before (the user's call)
    res = featx.fit_head(store, head="knn", k=3, cv=0, backend="sklearn")
    assert res.training["backend"] == "sklearn"


def test_streaming_refusals_come_before_any_work(tmp_path, monkeypatch):
    store = _store(tmp_path / "s", n=400, shard=100)
    monkeypatch.setattr(large, "_fit_scaler", lambda *a, **k: (_ for _ in ()).throw(AssertionError("fitted")))
    for kw in (dict(head="knn", k=3), dict(head="logistic", cv=5), dict(head="logistic", C=1.0, calibrate=True)):
        with pytest.raises(UsageError) as e:
            featx.fit_head(store, backend="stream", output=tmp_path / "h.skops", **kw)
        assert e.value.exit_code == 2
    assert not (tmp_path / "h.skops").exists()


def test_streaming_fit_refuses_nonfinite_rows_and_honours_exclude(tmp_path, small_chunks):
    from featx.errors import DataError

    rng = np.random.default_rng(0)
    n, dim = 600, 8
    x = rng.normal(size=(n, dim)).astype(np.float32)
    y = np.array(["a", "b"] * (n // 2))
    x[y == "a"] += 1.0
    paths = [f"{c}/{i}.jpg" for i, c in enumerate(y)]
    w = ShardWriter(tmp_path / "s", dim=dim, classes=["a", "b"], meta={"backbone": "synthetic"}, shard_size=250)
    w.add(x, paths, y)
    w.close()
    drop = tmp_path / "drop.txt"
    drop.write_text("\n".join(paths[:100]) + "\n")
    res = featx.fit_head(tmp_path / "s", C=1.0, cv=0, backend="stream", exclude=drop)
    assert res.training["excluded"]["excluded"] == 100
    assert res.training["n"] + res.scores["val"]["n"] == n - 100  # a 20 % hold-out of what is left
    x[7, 3] = np.nan
    w = ShardWriter(tmp_path / "bad", dim=dim, classes=["a", "b"], meta={"backbone": "synthetic"}, shard_size=250)
    w.add(x, paths, y)
    w.close()
    with pytest.raises(DataError, match="NaN or Inf"):
        featx.fit_head(tmp_path / "bad", C=1.0, cv=0, backend="stream")


def test_device_cache_path_gives_the_same_head(tmp_path, small_chunks, monkeypatch):
    """On a GPU the standardised rows stay on the device after the first pass; the cache must not change the fit.
    A float16 store streams as its float32 values."""
    store = _store(tmp_path / "s", n=1200, shard=300, dtype="float16")
    ref = featx.fit_head(store, C=1.0, cv=0, backend="stream", device="cpu")
    skl = featx.fit_head(store, C=1.0, cv=0, backend="sklearn", device="cpu")
    assert abs(ref.scores["val"]["accuracy"] - skl.scores["val"]["accuracy"]) <= 0.005
    monkeypatch.setattr(large, "_keep_on_device", lambda device, nbytes: True)
    got = featx.fit_head(store, C=1.0, cv=0, backend="stream", device="cpu")
    np.testing.assert_array_equal(got.head.pipeline.named_steps["clf"].coef_,
                                  ref.head.pipeline.named_steps["clf"].coef_)


def test_single_file_store_and_separate_val_stream_as_sklearn_fits_them(tmp_path, small_chunks):
    """An .npz store (read whole, fitted chunk by chunk) with --val features: the same split and scores as sklearn."""
    fs = featx.load_features(_store(tmp_path / "s", n=1500, shard=500))
    train, val = fs.split("train"), fs.split("val")
    train.splits = None  # a flat store: with --val given nothing is held out of it
    featx.save_features(train, tmp_path / "train.npz")
    featx.save_features(val, tmp_path / "val.npz")
    kw = dict(head="logistic", C=1.0, cv=0, val=tmp_path / "val.npz")
    got = featx.fit_head(tmp_path / "train.npz", backend="stream", **kw)
    ref = featx.fit_head(tmp_path / "train.npz", backend="sklearn", **kw)
    assert got.validation == ref.validation == "the --val features"
    assert got.training["n"] == len(train) and got.scores["val"]["n"] == len(val)
    assert abs(got.scores["val"]["accuracy"] - ref.scores["val"]["accuracy"]) <= 0.005
