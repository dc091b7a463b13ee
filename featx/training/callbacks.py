"""The Trainer's standard callbacks: progress lines, early stopping, stop-after-N, and the run folder's epoch files.

Order matters and is the order :func:`featx.training.runs.execute` gives them: the progress printer, the stopping
rules (before the writer, so a saved ``resume.safetensors`` already knows the run is over), the checkpoint writer.
Under torchrun only rank 0 writes and prints.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional

from .._io import write_csv
from ..devices import unwrap
from . import checkpoint
from .trainer import Callback, Phase, Trainer

METRIC_FIELDS = ("epoch", "phase", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
                 "val_balanced_accuracy", "lr", "seconds", "images_per_s")


class EarlyStopping(Callback):
    """Stop when ``patience`` epochs of a phase that may stop early brought no better validation accuracy."""

    def __init__(self, patience: int):
        self.patience = patience

    def on_epoch_end(self, trainer: Trainer, row: dict) -> None:
        if (self.patience and trainer.val_batches is not None and trainer.phase.early_stop
                and trainer.state["since_best"] >= self.patience and not trainer.state["done"]):
            trainer.stop("early", f"early stopping: no better validation accuracy for {self.patience} "
                                    f"epoch{'' if self.patience == 1 else 's'}")


class StopAfter(Callback):
    """Stop (resumably) after epoch ``n``: time-boxed jobs and tests of --resume."""

    def __init__(self, n: Optional[int]):
        self.n = n

    def on_epoch_end(self, trainer: Trainer, row: dict) -> None:
        if self.n is not None and row["epoch"] >= self.n and not trainer.state["done"]:
            trainer.stop("paused", f"stopped after epoch {row['epoch']} of {trainer.total_epochs}; "
                                   "continue with --resume")


class Checkpointer(Callback):
    """Every epoch: ``last.safetensors``, ``resume.safetensors``, ``metrics.csv``; a better epoch: ``best.safetensors``
    and ``model.json`` (``model_info(trainer)`` gives its fields)."""

    def __init__(self, run_dir: Path, model_info: Callable[[Trainer], dict]):
        self.run_dir, self.model_info = Path(run_dir), model_info

    def on_epoch_end(self, trainer: Trainer, row: dict) -> None:
        if not trainer.dist.is_main:
            return
        epoch = {"epoch": row["epoch"]}
        if trainer.improved:
            checkpoint.save_weights(self.run_dir / "best.safetensors", trainer.best_weights, epoch)
            checkpoint.write_model_json(self.run_dir, self.model_info(trainer))
        model = unwrap(trainer.model)
        checkpoint.save_weights(self.run_dir / "last.safetensors", model.state_dict(), epoch)
        checkpoint.save_resume(self.run_dir / checkpoint.RESUME_FILE, model, trainer.optimizer, trainer.loop_state())
        write_metrics_csv(self.run_dir / "metrics.csv", trainer.state["rows"])

    def on_fit_end(self, trainer: Trainer) -> None:
        # model.json's final form: the trainable parameters of the whole run (the widest phase)
        if trainer.dist.is_main and (self.run_dir / "best.safetensors").is_file():
            checkpoint.write_model_json(self.run_dir, self.model_info(trainer))


class EpochLog(Callback):
    """Phase lines to ``log``; each epoch's row (with ``total_epochs`` and ``improved``) to ``on_epoch``."""

    def __init__(self, log: Callable[[str], None], on_epoch: Optional[Callable[[dict], None]]):
        self.log, self.on_epoch = log, on_epoch

    def on_phase_start(self, trainer: Trainer, phase: Phase) -> None:
        first = 1 + sum(p.epochs for p in trainer.phases[:trainer.phase_index])
        last = first + phase.epochs - 1
        span = f"epochs {first}-{last}" if last > first else f"epoch {first}"  # never "epochs 1-1"
        self.log(f"phase {phase.name}: {span}, "
                 f"{trainer.trainable:,} trainable parameters, {trainer.precision.name}")

    def on_epoch_end(self, trainer: Trainer, row: dict) -> None:
        if self.on_epoch and trainer.dist.is_main:
            self.on_epoch(dict(row, total_epochs=trainer.total_epochs, improved=trainer.improved))


def write_metrics_csv(path: Path, rows: list) -> None:
    write_csv(path, list(METRIC_FIELDS), ([r.get(k) for k in METRIC_FIELDS] for r in rows))


def metrics_csv_is_ours(path: Path) -> bool:
    """A recogniser for check_outputs: a CSV whose header is exactly featx's metrics columns."""
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.readline().strip() == ",".join(METRIC_FIELDS)
    except (OSError, UnicodeDecodeError):
        return False


def format_epoch(row: dict) -> str:
    """One progress line per epoch (the CLI adds a mark for a new best)."""
    val = ""
    if row.get("val_accuracy") is not None:
        val = (f" | val loss {row['val_loss']:.4f} acc {row['val_accuracy']:.4f} "
               f"bal {row['val_balanced_accuracy']:.4f}")
    return (f"epoch {row['epoch']}/{row['total_epochs']} [{row['phase']}] loss {row['train_loss']:.4f} "
            f"acc {row['train_accuracy']:.4f}{val} | lr {row['lr']:.3g} | {row['seconds']:.1f} s, "
            f"{row['images_per_s']:.0f} img/s")


def print_message(msg: str) -> None:
    """The default ``log`` of the Python API: progress on stderr, as the CLI shows it."""
    print(msg, file=sys.stderr, flush=True)


def print_epoch(row: dict) -> None:
    """The default ``on_epoch`` of the Python API; ``*`` marks a new best validation accuracy."""
    star = " *" if row.get("improved") and row.get("val_accuracy") is not None else ""
    print(format_epoch(row) + star, file=sys.stderr, flush=True)
