"""What a finetune/scratch run hands back (:class:`TrainResult`, whose ``summary()`` is the ``--json`` document),
and the plain-language notes about it: which epoch was kept, and whether fine-tuning beat the head phase."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..report import summary as metrics_summary


@dataclass
class TrainResult:
    """The outcome of a finetune/scratch run (also of a resumed or time-boxed one)."""

    kind: str
    run_dir: Path
    model_path: Path  # model.json: what `featx predict --model` and `load_model` accept
    best: dict  # accuracy, balanced_accuracy, epoch, phase (None values without validation images)
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
    test_metrics: Optional[dict] = None  # the best weights on the folder's test/ images, scored once at the end
    n_test: int = 0
    precision: str = "fp32"
    notes: list = field(default_factory=list)  # which epoch was kept and why; fine-tuning vs the head phase

    @property
    def restored_best(self) -> bool:
        """True when the kept weights are not the last epoch's (a later epoch scored lower)."""
        return bool(self.rows) and self.best.get("epoch") is not None and self.best["epoch"] != self.rows[-1]["epoch"]

    def summary(self) -> dict:
        return {
            "kind": self.kind,
            "run_dir": str(self.run_dir),
            "model": str(self.model_path),
            "best": self.best,
            "restored_best_epoch": self.restored_best,
            "val": metrics_summary(self.metrics) if self.metrics else None,  # best weights; majority rate, chance
            "test": metrics_summary(self.test_metrics) if self.test_metrics else None,
            "epochs_run": len(self.rows),
            "completed": self.completed,
            "stopped_early": self.stopped_early,
            "seconds": round(self.seconds, 2),
            "trainable_params": self.trainable_params,
            "n_train": self.n_train,
            "n_val": self.n_val,
            "n_test": self.n_test,
            "precision": self.precision,
            "notes": list(self.notes),
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
        }


def best_of(state: dict) -> dict:
    """The best-epoch entry of the loop state, with the phase that epoch belonged to."""
    best = {k: state["best"].get(k) for k in ("accuracy", "balanced_accuracy", "epoch")}
    rows = {r["epoch"]: r for r in state["rows"]}
    best["phase"] = rows[best["epoch"]]["phase"] if best["epoch"] in rows else None
    return best


def outcome_notes(rows: list, best: dict) -> list:
    """Say which epoch's weights the model keeps, and when a later phase never beat an earlier one."""
    if not rows or best.get("epoch") is None or best.get("accuracy") is None:
        return []
    last = rows[-1]
    notes = []
    if best["epoch"] != last["epoch"]:
        notes.append(f"kept the weights of epoch {best['epoch']} ({best['phase']} phase, val accuracy "
                     f"{best['accuracy']:.4f}); the last epoch ({last['epoch']}) scored {last['val_accuracy']:.4f}")
    later = [r for r in rows if r["epoch"] > best["epoch"] and r["phase"] != best["phase"]]
    if later:
        top = max(later, key=lambda r: r["val_accuracy"])
        what = "fine-tuning" if top["phase"] == "finetune" else f"the {top['phase']} phase"
        notes.append(f"{what} did not beat the {best['phase']} phase: its best val accuracy was "
                     f"{top['val_accuracy']:.4f} (epoch {top['epoch']}) against {best['accuracy']:.4f}; the model "
                     f"keeps the {best['phase']}-phase weights")
    return notes
