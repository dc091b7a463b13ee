"""benchmarks/gpu_check.py (issue 14): its --smoke run end to end on the CPU, so the real GPU run cannot die of a
typo; rows in their own process under a time budget; the device command and carry; GPU paths marked gpu."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check as G  # noqa: E402
from tests.conftest import selects_gpu  # noqa: E402
from tests.imagegen import make_folder  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpucheck")
    out = tmp / "out" / "gpu.json"
    rc = G.main(["--smoke", "--photos", str(tmp / "no-photos"), "--work", str(tmp / "work"), "--out", str(out)])
    return rc, json.loads(out.read_text()), out.parent


def _row(doc, key):
    return next(r for r in doc["rows"] if r["key"] == key)


def test_smoke_run_has_every_row_and_no_error(smoke):
    rc, doc, out = smoke
    assert [r["key"] for r in doc["rows"]] == [r[0] for r in G.ROWS]
    errors = {r["key"]: (r["note"], r.get("traceback")) for r in doc["rows"] if r["status"] == "error"}
    assert not errors and rc == 0
    status = {r["key"]: r["status"] for r in doc["rows"]}
    # only what truly needs CUDA is skipped, and it says so
    assert status.pop("pytest") == "skip" and "CUDA" in _row(doc, "pytest")["note"]
    assert "skip" not in status.values(), status
    assert doc["setup"]["images"] == G.SMOKE.images and "synthetic" in doc["setup"]["note"]
    md = (out / "gpu.md").read_text()
    assert md.startswith("| row | check | figure |") and all(f"| {n} |" in md for n in "01234567")
    assert (out / "gpu.log").read_text().count("-- row") == len(G.ROWS)
    assert "Self CPU" in (out / "gpu-profile.txt").read_text()


def test_smoke_extraction_row_measures_every_step(smoke):
    _, doc, _ = smoke
    f = _row(doc, "extract")["figures"]
    plan = [name for name, _ in G.extraction_plan(G.SMOKE, f["default_size"], os.cpu_count() or 1)]
    assert sorted(f["runs"]) == sorted(plan) and not f["skipped_runs"]
    assert all(r["n_images"] == G.SMOKE.images and r["images_per_s"] > 0 for r in f["runs"].values())
    timings = set(f["runs"]["tv"]["timings"])
    assert {"input_wait_s", "output_wait_s", "loader_wait_s", "to_device_s", "write_s"} <= timings
    assert f["decoders_at_crop"]["same_rows"] and f["decoders_at_crop"]["mean_cos"] > 0.99
    assert f["resume"]["identical"] and 0 < f["resume"]["resumed_images"] < G.SMOKE.images
    assert f["compile"]["same_as_eager"]["same_rows"] and f["tutorial"] > 0 and f["ceiling"] > 0
    assert min(f["stages"][k] for k in ("workers_read_bytes", "workers_decode_pil", "device_decode",
                                        "device_decode_resize_crop")) > 0 and f["stages"]["device_decoded_share"] == 1
    # the switches change the speed, never the features
    for name in ("tv-sync", "tv-prefetch-only", "tv-defer-only"):
        assert G.compare_stores(Path(f["runs"]["tv"]["path"]), Path(f["runs"][name]["path"]))["identical"]


def test_smoke_rows_compare_against_their_baselines(smoke):
    _, doc, _ = smoke
    assert _row(doc, "torchrun")["figures"]["compare"]["identical"]
    heads = _row(doc, "heads")["figures"]
    assert heads["shape"] == [G.SMOKE.heads_rows, 1280] and heads["classes"] == G.SMOKE.heads_classes
    assert heads["torch"]["accuracy"] > 0 and heads["sklearn"]["fit_s"] > 0
    ft = _row(doc, "finetune")["figures"]
    assert ft["featx"]["images_per_s"] > 0 and ft["timm_loop"]["images_per_s"] > 0 and ft["ceiling"] > 0
    sc = _row(doc, "scratch")["figures"]
    assert sc["n_train"] == G.SMOKE.scratch_train and sc["resident"] and len(sc["train_s"]) == G.SMOKE.scratch_epochs
    assert _row(doc, "predict")["figures"]["predict_images_per_s"] > 0


def test_the_rows_that_need_cuda_run_their_code_when_told_cuda_is_there(smoke, tmp_path, monkeypatch):
    """The pytest row and the forced-fp16 part are skipped on the CPU: run their code anyway, so a typo there shows."""
    _, _, out = smoke
    args = G.parse_args(["--smoke", "--work", str(out.parent / "work"), "--out", str(tmp_path / "gpu.json")])
    ctx = G.make_ctx(args, time.time() + 120)  # the smoke run's JPEGs, this test's output folder
    monkeypatch.setattr(G, "cuda", lambda: True)
    (tmp_path / "test_tiny.py").write_text("def test_ok():\n    pass\n\ndef test_bad():\n    assert False\n")
    monkeypatch.setattr(G, "pytest_command", lambda junit: [sys.executable, "-m", "pytest", "-q", "-p",
                                                            "no:cacheprovider", f"--junitxml={junit}",
                                                            str(tmp_path / "test_tiny.py")])
    lines, figures, note = G.row_pytest(ctx)
    assert lines[0]["ok"] is False and figures["passed"] == 1 and "test_bad" in note
    assert (tmp_path / "gpu-tests.xml").is_file()
    fp = G.forced_fp16(ctx)  # on the CPU featx trains in fp32 whatever the variable says: not ok, but it ran
    assert fp["precision"] == "fp32" and fp["completed"] and not fp["ok"]


def test_a_row_runs_in_its_own_process_and_is_killed_at_its_timeout(tmp_path):
    args = G.parse_args(["--smoke", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "o" / "gpu.json"),
                         "--photos", str(tmp_path / "none")])
    said = []
    rec = G.run_isolated(args, "env", 120, said.append)
    assert rec["status"] == "pass" and rec["figures"]["cpus"] == os.cpu_count(), rec
    rec = G.run_isolated(args, "env", 0.05, said.append)
    assert rec["status"] == "error" and "timed out" in rec["note"]


def test_a_row_killed_at_its_timeout_keeps_what_it_saved_before(tmp_path):
    args = G.parse_args(["--work", str(tmp_path / "w"), "--out", str(tmp_path / "gpu.json")])
    ctx = G.make_ctx(args, time.time() + 60)
    ctx.row_out = tmp_path / "extract.json"
    ctx.save_partial("extract", [G.line("extract", "9,999 img/s", ok=False)], {"runs": {}}, "")
    rec = G.collect("extract", ctx.row_out, None, 240, ["last words"], 241.0)
    assert rec["status"] == "fail" and rec["lines"][0]["figure"] == "9,999 img/s"
    assert "cut short" in rec["note"] and "timed out after 240 s" in rec["note"] and rec["output_tail"] == "last words"
    rec = G.collect("heads", tmp_path / "none.json", -11, 120, [], 3.0)
    assert rec["status"] == "error" and "exited with -11" in rec["note"]


def test_a_row_that_would_start_past_the_budget_is_skipped_with_a_note(tmp_path):
    args = G.parse_args(["--work", str(tmp_path / "w"), "--out", str(tmp_path / "gpu.json"), "--budget", "10"])
    ctx = G.make_ctx(args, time.time() + 10)
    rec = G._one(args, ctx, "heads", time.time() + 5, lambda s: None, setup_ok=True)
    assert rec["status"] == "skip" and "--rows heads" in rec["note"]
    assert args.isolate and not G.parse_args(["--smoke"]).isolate  # rows in their own process unless --smoke


def test_a_failing_row_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    def boom(ctx):
        raise RuntimeError("typo")

    monkeypatch.setitem(G.BY_KEY, "heads", ("heads", "4", boom, 10))
    args = G.parse_args(["--smoke", "--rows", "heads,env", "--work", str(tmp_path / "w"),
                         "--out", str(tmp_path / "o" / "gpu.json"), "--photos", str(tmp_path / "none")])
    assert G.run_all(args) == 1
    doc = json.loads((tmp_path / "o" / "gpu.json").read_text())
    assert [r["status"] for r in doc["rows"]] == ["error", "pass"] and "typo" in doc["rows"][0]["note"]


def test_device_command_and_carry_are_written_down_and_ignored_by_git():
    doc = (ROOT / "benchmarks" / "gpu_check.py").read_text()
    assert G.DEVICE_COMMAND in " ".join(doc.split())  # the docstring shows the exact command
    assert G.DEVICE_COMMAND in (ROOT / "BENCHMARKS.md").read_text()
    ignored = (ROOT / ".gitignore").read_text().split()
    assert all(f"/{c}/" in ignored for c in G.CARRY)


def test_gpu_tests_get_the_gpu_only_when_asked_for():
    assert selects_gpu("gpu") and selects_gpu("gpu and not slow")
    assert not selects_gpu("") and not selects_gpu("not gpu") and not selects_gpu("slow")
    cmd = G.pytest_command(Path("r.xml"))
    at = cmd.index("pytest")
    assert cmd[at + 1:at + 3] == ["-m", "gpu"] and "CUDA_VISIBLE_DEVICES" not in " ".join(cmd)


def test_junit_counts(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text('<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
                   '<testcase classname="t" name="a"/><testcase classname="t" name="b"><failure/></testcase>'
                   '<testcase classname="t" name="c"><skipped/></testcase></testsuite></testsuites>')
    c = G.parse_junit(xml)
    assert c["passed"] == 1 and c["failures"] == 1 and c["skipped"] == 1 and c["failed_tests"] == ["t.b"]


def test_head_mixture_splits_by_image_and_keeps_classes_coherent():
    from featx.features.store import FeatureSet

    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 5
    x = np.concatenate([c + rng.normal(size=(20, 16)) for c in centres]).astype(np.float32)
    fs = FeatureSet(x, [f"{i}" for i in range(60)], meta={"backbone": "t", "feature_dim": 16})
    m = G.mixture(fs, 500, 3, noise=0.1)
    assert m.features.shape == (500, 16) and len(m.classes) == 3
    assert {"train", "val"} == set(m.splits)
    # a noisy copy sits next to its image: the nearest image of every row is never shared by train and val
    near = np.argmin(((m.features[:, None, :] - x[None]) ** 2).sum(-1), axis=1)
    assert not set(near[m.splits == "train"]) & set(near[m.splits == "val"])


# -- the GPU paths, for `pytest -m gpu` on a CUDA machine (row 1) ------------------------------------------------------
@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("gpu") / "imgs", classes=("a", "b"), n_per_class=12, splits=None,
                       size=48)


@pytest.mark.gpu
def test_cuda_predict_runs_on_the_gpu(labelled, tmp_path):
    import featx

    res = featx.extract_features(labelled, tmp_path / "f.npz", image_size=64, device="cuda")
    assert res.device.startswith("cuda") and res.decoder == "torchvision"
    featx.fit_head(res.path, "logistic", C=1.0, cv=0, output=tmp_path / "h.skops")
    pred = featx.predict_folder(labelled, model=tmp_path / "h.skops", output=tmp_path / "p.csv", device="cuda")
    assert pred.device.startswith("cuda") and pred.n_images == 24 and pred.n_errors == 0


@pytest.mark.gpu
@pytest.mark.parametrize("force16", [False, True])
def test_cuda_finetune_bf16_and_forced_fp16_with_a_scaler(labelled, tmp_path, monkeypatch, force16):
    import torch

    import featx

    if force16:
        monkeypatch.setenv("FEATX_FORCE_FP16", "1")
    r = featx.finetune("efficientnet_lite0", labelled, image_size=64, batch_size=8, epochs=2, head_epochs=1,
                       runs_dir=str(tmp_path), name="ft", verbose=False, device="cuda")
    want = "fp16" if force16 or not torch.cuda.is_bf16_supported() else "bf16"
    assert r.precision == want and r.completed
    assert all(math.isfinite(row["train_loss"]) for row in r.rows)


@pytest.mark.gpu
def test_cuda_scratch_keeps_the_decoded_images_on_the_gpu(labelled, tmp_path):
    import featx

    said = []
    r = featx.train_scratch(labelled, arch="resnet20", epochs=1, image_size=32, in_memory=True, device="cuda",
                            runs_dir=str(tmp_path), name="sc", log=said.append, on_epoch=lambda row: None)
    assert r.completed and any("uint8 tensor" in m and m.rstrip().endswith(("cuda", "cuda:0")) for m in said)
