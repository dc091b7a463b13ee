"""`featx compare --quick`: heads, fine-tuning and a scratch CNN on one split, as a table, JSON and a report."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from featx.cli.app import app

from .imagegen import make_folder

TINY = "timm/test_resnet.r160_in1k"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_compare_quick_writes_table_json_and_report(tmp_path):
    data = make_folder(tmp_path / "data", classes=("a", "b", "c"), n_per_class=6, size=32, splits=None)
    runs = tmp_path / "runs"
    args = ["compare", str(data), "--quick", "--backbone", TINY, "--no-pretrained", "--image-size", "32",
            "--arch", "lenet5", "--finetune-epochs", "2", "--scratch-epochs", "2", "--workers", "0",
            "--device", "cpu", "--runs-dir", str(runs)]
    r = CliRunner().invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    entries = json.loads(r.stdout)
    methods = [e["method"] for e in entries]
    assert {"heads:logistic", "heads:knn", f"finetune:{TINY}", "scratch:lenet5"} <= set(methods)
    for e in entries:
        assert {"method", "accuracy", "balanced_accuracy", "seconds", "trainable_params"} <= set(e)
        assert e["error"] is None and 0.0 <= e["accuracy"] <= 1.0 and e["seconds"] >= 0
    accs = [e["accuracy"] for e in entries]
    assert accs == sorted(accs, reverse=True)  # best first
    by = {e["method"]: e for e in entries}
    assert by["scratch:lenet5"]["trainable_params"] > by["heads:logistic"]["trainable_params"] > 0
    assert by["heads:knn"]["trainable_params"] == 0
    run = runs / "compare" / "exp"
    assert (run / "accuracy.png").stat().st_size > 1000
    report = (run / "report.md").read_text()
    assert "| method | val accuracy" in report and "scratch:lenet5" in report
    # the same split everywhere: every method validated on the same number of images
    res = json.loads((run / "results.json").read_text())
    n_val = res["n_val"]
    assert n_val == 3  # round(20 % of 6) = 1 per class, stratified
    ft = json.loads((Path(by[f"finetune:{TINY}"]["artifact"]) / "config.json").read_text())
    sc = json.loads((Path(by["scratch:lenet5"]["artifact"]) / "config.json").read_text())
    assert ft["split"] == sc["split"] == res["split"]
    # each part can be skipped; the table is printed without --json
    r = CliRunner().invoke(app, [*args, "--skip-heads", "--skip-finetune"])
    assert r.exit_code == 0, r.output
    assert "scratch:lenet5" in r.stdout and "heads:" not in r.stdout
    assert (runs / "compare" / "exp2" / "report.md").is_file()


def test_compare_refuses_to_skip_everything(tmp_path):
    data = make_folder(tmp_path / "data", classes=("a", "b"), n_per_class=3, size=16)
    r = CliRunner().invoke(app, ["compare", str(data), "--skip-heads", "--skip-finetune", "--skip-scratch",
                                 "--runs-dir", str(tmp_path / "r")])
    assert r.exit_code == 2 and "nothing to compare" in r.output


def test_featx_compare_is_the_function_even_after_importing_its_module():
    import featx
    import featx.comparison  # noqa: F401  (the module has its own name, so the API attribute is not shadowed)

    assert featx.compare is featx.comparison.compare
