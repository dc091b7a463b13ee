"""Issue 22.3: every CSV featx writes round-trips any file name (\\r, \\n, quotes, commas, non-UTF-8 bytes) through
Python's csv module and pandas with exactly one row per image, and `fit --exclude duplicates.csv` leaves out the right
images."""
from __future__ import annotations

import csv
import io
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import featx
from featx._io import safe_str
from featx.features.store import FeatureSet, load_features
from tests.imagegen import class_color, make_image

pd = pytest.importorskip("pandas")

# Every name a CSV reader has tripped on: line ends of both kinds (alone and as a pair), the quote character, the
# delimiter, Unicode line separators (str.splitlines splits on them, csv and pandas do not), leading/trailing spaces,
# a leading '#', and a name that is not valid UTF-8 (kept as surrogate escapes by Python; featx writes it as U+FFFD).
ODD = ["cr\rname", "lf\nname", "crlf\r\nname", 'quote"d', "com,ma", "sep\u2028line", "nel\x85x", " spaced ",
       "#hash", "plain"]
NON_UTF8 = os.fsdecode(b"caf\xe9")  # surrogate-escaped on a UTF-8 file system


def _csv_rows(path: Path) -> list:
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _pandas_rows(path: Path):
    return pd.read_csv(path, dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory):
    """Two classes of images whose names hold every odd character; each ``ant`` image also has an exact copy in
    ``bee/`` under another odd name (near-duplicate groups whose members have odd names on both sides)."""
    if sys.platform == "darwin":
        pytest.skip("macOS file systems refuse non-UTF-8 names")
    root = tmp_path_factory.mktemp("odd") / "images"
    names = ODD + [NON_UTF8]
    for i, stem in enumerate(names):
        make_image(root / "ant" / f"{stem}.png", size=24, color=class_color(0), seed=i)
        make_image(root / "bee" / f"b{i}{stem}.png", size=24, color=class_color(1), seed=100 + i)
    for i, stem in enumerate(names[:4]):  # exact copies: 4 duplicate groups
        shutil.copyfile(root / "ant" / f"{stem}.png", root / "bee" / f"copy{stem}.png")
    bb = featx.create_backbone("timm/test_resnet", pretrained=False, image_size=24)
    feats = root.parent / "f.npz"
    featx.extract_features(root, feats, backbone=bb, workers=0)
    return root, feats


def test_the_store_holds_every_odd_name(odd_folder):
    root, feats = odd_folder
    fs = load_features(feats)
    assert len(fs.paths) == 2 * (len(ODD) + 1) + 4
    assert f"ant/{NON_UTF8}.png" in list(fs.paths) and "ant/cr\rname.png" in list(fs.paths)


def test_predict_table_round_trips_every_name(odd_folder, tmp_path):
    root, feats = odd_folder
    head = tmp_path / "h.skops"
    featx.fit_head(feats, output=head, C=1.0, cv=0)
    out = tmp_path / "p.csv"
    res = featx.predict_folder(root, head, output=out, workers=0)
    want = sorted(safe_str(r["path"]) for r in res.rows)
    assert len(want) == len(load_features(feats).paths)
    assert sorted(r["path"] for r in _csv_rows(out)) == want
    df = _pandas_rows(out)
    assert len(df) == len(want) and sorted(df["path"]) == want
    assert out.read_bytes().decode("utf-8")  # valid UTF-8 whatever the names


def test_audit_csvs_round_trip_and_fit_exclude_leaves_out_the_copies(odd_folder, tmp_path):
    root, feats = odd_folder
    fs = load_features(feats)
    rep = tmp_path / "audit"
    res = featx.audit(feats, report_dir=rep, images=root, checks=["duplicates", "labels", "outliers"], folds=2,
                      threshold=0.99999)  # exact copies only (random-init features put all of one colour close)
    assert len(res.duplicates) == 4 and res.label_issues is not None and res.outliers is not None
    for name, rows in (("duplicates.csv", [m for g in res.duplicates for m in g["members"]]),
                       ("label_issues.csv", res.label_issues), ("outliers.csv", res.outliers)):
        want = [safe_str(r["path"]) for r in rows]
        assert [r["path"] for r in _csv_rows(rep / name)] == want, name
        df = _pandas_rows(rep / name)
        assert len(df) == len(rows) and list(df["path"]) == want, name
    # every duplicate group keeps its first member and loses the others, whatever their names
    gone = {m["path"] for g in res.duplicates for m in g["members"][1:]}
    assert gone == {f"bee/copy{s}.png" for s in (ODD + [NON_UTF8])[:4]}  # ant/ is listed before bee/
    fit = featx.fit_head(feats, C=1.0, cv=0, exclude=rep / "duplicates.csv")
    x = fit.training["excluded"]
    assert x["excluded"] == len(gone) and x["not_found"] == 0, x
    from featx.heads.exclude import apply_exclusions

    left, _ = apply_exclusions(fs, rep / "duplicates.csv")
    assert sorted(left.paths) == sorted(set(fs.paths) - gone)


def test_exclude_matches_a_non_utf8_name_by_the_form_featx_writes(odd_folder, tmp_path):
    """A CSV featx wrote holds U+FFFD for an undecodable byte; --exclude maps it back to the stored name."""
    root, feats = odd_folder
    lst = tmp_path / "list.csv"
    with open(lst, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\r\n")
        w.writerow(["path"])
        for p in (f"ant/{NON_UTF8}.png", "ant/cr\rname.png", "bee/b1lf\nname.png"):
            w.writerow([safe_str(p)])
    fit = featx.fit_head(feats, C=1.0, cv=0, exclude=lst)
    assert fit.training["excluded"]["excluded"] == 3 and fit.training["excluded"]["not_found"] == 0


def test_exclusions_read_with_the_csv_module_not_line_splitting(tmp_path):
    """A quoted name with a line separator (U+2028, \\x85, \\r) stays one row when read back."""
    from featx.heads.exclude import read_exclusions

    names = ["a\u2028b.png", "c\x85d.png", "e\rf.png", "g\r\nh.png", 'i"j,k.png']
    lst = tmp_path / "x.csv"
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(["path"])
    for n in names:
        w.writerow([n])
    lst.write_bytes(buf.getvalue().encode("utf-8"))
    assert read_exclusions(lst) == names


def test_every_csv_writer_uses_the_one_round_trip_setting():
    """The training metrics, predict tables and audit CSVs: a field with a lone \\r is quoted."""
    from featx._io import csv_writer

    buf = io.StringIO()
    csv_writer(buf).writerow(["a\rb", "c"])
    assert list(csv.reader(io.StringIO(buf.getvalue(), newline=""))) == [["a\rb", "c"]]
    assert len(pd.read_csv(io.StringIO("x,y\r\n" + buf.getvalue()), dtype=str)) == 1


def test_jsonl_table_keeps_one_row_per_name_for_any_line_reader(tmp_path):
    """JSON escapes \\r and \\n; U+2028, U+2029 and \\x85 (line ends to str.splitlines) are escaped too."""
    import json

    from featx.predict.tables import write_rows

    names = ODD + ["para\u2029graph", NON_UTF8]
    rows = [dict(path=f"{n}.png", label="a", confidence=0.5, top_k=[{"label": "a", "score": 0.5}], error=None)
            for n in names]
    out = write_rows(rows, tmp_path / "p.jsonl", "jsonl")
    text = out.read_bytes().decode("utf-8")
    want = [safe_str(f"{n}.png") for n in names]
    assert [json.loads(ln)["path"] for ln in text.splitlines()] == want
    assert list(pd.read_json(out, lines=True, dtype=False)["path"]) == want
