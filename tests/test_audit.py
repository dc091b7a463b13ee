"""`featx audit`: planted near-duplicates, label swaps and foreign images are found; report files; safety rules."""
from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import featx
from featx.audit import audit, neighbors
from featx.cli.app import app
from featx.errors import DataError, OutputError, UsageError
from featx.features.store import FeatureSet, save_features

runner = CliRunner()
# the label check is an optional extra (featx[audit], also in featx[test]); its tests skip where it is not installed
needs_cleanlab = pytest.mark.skipif(importlib.util.find_spec("cleanlab") is None,
                                    reason="cleanlab not installed (pip install 'featx[audit]')")


def _cluster_features(rng, n_per_class: int, classes: int, dim: int) -> tuple:
    """Non-negative, CNN-like (ReLU) features: a class centre plus enough noise that distinct rows stay below ~0.8
    cosine after the audit's square-root normalisation, while a 3%-noise copy stays above 0.99."""
    centres = rng.normal(0, 0.5, (classes, dim))
    for k in range(classes):  # each class also lights up a block of its own: linearly separable classes
        centres[k, k * 12:(k + 1) * 12] += 3.0
    y = np.repeat(np.arange(classes), n_per_class)
    X = np.maximum(centres[y] + rng.normal(0, 1.0, (len(y), dim)), 0)
    return X.astype(np.float32), y


def planted_store(tmp_path: Path, *, n_per_class=40, classes=2, dim=128, seed=0, labelled=True, splits=True) -> tuple:
    """A store (and a fake image root) with 3 near-copies across splits, 1 exact copy within train,
    4 swapped labels and 3 foreign rows. Returns (FeatureSet saved at tmp/features.npz, truth)."""
    rng = np.random.default_rng(seed)
    X, y = _cluster_features(rng, n_per_class, classes, dim)
    n = len(y)
    split = np.where(np.arange(n) % 4 == 3, "val", "train") if splits else None
    names = [f"c{c}" for c in range(classes)]
    paths = [f"{split[i] + '/' if splits else ''}{names[y[i]]}/img{i:03d}.jpg" for i in range(n)]
    truth = {"near": [], "exact": [], "swapped": [], "foreign": []}
    # near-copies: a train row copied into val (small noise: a re-encoded copy)
    train_rows = [i for i in range(n) if not splits or split[i] == "train"]
    for k, src in enumerate(train_rows[:3]):
        X = np.vstack([X, X[src] * (1 + rng.normal(0, 0.03, dim))])
        y = np.append(y, y[src])
        paths.append(f"{'val/' if splits else ''}{names[y[src]]}/copy{k}.jpg")
        if splits:
            split = np.append(split, "val")
        truth["near"].append((paths[src], paths[-1]))
    # an exact copy (same bytes on disk, same features) inside train
    src = train_rows[5]
    X = np.vstack([X, X[src]])
    y = np.append(y, y[src])
    paths.append(f"{'train/' if splits else ''}{names[y[src]]}/same.jpg")
    if splits:
        split = np.append(split, "train")
    truth["exact"] = [paths[src], paths[-1]]
    # foreign rows: active only on a few dimensions of their own (far from both classes and from each other)
    for k in range(3):
        row = np.zeros(dim)
        row[dim - 8 * (k + 1):dim - 8 * k] = 3 + rng.random(8)  # the last 24 dimensions: no class block there
        X = np.vstack([X, row])
        y = np.append(y, k % classes)
        paths.append(f"{'train/' if splits else ''}{names[k % classes]}/foreign{k}.jpg")
        if splits:
            split = np.append(split, "train")
        truth["foreign"].append(paths[-1])
    labels = np.array([names[c] for c in y], dtype=object)
    by_class = [[i for i in train_rows if y[i] == c] for c in range(classes)]
    for row in [r for rows in by_class for r in rows[10:12]]:  # swapped labels, 2 from each class
        labels[row] = names[(y[row] + 1) % classes]
        truth["swapped"].append(paths[row])
    root = tmp_path / "images"
    for i, p in enumerate(paths):  # audit hashes the files of duplicate groups: give it bytes to hash
        f = root / p
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(b"same bytes" if p in truth["exact"] else f"image {i}".encode())
    fs = FeatureSet(features=X, paths=paths, labels=labels.tolist() if labelled else None,
                    splits=split.tolist() if splits else None, classes=names if labelled else [],
                    meta={"backbone": "synthetic", "root": str(root)})
    save_features(fs, tmp_path / "features.npz")
    return fs, truth


@pytest.fixture()
def planted(tmp_path):
    return planted_store(tmp_path)


def test_planted_near_duplicates_are_found_leakage_first_and_exact_copies_marked(planted, tmp_path):
    fs, truth = planted
    res = audit(fs, report_dir=False, checks=["duplicates"])
    groups = [{m["path"] for m in g["members"]} for g in res.duplicates]
    for a, b in truth["near"]:
        assert {a, b} in groups
    assert set(truth["exact"]) in groups
    assert len(res.duplicates) == 4  # nothing else reaches the threshold in these features
    assert [g["leakage"] for g in res.duplicates] == [True, True, True, False]  # leakage listed first
    exact = next(g for g in res.duplicates if {m["path"] for m in g["members"]} == set(truth["exact"]))
    assert exact["all_exact"] and all(m["exact"] for m in exact["members"])
    assert not any(m["exact"] for g in res.leakage for m in g["members"])


def test_projected_blocked_search_finds_exactly_the_pairs_of_the_full_matrix(monkeypatch):
    """The projection is a filter with no false negatives, and query blocks do not drop or repeat pairs."""
    rng = np.random.default_rng(1)
    X, _ = _cluster_features(rng, 150, 2, 48)
    X[100:140] = X[:40] * (1 + rng.normal(0, 0.05, (40, 48)))  # some close pairs
    monkeypatch.setattr(neighbors, "BLOCK_MB", 0.01)  # 16-row blocks: many blocks, pairs across their edges
    assert neighbors.block_rows(300) == 16
    for backend in ("numpy", "sklearn"):
        for project in (True, False):
            index = neighbors.build_index(X, project=project, dim=6, backend=backend)
            assert index.projected is project and index.Z.shape[1] == (6 if project else 48)
            i, j, s = neighbors.similar_pairs(index, 0.8)
            U = index.X @ index.X.T
            ei, ej = np.nonzero(np.triu(U >= 0.8, 1))
            assert len(ei) > 40  # the test means something: many pairs, close copies and same-class neighbours
            assert sorted(zip(i.tolist(), j.tolist())) == sorted(zip(ei.tolist(), ej.tolist()))
            np.testing.assert_allclose(s, U[i, j], atol=1e-5)


def test_kth_neighbour_distance_exact_reranked_and_sampled(monkeypatch):
    rng = np.random.default_rng(2)
    X, _ = _cluster_features(rng, 100, 3, 40)
    X[7] = X[8]  # an identical copy is a neighbour like any other (distance 0), only the row itself is not
    Xn = neighbors.normalise(X)
    S = Xn @ Xn.T
    np.fill_diagonal(S, -np.inf)
    truth = 1 - np.sort(S, axis=1)[:, -5]  # the 5th nearest other row
    monkeypatch.setattr(neighbors, "BLOCK_MB", 0.01)
    for backend in ("numpy", "sklearn"):
        exact = neighbors.kth_neighbour_distance(neighbors.build_index(X, project=False, backend=backend), 5)
        assert exact.k == 5 and exact.reference == 300
        np.testing.assert_allclose(exact.distance, truth, atol=1e-5)
        # on a projection the candidates are re-measured in the full dimension: real distances to real
        # neighbours, never shorter than the exact ones; here (30 of 40 dimensions) nearly all are exact
        approx = neighbors.kth_neighbour_distance(neighbors.build_index(X, project=True, dim=30, backend=backend), 5)
        assert (approx.distance >= truth - 1e-5).all() and (np.abs(approx.distance - truth) < 1e-5).mean() > 0.9
    monkeypatch.setattr(neighbors, "KNN_REFERENCE", 150)  # a sample of half the rows: k scales to 2 (5 * 150/300)
    sampled = neighbors.kth_neighbour_distance(neighbors.build_index(X, project=False), 5)
    assert (sampled.k, sampled.reference) == (2, 150)
    assert np.corrcoef(sampled.distance, truth)[0, 1] > 0.8


@needs_cleanlab
def test_swapped_labels_are_ranked_first(planted):
    fs, truth = planted
    res = audit(fs, report_dir=False, checks=["labels"])
    top = [r["path"] for r in res.label_issues[:len(truth["swapped"]) + 3]]  # the 3 foreign rows may rank too
    assert set(truth["swapped"]) <= set(top)
    first = next(r for r in res.label_issues if r["path"] == truth["swapped"][0])
    assert first["suggested"] != first["given"] and first["given_probability"] < 0.5
    assert res.info["labels"]["folds"] == 5 and res.info["labels"]["n_checked"] == len(fs)


def test_foreign_rows_are_the_outliers(planted):
    fs, truth = planted
    res = audit(fs, report_dir=False, checks=["outliers"], k=3)
    assert {r["path"] for r in res.outliers[:3]} == set(truth["foreign"])
    scores = [r["score"] for r in res.outliers]
    assert scores == sorted(scores, reverse=True)


def test_unlabelled_flat_store_runs_duplicates_and_outliers_and_skips_labels(tmp_path):
    fs, truth = planted_store(tmp_path, labelled=False, splits=False)
    seen = []
    res = audit(tmp_path / "features.npz", report_dir=False, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (2 * len(fs), 2 * len(fs))  # two neighbour passes, reported as one bar that ends full
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert res.info["checks"] == ["duplicates", "outliers"] and res.info["skipped"] == ["labels"]
    assert res.label_issues == [] and len(res.duplicates) == 4
    assert not res.leakage  # no splits, no labels: nothing to leak between
    assert {r["path"] for r in res.outliers} >= set(truth["foreign"])


def test_copy_between_train_and_fits_own_holdout_is_leakage_without_a_val_folder(tmp_path):
    """No val/ folder: `featx fit` holds part of train out (plan_split); a copy across that line leaks too."""
    from featx.data.split import plan_split

    fs, truth = planted_store(tmp_path, splits=False)
    plan = plan_split(fs.paths, fs.labels.tolist(), None, val_fraction=0.2, seed=0)
    planted = {p for v in truth.values() for p in (v if isinstance(v[0], str) else sum(map(list, v), []))}
    plain = [i for i, p in enumerate(fs.paths) if p not in planted]
    a = next(i for i in plan.val if i in plain)
    b = next(i for i in plan.train if i in plain and fs.labels[i] == fs.labels[a])
    X = fs.features.copy()
    X[b] = X[a] * 1.001
    res = audit(FeatureSet(X, fs.paths, fs.labels, None, fs.classes, fs.meta), report_dir=False,
                checks=["duplicates"])
    g = next(g for g in res.duplicates if {m["path"] for m in g["members"]} == {fs.paths[a], fs.paths[b]})
    assert g["leakage"] and g["roles"] == ["train", "val"]
    assert "hold-out" in res.info["split_rule"]


def test_missing_cleanlab_is_one_clear_line_naming_the_extra(planted, monkeypatch):
    fs, _ = planted
    monkeypatch.setitem(sys.modules, "cleanlab", None)  # import cleanlab -> ImportError
    monkeypatch.setitem(sys.modules, "cleanlab.filter", None)
    with pytest.raises(UsageError, match=r"featx\[audit\]"):
        audit(fs, report_dir=False)
    res = audit(fs, report_dir=False, checks=["duplicates", "outliers"])  # the rest works without it
    assert len(res.duplicates) == 4


def test_bad_features_and_settings_are_refused(planted, tmp_path):
    fs, _ = planted
    bad = fs.features.copy()
    bad[3, 2] = np.nan
    with pytest.raises(DataError, match="NaN"):
        audit(FeatureSet(bad, fs.paths, fs.labels, fs.splits, fs.classes, fs.meta), report_dir=False)
    same = np.ones((300, 16), np.float32) + np.random.default_rng(0).random((300, 16), np.float32) * 0.01
    with pytest.raises(UsageError, match="raise --threshold"):  # every pair is "similar": that is not duplication
        audit(FeatureSet(same, [f"{i}.jpg" for i in range(300)]), report_dir=False, checks=["duplicates"])
    with pytest.raises(UsageError, match="unknown check"):
        audit(fs, report_dir=False, checks=["dupes"])
    with pytest.raises(UsageError, match="faiss|backend"):
        audit(fs, report_dir=False, backend="annoy")


# ------------------------------------------------------------------------------------------------ CLI and files
def _cli(*args):
    return runner.invoke(app, [str(a) for a in args])


@needs_cleanlab
def test_cli_writes_the_report_folder_beside_the_store_and_json(planted, tmp_path):
    fs, truth = planted
    store = tmp_path / "features.npz"
    r = _cli("audit", store, "--json", "--k", "3")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["counts"]["leakage_groups"] == 3 and doc["counts"]["duplicate_groups"] == 4
    folder = tmp_path / "features-audit"
    assert doc["report_dir"] == str(folder)
    names = {"report.md", "duplicates.csv", "label_issues.csv", "outliers.csv", "duplicates.png",
             "label_issues.png", "outliers.png", "scores.csv", "report.html"}
    names |= {"scores.parquet"} if importlib.util.find_spec("pyarrow") else set()
    assert {p.name for p in folder.iterdir()} == names
    rows = list(csv.DictReader(open(folder / "duplicates.csv")))
    assert {r["path"] for r in rows} >= {p for pair in truth["near"] for p in pair}  # relative to the image root
    assert all(not Path(r["path"]).is_absolute() for r in rows)
    assert (folder / "duplicates.png").read_bytes().startswith(b"\x89PNG")
    md = (folder / "report.md").read_text()
    assert "3 span splits = leakage" in md and "copy0.jpg" in md
    # the table view names the same things
    r = _cli("audit", store, "--k", "3", "--top", "3")
    assert r.exit_code == 0, r.output
    assert "across splits" in r.output and "copy0.jpg" in r.output and "report ->" in r.output


@needs_cleanlab
def test_cli_refuses_a_foreign_file_in_the_report_folder_before_any_work(planted, tmp_path):
    folder = tmp_path / "features-audit"
    folder.mkdir()
    mine = folder / "outliers.csv"
    mine.write_text("my own notes\n")
    r = _cli("audit", tmp_path / "features.npz")
    assert r.exit_code == 2
    assert "was not written by featx" in r.output
    assert mine.read_text() == "my own notes\n" and sorted(p.name for p in folder.iterdir()) == ["outliers.csv"]
    r = _cli("audit", tmp_path / "features.npz", "--overwrite")
    assert r.exit_code == 0, r.output
    assert mine.read_text().startswith("rank,path")


@needs_cleanlab
def test_report_folder_inside_the_image_folder_is_refused(planted, tmp_path):
    fs, _ = planted
    inside = Path(fs.meta["root"]) / "audit"
    r = _cli("audit", tmp_path / "features.npz", "--report-dir", inside)
    assert r.exit_code == 2 and "inside the input folder" in r.output
    assert not inside.exists()


@needs_cleanlab
def test_rerun_replaces_its_own_report_and_stays_consistent(planted, tmp_path):
    store = tmp_path / "features.npz"
    assert _cli("audit", store).exit_code == 0
    r = _cli("audit", store, "--checks", "outliers", "--k", "3")  # fewer checks: no stale lists left behind
    assert r.exit_code == 0, r.output
    folder = tmp_path / "features-audit"
    assert (folder / "duplicates.csv").read_text().strip().count("\n") == 0  # header only
    assert "near-duplicates: not run" in (folder / "report.md").read_text()


@needs_cleanlab
def test_a_second_audit_of_the_same_store_is_refused_while_the_first_runs(planted, tmp_path):
    from featx._io import OutputLock

    with OutputLock(tmp_path / "features-audit" / "report.md"):
        with pytest.raises(OutputError, match="another featx run"):
            audit(tmp_path / "features.npz")
        r = _cli("audit", tmp_path / "features.npz")
        assert r.exit_code == 7


@needs_cleanlab
def test_audit_never_touches_the_images(planted, tmp_path):
    fs, _ = planted
    root = Path(fs.meta["root"])
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}
    assert _cli("audit", tmp_path / "features.npz", "--k", "3").exit_code == 0
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}
    assert before == after


@pytest.fixture(scope="module")
def lite0_96():
    # the real embedded network at a small input size: seconds on the CPU, same code path as 224 px
    return featx.create_backbone("efficientnet_lite0", image_size=96)


def test_audit_of_an_extracted_folder_finds_copied_files_across_splits(tmp_path, lite0_96):
    """Real path: images -> featx extract -> featx audit (a tiny input size keeps it fast)."""
    import shutil

    from tests.imagegen import make_folder

    folder = make_folder(tmp_path / "imgs", classes=("a", "b"), n_per_class=3, splits=("train", "val"), size=40)
    src = sorted((folder / "train" / "a").iterdir())[0]
    shutil.copyfile(src, folder / "val" / "a" / "copied.jpg")
    featx.extract_features(folder, tmp_path / "f.npz", backbone=lite0_96, workers=0)
    # these flat-colour test images all look alike to the network: only a byte copy reaches 0.9999
    r = _cli("audit", tmp_path / "f.npz", "--checks", "duplicates", "--threshold", "0.9999", "--json")
    assert r.exit_code == 0, r.output
    [g] = json.loads(r.stdout)["duplicates"]
    assert g["leakage"] and g["all_exact"]
    assert {m["path"] for m in g["members"]} == {f"train/a/{src.name}", "val/a/copied.jpg"}


def test_planted_copies_and_a_digit_among_real_photos_are_found(hymenoptera, tmp_path, lite0_96):
    """Real photos (../shared/data/hymenoptera, skipped without it): 3 copies planted across splits after a resize,
    a JPEG re-encode and a 6% crop, plus an upscaled scikit-learn digit among the ants. Pretrained lite0 at 96 px
    keeps this to seconds; BENCHMARKS.md has the full-size run on all 398 photos."""
    import shutil

    from PIL import Image
    from sklearn.datasets import load_digits

    root = tmp_path / "photos"
    for split, n in (("train", 10), ("val", 5)):
        for cls in ("ants", "bees"):
            (root / split / cls).mkdir(parents=True)
            for f in sorted((hymenoptera / split / cls).iterdir())[:n]:
                shutil.copyfile(f, root / split / cls / f.name)
    copies = []
    for cls, i, how in (("ants", 0, "resize"), ("bees", 1, "reencode"), ("ants", 2, "crop")):
        src = sorted((root / "train" / cls).iterdir())[i]
        im = Image.open(src).convert("RGB")
        w, h = im.size
        if how == "resize":
            im, q = im.resize((w * 3 // 5, h * 3 // 5), Image.BICUBIC), 85
        elif how == "crop":
            im, q = im.crop((w * 6 // 100, h * 6 // 100, w - w * 6 // 100, h - h * 6 // 100)), 90
        else:
            q = 40
        im.save(root / "val" / cls / f"copy_{src.name}", quality=q)
        copies.append({f"train/{cls}/{src.name}", f"val/{cls}/copy_{src.name}"})
    digit = (load_digits().images[3] * 255 / 16).astype(np.uint8)
    Image.fromarray(digit).convert("RGB").resize((224, 224), Image.BICUBIC).save(root / "train" / "ants" / "digit.jpg")
    featx.extract_features(root, tmp_path / "f.npz", backbone=lite0_96, workers=0)
    res = audit(tmp_path / "f.npz", report_dir=False, checks=["duplicates", "outliers"], k=5)
    found = sorted(sorted(m["path"] for m in g["members"]) for g in res.duplicates)
    assert found == sorted(sorted(c) for c in copies)  # all three, and no pair of distinct photos
    assert all(g["leakage"] for g in res.duplicates)
    assert res.outliers and res.outliers[0]["path"] == "train/ants/digit.jpg"


def test_cli_defaults_are_the_library_defaults():
    """The CLI spells its defaults out (so `featx --help` imports nothing heavy); they must match AuditSettings."""
    import inspect

    from featx.audit import AuditSettings
    from featx.cli.audit import DEFAULT_FEATURES, audit_cmd
    from featx.features.store import DEFAULT_FEATURES_PATH

    params = {name: p.default.default for name, p in inspect.signature(audit_cmd).parameters.items()}
    lib = AuditSettings()
    for name in ("threshold", "k", "fence", "C", "folds", "val_split", "seed", "backend"):
        assert params[name] == getattr(lib, name), name
    assert params["checks"].split(",") == list(lib.checks)
    assert DEFAULT_FEATURES == DEFAULT_FEATURES_PATH
