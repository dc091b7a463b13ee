"""Issue 25.1: a score for every image (scores.csv / scores.parquet), and every score's top N in report.md and --json,
flagged or not."""
from __future__ import annotations

import csv
import importlib.util
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from featx.audit import audit
from featx.audit.scores import COLUMNS, class_kth_distance, neighbour_agreement, percentile_of
from featx.cli.app import app
from featx.features.store import FeatureSet, save_features
from tests.test_audit import needs_cleanlab, planted_store

runner = CliRunner()


@pytest.fixture()
def planted(tmp_path):
    return planted_store(tmp_path)


def _read_scores(folder):
    with open(folder / "scores.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@needs_cleanlab
def test_every_image_has_a_row_with_every_score(planted, tmp_path):
    fs, truth = planted
    res = audit(tmp_path / "features.npz", k=3)
    rows = _read_scores(res.report_dir)
    assert list(rows[0].keys()) == COLUMNS
    assert [r["path"] for r in rows] == list(fs.paths)  # every image, in store order
    by = {r["path"]: r for r in rows}
    # label-issue score: the swapped labels rank first, with given and suggested class
    top = sorted(rows, key=lambda r: int(r["label_rank"]))[:len(truth["swapped"])]
    assert {r["path"] for r in top} == set(truth["swapped"])
    assert all(r["given"] != r["suggested"] for r in top)
    assert all(0 <= float(r["label_score"]) <= 1 for r in rows)
    # outlier score with its percentile: the foreign rows on top
    top = sorted(rows, key=lambda r: int(r["outlier_rank"]))[:3]
    assert {r["path"] for r in top} == set(truth["foreign"])
    assert all(float(r["outlier_percentile"]) > 95 for r in top)
    assert all(0 <= float(r["outlier_score"]) <= 1 for r in rows)
    # nearest other image and its similarity; duplicate group and whether it crosses splits
    for a, b in truth["near"]:
        assert by[b]["nearest"] == a and float(by[b]["nearest_similarity"]) > 0.95
        assert by[a]["duplicate_group"] == by[b]["duplicate_group"] != ""
        assert by[a]["crosses_splits"] == by[b]["crosses_splits"] == "True"
    same = truth["exact"]
    assert by[same[0]]["crosses_splits"] == "False" and by[same[0]]["duplicate_group"]
    # the flagged sets stay as they were, and the table says which rows they are
    assert {r["path"] for r in rows if r["label_flagged"] == "True"} == {r["path"] for r in res.label_issues}
    assert {r["path"] for r in rows if r["outlier_flagged"] == "True"} == {r["path"] for r in res.outliers}
    assert sum(1 for r in rows if r["duplicate_group"]) == sum(g["size"] for g in res.duplicates)


@needs_cleanlab
def test_report_md_and_json_list_each_scores_top_n_flagged_or_not(planted, tmp_path):
    fs, truth = planted
    r = runner.invoke(app, ["audit", str(tmp_path / "features.npz"), "--json", "--k", "3", "--top", "7"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert set(doc["rankings"]) == {"label", "outlier", "duplicate"}
    for name, rows in doc["rankings"].items():
        assert len(rows) == 7
        ranks = [row[f"{name}_rank"] for row in rows]
        assert ranks == list(range(1, 8))
    # beyond the flagged sets: 7 outlier rows although fewer are flagged, the unflagged ones marked as such
    outl = doc["rankings"]["outlier"]
    assert [row["outlier_flagged"] for row in outl].count(False) == 7 - len(doc["outliers"])
    md = (tmp_path / "features-audit" / "report.md").read_text()
    for title in ("Label-issue score, top 7 (flagged or not)", "Outlier score, top 7 (flagged or not)",
                  "Nearest other image, top 7 by similarity (flagged or not)"):
        assert f"## {title}" in md
    section = md.split("## Outlier score, top 7")[1].split("\n## ")[0]
    table = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| rank")]
    assert len(table) == 7
    assert sum("**yes**" in line for line in table) == len(doc["outliers"])  # flagged rows say so, the rest not


def test_unlabelled_store_has_empty_label_columns_and_no_label_ranking(tmp_path):
    fs, truth = planted_store(tmp_path, labelled=False, splits=False)
    res = audit(tmp_path / "features.npz", k=3)
    rows = _read_scores(res.report_dir)
    assert len(rows) == len(fs)
    assert all(r["label_score"] == "" and r["label_rank"] == "" and r["label"] == "" for r in rows)
    assert all(r["class_knn_distance"] == "" for r in rows)
    assert set(res.rankings()) == {"outlier", "duplicate"}
    assert all(r["crosses_splits"] in ("False", "") for r in rows)


def test_checks_not_run_leave_their_columns_empty(planted, tmp_path):
    res = audit(tmp_path / "features.npz", k=3, checks=["duplicates"])
    rows = _read_scores(res.report_dir)
    assert all(r["outlier_score"] == "" and r["label_score"] == "" for r in rows)
    assert all(r["nearest"] for r in rows)  # the nearest image is always there
    assert set(res.rankings()) == {"duplicate"}


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="pyarrow (parquet extra) not installed")
def test_scores_parquet_holds_the_same_table(planted, tmp_path):
    import pyarrow.parquet as pq

    res = audit(tmp_path / "features.npz", k=3, checks=["duplicates", "outliers"])
    table = pq.read_table(res.report_dir / "scores.parquet")
    assert table.column_names == COLUMNS
    rows = _read_scores(res.report_dir)
    assert table.column("path").to_pylist() == [r["path"] for r in rows]
    got = table.column("outlier_score").to_pylist()
    assert got == pytest.approx([float(r["outlier_score"]) for r in rows], abs=1e-4)
    assert table.column("label_score").null_count == len(rows)  # not run: null, as the CSV's empty cells


def test_odd_file_names_round_trip_through_scores_csv(tmp_path):
    rng = np.random.default_rng(0)
    names = ['a,b.jpg', 'quote"d.jpg', "holiday[final].jpg", "line\rbreak.jpg", "plain.jpg", "caf\udce9.jpg"]
    X = rng.random((len(names), 16)).astype(np.float32)
    fs = FeatureSet(features=X, paths=names, labels=None, splits=None, classes=[], meta={"backbone": "synthetic"})
    save_features(fs, tmp_path / "f.npz")
    res = audit(tmp_path / "f.npz", k=2)
    rows = _read_scores(res.report_dir)
    shown = [n.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for n in names]
    assert [r["path"] for r in rows] == shown
    assert {r["nearest"] for r in rows} <= set(shown)
    if importlib.util.find_spec("pandas"):
        import pandas as pd

        assert pd.read_csv(res.report_dir / "scores.csv")["path"].tolist() == shown


def test_neighbour_agreement_and_class_distance():
    labels = np.array(["a", "a", "a", "b", ""], dtype=object)
    nbrs = np.array([[1, 2], [0, 3], [3, 0], [2, 1], [0, 1]])
    sims = np.array([[0.9, 0.8], [0.9, 0.5], [0.9, 0.1], [0.9, 0.8], [0.5, 0.5]], dtype=np.float32)
    agree = neighbour_agreement(labels, nbrs, sims)
    assert agree[0] == pytest.approx(1.0)
    assert agree[1] == pytest.approx(0.9 / 1.4)
    assert agree[3] == pytest.approx(0.0)
    assert np.isnan(agree[4])  # unlabelled: no vote
    assert percentile_of(np.array([1.0, 2.0, 3.0, np.nan])).tolist()[:3] == pytest.approx([100 / 3, 200 / 3, 100])

    from featx.audit import neighbors

    X = np.array([[1, 0], [1, 0.1], [1, 0.2], [0, 1], [0.1, 1], [1, 0.05]], dtype=np.float32)
    lab = np.array(["a", "a", "a", "b", "b", "b"], dtype=object)  # the last row is a "b" sitting among the a's
    d = class_kth_distance(neighbors.build_index(X, project=False), lab, 1)
    assert d[5] == d.max() and d[5] > 0.2


def test_large_store_sampled_reference_table_complete_page_capped(tmp_path, monkeypatch):
    """Beyond KNN_REFERENCE images the k-NN pass sees a sample: every image still has its row and a nearest image,
    a planted copy's nearest is its original (from the exact pair search), and the page stays capped and paged."""
    from featx import report_html
    from featx.audit import neighbors

    monkeypatch.setattr(neighbors, "KNN_REFERENCE", 400)
    monkeypatch.setattr(report_html, "ROW_CAP", 100)
    rng = np.random.default_rng(1)
    n, dim = 3000, 24
    X = rng.standard_normal((n, dim)).astype(np.float32)
    copies = {int(c): int(o) for c, o in zip(rng.choice(n, 5, replace=False), rng.choice(n, 5, replace=False))
              if c != o}
    for c, o in copies.items():
        X[c] = X[o] * (1 + 0.001 * rng.standard_normal(dim)).astype(np.float32)
    paths = [f"img{i:05d}.jpg" for i in range(n)]
    save_features(FeatureSet(features=X, paths=paths, labels=None, splits=None, classes=[],
                             meta={"backbone": "synthetic"}), tmp_path / "f.npz")
    res = audit(tmp_path / "f.npz", k=10, checks=["duplicates", "outliers"])
    assert res.info["outlier_knn"]["reference"] == 400
    rows = _read_scores(res.report_dir)
    assert len(rows) == n and all(r["nearest"] and r["outlier_score"] for r in rows)
    for c, o in copies.items():
        assert rows[c]["nearest"] == paths[o] and float(rows[c]["nearest_similarity"]) > 0.99
    page = (res.report_dir / "report.html").read_text(encoding="utf-8")
    assert f"Showing the first 100 of {n} rows" in page and page.count("<tr") < 500
