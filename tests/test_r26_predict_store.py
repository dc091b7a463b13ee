"""Issue 26.1: `featx predict STORE -m head.skops` scores stored features (npz, Parquet, sharded) without a network."""
from __future__ import annotations

import csv
import io
import json
import os
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import featx
from featx.cli.app import app
from featx.errors import ArtifactError, StrictModeError, UsageError
from featx.predict.tables import Layout, write_table

runner = CliRunner()
CLASSES = ["ant", "bee", "wasp"]
META = {"backbone": "tiny", "weights_sha256": "abc", "preprocess": {"input_size": 32, "resize": 36},
        "layer": "pooled", "feature_dim": 8}
FORMATS = ("npz", "parquet", "sharded")


def _fs(n=45, dim=8, seed=0, meta=META, labelled=True):
    """Features with class structure: each class a shifted Gaussian, so the head has something to learn."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % len(CLASSES)
    x = (rng.normal(size=(n, dim)) + 2.0 * np.eye(len(CLASSES), dim)[y]).astype(np.float32)
    return featx.FeatureSet(
        features=x, paths=[f"{CLASSES[c]}/img{i:05d}.jpg" for i, c in enumerate(y)],
        labels=[CLASSES[c] for c in y] if labelled else None,
        splits=(["train"] * (n - 15) + ["val"] * 15) if labelled else None, classes=CLASSES, meta=dict(meta))


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A logistic head fitted on 30 train rows; records its training images by path (the store has no image root)."""
    path = tmp_path_factory.mktemp("head") / "head.skops"
    featx.fit_head(_fs(), "logistic", C=1.0, cv=0, output=path)
    return path


def _save(fs, folder: Path, fmt: str, shard_size: int = 7) -> Path:
    if fmt == "sharded":
        from featx.features.sharded import write_sharded

        return write_sharded(fs, folder / "store", shard_size=shard_size)  # several shards, the last one short
    return featx.save_features(fs, folder / f"store.{fmt}")


@pytest.fixture(autouse=True)
def never_load_sharded_whole(monkeypatch):
    """Predicting from a sharded store never reads it whole: ShardedStore.load (one float32 copy) must not run."""
    from featx.features.sharded import ShardedStore

    def refuse(self):
        raise AssertionError("the whole sharded store was loaded")
    monkeypatch.setattr(ShardedStore, "load", refuse)

    def no_network(*a, **k):
        raise AssertionError("a network was built to predict from stored features")
    import featx.backbones
    import featx.runtime

    monkeypatch.setattr(featx.backbones, "backbone_from_meta", no_network)
    monkeypatch.setattr(featx.runtime, "network_for", no_network)


def _expected_rows(fs, head_path, top_k=3):
    """What scoring the same features in memory gives, as the rows predict writes for images."""
    head = featx.load_head(head_path)
    scores, kind = head.predict_scores(fs.features)
    order = np.argsort(-scores, axis=1, kind="stable")
    k = min(top_k, len(head.classes))
    rows = []
    for i, p in enumerate(fs.paths):
        top = order[i]
        rows.append({"path": p, "label": head.classes[top[0]], "confidence": float(scores[i, top[0]]),
                     "top_k": [{"label": head.classes[j], "score": float(scores[i, j])} for j in top[:k]],
                     "true_label": None if fs.labels is None else str(fs.labels[i]), "error": None})
    return rows, kind


@pytest.mark.parametrize("fmt", FORMATS)
def test_store_table_equals_scoring_the_features_in_memory(tmp_path, head, fmt):
    fs = _fs()
    store = _save(fs, tmp_path, fmt)
    out = tmp_path / "p.csv"
    res = featx.predict_folder(store, model=head, output=out, batch_size=4)  # blocks of 4 rows across shards of 7
    expected, kind = _expected_rows(fs, head)
    want = tmp_path / "want.csv"
    write_table(expected, want, "csv", Layout(top_k=3, labelled=True, score="probability"))
    assert out.read_bytes() == want.read_bytes()
    assert kind == "probability" and res.confidence_kind == "probability"
    assert len(res) == len(fs) and res.n_errors == 0 and res.runtime == "stored features"
    for got, exp in zip(res, expected):  # rows as the API gives them, read back lazily from the store
        assert got["path"] == exp["path"] and got["label"] == exp["label"]
        assert got["confidence"] == pytest.approx(exp["confidence"], rel=1e-5)
    assert res[-1]["path"] == fs.paths[-1] and res[3:5] == [res[3], res[4]]
    # the 30 training rows are recorded in the head by path (no image root): scored apart, as for an image folder
    assert sorted(res.seen_paths) == sorted(fs.paths[:30])
    from featx.report import classification_metrics

    unseen = expected[30:]
    m = classification_metrics([r["true_label"] for r in unseen], [r["label"] for r in unseen], CLASSES)
    assert res.metrics["accuracy"] == m["accuracy"] and res.metrics["confusion"] == m["confusion"]
    assert set(res.split_metrics) == {"val"}
    assert (res.report_dir / "metrics.json").is_file() and (res.report_dir / "report.html").is_file()
    assert not list(tmp_path.glob(".featx-tmp*")) and not list(tmp_path.glob("*.featx-lock"))


def test_jsonl_and_unlabelled_store(tmp_path, head):
    fs = _fs(n=20, seed=3, labelled=False)
    store = _save(fs, tmp_path, "sharded", shard_size=6)
    out = tmp_path / "p.jsonl"
    res = featx.predict_folder(store, model=head, output=out, top_k=2)
    expected, _ = _expected_rows(fs, head, top_k=2)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["path"] for r in lines] == fs.paths
    assert [r["label"] for r in lines] == [r["label"] for r in expected]
    assert np.allclose([r["probability"] for r in lines], [r["confidence"] for r in expected], rtol=1e-5)
    assert "true_label" not in lines[0] and not res.labelled and res.metrics is None
    assert sum(res.counts.values()) == 20


def test_head_from_other_features_is_refused_naming_both(tmp_path, head):
    for i, meta in enumerate([{**META, "backbone": "other"},
                              {**META, "preprocess": {"input_size": 48, "resize": 54}},  # another crop size
                              {**META, "layer": "stage3"}]):
        store = _save(_fs(meta=meta), tmp_path / str(i), "sharded")
        out = tmp_path / f"p{i}.csv"
        r = runner.invoke(app, ["predict", str(store), "-m", str(head), "-o", str(out)])
        assert r.exit_code == 2, r.output
        msg = r.output.strip().splitlines()
        assert len(msg) == 1 and "fingerprint" in msg[0] and msg[0].count("fingerprint") == 2
        assert not out.exists()
        if i == 0:
            assert "'tiny'" in msg[0] and "'other'" in msg[0]  # both backbones named


def test_models_that_need_pixels_are_refused(tmp_path):
    store = _save(_fs(), tmp_path, "npz")
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"not read: refused before loading")
    run = tmp_path / "runs" / "finetune" / "exp"
    run.mkdir(parents=True)
    for model in (onnx, run):
        r = runner.invoke(app, ["predict", str(store), "-m", str(model), "-o", str(tmp_path / "p.csv")])
        assert r.exit_code == 2 and "needs pixels" in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "p.csv").exists()


def test_pixel_options_refused_or_confirmed(tmp_path, head):
    store = _save(_fs(), tmp_path, "sharded")
    out = tmp_path / "p.csv"
    for extra, word in ((["--sort-into", str(tmp_path / "sorted")], "--sort-into"),
                        (["--weights", str(tmp_path / "w.pth")], "--weights"),
                        (["--runtime", "torch"], "--runtime"), (["--image-size", "64"], "--image-size")):
        r = runner.invoke(app, ["predict", str(store), "-m", str(head), "-o", str(out), *extra])
        assert r.exit_code == 2 and word in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert not out.exists() and not (tmp_path / "sorted").exists()
    # the store's own crop size is confirmed; --workers / --device only tune decoding: ignored
    r = runner.invoke(app, ["predict", str(store), "-m", str(head), "-o", str(out), "--image-size", "32",
                            "--workers", "0", "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["n_images"] == 45 and out.is_file()


def test_nothing_written_on_error_and_the_old_table_kept(tmp_path, head):
    fs = _fs()
    store = _save(fs, tmp_path, "sharded")
    out = tmp_path / "p.csv"
    featx.predict_folder(store, model=head, output=out)
    before = out.read_bytes()
    shard = store / "features-000004.npy"  # a shard in the middle: the first ones were already scored and written
    shard.write_bytes(shard.read_bytes()[:-40])
    with pytest.raises(ArtifactError):
        featx.predict_folder(store, model=head, output=out, overwrite=True)
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv", "p.report", "store"]


def test_nonfinite_rows_are_error_rows_and_strict_fails_after_writing(tmp_path, head):
    fs = _fs()
    fs.features[5, 2] = np.nan
    store = _save(fs, tmp_path, "sharded")
    out = tmp_path / "p.csv"
    with pytest.raises(StrictModeError) as info:
        featx.predict_folder(store, model=head, output=out, strict=True)
    res = info.value.result
    assert res.n_errors == 1 and res.errors[0]["path"] == fs.paths[5] and res[5]["label"] is None
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 45 and rows[5]["label"] == "" and "NaN" in rows[5]["error"]


def test_sharded_store_is_scored_in_bounded_memory(tmp_path, head):
    """12,000 x 256 float32 (12 MB) in 1,500-row shards: what Python allocates while scoring them and writing the
    table stays a fraction of the store (a shard's working set plus 36 bytes a row), never the store itself."""
    from featx.features.sharded import ShardWriter

    dim, n = 256, 12_000
    meta = {**META, "feature_dim": dim}
    small = featx.FeatureSet(features=np.random.default_rng(0).normal(size=(60, dim)).astype(np.float32),
                             paths=[f"x/{i}.jpg" for i in range(60)], labels=[CLASSES[i % 3] for i in range(60)],
                             classes=CLASSES, meta=meta)
    head_d = tmp_path / "h.skops"
    featx.fit_head(small, "logistic", C=1.0, cv=0, output=head_d)
    w = ShardWriter(tmp_path / "big", dim=dim, meta=meta, shard_size=1500)
    rng = np.random.default_rng(1)
    for lo in range(0, n, 4000):
        w.add(rng.normal(size=(4000, dim)).astype(np.float32), [f"d/{i:06d}.jpg" for i in range(lo, lo + 4000)])
    w.close()
    out = tmp_path / "p.csv"
    featx.predict_folder(small.subset(np.arange(3)).save(tmp_path / "warm.npz"), model=head_d, output=False)
    tracemalloc.start()  # after a first call: imports are not what is measured
    try:
        res = featx.predict_folder(tmp_path / "big", model=head_d, output=out, batch_size=500)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert res.n_images == n and out.read_text().count("\n") == n + 1
    store_bytes = n * dim * 4
    assert peak < store_bytes / 3, f"peak {peak / 2**20:.1f} MiB for a {store_bytes / 2**20:.0f} MiB store"


def test_store_recognised_by_its_recogniser_not_its_name(tmp_path, head):
    from featx.predict.from_store import is_feature_store

    images = tmp_path / "photos"
    images.mkdir()
    (images / "manifest.json").write_text(json.dumps({"format": "my-own-catalogue", "shards": []}))
    (images / "a.jpg").write_bytes(b"\xff\xd8")
    assert not is_feature_store(images) and not is_feature_store(images / "a.jpg")
    store = _save(_fs(), tmp_path, "sharded")
    assert is_feature_store(store) and is_feature_store(store / "manifest.json") and is_feature_store([store])
    assert is_feature_store(_save(_fs(), tmp_path, "npz")) and is_feature_store(_save(_fs(), tmp_path, "parquet"))
    # the CLI writes a table for a store file (image files named one by one are printed instead)
    r = runner.invoke(app, ["predict", str(tmp_path / "store.npz"), "-m", str(head), "-o", str(tmp_path / "p.csv")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "p.csv").read_text().startswith("path,label,probability")


def test_help_and_api_docstring_say_stores(tmp_path):
    r = runner.invoke(app, ["predict", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0 and "feature store" in r.output
    assert "feature store" in featx.predict_folder.__doc__
    assert os.environ.get("FEATX_NO_PROGRESS") == "1"


def test_images_extraction_skipped_are_listed_and_strict_refuses_before_work(tmp_path, head):
    fs = _fs()
    fs.meta["skipped"] = [{"path": "ant/broken.jpg", "reason": "truncated file", "stage": "decode"}]
    store = _save(fs, tmp_path, "npz")
    out = tmp_path / "p.csv"
    with pytest.raises(StrictModeError):
        featx.predict_folder(store, model=head, output=out, strict=True)
    assert not out.exists()
    res = featx.predict_folder(store, model=head, output=out, dry_run=True)
    assert res.skipped[0]["path"] == "ant/broken.jpg" and res.dry_run and not out.exists()
    assert not (tmp_path / "p.report").exists()
    with pytest.raises(UsageError, match="min-confidence"):
        featx.predict_folder(store, model=head, output=out, min_confidence=0.5)


def test_seen_images_matched_by_content_when_the_store_images_are_here(tmp_path):
    """A head fitted on features whose images were on disk records them by content; predicting a store of the same
    images (another copy of the folder) scores those apart; with the images gone, a warning says they cannot be."""
    import shutil

    fs = _fs()
    first = tmp_path / "first"
    for i, p in enumerate(fs.paths):
        (first / p).parent.mkdir(parents=True, exist_ok=True)
        (first / p).write_bytes(f"image {i}".encode())
    fs.meta["root"] = str(first)
    head = tmp_path / "h.skops"
    featx.fit_head(fs, "logistic", C=1.0, cv=0, output=head)
    assert "trained" in featx.load_head(head).meta["seen"]  # by content, not by path
    copy = tmp_path / "copy"
    shutil.copytree(first, copy)
    shutil.rmtree(first)
    fs.meta["root"] = str(copy)
    store = _save(fs, tmp_path, "sharded")
    res = featx.predict_folder(store, model=head, output=tmp_path / "p.csv")
    assert sorted(res.seen_paths) == sorted(fs.paths[:30]) and res.metrics["n"] == 15
    shutil.rmtree(copy)
    res = featx.predict_folder(store, model=head, output=tmp_path / "p.csv")
    assert res.seen_paths == [] and res.metrics["n"] == 45
    assert any("not on this machine" in w for w in res.warnings)
