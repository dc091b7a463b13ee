"""`featx compare --shots`: subsets from the training split only, one fixed validation set, the curve and its sentence;
the best-of-family marks; fit_head's hold-out is featx.data.split's; restrict_train; --budget."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import featx.heads.fit
from featx.cli.app import app

from .imagegen import make_folder

TINY = "timm/test_resnet.r160_in1k"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _split(data: Path, seed: int = 0):
    from featx.data.discover import discover
    from featx.data.split import split_records

    return split_records(discover(data), 0.2, seed)


def test_shots_train_on_training_images_only_and_score_one_fixed_validation_set(tmp_path):
    data = make_folder(tmp_path / "data", classes=("a", "b"), n_per_class=6, size=32, splits=None)
    runs = tmp_path / "runs"
    args = ["compare", str(data), "--quick", "--backbone", TINY, "--no-pretrained", "--image-size", "32",
            "--arch", "lenet5", "--arch", "resnet20", "--skip-finetune", "--scratch-epochs", "1", "--workers", "0",
            "--device", "cpu", "--runs-dir", str(runs), "--shots", "1,2,all", "--repeats", "2"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    run_dir = runs / "compare" / "exp"
    doc = json.loads((run_dir / "results.json").read_text())
    _check_best_marks(doc["methods"], r.stdout)
    split = _split(data)
    train = {str(x.relpath) for x in split.train}
    val = {str(x.relpath) for x in split.val}
    assert set(doc["val_images"]) == val and len(val) == 2
    shots = doc["shots"]
    assert shots["ks"] == [1, 2]
    runs_ = [x for x in shots["runs"] if x["k"] is not None]
    best_head = next(e["method"] for e in doc["methods"] if e["family"] == "heads" and e["best_in_family"])
    assert {x["method"] for x in runs_} == {best_head, "scratch:lenet5", "scratch:resnet20"}
    by = {}
    for x in runs_:
        assert x["error"] is None and x["skipped"] is None and 0 <= x["accuracy"] <= 1
        imgs = x["train_images"]
        assert len(imgs) == x["k"] * 2 == x["n_train"]
        assert set(imgs) <= train and not set(imgs) & val  # never a validation image, by relative path
        if x["method"] != "scratch:resnet20":
            by.setdefault((x["family"], x["k"]), []).append(x)
        if x["family"] != "heads":  # the sub-run trained on exactly these images (recorded in its config.json)
            cfg = json.loads((Path(x["artifact"]) / "config.json").read_text())
            assert cfg["train_subset"] == imgs and cfg["fill_epoch"] == len(train)
    families = {"heads", "scratch"}  # fine-tuning runs the same path (test_finetune_on_a_training_subset)
    assert {f for f, _ in by} == families
    for f in families:
        assert len(by[(f, 1)]) == 2  # the smallest size: two draws
        assert len(by[(f, 2)]) == (2 if f == "heads" else 1)  # the heads: every size
        d1, d2 = (set(x["train_images"]) for x in by[(f, 1)])
        assert d1 != d2  # different draws
        assert set(by[(f, 1)][0]["train_images"]) <= set(by[(f, 2)][0]["train_images"])  # nested within a draw
    points = {(p["method"], p["k"]): p for p in shots["points"]}
    assert all(points[(m, None)]["n"] == 1 for m, _ in points)  # the full-data point: the main table's run
    p1 = points[("scratch:lenet5", 1)]
    accs = [x["accuracy"] for x in by[("scratch", 1)]]
    assert p1["n"] == 2 and p1["mean"] == pytest.approx(np.mean(accs)) and p1["min"] == min(accs)
    assert shots["sentence"]
    assert (run_dir / "learning_curve.png").stat().st_size > 2000
    report = (run_dir / "report.md").read_text()
    assert shots["sentence"] in report and "learning_curve.png" in report and "| all (" in report
    assert shots["sentence"] in " ".join(r.stdout.split())


def _check_best_marks(rows: list, table: str) -> None:
    """Issue 12 (7): every scratch row was "best_in_family"; the terminal table did not mark the best head."""
    for family in ("heads", "scratch"):
        fam = [e for e in rows if e["family"] == family]
        assert len(fam) >= 2
        best = [e for e in fam if e["best_in_family"]]
        assert len(best) == 1 and best[0]["accuracy"] == max(e["accuracy"] for e in fam)
        line = next(ln for ln in table.splitlines() if f" {best[0]['method']} " in ln)
        assert f"{best[0]['method']} *" in line  # the mark, on the best row's own line
        for e in fam:
            if not e["best_in_family"]:
                assert f"{e['method']} *" not in table


def test_finetune_on_a_training_subset_repeated_to_the_full_epoch(tmp_path):
    import featx
    from featx.errors import DataError

    data = make_folder(tmp_path / "data", classes=("a", "b"), n_per_class=6, size=32, splits=None)
    split = _split(data)
    sub = [str(x.relpath) for x in split.train if x.label == "a"][:1] + \
          [str(x.relpath) for x in split.train if x.label == "b"][:1]
    runs = tmp_path / "runs"
    r = featx.finetune(TINY, data, pretrained=False, image_size=32, epochs=1, workers=0, device="cpu",
                       runs_dir=str(runs), train_subset=sub, fill_epoch=len(split.train), verbose=False)
    assert r.n_train == len(split.train) and r.n_val == len(split.val)  # 2 images x 5 copies; validation unchanged
    assert json.loads((r.run_dir / "config.json").read_text())["train_subset"] == sub
    with pytest.raises(DataError, match="not training images"):
        featx.finetune(TINY, data, pretrained=False, image_size=32, epochs=1, workers=0, device="cpu",
                       runs_dir=str(runs), name="leak", train_subset=[str(split.val[0].relpath)], verbose=False)
    assert not (runs / "finetune" / "leak").exists()


def test_draws_are_seeded_nested_and_per_class():
    from featx.comparison.shots import draw

    pool = {"a": [f"a/{i}.jpg" for i in range(10)], "b": [f"b/{i}.jpg" for i in range(3)]}
    one, two, five = (draw(pool, k, 0, seed=0) for k in (1, 2, 5))
    assert set(one) <= set(two) <= set(five)
    assert len(five) == 5 + 3  # a class with fewer images gives all of its own
    assert draw(pool, 2, 0, seed=0) == two and draw(pool, 2, 1, seed=0) != two and draw(pool, 2, 0, seed=1) != two


@pytest.mark.parametrize("text,err", [("0,1", "images per class"), ("1,x", "images per class"), ("all", "at least one")])
def test_bad_shots_are_usage_errors_before_any_work(tmp_path, text, err):
    data = make_folder(tmp_path / "data", classes=("a", "b"), n_per_class=4, size=16)
    r = CliRunner().invoke(app, ["compare", str(data), "--shots", text, "--runs-dir", str(tmp_path / "runs")])
    assert r.exit_code == 2 and err in r.output
    assert not (tmp_path / "runs").exists()


def test_shot_plan_auto_quick_and_sizes_at_or_above_the_largest_class():
    from featx.comparison import CompareSettings
    from featx.comparison.shots import plan
    from featx.errors import UsageError

    class R:
        def __init__(self, label):
            self.label = label

    class S:
        train = [R("a")] * 30 + [R("b")] * 60

    assert plan(CompareSettings(shots="auto"), S).ks == [1, 2, 5, 10, 20]  # below the smallest class (30)
    assert plan(CompareSettings(shots="auto", quick=True), S).ks == [1, 2, 5, 10, 20]
    S.train = [R("a")] * 300 + [R("b")] * 300
    assert plan(CompareSettings(shots="auto"), S).ks == [1, 2, 5, 10, 20, 50, 100, 200]
    assert plan(CompareSettings(shots="auto", quick=True), S).ks == [1, 2, 5, 10, 20]
    p = plan(CompareSettings(shots="5,1,400,all,5"), S)
    assert p.ks == [1, 5] and any("400" in n for n in p.notes)
    with pytest.raises(UsageError, match="smaller sizes"):
        plan(CompareSettings(shots="300"), S)


@pytest.mark.parametrize("k", [1, 2])
def test_every_head_fits_on_one_or_two_images_per_class(k):
    """CV inside fit must not crash at k=1 or 2: head_params_at fixes the parameter there."""
    from featx.comparison.shots import head_params_at
    from featx.features.store import FeatureSet
    from featx.heads import HEADS, fit_head

    rng = np.random.default_rng(0)
    y = np.repeat(["a", "b", "c"], k)
    centers = rng.normal(0, 3, (3, 8))
    X = (centers[np.repeat(np.arange(3), k)] + rng.normal(0, 0.1, (3 * k, 8))).astype(np.float32)
    Xv = (centers[np.repeat(np.arange(3), 4)] + rng.normal(0, 0.1, (12, 8))).astype(np.float32)
    meta = {"backbone": "test", "fingerprint": "x"}
    train = FeatureSet(X, [f"t{i}.jpg" for i in range(len(y))], labels=y, meta=meta)
    val = FeatureSet(Xv, [f"v{i}.jpg" for i in range(12)], labels=np.repeat(["a", "b", "c"], 4), meta=meta)
    for kind in HEADS:
        r = fit_head(train, head=kind, val=val, **head_params_at(kind, k, cv=5))
        assert r.scores["val"]["accuracy"] == 1.0, kind  # well-separated classes: one image each is enough
    assert head_params_at("logistic", 5, 5) == {"cv": 5} and head_params_at("knn", 2, 5) == {"cv": 0, "k": 1}


def test_sentence_is_read_off_the_numbers():
    from featx.comparison.shots import sentence

    def pts(method, family, label, vals):
        return [{"method": method, "family": family, "label": label, "k": k, "mean": m} for k, m in vals.items()]

    points = (pts("heads:logistic", "heads", "frozen features (logistic head)", {1: 0.60, 5: 0.90, None: 0.95})
              + pts("finetune:x", "finetune", "fine-tuning (x)", {1: 0.55, 5: 0.62, None: 0.96})
              + pts("scratch:lenet5", "scratch", "scratch lenet5", {1: 0.5, 5: 0.52, None: 0.61})
              + pts("scratch:resnet20", "scratch", "scratch resnet20", {1: 0.5, 5: 0.55, None: 0.66}))
    assert sentence(points, 240, 2) == ("With 5 images per class, frozen features (logistic head) reach 0.90; the "
                                        "best scratch CNN (resnet20) needs all 120 per class (240 training images) "
                                        "to reach 0.66.")
    no_scratch = [p for p in points if p["family"] != "scratch"]
    assert sentence(no_scratch, 240, 2) == "Fine-tuning (x) needs all 120 images per class to reach 0.96."
    assert "within 0.02 of the 0.96 it reaches with all 120" in sentence(
        pts("finetune:x", "finetune", "fine-tuning (x)", {1: 0.55, 5: 0.95, None: 0.96}), 240, 2)
    assert sentence(pts("heads:l", "heads", "frozen features", {None: 0.9}), 240, 2) == ""  # no sizes ran


def test_budget_skips_runs_with_a_note_never_silently(tmp_path, monkeypatch):
    import featx.comparison.methods as methods

    ticks = iter(range(0, 10_000, 100))  # every look at the budget's clock: 100 s later
    monkeypatch.setattr(methods, "_clock", lambda: next(ticks))
    data = make_folder(tmp_path / "data", classes=("a", "b"), n_per_class=5, size=32, splits=None)
    runs = tmp_path / "runs"
    r = CliRunner().invoke(app, ["compare", str(data), "--quick", "--backbone", TINY, "--no-pretrained",
                                 "--image-size", "32", "--skip-finetune", "--arch", "lenet5", "--workers", "0",
                                 "--device", "cpu", "--runs-dir", str(runs), "--shots", "1", "--budget", "150"])
    assert r.exit_code == 0, r.output
    doc = json.loads((runs / "compare" / "exp" / "results.json").read_text())
    rows = {e["method"]: e for e in doc["methods"]}
    assert rows["scratch:lenet5"]["skipped"] == "budget" and rows["scratch:lenet5"]["accuracy"] is None
    assert any(n.startswith("skipped scratch:lenet5") and "budget" in n for n in doc["notes"])
    curve_runs = [x for x in doc["shots"]["runs"] if x["k"] is not None]
    # the head refits cost seconds: the budget never skips them (issue 24); scratch is off the curve (skipped above)
    assert curve_runs and all(x["family"] == "heads" and x["skipped"] is None for x in curve_runs)
    assert "skipped scratch:lenet5" in r.output and "budget" in (runs / "compare" / "exp" / "report.md").read_text()
    assert not (runs / "compare" / "exp" / "scratch").exists()


def test_restrict_train_refuses_anything_outside_the_training_split(tmp_path):
    from featx.data.split import restrict_train
    from featx.errors import DataError

    data = make_folder(tmp_path / "data", classes=("a", "b"), n_per_class=5, size=16, splits=None)
    split = _split(data)
    train = [str(x.relpath) for x in split.train]
    sub = restrict_train(split, [train[0], train[-1], train[0]], fill_to=len(train))
    assert [str(x.relpath) for x in sub.train[:2]] == [train[0], train[-1]] and len(sub.train) == 2 * 4
    assert sub.val == split.val and sub.test == split.test and sub.classes == split.classes
    with pytest.raises(DataError, match="not training images"):
        restrict_train(split, [train[0], str(split.val[0].relpath)])


@pytest.mark.parametrize("layout", ["folders", "flat"])
def test_fit_head_holds_out_the_images_split_records_holds_out(tmp_path, layout):
    """Issue 13: the same seed holds out the same images in `featx fit` as in finetune/scratch/compare."""
    from featx.features.engine import extract_features
    from featx.heads.fit import FitSettings, _plan

    data = make_folder(tmp_path / "data", classes=("a", "b", "c"), n_per_class=7, size=16,
                       splits=("train", "val") if layout == "folders" else None)
    extract_features(data, tmp_path / "f.npz", backbone=TINY, pretrained=False, image_size=32, workers=0,
                     device="cpu")
    from featx.features.store import load_features

    fs = load_features(tmp_path / "f.npz")
    for seed in (0, 1):
        plan = _plan(fs, None, FitSettings(seed=seed))
        assert sorted(plan.evals["val"].paths) == sorted(str(x.relpath) for x in _split(data, seed).val)


def test_budget_starts_a_run_only_when_its_last_duration_fits(monkeypatch):
    import featx.comparison.methods as methods

    now = [0.0]
    monkeypatch.setattr(methods, "_clock", lambda: now[0])
    b = methods.Budget(100.0)
    assert b.allows("finetune:x", "first run")  # nothing known yet, time left: it starts
    b.spent("finetune:x", 30.0)
    now[0] = 50.0
    assert b.allows("finetune:x", "second run") and b.allows("scratch:y", "other method")
    now[0] = 80.0
    assert not b.allows("finetune:x", "third run")
    assert b.notes == ["skipped third run: 20 s of the 100 s budget left, its last run took 30 s"]
    assert methods.Budget(None).allows("a", "b")
