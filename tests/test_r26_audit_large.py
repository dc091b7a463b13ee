"""`featx audit` at scale (issue 26): the approximate faiss k-NN path agrees with the exact path, reads a sharded
store block by block, and says clearly when faiss is missing."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from typer.testing import CliRunner

from featx.audit import audit, large
from featx.cli.app import app
from featx.errors import UsageError
from featx.features.sharded import ShardedStore, write_sharded
from featx.features.store import FeatureSet

needs_faiss = pytest.mark.skipif(importlib.util.find_spec("faiss") is None,
                                 reason="faiss not installed (pip install 'featx[faiss]')")
needs_cleanlab = pytest.mark.skipif(importlib.util.find_spec("cleanlab") is None,
                                    reason="cleanlab not installed (pip install 'featx[audit]')")


def _store(n_per_class=200, classes=5, dim=96, copies=40, seed=0) -> tuple:
    """Clustered ReLU features (classes made of sub-clusters, as real embeddings are) with ``copies`` planted
    near-copies (3% noise), 4 foreign rows and a few swapped labels. Returns (FeatureSet, planted pairs)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 0.5, (classes, dim))
    for c in range(classes):
        centres[c, c * 10:(c + 1) * 10] += 3.0
    sub = centres[:, None, :] + rng.normal(0, 0.6, (classes, 6, dim))  # 6 sub-clusters per class
    y = np.repeat(np.arange(classes), n_per_class)
    X = np.maximum(sub[y, rng.integers(0, 6, len(y))] + rng.normal(0, 1.0, (len(y), dim)), 0)
    src = rng.choice(len(y), copies, replace=False)
    X = np.vstack([X, X[src] * (1 + rng.normal(0, 0.03, (copies, dim)))])
    y = np.concatenate([y, y[src]])
    planted = {(int(s), len(y) - copies + k) for k, s in enumerate(src)}
    foreign = np.zeros((4, dim))
    for k in range(4):
        foreign[k, dim - 6 * (k + 1):dim - 6 * k] = 4.0
    X = np.vstack([X, foreign])
    y = np.concatenate([y, np.arange(4) % classes])
    labels = np.array([f"c{c}" for c in y], dtype=object)
    for r in rng.choice(classes * n_per_class, 6, replace=False):
        labels[r] = f"c{(y[r] + 1) % classes}"
    paths = [f"c{y[i]}/img{i:05d}.jpg" for i in range(len(y))]
    splits = np.where(np.arange(len(y)) % 5 == 0, "val", "train")
    fs = FeatureSet(features=X.astype(np.float32), paths=paths, labels=labels.tolist(), splits=splits.tolist(),
                    classes=[f"c{c}" for c in range(classes)], meta={"backbone": "synthetic"})
    return fs, planted


@pytest.fixture(scope="module")
def both():
    """The same store audited exactly and through the faiss graph (PCA to 64 of 96 dimensions: 87% of the variance,
    about what 256 of 1,280 keep of a CNN embedding)."""
    if importlib.util.find_spec("faiss") is None:
        pytest.skip("faiss not installed (pip install 'featx[faiss]')")
    fs, planted = _store()
    checks = ["duplicates", "outliers"] + (["labels"] if importlib.util.find_spec("cleanlab") else [])
    mp = pytest.MonkeyPatch()
    mp.setattr(large, "PROJECT_DIM", 64)  # a projection that really drops dimensions
    before = fs.features.copy()
    try:
        exact = audit(fs, report_dir=False, index="exact", checks=checks)
        approx = audit(fs, report_dir=False, index="auto", large_above=500, checks=checks)
    finally:
        mp.undo()
    assert np.array_equal(fs.features, before)  # the caller's features are never normalised in place
    return fs, planted, exact, approx


def _pairs(res) -> set:
    return {tuple(sorted((m["path"] for m in g["members"]))) for g in res.duplicates}


@needs_faiss
def test_auto_switches_to_the_faiss_graph_above_the_threshold_and_says_so(both):
    _, _, exact, approx = both
    assert exact.info["search"].get("approximate") is None
    assert approx.info["search"]["approximate"] and "faiss IVF" in approx.info["search"]["backend"]
    assert approx.info["search"]["searched_dim"] == 64
    assert any("approximate search" in n for n in approx.info["notes"])


@needs_faiss
def test_faiss_path_finds_the_planted_duplicates_the_exact_path_finds(both):
    fs, planted, exact, approx = both
    want = {tuple(sorted((fs.paths[a], fs.paths[b]))) for a, b in planted}
    assert want <= _pairs(exact)  # the plants are real duplicates
    found = len(want & _pairs(approx)) / len(want)
    assert found >= 0.95, found
    # every pair the graph keeps was re-measured in the full dimension: the same cosines as the exact search
    sims_e = {m["path"]: m["similarity"] for g in exact.duplicates for m in g["members"]}
    for g in approx.duplicates:
        for m in g["members"]:
            assert m["similarity"] == pytest.approx(sims_e[m["path"]], abs=1e-3)


@needs_faiss
def test_nearest_image_outliers_and_label_vote_agree_with_the_exact_path(both):
    fs, _, exact, approx = both
    e, a = exact.scores.columns, approx.scores.columns
    # the nearest image: the best, in full dimension, of the first 3 in the projection (0.85-0.88 measured, seeds 0-3)
    assert np.mean(np.array(e["nearest"]) == np.array(a["nearest"])) >= 0.75
    # the k-th neighbour distance: re-measured exactly, of the k-th row in the projection (0.93-0.94 measured)
    assert np.corrcoef(e["knn_distance"], a["knn_distance"])[0, 1] >= 0.85
    foreign = {p for p in fs.paths if p.endswith(tuple(f"img{i:05d}.jpg" for i in range(len(fs) - 4, len(fs))))}
    assert foreign <= {r["path"] for r in approx.outliers}
    assert foreign <= {r["path"] for r in exact.outliers}
    assert np.corrcoef(e["outlier_score"], a["outlier_score"])[0, 1] >= 0.85  # 0.90 measured
    agree_e, agree_a = np.asarray(e["neighbour_agreement"]), np.asarray(a["neighbour_agreement"])
    if not np.isnan(agree_e).all():  # the vote is computed with the label check (cleanlab)
        assert np.mean(np.abs(agree_e - agree_a) <= 0.25) >= 0.9


@needs_faiss
@needs_cleanlab
def test_label_check_on_the_projection_with_sampled_folds_ranks_swapped_labels_high(both, monkeypatch):
    fs, _, exact, approx = both
    swapped = {p for p, lab in zip(fs.paths, fs.labels) if lab != p.split("/")[0]}
    assert len(swapped) == 6
    monkeypatch.setattr(large, "LABEL_TRAIN_ROWS", 500)  # each fold's head fitted on a sample of its other folds
    res = audit(fs, report_dir=False, index="faiss", checks=["labels"])
    top = {r["path"] for r in res.scores.ranked("label", 20)}
    assert len(swapped & top) >= 5
    assert any("fitted on 500 random rows" in n for n in res.info["notes"])
    assert len(swapped & {r["path"] for r in approx.scores.ranked("label", 20)}) >= 5


@needs_faiss
def test_sharded_store_is_read_block_by_block_never_whole(tmp_path, monkeypatch):
    fs, planted = _store(n_per_class=120, classes=3, copies=10)
    store = write_sharded(fs, tmp_path / "store", shard_size=128)
    monkeypatch.setattr(ShardedStore, "load", lambda self: pytest.fail("the whole store was loaded"))
    biggest = []
    real = ShardedStore.features

    def features(self, i):
        m = real(self, i)
        biggest.append(len(m))
        return m

    monkeypatch.setattr(ShardedStore, "features", features)
    res = audit(store, report_dir=tmp_path / "report", index="faiss", checks=["duplicates", "outliers"])
    assert max(biggest) <= 128  # one shard mapped at a time
    want = {tuple(sorted((fs.paths[a], fs.paths[b]))) for a, b in planted}
    assert len(want & _pairs(res)) >= 9
    assert (tmp_path / "report" / "scores.csv").is_file() and (tmp_path / "report" / "report.html").is_file()
    assert "faiss IVF" in (tmp_path / "report" / "report.md").read_text()


@needs_faiss
def test_nonfinite_rows_are_refused_on_the_block_path(tmp_path):
    fs, _ = _store(n_per_class=50, classes=2, copies=2)
    fs.features[7, 3] = np.inf
    store = write_sharded(fs, tmp_path / "store", shard_size=64)
    with pytest.raises(Exception, match="NaN or Inf"):
        audit(store, report_dir=False, index="faiss", checks=["outliers"])


def test_without_faiss_index_faiss_is_one_line_and_auto_falls_back_to_exact(monkeypatch):
    monkeypatch.setattr(large, "has_faiss", lambda: False)
    fs, _ = _store(n_per_class=40, classes=2, copies=3)
    with pytest.raises(UsageError, match=r"pip install 'featx\[faiss\]'"):
        audit(fs, report_dir=False, index="faiss", checks=["duplicates"])
    res = audit(fs, report_dir=False, large_above=30, checks=["duplicates", "outliers"])  # 83 rows: up to 4 x 30
    assert res.info["search"].get("approximate") is None and len(res.duplicates) == 3
    assert any("featx[faiss]" in n for n in res.info["notes"])
    # far above the switch (more than 4x), auto refuses the n^2 search before any work rather than run for hours
    with pytest.raises(UsageError, match=r"--index exact"):
        audit(fs, report_dir=False, large_above=20, checks=["duplicates"])
    with pytest.raises(UsageError, match="--index exact"):
        large.choose("auto", 41, 10)
    assert large.choose("exact", 41, 10) == ("exact", None) and large.choose("auto", 40, 10)[0] == "exact"


def test_cli_index_faiss_without_faiss_exits_2_naming_the_extra(tmp_path, monkeypatch):
    from featx.features.store import save_features

    monkeypatch.setattr(large, "has_faiss", lambda: False)
    fs, _ = _store(n_per_class=40, classes=2, copies=3)
    save_features(fs, tmp_path / "f.npz")
    r = CliRunner().invoke(app, ["audit", str(tmp_path / "f.npz"), "--index", "faiss", "--no-report",
                                 "--checks", "duplicates"])
    assert r.exit_code == 2, r.output
    msg = r.output.strip().splitlines()
    assert len(msg) == 1 and "pip install 'featx[faiss]'" in msg[0], r.output
    r = CliRunner().invoke(app, ["audit", str(tmp_path / "f.npz"), "--index", "hnsw", "--no-report"])
    assert r.exit_code == 2 and "--index" in r.output


def test_switch_threshold_from_the_environment(monkeypatch):
    monkeypatch.setenv(large.ENV_LARGE_ABOVE, "50")
    monkeypatch.setattr(large, "has_faiss", lambda: True)
    assert large.choose("auto", 51) == ("faiss", None)
    assert large.choose("auto", 50) == ("exact", None)
    assert large.choose("exact", 10**7) == ("exact", None)
    monkeypatch.delenv(large.ENV_LARGE_ABOVE)
    assert large.choose("auto", large.LARGE_ABOVE)[0] == "exact"
    assert large.choose("auto", large.LARGE_ABOVE + 1)[0] == "faiss"
