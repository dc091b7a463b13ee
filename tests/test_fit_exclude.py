"""`featx fit --exclude`: images an audit CSV or a path list names are left out of fitting and validation."""
from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from featx.cli.app import app
from featx.errors import UsageError
from featx.features.store import FeatureSet, save_features
from featx.heads import fit_head, load_head

META = {"backbone": "efficientnet_lite0", "weights_sha256": "ef" * 32, "preprocess": {"input_size": 8},
        "layer": "pooled", "feature_dim": 64}


@pytest.fixture(scope="module")
def fs():
    from sklearn.datasets import load_digits

    X, y = load_digits(n_class=3, return_X_y=True)
    X, y = X[:240], y[:240]
    labels = np.array([f"d{v}" for v in y])
    splits = np.array(["train"] * 180 + ["val"] * 60)
    return FeatureSet(X, [f"d{v}/{i}.png" for i, v in enumerate(y)], labels=labels, splits=splits,
                      classes=sorted(set(labels)), meta=dict(META))


def test_duplicates_csv_keeps_the_first_member_of_each_group(fs, tmp_path):
    # the audit's layout: members of a group in rows, train before val (a leak: the val copy goes, train stays)
    csv = tmp_path / "duplicates.csv"
    csv.write_text("group,size,leakage,conflicting_labels,path,split,role,label,similarity,exact\n"
                   f"1,2,true,false,{fs.paths[0]},train,train,{fs.labels[0]},0.95,false\n"
                   f"1,2,true,false,{fs.paths[200]},val,val,{fs.labels[200]},0.95,false\n"
                   f"2,3,false,false,{fs.paths[1]},train,train,{fs.labels[1]},0.97,false\n"
                   f"2,3,false,false,{fs.paths[2]},train,train,{fs.labels[2]},0.97,false\n"
                   f"2,3,false,false,{fs.paths[3]},train,train,{fs.labels[3]},0.97,false\n")
    r = fit_head(fs, "logistic", C=1.0, cv=0, exclude=csv)
    x = r.training["excluded"]
    assert x["excluded"] == 3 and x["by_split"] == {"train": 2, "val": 1} and x["not_found"] == 0
    assert r.training["n"] == 178 and r.scores["val"]["n"] == 59
    assert r.head.meta["training"]["excluded"]["excluded"] == 3


def test_label_issue_csv_and_plain_list_drop_every_listed_path(fs, tmp_path, caplog):
    csv = tmp_path / "label_issues.csv"
    csv.write_text("rank,path,split,role,given,suggested,given_probability\n"
                   + "".join(f"{n},{fs.paths[i]},train,train,x,y,0.1\n" for n, i in enumerate((5, 6, 7), 1)))
    assert fit_head(fs, "logistic", C=1.0, cv=0, exclude=csv).training["n"] == 177
    listing = tmp_path / "bad.txt"
    listing.write_text(f"# hand-picked\n{fs.paths[10]}\n\n{fs.paths[230]}\nd0/not-there.png\n")
    with caplog.at_level("WARNING", logger="featx.heads"):
        r = fit_head(fs, "logistic", C=1.0, cv=0, exclude=listing)
    assert r.training["n"] == 179 and r.scores["val"]["n"] == 59 and r.training["excluded"]["not_found"] == 1
    assert "not-there.png" in caplog.text


def test_a_list_matching_nothing_or_missing_is_a_usage_error(fs, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("/elsewhere/a.png\n/elsewhere/b.png\n")
    with pytest.raises(UsageError, match="none of its 2 paths"):
        fit_head(fs, "logistic", C=1.0, cv=0, exclude=other)
    with pytest.raises(UsageError, match="no such file"):
        fit_head(fs, "logistic", C=1.0, cv=0, exclude=tmp_path / "missing.csv")


def test_cli_exclude_prints_what_was_left_out(fs, tmp_path):
    store = tmp_path / "f.npz"
    save_features(fs, store)
    listing = tmp_path / "drop.txt"
    listing.write_text(f"{fs.paths[0]}\n{fs.paths[1]}\n")
    res = CliRunner().invoke(app, ["fit", str(store), "-o", str(tmp_path / "h.skops"), "--C", "1", "--cv", "0",
                                   "--exclude", str(listing)])
    assert res.exit_code == 0, res.output
    assert "left out 2 image(s)" in res.output
    report = json.loads((tmp_path / "h.report.json").read_text())
    assert json.dumps(report).count("drop.txt") >= 1
    assert load_head(tmp_path / "h.skops").meta["training"]["n"] == 178
    bad = CliRunner().invoke(app, ["fit", str(store), "-o", str(tmp_path / "h2.skops"), "--exclude",
                                   str(tmp_path / "nope.csv")])
    assert bad.exit_code == 2 and not (tmp_path / "h2.skops").exists()
