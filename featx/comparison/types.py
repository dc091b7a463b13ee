"""The types `featx compare` passes between its modules (settings, rows, the --shots runs and curve, the result):
one module below ``core``, ``methods``, ``shots`` and ``render``, so that data flows one way through the package."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

QUICK = {"finetune_epochs": 4, "scratch_epochs": 8, "cv": 3}  # --quick: minutes on a CPU, seconds on a GPU
OUTPUT_FILES = ("report.md", "results.json", "accuracy.png", "learning_curve.png", "report.html")  # beside the sub-runs


@dataclass
class CompareSettings:
    """What `featx compare` runs; every method uses the same split and seed."""

    backbone: str = "efficientnet_lite0"  # for the frozen-feature heads and for fine-tuning
    archs: Sequence[str] = ("lenet5", "resnet20")  # scratch baselines: the classic and a small modern net
    quick: bool = False  # small budget: 4 fine-tuning epochs, 8 scratch epochs, 3-fold CV for the heads
    skip_heads: bool = False
    skip_finetune: bool = False
    skip_scratch: bool = False
    finetune_epochs: Optional[int] = None  # None: finetune's default (15), or 4 with --quick
    scratch_epochs: Optional[int] = None  # None: scratch's default (30), or 8 with --quick
    image_size: Optional[Union[int, str]] = None  # finetune/extract crop size; None: the backbone's own; "auto"
    scratch_image_size: Optional[int] = None  # None: each architecture's default
    pretrained: bool = True
    weights: Optional[str] = None
    val_split: float = 0.2  # held-out fraction when the folder has no val/ split (shared by every method)
    seed: int = 0
    device: str = "auto"
    workers: Optional[int] = None
    runtime: str = "auto"  # how the extraction's network runs (featx.runtime): auto = onnxruntime on the CPU
    threads: Optional[int] = None  # onnxruntime's threads; None: the cores this process may use
    runs_dir: str = "runs"
    name: Optional[str] = None
    exist_ok: bool = False
    # A learning curve: None = one data size (the whole training split). "auto" = 1, 2, 5, 10, 20, 50, ... images
    # per class below the smallest class's training count (up to 20 with --quick), plus all; or "1,2,5,10,all".
    shots: Optional[str] = None
    repeats: int = 3  # draws of the smallest k (of every k below all for the heads, whose refit costs seconds)
    budget: Optional[float] = None  # seconds for the whole comparison; runs that would not fit are skipped, listed


@dataclass
class MethodResult:
    method: str  # "heads:logistic", "finetune:efficientnet_lite0", "scratch:lenet5"
    accuracy: Optional[float]
    balanced_accuracy: Optional[float]
    seconds: float
    trainable_params: Optional[int]
    family: str  # heads | finetune | scratch
    best_in_family: bool = False  # set once every row is in: the most accurate row of its family
    artifact: Optional[str] = None  # what `featx predict --model` accepts
    error: Optional[str] = None
    skipped: Optional[str] = None  # why it did not run (the --budget was spent)
    majority_rate: Optional[float] = None  # always answering the commonest validation class (featx.report)
    beats_chance: Optional[bool] = None  # False: not clearly above majority_rate (featx.report.beats_chance)

    @property
    def ok(self) -> bool:
        return self.error is None and self.skipped is None and self.accuracy is not None


@dataclass
class CompareResult:
    run_dir: Path
    rows: list  # MethodResult, best first
    report_path: Path
    chart_path: Optional[Path]
    split: str
    n_train: int
    n_val: int
    seconds: float
    settings: Optional[CompareSettings] = None
    curve: Optional[Curve] = None  # with --shots
    curve_path: Optional[Path] = None  # learning_curve.png
    notes: list = field(default_factory=list)  # runs left out by --budget, plots not drawn, ...
    val_images: list = field(default_factory=list)  # relative paths every method was scored on

    def methods(self) -> list:
        """One dict per method (what ``featx compare --json`` prints without --shots)."""
        return [asdict(r) for r in self.rows]

    def to_dict(self) -> dict:
        """The whole result, as results.json holds it."""
        s = self.settings
        return {"settings": None if s is None else {k: (list(v) if isinstance(v, tuple) else v)
                                                   for k, v in asdict(s).items()},
                "split": self.split, "n_train": self.n_train, "n_val": self.n_val, "val_images": list(self.val_images),
                "seconds": round(self.seconds, 2), "methods": self.methods(),
                "shots": None if self.curve is None else self.curve.to_dict(),
                "notes": list(self.notes), "run_dir": str(self.run_dir), "report": str(self.report_path),
                "charts": {"accuracy": str(self.chart_path) if self.chart_path else None,
                           "learning_curve": str(self.curve_path) if self.curve_path else None}}

    def to_json(self, indent: Optional[int] = 2) -> str:
        """:meth:`to_dict` as a JSON string."""
        return json.dumps(self.to_dict(), indent=indent, default=str)


@dataclass
class ShotRun:
    """One training run on a subset (``k`` images per class; None: the whole training split, the main table's run)."""

    method: str
    family: str
    k: Optional[int]
    draw: int
    n_train: int
    accuracy: Optional[float] = None
    balanced_accuracy: Optional[float] = None
    seconds: float = 0.0
    train_images: list = field(default_factory=list)  # relative paths (empty for k=None: the whole split)
    artifact: Optional[str] = None
    error: Optional[str] = None
    skipped: Optional[str] = None


@dataclass
class Curve:
    ks: list
    repeats: int
    n_classes: int
    n_train: int  # images in the whole training split: the "all" point
    val_images: list  # relative paths every run was scored on
    labels: dict = field(default_factory=dict)  # method -> words for the plot and the sentence
    runs: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    sentence: str = ""

    @property
    def per_class_all(self) -> float:
        return self.n_train / max(1, self.n_classes)

    def points(self) -> list:
        """Mean, standard deviation (over draws), min, max and number of draws per method and size."""
        groups: dict = {}
        for r in self.runs:
            if r.accuracy is not None:
                groups.setdefault((r.method, r.k), []).append(r)
        out = []
        for (method, k), rs in groups.items():
            a = np.array([r.accuracy for r in rs], dtype=float)
            out.append({"method": method, "family": rs[0].family, "label": self.labels.get(method, method),
                        "k": k, "images_per_class": float(k) if k is not None else self.per_class_all,
                        "mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
                        "min": float(a.min()), "max": float(a.max()), "n": int(len(a))})
        return out

    def to_dict(self) -> dict:
        return {"ks": list(self.ks), "repeats": self.repeats, "n_classes": self.n_classes, "n_train": self.n_train,
                "points": self.points(),
                "runs": [asdict(r) for r in self.runs], "sentence": self.sentence, "notes": list(self.notes)}
