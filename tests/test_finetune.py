"""`featx finetune`: the two-phase recipe on a tiny folder, the run folder, load_model, --resume, the CLI contract."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from featx.cli.app import app
from featx.errors import UsageError
from featx.training import finetune, load_model
from featx.data.loader import stack_uint8

from .imagegen import make_folder

# a 0.37M-parameter timm ResNet: random init needs no download, and a CPU step takes milliseconds
TINY = "timm/test_resnet.r160_in1k"
RUN_FILES = {"config.json", "metrics.csv", "learning_curve.png", "confusion.png", "best.safetensors",
             "last.safetensors", "model.json", "report.md", "resume.safetensors"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("ft") / "data", classes=("a", "b", "c"), n_per_class=8, size=40)


def test_finetune_lowers_the_loss_and_writes_a_complete_run(data, tmp_path):
    res = finetune(TINY, data, pretrained=False, epochs=4, head_epochs=1, image_size=32, batch_size=8, workers=0,
                   runs_dir=str(tmp_path))
    assert [r["phase"] for r in res.rows] == ["head", "finetune", "finetune", "finetune"]
    assert res.rows[-1]["train_loss"] < res.rows[0]["train_loss"]
    assert res.run_dir == tmp_path / "finetune" / "exp"
    assert RUN_FILES <= {p.name for p in res.run_dir.iterdir()}
    rows = list(csv.DictReader(open(res.run_dir / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert {"train_loss", "val_accuracy", "lr", "seconds", "images_per_s"} <= set(rows[0])
    meta = json.loads((res.run_dir / "model.json").read_text())
    assert meta["kind"] == "finetune" and meta["backbone"] == TINY and meta["classes"] == ["a", "b", "c"]
    assert meta["preprocess"]["input_size"] == 32 and "torch" in meta["versions"]
    assert meta["trainable_params"] == res.trainable_params > 300_000  # phase 2 unfroze everything ("all")
    cfg = json.loads((res.run_dir / "config.json").read_text())
    assert cfg["phases"] == [["head", 1], ["finetune", 3]] and cfg["unfreeze"] == "all"
    assert cfg["memory_format"] == "channels_last"  # CPU training of a backbone: measured 1.7x contiguous


def test_checkpoint_predicts_like_the_validation_run(data, tmp_path):
    res = finetune(TINY, data, pretrained=False, epochs=2, image_size=32, batch_size=8, workers=0,
                   runs_dir=str(tmp_path), name="p")
    for ref in (res.run_dir, res.run_dir / "model.json", res.run_dir / "best.safetensors"):
        tm = load_model(ref)
        assert tm.classes == ["a", "b", "c"] and tm.kind == "finetune"
    # classify the validation images through the recorded recipe; accuracy equals the recorded best
    from featx.data.decode import load_rgb

    val = sorted((data / "val").rglob("*.jpg"))
    x = stack_uint8([tm.preprocess.resize_crop(load_rgb(p, draft_size=tm.preprocess.resize)) for p in val])
    pred = tm.predict_uint8(x).argmax(1).tolist()
    acc = sum(tm.classes[i] == p.parent.name for i, p in zip(pred, val)) / len(val)
    assert acc == pytest.approx(res.best["accuracy"])
    # `featx predict --model RUN_DIR` goes through the extraction engine and gives the same labels
    from featx.predict import predict_folder

    out = predict_folder(data / "val", model=res.run_dir, device="cpu", workers=0)
    by_path = {Path(r["path"]).name: r["label"] for r in out.rows}
    assert by_path == {p.name: tm.classes[i] for i, p in zip(pred, val)}


def test_resume_continues_exactly_where_it_stopped(data, tmp_path):
    kw = dict(pretrained=False, epochs=3, head_epochs=1, image_size=32, batch_size=8, workers=0, runs_dir=str(tmp_path))
    full = finetune(TINY, data, name="full", **kw)
    part = finetune(TINY, data, name="part", stop_after=2, **kw)
    assert not part.completed and len(part.rows) == 2
    assert "--resume" in (part.run_dir / "report.md").read_text()
    resumed = finetune(TINY, data, name="part", resume=True, **{**kw, "epochs": 99})  # saved settings win
    assert resumed.completed and [r["epoch"] for r in resumed.rows] == [1, 2, 3]
    rows = list(csv.DictReader(open(resumed.run_dir / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    # per-epoch seeding + saved optimizer state: the resumed run retraces the uninterrupted one
    for a, b in zip(full.rows, resumed.rows):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)


def test_cli_json_contract_and_refusals(data, tmp_path):
    runs = tmp_path / "runs"
    args = ["finetune", TINY, str(data), "--no-pretrained", "--epochs", "1", "--image-size", "32", "--batch-size", "8",
            "--workers", "0", "--runs-dir", str(runs), "--name", "cli"]
    r = CliRunner().invoke(app, [*args, "--json"])
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["run_dir"] == str(runs / "finetune" / "cli")
    assert Path(s["model"]).name == "model.json" and load_model(s["model"]).classes == ["a", "b", "c"]
    assert set(s["best"]) >= {"accuracy", "balanced_accuracy", "epoch"} and s["best"]["epoch"] == 1
    # an existing --name is neither overwritten nor mixed with a new run
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 2 and "already exists" in r.output
    r = CliRunner().invoke(app, [*args[:-2], "--unfreeze", "top"])
    assert r.exit_code == 2 and "--unfreeze" in r.output
    r = CliRunner().invoke(app, ["finetune", "no_such_net", str(data), "--runs-dir", str(runs)])
    assert r.exit_code == 2 and "unknown backbone" in r.output
    assert [d.name for d in (runs / "finetune").iterdir()] == ["cli"]  # the failed run left no empty exp/ behind
    r = CliRunner().invoke(app, ["finetune", TINY, str(data), "--runs-dir", str(data / "runs")])
    assert r.exit_code == 2 and "inside the input folder" in r.output


def test_unfreeze_top_groups_only(data, tmp_path):
    res = finetune(TINY, data, pretrained=False, epochs=2, head_epochs=1, unfreeze=1, image_size=32, batch_size=8,
                   workers=0, runs_dir=str(tmp_path))
    from featx.backbones import create_backbone

    bb = create_backbone(TINY, pretrained=False)
    top = sum(p.numel() for m in bb.layer_groups()[-1] for p in m.parameters())
    head = sum(p.numel() for p in bb.reset_classifier(3).parameters())
    assert res.trainable_params == top + head


def test_head_phase_leaves_the_backbone_and_its_bn_statistics_untouched(data, tmp_path):
    from featx.backbones import create_backbone
    from featx.training.checkpoint import load_weights

    res = finetune(TINY, data, pretrained=False, epochs=1, image_size=32, batch_size=8, workers=0, runs_dir=str(tmp_path))
    assert [r["phase"] for r in res.rows] == ["head"] and res.trainable_params < 1000
    init = create_backbone(TINY, pretrained=False, num_classes=3).model.state_dict()  # the same seeded init
    trained, _ = load_weights(res.run_dir / "last.safetensors")
    head_keys = {k for k in trained if k.startswith("fc.")}
    assert head_keys and any(not torch.equal(trained[k], init[k]) for k in head_keys)
    body = [k for k in trained if k not in head_keys]
    assert any("running_mean" in k for k in body)
    for k in body:  # weights and BatchNorm running statistics alike
        assert torch.equal(trained[k], init[k]), k


def test_augmentation_is_reproducible_whatever_the_worker_count(data, tmp_path):
    kw = dict(pretrained=False, epochs=2, head_epochs=1, image_size=32, batch_size=8, runs_dir=str(tmp_path))
    a = finetune(TINY, data, workers=0, **kw)
    b = finetune(TINY, data, workers=2, **kw)
    assert [r["train_loss"] for r in a.rows] == [r["train_loss"] for r in b.rows]
    c = finetune(TINY, data, workers=0, seed=1, **kw)
    assert [r["train_loss"] for r in c.rows] != [r["train_loss"] for r in a.rows]


# -- issue 11/12: one run per folder, nothing left by a failed start, interrupts that say how to resume -------------
FAST = dict(pretrained=False, epochs=2, head_epochs=1, image_size=32, batch_size=8, workers=0, verbose=False)
ONE = {**FAST, "epochs": 1}  # the head phase only: the cheapest complete run


def test_a_second_run_on_a_busy_run_folder_is_refused_at_once(data, tmp_path):
    import os

    from featx._io import OutputLock
    from featx.errors import OutputError

    first = finetune(TINY, data, name="busy", runs_dir=str(tmp_path), stop_after=1, **FAST)  # resumable
    before = {p.name: p.stat().st_mtime_ns for p in first.run_dir.iterdir()}
    with OutputLock(first.run_dir):  # what a running `featx finetune --name busy` holds
        for again in (dict(name="busy", resume=True), dict(name="busy", exist_ok=True), dict(resume=True)):
            with pytest.raises(OutputError, match=rf"being written by another featx run \(pid {os.getpid()}"):
                finetune(TINY, data, runs_dir=str(tmp_path), **{**FAST, **again})
    assert {p.name: p.stat().st_mtime_ns for p in first.run_dir.iterdir()} == before  # untouched
    resumed = finetune(TINY, data, name="busy", resume=True, runs_dir=str(tmp_path), **FAST)  # free again
    assert resumed.completed
    assert not [p for p in (tmp_path / "finetune").iterdir() if p.name.endswith(".featx-lock")]


def test_failures_before_the_first_epoch_leave_no_folders(data, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    r = CliRunner().invoke(app, ["finetune", TINY, str(data), "--weights", str(tmp_path / "missing.safetensors"),
                                 "--runs-dir", str(runs)])
    assert r.exit_code == 4, r.output
    assert not runs.exists()  # neither runs/finetune/exp nor an empty runs/finetune/
    from featx.training import trainer as T

    def boom(self, epoch):
        raise RuntimeError("crash in epoch 1")

    monkeypatch.setattr(T.Trainer, "_train_epoch", boom)
    with pytest.raises(RuntimeError):
        finetune(TINY, data, runs_dir=str(runs), **FAST)
    assert not runs.exists()  # config.json was the only file, and it went with its folder


@pytest.mark.parametrize("sig, code, word", [("SIGINT", 130, "Ctrl-C"), ("SIGTERM", 143, "SIGTERM")])
def test_ctrl_c_and_sigterm_both_say_how_to_resume(data, tmp_path, sig, code, word):
    import signal

    from featx.errors import Interrupted

    seen = []

    def stop_in_epoch_2(row):
        seen.append(row["epoch"])
        if row["epoch"] == 2:  # epoch 1 is saved by now; epoch 2 is not
            if sig == "SIGINT":  # what Python's own SIGINT handler raises (a real signal here was flaky late in a
                raise KeyboardInterrupt  # long suite: the run finished before it was handled)
            signal.raise_signal(signal.SIGTERM)  # featx's own handler: exercised for real

    try:
        finetune(TINY, data, name="sig", runs_dir=str(tmp_path), on_epoch=stop_in_epoch_2, **FAST)
    except Interrupted as e:
        stopped = e
    else:
        pytest.fail(f"finetune was not interrupted; on_epoch saw epochs {seen}")
    msg = str(stopped)
    assert seen == [1, 2] and stopped.exit_code == code and msg.startswith(f"stopped by {word};")
    assert "epoch 1 is saved" in msg and "--resume --name sig" in msg
    if sig == "SIGINT":  # and the hint works
        done = finetune(TINY, data, name="sig", resume=True, runs_dir=str(tmp_path), **FAST)
        assert done.completed and [r["epoch"] for r in done.rows] == [1, 2]


def test_a_reused_folder_keeps_files_featx_did_not_write(data, tmp_path):
    run = tmp_path / "finetune" / "mine"
    run.mkdir(parents=True)
    (run / "report.md").write_text("my own notes\n")
    with pytest.raises(UsageError, match="report.md exists and was not written by featx"):
        finetune(TINY, data, name="mine", exist_ok=True, runs_dir=str(tmp_path), **ONE)
    assert (run / "report.md").read_text() == "my own notes\n" and sorted(p.name for p in run.iterdir()) == ["report.md"]
    (run / "report.md").unlink()
    (run / "metrics.csv").write_text("a,b\n1,2\n")
    with pytest.raises(UsageError, match="metrics.csv exists"):
        finetune(TINY, data, name="mine", exist_ok=True, runs_dir=str(tmp_path), **ONE)
    (run / "metrics.csv").unlink()
    first = finetune(TINY, data, name="mine", exist_ok=True, runs_dir=str(tmp_path), **ONE)
    again = finetune(TINY, data, name="mine", exist_ok=True, runs_dir=str(tmp_path), **ONE)  # its own files: fine
    assert first.run_dir == again.run_dir and again.completed


def test_the_python_api_shows_progress_by_default(data, tmp_path, capsys):
    finetune(TINY, data, runs_dir=str(tmp_path), **{**FAST, "verbose": True})
    err = capsys.readouterr().err
    assert "epoch 1/2 [head]" in err and "epoch 2/2 [finetune]" in err and "phase finetune" in err
    finetune(TINY, data, runs_dir=str(tmp_path), **ONE)
    assert capsys.readouterr().err == ""


def test_small_folders_fine_tune_fewer_groups_at_a_lower_rate(data, tmp_path):
    from featx.backbones import create_backbone
    from featx.training.checkpoint import save_weights
    from featx.training.config import FinetuneConfig
    from featx.training.finetune import phase2_for_data

    cfg = FinetuneConfig()  # pretrained, lr 1e-3, unfreeze all
    assert phase2_for_data(cfg, 9, 32) == (pytest.approx(1e-3 * (32 / 1000) ** 0.5), 1, pytest.approx(0.1789, abs=1e-4))
    assert phase2_for_data(cfg, 9, 245)[1] == 4 and phase2_for_data(cfg, 9, 1000) == (1e-3, 9, 1.0)
    assert phase2_for_data(cfg.replace(unfreeze=2), 9, 500)[1] == 2  # never more than --unfreeze allows
    assert phase2_for_data(cfg.replace(scale_to_data=False), 9, 32) == (1e-3, 9, 1.0)
    assert phase2_for_data(cfg.replace(pretrained=False), 9, 32) == (1e-3, 9, 1.0)  # nothing learnt to protect
    # end to end: local weights count as pretrained; 24 training images -> the top group only, at ~0.15 x lr
    bb = create_backbone(TINY, pretrained=False)
    save_weights(tmp_path / "w.safetensors", bb.model.state_dict())
    res = finetune(TINY, data, weights=str(tmp_path / "w.safetensors"), runs_dir=str(tmp_path), **FAST)
    top = sum(p.numel() for m in bb.layer_groups()[-1] for p in m.parameters())
    head = sum(p.numel() for p in bb.reset_classifier(3).parameters())
    assert res.trainable_params == top + head
    cfg_json = json.loads((res.run_dir / "config.json").read_text())
    assert cfg_json["phase_lrs"][1] == pytest.approx(1e-3 * (24 / 1000) ** 0.5)
