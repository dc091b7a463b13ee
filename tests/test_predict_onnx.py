"""`featx predict --model model.onnx`: one dispatch, the same rows as the model it was exported from, no torch needed,
folder-level skips and the batch-size cap as in extract."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import featx
from featx.errors import StrictModeError, UsageError
from featx.predict import predictor as PR
from tests.imagegen import make_bad_files, make_folder
from tests.test_predict import tiny_head  # noqa: F401  (session fixture)

pytest.importorskip("onnx", reason="featx[export] is not installed")
pytest.importorskip("onnxruntime", reason="featx[export] is not installed")

ROOT = Path(__file__).resolve().parents[1]

# Makes `import torch` (and torchvision, timm) fail as on a machine where it is not installed. A meta-path finder
# rather than sys.modules["torch"] = None: SciPy (under scikit-learn's metrics) looks into sys.modules["torch"]
# when the name is there, which a real torch-free machine never has.
NO_TORCH = textwrap.dedent("""
    import sys
    class _NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision", "timm"):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    sys.meta_path.insert(0, _NoTorch())
""")


@pytest.fixture(scope="module")
def exported(tiny_head, tmp_path_factory):  # noqa: F811
    """The tiny head exported to ONNX (TorchScript exporter: ~10x faster than dynamo on two cores), and a copy of
    its labelled val/ folder with a truncated JPEG and a text file named .jpg."""
    data, head = tiny_head
    base = tmp_path_factory.mktemp("predict_onnx")
    res = featx.export_model(head, base / "model.onnx", check=data / "val", exporter="torchscript")
    val = Path(shutil.copytree(data / "val", base / "val"))
    (val / "bee" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    (val / "ant" / "notes.jpg").write_text("not a picture\n")
    ref = featx.predict_folder(val, head, output=base / "head.csv", workers=0)
    return {"onnx": res.output, "head": head, "val": val, "ref": ref, "ref_csv": base / "head.csv", "base": base}


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.reader(fh))


def same_rows(a, b, tol=1e-4):
    assert [r["path"] for r in a] == [r["path"] for r in b]
    assert [r["label"] for r in a] == [r["label"] for r in b]
    assert [r["error"] for r in a] == [r["error"] for r in b]
    for x, y in zip(a, b):
        if x["confidence"] is None:
            assert y["confidence"] is None
        else:
            assert abs(x["confidence"] - y["confidence"]) < tol


# -- one dispatch, same rows ---------------------------------------------------------------------------------------
def test_an_onnx_file_predicts_the_rows_of_the_head_it_was_exported_from(exported, tmp_path):
    out = tmp_path / "onnx.csv"
    res = featx.predict_folder(exported["val"], exported["onnx"], output=out, workers=0)
    ref = exported["ref"]
    same_rows(res.rows, ref.rows)
    assert res.n_errors == ref.n_errors == 2 and {e["path"] for e in res.errors} == {"ant/notes.jpg", "bee/broken.jpg"}
    assert res.errors == ref.errors  # same reasons and stages
    assert res.confidence_kind == ref.confidence_kind == "probability"
    assert res.counts == ref.counts and res.metrics["accuracy"] == ref.metrics["accuracy"]
    assert res.device == "cpu (onnxruntime)" and res.model_kind == "head" and res.model.endswith("(ONNX)")
    assert read_csv(out)[0] == read_csv(exported["ref_csv"])[0]  # same table layout
    assert (tmp_path / "onnx.report" / "metrics.json").is_file()  # evaluation report as for any model
    # several odd batches decoded in two processes: the same rows, in input order
    res2 = featx.predict_folder(exported["val"], exported["onnx"], output=False, workers=2, batch_size=3)
    same_rows(res2.rows, res.rows, tol=1e-6)


def test_the_dispatch_knows_onnx_in_one_place(exported, tmp_path):
    from featx.export.onnx_predictor import load_onnx_predictor

    assert PR.artifact_kind(exported["onnx"]) == "onnx" and set(PR.LOADERS) == {"head", "trained", "onnx"}
    loaded = load_onnx_predictor(exported["onnx"], threads=1)
    assert PR.artifact_kind(loaded) == "onnx"
    res = featx.predict_folder(exported["val"], loaded, output=False, workers=0)  # a loaded OnnxPredictor works too
    same_rows(res.rows, exported["ref"].rows)
    pred = PR.load_predictor(exported["onnx"])
    assert not pred.needs_torch and pred.classes == ["ant", "bee"] and pred.image_size == 32
    px = np.zeros((3, 32, 32, 3), np.uint8)
    assert pred(px).shape == (3, 2) and np.allclose(pred(px).sum(1), 1.0, atol=1e-5)
    with pytest.raises(UsageError, match="uint8"):
        pred(px.astype(np.float32))
    with pytest.raises(UsageError, match="carries its own"):
        PR.load_predictor(exported["onnx"], weights=tmp_path / "w.pth")
    with pytest.raises(UsageError, match="export it again"):
        PR.load_predictor(exported["onnx"], image_size=64)
    with pytest.raises(UsageError, match="runs on the CPU with onnxruntime"):
        PR.model_device(exported["onnx"], "cuda")
    assert str(PR.model_device(exported["onnx"], "auto")) == "cpu (onnxruntime)"


# -- a deployment machine: no torch --------------------------------------------------------------------------------
def test_the_cli_predicts_with_an_onnx_file_where_torch_is_not_installed(exported, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(NO_TORCH)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "FEATX_NO_PROGRESS": "1"}
    probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert probe.returncode != 0 and "No module named 'torch'" in probe.stderr  # the block works
    out = tmp_path / "out.csv"
    r = subprocess.run([sys.executable, "-m", "featx", "predict", str(exported["val"]), "--model",
                        str(exported["onnx"]), "-o", str(out), "--workers", "2", "--json"],
                       env=env, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["n_images"] == 14 and summary["n_errors"] == 2 and summary["device"] == "cpu (onnxruntime)"
    rows, ref = read_csv(out), read_csv(exported["ref_csv"])
    assert [(x[0], x[1], x[-1]) for x in rows] == [(x[0], x[1], x[-1]) for x in ref]  # path, label, error
    assert dict((x[0], x[-1]) for x in rows)["bee/broken.jpg"].startswith("truncated or corrupt")
    assert "could not read bee/broken.jpg" in r.stderr and "Traceback" not in r.stderr
    assert (tmp_path / "out.report" / "confusion.png").is_file()
    # a model that needs torch: one line naming what to install, nothing written
    r = subprocess.run([sys.executable, "-m", "featx", "predict", str(exported["val"]), "--model",
                        str(exported["head"]), "-o", str(tmp_path / "head.csv")],
                       env=env, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("Error: torch is not installed"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "head.csv").exists()


def test_importing_the_cli_imports_no_torch_and_the_scratch_help_matches_the_zoo():
    code = "import sys, featx.cli.app; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
    from featx.cli.scratch import ARCHS as literal
    from featx.training.zoo import ARCHS

    assert [(a.name, a.image_size, a.description) for a in literal.values()] == \
        [(a.name, a.image_size, a.description) for a in ARCHS.values()]


def test_numpy_pixels_match_the_torch_loader_rows_errors_and_pixels(tmp_path):
    import torch

    from featx.data.loader import iter_pixels
    from featx.data.numpy_pixels import iter_numpy_pixels
    from featx.data.preprocess import Preprocess

    folder = make_folder(tmp_path / "d", classes=("a",), n_per_class=5, splits=None, size=40)
    bad = make_bad_files(folder / "a")
    paths = sorted((folder / "a").iterdir())
    pp = Preprocess(input_size=24, resize=28)
    batches = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    want = list(iter_pixels(paths, pp, device=torch.device("cpu"), batches=batches, workers=0, decoder="pil"))
    for workers in (0, 2):
        got = list(iter_numpy_pixels(paths, pp, batches=batches, workers=workers))
        assert len(got) == len(want) == 4
        for (gi, gp, ge), (wi, wp, we) in zip(got, want):
            assert list(gi) == list(wi) and ge == we
            assert (gp is None and wp is None) or np.array_equal(gp, wp.numpy())
    errors = {paths[i].name: reason for _, _, errs in got for i, reason, _ in errs}
    assert set(errors) == set(bad) and all(bad[n] in errors[n] for n in bad)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the fake crash reaches the workers through fork")
def test_a_decoding_process_that_dies_is_one_clear_error(tmp_path, monkeypatch):
    import featx.data.jpeg_batch as jb
    from featx.data.numpy_pixels import iter_numpy_pixels
    from featx.data.preprocess import Preprocess
    from featx.errors import DataError

    folder = make_folder(tmp_path / "d", classes=("a",), n_per_class=4, splits=None, size=24)
    paths = sorted((folder / "a").iterdir())
    real = jb.pil_pixels
    monkeypatch.setattr(jb, "pil_pixels", lambda p, *a: os._exit(9) if p.endswith("a_002.jpg") else real(p, *a))
    with pytest.raises(DataError, match=r"a decoding process died .* on were not decoded; re-run with --workers 0"):
        list(iter_numpy_pixels(paths, Preprocess(input_size=16, resize=16), batches=[[0, 1], [2, 3]], workers=2))


# -- folder-level skips and the batch-size cap, as in extract -------------------------------------------------------
@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_folders_discovery_skipped_are_reported_and_strict_refuses_them_before_any_work(exported, tmp_path,
                                                                                         monkeypatch):
    val = Path(shutil.copytree(exported["val"], tmp_path / "val"))
    os.symlink("../ant", val / "bee" / "link_to_ant")  # every ant reached a second time, as a bee
    res = featx.predict_folder(val, exported["onnx"], output=tmp_path / "p.csv", workers=0)
    assert [r["path"] for r in res] == [r["path"] for r in exported["ref"]]  # no row for the links
    assert len(res.skipped) == 7 and all(s["path"].startswith("bee/link_to_ant/") for s in res.skipped)
    assert all("not used as 'bee'" in s["reason"] and s["stage"] == "discover" for s in res.skipped)
    assert res.to_dict()["n_skipped"] == 7 and res.to_dict()["skipped"] == res.skipped
    assert sum("reached under more than one class label" in w for w in res.warnings) == 1  # discover's one summary

    def must_not_load(*_a, **_k):
        raise AssertionError("--strict must refuse skipped folders before loading a model")

    monkeypatch.setattr("featx.predict.folder.load_predictor", must_not_load)
    with pytest.raises(StrictModeError, match="7 file\\(s\\) or folder\\(s\\) could not be read"):
        featx.predict_folder(val, exported["onnx"], output=tmp_path / "q.csv", workers=0, strict=True)
    assert not (tmp_path / "q.csv").exists()


def test_an_oversized_batch_is_capped_to_memory_like_extract(exported, monkeypatch):
    import featx.features.engine as engine

    pred = PR.load_predictor(exported["onnx"])
    assert pred.largest_activation() >= 32 * 32 * 3 * 4  # at least the float input, from onnxruntime's profiler
    monkeypatch.setattr(engine, "CHECK_ABOVE", 2)
    monkeypatch.setattr(engine, "available_memory", lambda: 2 * 2**20)  # 2 MB free
    res = featx.predict_folder(exported["val"], exported["onnx"], output=False, workers=0, batch_size=100000)
    note = [w for w in res.warnings if w.startswith("--batch-size 100000 would need")]
    assert note and "using batches of" in note[0]
    same_rows(res.rows, exported["ref"].rows)


def test_without_onnxruntime_predict_names_the_extra_in_one_line(exported, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from featx.cli.app import app

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    r = CliRunner().invoke(app, ["predict", str(exported["val"]), "--model", str(exported["onnx"]), "-o",
                                 str(tmp_path / "p.csv"), "--workers", "0"])
    assert r.exit_code == 2 and "pip install onnxruntime (or 'featx[export]')" in r.stderr, r.output
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "p.csv").exists()
