"""THE training loop of featx: a :class:`Trainer` that fits a model through phases and calls back at fixed points.

A run is a list of :class:`Phase` s (finetune: the head on the frozen backbone, then the unfrozen network; scratch:
one phase). Entering a phase builds its optimizer and per-step schedule (``optim.py``). Each epoch trains, then
validates; the best epoch's weights are kept in memory and restored at the end, where the best weights are scored
once more on the validation images and, when the folder has ``test/``, once on the test images.

Everything around the loop is a :class:`Callback` (``callbacks.py``): progress lines, early stopping, stopping
after N epochs, checkpoint files, the final report. The Trainer itself writes nothing. Device, precision and
ranks come from :mod:`featx.devices` (bf16 autocast where supported, else fp16 with a gradient scaler, fp32 on the
CPU); under torchrun every rank trains on its shard and collectives merge the metrics.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from .. import devices
from ..devices import Dist, unwrap
from ..errors import DataError, FeatxError
from . import checkpoint
from .optim import make_optimizer, make_scheduler


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Phase:
    """A stretch of epochs with one set of trainable parameters, one optimizer and one schedule."""

    name: str  # "head", "finetune", "train"
    epochs: int
    lr: float  # peak learning rate; each parameter group scales it by its lr_scale
    # sets requires_grad on the model and returns the optimizer's parameter groups (optim.param_groups)
    setup: Callable[[nn.Module], list]
    early_stop: bool = True  # patience counts only in phases that may stop early (not the short head phase)
    bn_stats: bool = True  # False: every BatchNorm keeps its running statistics (eval mode), even if it trains


class Callback:
    """Hooks the :class:`Trainer` calls, in the order the callbacks were given (stopping rules before writers)."""

    def on_fit_start(self, trainer: "Trainer") -> None: ...

    def on_phase_start(self, trainer: "Trainer", phase: Phase) -> None: ...

    def on_epoch_end(self, trainer: "Trainer", row: dict) -> None: ...

    def on_fit_end(self, trainer: "Trainer") -> None: ...


def fresh_state() -> dict:
    """The loop counters saved with every epoch (JSON): a resumed run continues from exactly these."""
    return {"epoch": 0, "phase": -1, "best": {"accuracy": None, "balanced_accuracy": None, "epoch": None},
            "since_best": 0, "rows": [], "seconds": 0.0, "skipped": [], "stopped_early": False, "done": False,
            "scaler": {}}


def freeze_bn_stats(model: nn.Module, all_bn: bool = False) -> None:
    """BatchNorm layers whose parameters are frozen (or all of them) keep their running statistics (eval mode)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters(recurse=False))
            if all_bn or (params and not any(p.requires_grad for p in params)):
                m.eval()


def _better(acc: float, loss: float, best: dict) -> bool:
    """Higher accuracy wins; a tie goes to the lower validation loss."""
    if best.get("accuracy") is None:
        return True
    return acc > best["accuracy"] + 1e-12 or (abs(acc - best["accuracy"]) <= 1e-12 and loss < best.get("val_loss", math.inf))


class Trainer:
    """Fits ``model`` through ``phases`` on ``train_batches``, selecting the best epoch on ``val_batches``.

    Batch sources yield uint8 NCHW batches on the device (``featx.data.batches``); ``preprocess.normalize`` turns
    them into the network's input. ``cfg`` is a :class:`~featx.training.config.TrainConfig`.
    """

    def __init__(self, model: nn.Module, phases: list, *, train_batches, val_batches=None, test_batches=None,
                 preprocess, classes: list, cfg, device: torch.device, dist: Optional[Dist] = None,
                 callbacks: tuple = (), log: Callable[[str], None] = lambda msg: None, cpu_channels_last: bool = False):
        self.model, self.phases, self.cfg, self.device = model, list(phases), cfg, device
        self.train_batches, self.val_batches, self.test_batches = train_batches, val_batches, test_batches
        self.preprocess, self.classes = preprocess, list(classes)
        self.dist = dist or Dist()
        self.callbacks, self.log = list(callbacks), log
        self.precision = devices.resolve_precision(device, cfg.precision)
        self.scaler = devices.grad_scaler(device, self.precision)
        # channels_last: on CUDA whenever autocast runs (tensor cores); on the CPU where the recipe measured it faster
        # (idle 2-core machine: finetune's lite0 1.7x, featx's small CNNs 1.2-1.4x; benchmarks/bench_cpu_training.py)
        self.channels_last = (self.precision.dtype is not None) if device.type == "cuda" else \
            (device.type == "cpu" and bool(cpu_channels_last))
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        self.total_epochs = sum(ph.epochs for ph in self.phases)
        self.state = fresh_state()
        self.best_weights: Optional[dict] = None
        self.improved = False
        self.stop_reason: Optional[str] = None  # "early" | "paused"
        self.final_metrics: Optional[dict] = None  # the best weights on the validation images
        self.test_metrics: Optional[dict] = None  # the best weights on the test images, scored once
        self.trainable = 0
        self.optimizer = self.scheduler = None
        self.net: nn.Module = model
        self.phase_index, self.step = -1, 0
        self._pending_opt_state: Optional[dict] = None
        self._t_run = time.perf_counter()

    @property
    def memory_format(self) -> str:
        """What config.json records: "channels_last" or "contiguous"."""
        return "channels_last" if self.channels_last else "contiguous"

    # -- public API --------------------------------------------------------------------------------------------
    def resume(self, loop_state: dict, optimizer_state: dict, last: dict, best: Optional[dict]) -> None:
        """Continue after the epoch ``loop_state`` describes: its weights, best weights and optimizer state."""
        self.state.update(loop_state)
        self.model.load_state_dict(last)
        self.best_weights = best
        self._pending_opt_state = optimizer_state
        if self.state.get("scaler"):
            self.scaler.load_state_dict(self.state["scaler"])

    @property
    def phase(self) -> Phase:
        return self.phases[self.phase_index]

    def stop(self, reason: str, message: str) -> None:
        """Called by callbacks: ``early`` ends the run for good; ``paused`` leaves it resumable."""
        self.stop_reason = reason
        if reason == "early":
            self.state.update(stopped_early=True, done=True)
        self.log(message)

    def fit(self) -> "Trainer":
        """Train the remaining epochs, then restore and score the best weights; returns ``self``."""
        self.model.to(self.device)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self._t_run = time.perf_counter() - float(self.state["seconds"])
        self._call("on_fit_start")
        epoch = self.state["epoch"] + 1
        while epoch <= self.total_epochs and not self.state["done"]:
            pi, first = self._phase_at(epoch)
            if pi != self.phase_index:
                self._enter_phase(pi, epoch - first)
            row, t0 = self._train_epoch(epoch)
            self._end_epoch(epoch, row, t0)
            if self.stop_reason:
                break
            epoch += 1
        self.dist.barrier()
        self._finish()
        self._call("on_fit_end")
        self.dist.barrier()
        self.model.eval()
        return self

    def evaluate(self, batches) -> dict:
        """Loss and classification metrics over ``batches``, gathered from every rank (each image counted once)."""
        self.model.eval()
        loss_sum, n, preds, idxs, truth = 0.0, 0, [], [], []
        with torch.inference_mode(), devices.autocast(self.device, self.precision):
            for xb, yb, idx in batches.epoch(0):
                logits = self.model(self._input(xb)).float()
                loss_sum += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
                n += len(yb)
                preds += logits.argmax(1).tolist()
                truth += yb.tolist()
                idxs += idx.tolist()
        parts = self.dist.all_gather_object((loss_sum, n, idxs, truth, preds))
        merged = sorted({i: (t, p) for part in parts for i, t, p in zip(part[2], part[3], part[4])}.items())
        from ..report import classification_metrics

        y_true = [self.classes[t] for _, (t, _) in merged]
        y_pred = [self.classes[p] for _, (_, p) in merged]
        metrics = classification_metrics(y_true, y_pred, self.classes) if merged else None
        return {"loss": sum(p[0] for p in parts) / max(1, sum(p[1] for p in parts)), "metrics": metrics,
                "n": len(merged)}

    @property
    def elapsed(self) -> float:
        """Seconds of training in this run, across resumes."""
        return time.perf_counter() - self._t_run

    def loop_state(self) -> dict:
        """What ``resume.safetensors`` keeps besides the optimizer: counters, rows, best, the gradient scaler."""
        return {**self.state, "scaler": self.scaler.state_dict()}

    # -- one phase, one epoch, one step ------------------------------------------------------------------------
    def _phase_at(self, epoch: int) -> tuple[int, int]:
        """Global epoch (1-based) -> (phase index, first global epoch of that phase)."""
        start = 1
        for i, ph in enumerate(self.phases):
            if epoch < start + ph.epochs:
                return i, start
            start += ph.epochs
        return len(self.phases) - 1, start - self.phases[-1].epochs

    def _enter_phase(self, index: int, epochs_done: int) -> None:
        """Trainable set, optimizer, schedule (advanced past ``epochs_done`` epochs on resume), DDP wrapper."""
        self.phase_index = index
        phase = self.phase
        groups = phase.setup(self.model)
        cfg = self.cfg
        self.optimizer = make_optimizer(groups, cfg.optimizer, phase.lr, cfg.weight_decay, cfg.momentum)
        steps_per_epoch = max(1, len(self.train_batches))
        self.scheduler = make_scheduler(self.optimizer, steps_per_epoch * phase.epochs, cfg.warmup, phase.lr)
        if self._pending_opt_state is not None and index == self.state["phase"]:
            # after the scheduler: torch loads only the group entries the new optimizer has (initial_lr included)
            checkpoint.restore_optimizer(self.model, self.optimizer, self._pending_opt_state)
        self._pending_opt_state = None
        self.step = epochs_done * steps_per_epoch
        self.trainable = max(self.trainable, sum(p.numel() for p in self.model.parameters() if p.requires_grad))
        self.net = self.model
        if self.dist.enabled:
            ids = [self.device] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self._call("on_phase_start", phase)

    def _input(self, xb: torch.Tensor) -> torch.Tensor:
        x = self.preprocess.normalize(xb)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _train_step(self, xb: torch.Tensor, yb: torch.Tensor) -> tuple:
        """One optimizer step; under fp16 the scaler scales the loss and skips steps with inf/NaN gradients."""
        self.scheduler.step_update(self.step + 1)
        with devices.autocast(self.device, self.precision):
            logits = self.net(self._input(xb))
            loss = self.criterion(logits.float(), yb)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        return loss.detach(), logits.detach()

    def _train_epoch(self, epoch: int) -> tuple[dict, float]:
        """-> (the epoch's metrics row, its start time)."""
        seed_everything(self.cfg.seed * 1000 + epoch)  # per-epoch seeding: a resumed run replays the same randomness
        self.net.train()
        freeze_bn_stats(self.model, all_bn=not self.phase.bn_stats)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.float64, device=self.device)
        seen = 0
        for xb, yb, _ in self.train_batches.epoch(epoch):
            loss, logits = self._train_step(xb, yb)
            loss_sum += loss.double() * len(yb)
            correct += (logits.argmax(1) == yb).sum().double()
            seen += len(yb)
        t_train = time.perf_counter() - t0
        loss_tot, correct_tot, seen_tot = self.dist.all_reduce_sum([float(loss_sum), float(correct), seen], self.device)
        if seen_tot == 0:
            raise FeatxError("no training image could be used in this epoch (all failed to decode?)")
        train_loss = loss_tot / seen_tot
        if not math.isfinite(train_loss):
            raise FeatxError(f"training diverged (loss {train_loss}) in epoch {epoch}; lower --lr "
                             f"(currently {self.phase.lr:g}) or use --optimizer sgd")
        return {"epoch": epoch, "phase": self.phase.name, "train_loss": round(train_loss, 5),
                "train_accuracy": round(correct_tot / seen_tot, 5), "val_loss": None, "val_accuracy": None,
                "val_balanced_accuracy": None,
                "lr": float(f"{max(g['lr'] for g in self.optimizer.param_groups):.4g}"),
                "seconds": None, "images_per_s": round(seen_tot / max(t_train, 1e-9), 1)}, t0

    def _end_epoch(self, epoch: int, row: dict, t0: float) -> None:
        """Validate, keep the best weights, update the loop state, then let the callbacks stop, save and print."""
        self.improved = self._validate(epoch, row)
        row["seconds"] = round(time.perf_counter() - t0, 3)
        self.state["rows"] = [*self.state["rows"], row]
        self.state["since_best"] = 0 if self.improved else self.state["since_best"] + 1
        if self.improved:
            self.best_weights = {k: v.detach().to("cpu").clone() for k, v in unwrap(self.model).state_dict().items()}
        self.add_skipped(self._gather_skipped())
        self.state.update(epoch=epoch, phase=self.phase_index, seconds=time.perf_counter() - self._t_run,
                          done=epoch == self.total_epochs)
        self._call("on_epoch_end", row)

    def add_skipped(self, skipped) -> None:
        """Record images that could not be decoded ((relative path, reason)), once each, in the loop state."""
        seen = dict.fromkeys(tuple(s) for s in self.state["skipped"])
        for s in skipped:
            seen.setdefault(tuple(s), None)
        self.state["skipped"] = [list(s) for s in seen]

    def _gather_skipped(self) -> list:
        """Decode failures the streaming batch sources met this epoch, from every rank."""
        found = [s for b in (self.train_batches, self.val_batches, self.test_batches) if b is not None
                 for s in getattr(b, "skipped", [])]
        return [s for part in self.dist.all_gather_object(found) for s in part]

    def _validate(self, epoch: int, row: dict) -> bool:
        """Score the epoch on the validation images; -> whether it is the best so far (always, without them)."""
        if self.val_batches is None:
            self.state["best"] = {"accuracy": None, "balanced_accuracy": None, "epoch": epoch}
            return True
        ev = self.evaluate(self.val_batches)
        m = ev["metrics"]
        if m is None:
            raise DataError("none of the validation images could be decoded; see the skipped images above")
        row.update(val_loss=round(ev["loss"], 5), val_accuracy=round(m["accuracy"], 5),
                   val_balanced_accuracy=round(m["balanced_accuracy"], 5))
        if not _better(m["accuracy"], ev["loss"], self.state["best"]):
            return False
        self.state["best"] = {"accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"], "epoch": epoch,
                              "val_loss": ev["loss"]}
        return True

    def _finish(self) -> None:
        """Restore the best epoch's weights and score them: on validation again (for the report), on test once."""
        if self.trainable == 0:  # a finished run reopened: nothing was set up
            self.trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        if self.best_weights is not None:
            unwrap(self.model).load_state_dict(self.best_weights)
        if self.best_weights is not None and self.val_batches is not None:
            self.final_metrics = self.evaluate(self.val_batches)["metrics"]
        if self.test_batches is not None and self.state["done"]:
            self.test_metrics = self.evaluate(self.test_batches)["metrics"]
            self.add_skipped(self._gather_skipped())

    def _call(self, hook: str, *args) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)
