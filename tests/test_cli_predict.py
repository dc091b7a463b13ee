"""`featx predict` in-process: table + summary + exit codes, --strict, --json keys, sorting modes, refusals."""
from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from featx.cli.app import app
from tests.test_predict import tiny_head  # noqa: F401  (session fixture: one tiny head for both files)

runner = CliRunner()


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (sha(p) if p.is_file() else "dir") for p in sorted(root.rglob("*"))}


@pytest.fixture
def val(tiny_head, tmp_path):  # noqa: F811
    v = Path(shutil.copytree(tiny_head[0] / "val", tmp_path / "val"))
    (v / "bee" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    return v


def said(r) -> str:
    """stderr with Rich's line wrapping undone."""
    return " ".join(r.stderr.split())


def predict(*args):
    return runner.invoke(app, ["predict", *map(str, args), "--workers", "0"])


def test_help():
    r = runner.invoke(app, ["predict", "--help"])
    assert r.exit_code == 0
    for opt in ("--model", "--sort-into", "--min-confidence", "--dry-run", "--strict", "--top-k", "--format", "--move"):
        assert opt in r.stdout


def test_predict_writes_table_prints_counts_and_scores_and_exits_0_despite_a_corrupt_file(tiny_head, val, tmp_path):  # noqa: F811
    out = tmp_path / "preds.csv"
    r = predict(val, "--model", tiny_head[1], "-o", out)
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert len(rows) == 13
    broken = [x for x in rows if x["path"] == "bee/broken.jpg"][0]
    assert broken["label"] == "" and broken["error"]
    ok = [x for x in rows if not x["error"]]
    acc = sum(x["label"] == x["true_label"] for x in ok) / len(ok)
    text = r.stdout
    assert "Predicted classes" in text and "(unreadable)" in text
    assert f"{acc:.3f}" in text and "Confusion matrix" in text
    assert "confidence = probability" in text and str(out) in text
    assert "could not read bee/broken.jpg" in said(r)
    # 13 files, one of them unreadable: 12 were classified
    assert "12 images classified by" in text and "; 1 unreadable" in text


def test_strict_exits_non_zero_after_writing(tiny_head, val, tmp_path):  # noqa: F811
    out = tmp_path / "preds.csv"
    r = predict(val, "--model", tiny_head[1], "-o", out, "--strict")
    assert r.exit_code == 6
    assert "Error:" in said(r) and "could not be read" in said(r)
    assert len(list(csv.reader(out.open()))) == 14


def test_json_summary_keys(tiny_head, val, tmp_path):  # noqa: F811
    r = predict(val, "--model", tiny_head[1], "-o", tmp_path / "p.jsonl", "--json", "--sort-into", tmp_path / "s")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    for key in ("output", "format", "model", "confidence_kind", "n_images", "n_errors", "counts", "errors",
                "metrics", "unknown_classes", "report", "sort"):
        assert key in d, key
    assert d["format"] == "jsonl" and d["confidence_kind"] == "probability"
    assert d["n_images"] == 13 and d["n_errors"] == 1 and sum(d["counts"].values()) == 12
    assert 0.0 <= d["metrics"]["accuracy"] <= 1.0 and d["metrics"]["n"] == 12
    assert d["sort"]["mode"] == "copy" and len(d["sort"]["actions"]) == 12
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 13


def test_dry_run_sort_creates_nothing(tiny_head, val, tmp_path):  # noqa: F811
    before = snapshot(tmp_path)
    r = predict(val, "--model", tiny_head[1], "-o", tmp_path / "p.csv", "--sort-into", tmp_path / "sorted",
                "--move", "--dry-run")
    assert r.exit_code == 0, r.output
    assert snapshot(tmp_path) == before
    assert "Plan" in r.stdout and "would sort into" in r.stdout and "nothing was written" in r.stdout


def test_copy_keeps_sources_byte_identical_and_move_removes_them(tiny_head, val, tmp_path):  # noqa: F811
    src_before = snapshot(val)
    r = predict(val, "--model", tiny_head[1], "-o", tmp_path / "p.csv", "--sort-into", tmp_path / "copied")
    assert r.exit_code == 0, r.output
    assert snapshot(val) == src_before
    copied = sorted(p.name for p in (tmp_path / "copied").rglob("*.jpg"))
    assert len(copied) == 12 and "broken.jpg" not in copied

    r = predict(val, "--model", tiny_head[1], "-o", tmp_path / "p.csv", "--sort-into", tmp_path / "linked", "--link")
    assert r.exit_code == 0 and snapshot(val) == src_before

    r = predict(val, "--model", tiny_head[1], "-o", tmp_path / "p.csv", "--sort-into", tmp_path / "moved", "--move")
    assert r.exit_code == 0, r.output
    left = sorted(str(p.relative_to(val)) for p in val.rglob("*.jpg"))
    assert left == ["bee/broken.jpg"]  # only the unreadable file stays
    moved = {p.name: sha(p) for p in (tmp_path / "moved").rglob("*.jpg")}
    assert moved == {Path(k).name: v for k, v in src_before.items() if k.endswith(".jpg") and "broken" not in k}


def test_option_errors_are_one_line_with_exit_codes(tiny_head, val, tmp_path, monkeypatch):  # noqa: F811
    r = predict(val, "--model", tiny_head[1], "--sort-into", tmp_path / "s", "--link", "--move")
    assert r.exit_code == 2 and "exclude each other" in said(r)
    r = predict(val, "--model", tiny_head[1], "-o", val / "p.csv")
    assert r.exit_code == 2 and "inside the input folder" in said(r)
    r = predict(val, "--model", tiny_head[1], "--format", "xml")
    assert r.exit_code == 2
    monkeypatch.chdir(tmp_path)  # no featx-out/head.skops here
    r = predict(val)
    assert r.exit_code == 5 and "featx fit" in said(r)
    assert not (tmp_path / "featx-out").exists()


def test_head_whose_backbone_weights_do_not_match_is_refused(tiny_head, val, tmp_path):  # noqa: F811
    from featx.heads import Head, load_head, save_head

    head = load_head(tiny_head[1])
    meta = {k: v for k, v in head.meta.items() if k not in ("format", "format_version")}
    meta["features"] = {**head.feature_meta, "weights_sha256": "1" * 64}
    save_head(Head(head.pipeline, meta), tmp_path / "other.skops")
    r = predict(val, "--model", tmp_path / "other.skops", "-o", tmp_path / "p.csv")
    assert r.exit_code == 4 and "differ" in said(r)
    assert not (tmp_path / "p.csv").exists()


def test_help_shows_no_type_placeholders():
    r = runner.invoke(app, ["predict", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    assert "{images}" not in r.stdout and "<bool>" not in r.stdout
    assert "predict [OPTIONS] IMAGES" in r.stdout and "--image-size" in r.stdout


def test_a_missing_model_says_how_to_make_one(val, tmp_path):
    r = predict(val, "--model", tmp_path / "nope.skops", "-o", tmp_path / "p.csv")
    assert r.exit_code == 5
    assert "does not exist" in said(r) and "featx fit" in said(r) and "featx finetune" in said(r)


def test_a_failed_sort_prints_the_summary_then_exits_7(tiny_head, val, tmp_path):  # noqa: F811
    (tmp_path / "sorted").mkdir()
    (tmp_path / "sorted" / "bee").write_text("a file, not a folder")
    r = predict(val, "--model", tiny_head[1], "-o", tmp_path / "p.csv", "--sort-into", tmp_path / "sorted")
    assert r.exit_code == 7
    assert "Predicted classes" in r.stdout and "sorted into" in r.stdout  # what was done is still shown
    assert "Error:" in said(r) and "could not be sorted" in said(r) and "could not sort" in said(r)
    rows = list(csv.DictReader((tmp_path / "p.csv").open(encoding="utf-8")))
    assert {x["sort_status"].split(":")[0] for x in rows if x["label"] == "bee"} == {"failed"}


def test_a_run_holding_the_table_is_named(tiny_head, val, tmp_path):  # noqa: F811
    import subprocess
    import sys

    out = tmp_path / "p.csv"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from featx._io import OutputLock; l = OutputLock(sys.argv[1]); "
         "l.acquire(); print('held', flush=True); sys.stdin.read()", str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        r = predict(val, "--model", tiny_head[1], "-o", out)
        assert r.exit_code == 7 and f"pid {holder.pid}" in said(r) and not out.exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    from featx._io import OutputLock

    with OutputLock(out):  # the OS released the lock with its holder
        pass
