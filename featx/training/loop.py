"""THE training loop shared by `featx finetune` and `featx scratch`, and the run folder it fills.

A run is a list of phases (finetune: head on the frozen backbone, then the unfrozen network; scratch: one
phase). Each phase gets its own optimizer and a per-step schedule: linear warm-up, then cosine decay.
Every epoch writes ``last.safetensors`` + ``resume.safetensors`` + ``metrics.csv``; a better validation
accuracy writes ``best.safetensors`` + ``model.json``. The run ends with plots, a confusion matrix of the
best weights on the validation images, and ``report.md``. Under torchrun every rank trains; rank 0 writes.
"""
from __future__ import annotations

import csv
import io
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from .._io import atomic_write, write_json, write_markdown
from ..data.preprocess import Preprocess
from ..errors import FeatxError
from . import checkpoint
from .config import TrainConfig
from .distributed import Dist, unwrap
from .runs import RESUME_FILE

METRIC_FIELDS = ("epoch", "phase", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
                 "val_balanced_accuracy", "lr", "seconds", "images_per_s")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Phase:
    """A stretch of epochs with one set of trainable parameters and one optimizer."""

    name: str  # "head", "finetune", "train"
    epochs: int
    # sets requires_grad on the model and returns optimizer param groups [{"params", "lr", "weight_decay"}]
    setup: Callable[[nn.Module], list]
    early_stop: bool = True  # patience counts only in phases that may stop early (not the short head phase)
    bn_stats: bool = True  # False: every BatchNorm keeps its running statistics (eval mode), even if it trains


@dataclass
class TrainResult:
    """What a finetune/scratch run produced; ``summary()`` is the `--json` document."""

    kind: str
    run_dir: Path
    model_path: Path  # model.json: what `featx predict --model` and `load_model` accept
    best: dict  # accuracy, balanced_accuracy, epoch (None values without validation images)
    rows: list  # per-epoch metrics
    metrics: Optional[dict]  # classification metrics of the best weights on the validation images
    skipped: list  # [(relative path, reason)] images that could not be decoded
    seconds: float
    trainable_params: int
    total_params: int
    completed: bool  # False when stopped by stop_after (resume continues it)
    stopped_early: bool
    n_train: int = 0
    n_val: int = 0
    config: dict = field(default_factory=dict)

    def summary(self) -> dict:
        return {
            "kind": self.kind,
            "run_dir": str(self.run_dir),
            "model": str(self.model_path),
            "best": self.best,
            "epochs_run": len(self.rows),
            "completed": self.completed,
            "stopped_early": self.stopped_early,
            "seconds": round(self.seconds, 2),
            "trainable_params": self.trainable_params,
            "n_train": self.n_train,
            "n_val": self.n_val,
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
        }


@dataclass
class RunSpec:
    """Everything the loop needs; finetune.py and scratch.py build one and call :func:`train`."""

    kind: str  # "finetune" | "scratch"
    model: nn.Module
    preprocess: Preprocess
    classes: list
    train_batches: object  # TensorBatches | LoaderBatches
    val_batches: Optional[object]
    phases: list
    cfg: TrainConfig
    run_dir: Path
    model_info: dict  # kind-specific model.json fields (arch/backbone, image_size, ...)
    dist: Dist
    device: torch.device
    n_train: int
    n_val: int
    split_source: str = ""
    skipped: list = field(default_factory=list)  # decode failures found before training
    warnings: list = field(default_factory=list)
    resume_state: Optional[dict] = None  # (loop state, optimizer state) from resume.safetensors
    log: Callable[[str], None] = lambda msg: None
    on_epoch: Optional[Callable[[dict], None]] = None


def lr_factor(step: int, total: int, warmup: float) -> float:
    """Linear warm-up over ``warmup`` of the steps, then cosine from 1 down to 1% at the last step."""
    warm = max(1, int(round(warmup * total))) if warmup > 0 else 0
    if step < warm:
        return (step + 1) / warm
    span = max(1, total - warm)
    t = min(1.0, (step - warm + 1) / span)
    return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * t))


def make_optimizer(groups: list, cfg: TrainConfig) -> torch.optim.Optimizer:
    for g in groups:
        g["initial_lr"] = g["lr"]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=groups[0]["lr"])


def split_decay(named_params, lr: float, weight_decay: float) -> list:
    """Two param groups at ``lr``: weights with decay, biases and norm scales (1-D tensors) without it."""
    decay, no_decay = [], []
    for _, p in named_params:
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    groups = []
    if decay:
        groups.append({"params": decay, "lr": lr, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
    return groups


def freeze_bn_stats(model: nn.Module, all_bn: bool = False) -> None:
    """BatchNorm layers whose parameters are frozen (or all of them) keep their running statistics (eval mode)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters(recurse=False))
            if all_bn or (params and not any(p.requires_grad for p in params)):
                m.eval()


def _autocast(device: torch.device, cfg: TrainConfig):
    if device.type == "cuda" and cfg.amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    import contextlib

    return contextlib.nullcontext()


def _phase_at(phases: list, epoch: int) -> tuple[int, int]:
    """Global epoch (1-based) -> (phase index, first global epoch of that phase)."""
    start = 1
    for i, ph in enumerate(phases):
        if epoch < start + ph.epochs:
            return i, start
        start += ph.epochs
    return len(phases) - 1, start - phases[-1].epochs


def evaluate(model: nn.Module, batches, spec: RunSpec) -> dict:
    """Loss, predictions and dataset indices over the validation batches, gathered from every rank."""
    model.eval()
    loss_sum, n, preds, idxs, truth = 0.0, 0, [], [], []
    with torch.inference_mode(), _autocast(spec.device, spec.cfg):
        for xb, yb, idx in batches.epoch(0):
            x = spec.preprocess.normalize(xb)
            if spec.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            logits = model(x).float()
            loss_sum += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
            n += len(yb)
            preds += logits.argmax(1).tolist()
            truth += yb.tolist()
            idxs += idx.tolist()
    parts = spec.dist.all_gather_object((loss_sum, n, idxs, truth, preds))
    loss_sum = sum(p[0] for p in parts)
    n = sum(p[1] for p in parts)
    merged = sorted({i: (t, p) for part in parts for i, t, p in zip(part[2], part[3], part[4])}.items())
    y_true = [spec.classes[t] for _, (t, _) in merged]
    y_pred = [spec.classes[p] for _, (_, p) in merged]
    from ..report import classification_metrics

    metrics = classification_metrics(y_true, y_pred, spec.classes) if merged else None
    return {"loss": loss_sum / max(1, n), "metrics": metrics, "n": len(merged)}


def _better(acc: float, loss: float, best: dict) -> bool:
    if best.get("accuracy") is None:
        return True
    return acc > best["accuracy"] + 1e-12 or (abs(acc - best["accuracy"]) <= 1e-12 and loss < best.get("val_loss", math.inf))


def train(spec: RunSpec) -> TrainResult:
    """Run (or resume) the phases, writing the run folder as it goes; returns the result of the whole run."""
    try:
        return _train(spec)
    except KeyboardInterrupt:
        from ..errors import Interrupted

        done = _last_saved_epoch(spec.run_dir)
        hint = (f"{spec.run_dir} keeps epoch {done}; continue with --resume --name {spec.run_dir.name}"
                if done else f"no epoch finished; nothing to resume in {spec.run_dir}")
        raise Interrupted(f"training interrupted: {hint}", signum=2) from None


def _last_saved_epoch(run_dir: Path) -> Optional[int]:
    try:
        return int(checkpoint.load_weights(run_dir / "last.safetensors")[1].get("epoch"))
    except Exception:  # nothing saved yet, or unreadable: report "nothing to resume"
        return None


def _train(spec: RunSpec) -> TrainResult:
    cfg, dist, device, model = spec.cfg, spec.dist, spec.device, spec.model
    run_dir = spec.run_dir
    total_epochs = sum(ph.epochs for ph in spec.phases)
    crit = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    model.to(device)
    if device.type == "cuda" and cfg.amp:
        model.to(memory_format=torch.channels_last)

    # -- resume bookkeeping --------------------------------------------------------------------------
    state = {"epoch": 0, "phase": -1, "best": {"accuracy": None, "balanced_accuracy": None, "epoch": None},
             "since_best": 0, "rows": [], "seconds": 0.0, "skipped": [], "stopped_early": False, "done": False}
    opt_state = None
    if spec.resume_state is not None:
        loaded, opt_state = spec.resume_state
        state.update(loaded)
        last, _ = checkpoint.load_weights(run_dir / "last.safetensors")
        model.load_state_dict(last)
        spec.log(f"resuming {run_dir} after epoch {state['epoch']} of {total_epochs}")
    skipped = list(dict.fromkeys([tuple(s) for s in state["skipped"]] + [tuple(s) for s in spec.skipped]))
    best_state = None
    if state["best"].get("epoch") is not None and (run_dir / "best.safetensors").is_file():
        best_state, _ = checkpoint.load_weights(run_dir / "best.safetensors")

    rows = list(state["rows"])
    epoch = state["epoch"] + 1
    t_run = time.perf_counter() - float(state["seconds"])
    trainable = 0
    stop_reason = None
    cur_phase, opt, net, step = -1, None, model, 0
    if state["done"]:
        spec.log(f"{run_dir} already finished; rewriting its report")
    while epoch <= total_epochs and not state["done"]:
        pi, pstart = _phase_at(spec.phases, epoch)
        phase = spec.phases[pi]
        if pi != cur_phase:  # enter a phase: trainable set, optimizer, DDP wrapper
            groups = phase.setup(model)
            opt = make_optimizer(groups, cfg)
            if opt_state is not None and pi == state["phase"]:
                opt.load_state_dict(opt_state)
                for g in opt.param_groups:  # load_state_dict keeps saved lrs; the schedule sets them below
                    g.setdefault("initial_lr", g["lr"])
            opt_state = None
            trainable = max(trainable, sum(p.numel() for p in model.parameters() if p.requires_grad))
            net = model
            if dist.enabled:
                net = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
            cur_phase = pi
            steps_per_epoch = max(1, len(spec.train_batches))
            phase_steps = steps_per_epoch * phase.epochs
            step = (epoch - pstart) * steps_per_epoch
            spec.log(f"phase {phase.name}: epochs {pstart}-{pstart + phase.epochs - 1}, "
                     f"{trainable:,} trainable parameters")

        # -- one epoch of training ----------------------------------------------------------------------
        seed_everything(cfg.seed * 1000 + epoch)  # per-epoch seeding: a resumed run replays the same randomness
        net.train()
        freeze_bn_stats(model, all_bn=not phase.bn_stats)
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.float64, device=device)
        seen = 0
        for xb, yb, _ in spec.train_batches.epoch(epoch):
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * lr_factor(step, phase_steps, cfg.warmup)
            x = spec.preprocess.normalize(xb)
            if device.type == "cuda" and cfg.amp:
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(device, cfg):
                logits = net(x)
                loss = crit(logits.float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += loss.detach().double() * len(yb)
            correct += (logits.detach().argmax(1) == yb).sum().double()
            seen += len(yb)
        t_train = time.perf_counter() - t0
        loss_tot, correct_tot, seen_tot = dist.all_reduce_sum([float(loss_sum), float(correct), seen], device)
        if seen_tot == 0:
            raise FeatxError("no training image could be used in this epoch (all failed to decode?)")
        train_loss = loss_tot / seen_tot
        if not math.isfinite(train_loss):
            raise FeatxError(f"training diverged (loss {train_loss}) in epoch {epoch}; lower --lr "
                             f"(currently {opt.param_groups[0]['initial_lr']:g}) or use --optimizer sgd")
        row = {"epoch": epoch, "phase": phase.name, "train_loss": round(train_loss, 5),
               "train_accuracy": round(correct_tot / seen_tot, 5), "val_loss": None, "val_accuracy": None,
               "val_balanced_accuracy": None, "lr": float(f"{max(g['lr'] for g in opt.param_groups):.4g}"),
               "seconds": None, "images_per_s": round(seen_tot / max(t_train, 1e-9), 1)}

        # -- validation, best/early stopping -------------------------------------------------------------
        improved = spec.val_batches is None
        if spec.val_batches is not None:
            ev = evaluate(model, spec.val_batches, spec)
            m = ev["metrics"]
            if m is None:
                from ..errors import DataError

                raise DataError("none of the validation images could be decoded; see the skipped images above")
            row.update(val_loss=round(ev["loss"], 5), val_accuracy=round(m["accuracy"], 5),
                       val_balanced_accuracy=round(m["balanced_accuracy"], 5))
            improved = _better(m["accuracy"], ev["loss"], state["best"])
            if improved:
                state["best"] = {"accuracy": m["accuracy"], "balanced_accuracy": m["balanced_accuracy"],
                                 "epoch": epoch, "val_loss": ev["loss"]}
        else:
            state["best"] = {"accuracy": None, "balanced_accuracy": None, "epoch": epoch}
        row["seconds"] = round(time.perf_counter() - t0, 3)
        rows.append(row)
        state["since_best"] = 0 if improved else state["since_best"] + 1
        if improved:
            best_state = {k: v.detach().to("cpu").clone() for k, v in unwrap(model).state_dict().items()}

        # -- write the epoch's files (rank 0) -----------------------------------------------------------
        skipped = _merge_skipped(skipped, spec, dist)
        state.update(epoch=epoch, phase=pi, rows=rows, seconds=time.perf_counter() - t_run,
                     skipped=[list(s) for s in skipped])
        if phase.early_stop and cfg.patience and state["since_best"] >= cfg.patience and spec.val_batches is not None:
            state["stopped_early"] = True
            stop_reason = "early"
        if epoch == total_epochs or stop_reason == "early":
            state["done"] = True
        if dist.is_main:
            if improved:
                checkpoint.save_weights(run_dir / "best.safetensors", best_state, {"epoch": epoch})
                _write_model_json(spec, state, trainable)
            checkpoint.save_weights(run_dir / "last.safetensors", unwrap(model).state_dict(), {"epoch": epoch})
            checkpoint.save_resume(run_dir / RESUME_FILE, opt, state)
            write_metrics_csv(run_dir / "metrics.csv", rows)
        if spec.on_epoch and dist.is_main:
            spec.on_epoch(dict(row, total_epochs=total_epochs, improved=improved))
        epoch += 1
        if stop_reason == "early":
            spec.log(f"early stopping: no better validation accuracy for {cfg.patience} epochs")
            break
        if cfg.stop_after is not None and epoch - 1 >= cfg.stop_after and not state["done"]:
            stop_reason = "stop_after"
            spec.log(f"stopped after epoch {epoch - 1} of {total_epochs}; continue with --resume")
            break
    dist.barrier()

    # -- final evaluation of the best weights, plots, report ----------------------------------------------
    if trainable == 0:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    final_metrics = None
    if best_state is not None and spec.val_batches is not None:
        unwrap(model).load_state_dict(best_state)
        final_metrics = evaluate(model, spec.val_batches, spec)["metrics"]
    elif best_state is not None:
        unwrap(model).load_state_dict(best_state)
    seconds = time.perf_counter() - t_run
    best = {k: state["best"].get(k) for k in ("accuracy", "balanced_accuracy", "epoch")}
    result = TrainResult(kind=spec.kind, run_dir=run_dir, model_path=run_dir / checkpoint.MODEL_JSON, best=best,
                         rows=rows, metrics=final_metrics, skipped=[tuple(s) for s in skipped], seconds=seconds,
                         trainable_params=trainable, total_params=sum(p.numel() for p in model.parameters()),
                         completed=bool(state["done"]), stopped_early=bool(state["stopped_early"]),
                         n_train=spec.n_train, n_val=spec.n_val, config=cfg.to_dict())
    if dist.is_main:
        if (run_dir / "best.safetensors").is_file():  # final form: trainable parameters of the whole run
            _write_model_json(spec, state, trainable)
        finish_run(spec, result)
    dist.barrier()
    model.eval()
    return result


def _merge_skipped(skipped: list, spec: RunSpec, dist: Dist) -> list:
    found = list(getattr(spec.train_batches, "skipped", [])) + list(getattr(spec.val_batches, "skipped", []) if spec.val_batches else [])
    everyone = dist.all_gather_object(found)
    seen = dict.fromkeys(tuple(s) for s in skipped)
    for part in everyone:
        for s in part:
            seen.setdefault(tuple(s), None)
    return list(seen)


def _write_model_json(spec: RunSpec, state: dict, trainable: int) -> None:
    best = {k: state["best"].get(k) for k in ("accuracy", "balanced_accuracy", "epoch")}
    checkpoint.write_model_json(spec.run_dir, {
        "kind": spec.kind,
        **spec.model_info,
        "classes": list(spec.classes),
        "preprocess": spec.preprocess.to_dict(),
        "best": best,
        "trainable_params": trainable,
        "split": spec.split_source,
    })


def write_metrics_csv(path: Path, rows: list) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(METRIC_FIELDS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in METRIC_FIELDS})
    with atomic_write(path, "w") as fh:
        fh.write(buf.getvalue())


def finish_run(spec: RunSpec, result: TrainResult) -> None:
    """Plots, config.json (final form) and report.md; failures to plot never lose the trained weights."""
    from .. import report

    run_dir = spec.run_dir
    notes = []
    try:
        report.save_learning_curve_png(result.rows, run_dir / "learning_curve.png")
    except Exception as exc:  # a plotting problem (fonts, backend) must not fail a finished training run
        notes.append(f"learning curve not drawn: {exc}")
    if result.metrics:
        try:
            report.save_confusion_png(result.metrics, run_dir / "confusion.png",
                                      title=f"{spec.model_info.get('backbone') or spec.model_info.get('arch')}: "
                                            f"best epoch {result.best['epoch']} on validation")
        except Exception as exc:
            notes.append(f"confusion matrix not drawn: {exc}")
    write_markdown(run_dir / "report.md", render_report(spec, result, notes))


def _fmt(v, nd=4) -> str:
    return "-" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def _g(v) -> str:
    return "-" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


def render_report(spec: RunSpec, result: TrainResult, notes: list) -> str:
    name = spec.model_info.get("backbone") or spec.model_info.get("arch")
    status = ("finished" + (" (early stopping)" if result.stopped_early else "")) if result.completed else \
        "stopped before the last epoch; continue with `--resume`"
    lines = [
        f"# featx {spec.kind}: {name}", "",
        f"- run folder: `{spec.run_dir}`",
        f"- status: {status}",
        f"- classes ({len(spec.classes)}): {', '.join(spec.classes)}",
        f"- images: {spec.n_train} train, {spec.n_val} validation ({spec.split_source})",
        f"- best epoch: {_fmt(result.best['epoch'])} of {len(result.rows)} run; "
        f"val accuracy {_fmt(result.best['accuracy'])}, balanced accuracy {_fmt(result.best['balanced_accuracy'])}",
        f"- trainable parameters: {result.trainable_params:,} of {result.total_params:,}",
        f"- wall time: {result.seconds:.1f} s", "",
    ]
    m = result.metrics
    if m and isinstance(m.get("per_class"), dict):
        lines += ["## Per class (best weights, validation images)", "", "| class | precision | recall | f1 | support |",
                  "|---|---|---|---|---|"]
        for c, pc in m["per_class"].items():
            lines.append(f"| {c} | {_fmt(pc.get('precision'), 3)} | {_fmt(pc.get('recall'), 3)} | "
                         f"{_fmt(pc.get('f1'), 3)} | {_fmt(pc.get('support'))} |")
        lines.append("")
    lines += ["## Epochs", "", "| " + " | ".join(METRIC_FIELDS) + " |", "|" + "---|" * len(METRIC_FIELDS)]
    for r in result.rows:
        lines.append("| " + " | ".join(_g(r.get(k)) for k in METRIC_FIELDS) + " |")
    lines += ["", "## Files", "",
              "- `model.json` + `best.safetensors`: the model (`featx predict IMAGES --model " + str(spec.run_dir) + "`)",
              "- `last.safetensors`, `resume.safetensors`: the last epoch, for `--resume`",
              "- `metrics.csv`, `learning_curve.png`, `confusion.png`, `config.json`", ""]
    if result.skipped:
        lines += [f"## Skipped images ({len(result.skipped)})", "", "Could not be decoded; not used for training or "
                  "validation:", ""]
        lines += [f"- `{p}`: {r}" for p, r in result.skipped[:200]]
        if len(result.skipped) > 200:
            lines.append(f"- ... and {len(result.skipped) - 200} more")
        lines.append("")
    if spec.warnings or notes:
        lines += ["## Notes", ""] + [f"- {w}" for w in [*spec.warnings, *notes]] + [""]
    s = spec.cfg.to_dict()
    lines += ["## Settings", "", "```json", __import__("json").dumps(s, indent=2, default=str), "```", ""]
    return "\n".join(lines)


def write_config(run_dir: Path, cfg: TrainConfig, extra: dict) -> None:
    write_json(run_dir / "config.json", {**cfg.to_dict(), **extra})
