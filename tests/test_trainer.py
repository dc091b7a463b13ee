"""The Trainer on its own: precision through featx.devices (the fp16 + gradient-scaler path on the CPU), callbacks,
best-epoch restore, and the notes that say which epoch a run keeps."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from featx import devices
from featx.data.preprocess import Preprocess
from featx.training import trainer as T
from featx.training.callbacks import EarlyStopping
from featx.training.config import TrainConfig
from featx.data.batches import TensorBatches
from featx.training.optim import param_groups
from featx.training.result import outcome_notes

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _toy(n=32, size=8, seed=0):
    """Two classes of uint8 images a linear net separates: bright vs dark."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = (torch.rand(n, 3, size, size, generator=g) * 60 + 40 + 120 * y.view(-1, 1, 1, 1)).to(torch.uint8)
    return x, y


def _trainer(phases_lr=0.05, epochs=3, callbacks=(), **cfg_kw) -> T.Trainer:
    torch.manual_seed(0)
    x, y = _toy()
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    cfg = TrainConfig(epochs=epochs, warmup=0.0, label_smoothing=0.0, **cfg_kw)

    def setup(m):
        for p in m.parameters():
            p.requires_grad_(True)
        return param_groups([m], 0.0)

    return T.Trainer(model, [T.Phase("train", epochs, phases_lr, setup)],
                     train_batches=TensorBatches(x[:24], y[:24], 8, train=True),
                     val_batches=TensorBatches(x[24:], y[24:], 8, train=False),
                     preprocess=Preprocess(input_size=8, resize=8), classes=["dark", "bright"], cfg=cfg,
                     device=torch.device("cpu"), callbacks=callbacks)


def test_precision_comes_from_devices_and_fp16_trains_through_the_grad_scaler(monkeypatch):
    # FEATX_FORCE_FP16 makes devices pick fp16 + scaler for a CUDA device (checked without a GPU: the flag decides
    # before any CUDA query); the trainer must take whatever devices resolves for its device and settings.
    monkeypatch.setenv("FEATX_FORCE_FP16", "1")
    assert devices.resolve_precision(torch.device("cuda"), "auto") == devices.Precision("fp16", torch.float16, True)
    asked = []

    def fp16_everywhere(device, precision="auto"):
        asked.append((device.type, precision))
        return devices.Precision("fp16", torch.float16, scaler=True)  # what a GPU without bf16 gets

    monkeypatch.setattr(T.devices, "resolve_precision", fp16_everywhere)
    t = _trainer(precision="auto")
    assert asked == [("cpu", "auto")] and t.precision.name == "fp16" and t.scaler.is_enabled()
    t.fit()
    state = t.loop_state()["scaler"]
    # the scaler scaled and stepped every one of the 3 x 3 optimizer steps (its growth tracker counts the steps
    # without inf/NaN gradients); its state is saved with the loop state for --resume
    assert state["_growth_tracker"] == 9 and state["scale"] == 2.0 ** 16
    rows = t.state["rows"]
    assert all(r["train_loss"] == r["train_loss"] for r in rows)  # finite
    assert rows[-1]["val_accuracy"] == 1.0
    resumed = _trainer(precision="auto")
    resumed.resume({**t.state, "scaler": state}, {}, t.model.state_dict(), None)
    assert resumed.scaler.get_scale() == state["scale"]


def test_fp32_on_the_cpu_has_a_disabled_scaler():
    t = _trainer()
    assert t.precision.name == "fp32" and not t.scaler.is_enabled()
    t.fit()
    assert t.loop_state()["scaler"] == {} and t.state["rows"][-1]["val_accuracy"] == 1.0


def test_best_epoch_is_restored_and_callbacks_can_stop():
    calls = []

    class Spy(T.Callback):
        def on_fit_start(self, trainer):
            calls.append("start")

        def on_phase_start(self, trainer, phase):
            calls.append(f"phase {phase.name}")

        def on_epoch_end(self, trainer, row):
            calls.append(row["epoch"])

        def on_fit_end(self, trainer):
            calls.append("end")

    # a huge learning rate: the first epoch is the best, the next ones get worse, early stopping ends the run
    t = _trainer(phases_lr=30.0, epochs=8, callbacks=(Spy(), EarlyStopping(2)))
    orig = t._validate

    def worse_after_one(epoch, row):
        improved = orig(epoch, row)
        if epoch > 1:
            t.state["best"]["epoch"] = 1
            return False
        return improved

    t._validate = worse_after_one
    first = {}
    t.callbacks.append(SimpleNamespace(on_fit_start=lambda tr: None, on_phase_start=lambda tr, p: None,
                                       on_fit_end=lambda tr: None,
                                       on_epoch_end=lambda tr, row: first.setdefault(
                                           "w", {k: v.clone() for k, v in tr.best_weights.items()})))
    t.fit()
    assert calls[:3] == ["start", "phase train", 1] and calls[-1] == "end"
    assert t.stop_reason == "early" and t.state["stopped_early"] and len(t.state["rows"]) == 3
    for k, v in t.model.state_dict().items():  # the weights of epoch 1, not of the last epoch
        assert torch.equal(v, first["w"][k])


def test_notes_say_which_epoch_is_kept_and_when_fine_tuning_lost_to_the_head():
    rows = [{"epoch": 1, "phase": "head", "val_accuracy": 0.8}, {"epoch": 2, "phase": "head", "val_accuracy": 0.94},
            {"epoch": 3, "phase": "finetune", "val_accuracy": 0.88}, {"epoch": 4, "phase": "finetune", "val_accuracy": 0.56}]
    best = {"accuracy": 0.94, "balanced_accuracy": 0.94, "epoch": 2, "phase": "head"}
    notes = outcome_notes(rows, best)
    assert notes[0].startswith("kept the weights of epoch 2 (head phase") and "0.5600" in notes[0]
    assert notes[1].startswith("fine-tuning did not beat the head phase") and "0.8800 (epoch 3)" in notes[1]
    rows[3]["val_accuracy"] = 0.97
    assert outcome_notes(rows, {**best, "accuracy": 0.97, "epoch": 4, "phase": "finetune"}) == []
