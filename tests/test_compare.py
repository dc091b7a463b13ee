"""`featx compare --quick`: heads, fine-tuning and scratch CNNs on one split, as a table, JSON and a report."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from featx.cli.app import app

from .imagegen import make_folder

TINY = "timm/test_resnet.r160_in1k"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _val_relpaths(data: Path, seed: int = 0) -> list:
    from featx.data.discover import discover
    from featx.data.split import split_records

    return sorted(str(r.relpath) for r in split_records(discover(data), 0.2, seed).val)


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
    # the same split everywhere: every method validated on the same images (issue 13)
    res = json.loads((run / "results.json").read_text())
    n_val = res["n_val"]
    assert n_val == 3  # round(20 % of 6) = 1 per class, stratified
    assert sorted(res["val_images"]) == _val_relpaths(data)  # featx.data.split's rule, not a second hold-out
    ft = json.loads((Path(by[f"finetune:{TINY}"]["artifact"]) / "config.json").read_text())
    sc = json.loads((Path(by["scratch:lenet5"]["artifact"]) / "config.json").read_text())
    assert ft["split"] == sc["split"] == res["split"]
    head = json.loads((run / "heads" / "head.report.json").read_text())
    assert head["scores"]["val"]["n"] == n_val
    # each part can be skipped; the table is printed without --json
    r = CliRunner().invoke(app, [*args, "--skip-heads", "--skip-finetune"])
    assert r.exit_code == 0, r.output
    assert "scratch:lenet5" in r.stdout and "heads:" not in r.stdout
    assert (runs / "compare" / "exp2" / "report.md").is_file()


def test_offline_missing_weights_exit_4_once_and_leave_no_run_folder(tmp_path, monkeypatch):
    """Issue 12 (7): `compare -b resnet18 --skip-scratch --quick` offline exited 1, said it twice, left folders."""
    monkeypatch.setenv("FEATX_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))  # an empty cache on any machine
    data = make_folder(tmp_path / "data", classes=("a", "b"), n_per_class=3, size=16)
    runs = tmp_path / "runs"
    r = CliRunner().invoke(app, ["compare", str(data), "-b", "resnet18", "--skip-scratch", "--quick",
                                 "--runs-dir", str(runs)])
    assert r.exit_code == 4, r.output
    assert r.output.count("no pretrained weights for timm/resnet18") == 1
    assert "every method failed" not in r.output
    assert not runs.exists() or not any(runs.rglob("*"))


def test_a_failed_run_leaves_no_compare_folder_and_keeps_the_error_code(tmp_path):
    import featx
    from featx.errors import UsageError

    data = make_folder(tmp_path / "data", classes=("a", "b"), n_per_class=3, size=16)
    runs = tmp_path / "runs"
    with pytest.raises(UsageError, match="image-size"):  # the only method fails: its error and exit code
        featx.compare(data, skip_heads=True, skip_finetune=True, archs=("lenet5",), scratch_image_size=4,
                      runs_dir=str(runs))
    assert not (runs / "compare").exists() or not any((runs / "compare").iterdir())


def test_every_failure_message_once_with_the_shared_exit_code():
    from featx.comparison.core import MethodResult
    from featx.comparison.methods import _all_failed
    from featx.errors import DataError, UsageError

    rows = [MethodResult("heads", None, None, 0.1, None, "heads", error="no images decode"),
            MethodResult("scratch:lenet5", None, None, 0.1, None, "scratch", error="no images decode")]
    e = _all_failed(rows, [DataError("no images decode"), DataError("no images decode")])
    assert e.exit_code == 3 and str(e).count("no images decode") == 1 and "heads, scratch:lenet5" in str(e)
    assert _all_failed(rows, [DataError("x"), UsageError("y")]).exit_code == 1


def test_compare_result_to_json_is_a_json_string_and_to_dict_the_results_document(tmp_path):
    """Issue 12 (11): CompareResult.to_json() returned a list."""
    from featx.comparison import CompareResult, CompareSettings, MethodResult

    rows = [MethodResult("heads:logistic", 0.9, 0.9, 1.0, 10, "heads", best_in_family=True, artifact="h.skops")]
    res = CompareResult(run_dir=tmp_path, rows=rows, report_path=tmp_path / "report.md", chart_path=None,
                        split="folders", n_train=8, n_val=4, seconds=1.5, settings=CompareSettings(quick=True))
    text = res.to_json()
    assert isinstance(text, str)
    doc = json.loads(text)
    assert doc == json.loads(json.dumps(res.to_dict(), default=str))
    assert doc["methods"][0]["method"] == "heads:logistic" and doc["settings"]["quick"] is True
    assert res.methods() == doc["methods"]


def test_compare_refuses_to_skip_everything(tmp_path):
    data = make_folder(tmp_path / "data", classes=("a", "b"), n_per_class=3, size=16)
    r = CliRunner().invoke(app, ["compare", str(data), "--skip-heads", "--skip-finetune", "--skip-scratch",
                                 "--runs-dir", str(tmp_path / "r")])
    assert r.exit_code == 2 and "nothing to compare" in r.output


def test_featx_compare_is_the_function_even_after_importing_its_module():
    import featx
    import featx.comparison  # noqa: F401  (the module has its own name, so the API attribute is not shadowed)

    assert featx.compare is featx.comparison.compare
