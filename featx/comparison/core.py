"""`featx.compare()` itself: its settings, its results, and the run (one split, every method, one report)."""
from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from .._io import safe_str
from ..errors import Interrupted, UsageError

QUICK = {"finetune_epochs": 4, "scratch_epochs": 8, "cv": 3}  # --quick: minutes on a CPU, seconds on a GPU
OUTPUT_FILES = ("report.md", "results.json", "accuracy.png", "learning_curve.png")  # beside the sub-runs


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
    image_size: Optional[int] = None  # finetune/extract crop size; None: the backbone's own
    scratch_image_size: Optional[int] = None  # None: each architecture's default
    pretrained: bool = True
    weights: Optional[str] = None
    val_split: float = 0.2  # held-out fraction when the folder has no val/ split (shared by every method)
    seed: int = 0
    device: str = "auto"
    workers: Optional[int] = None
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
    curve: Optional[object] = None  # featx.comparison.shots.Curve with --shots
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


def compare(images: str | os.PathLike, *, settings: Optional[CompareSettings] = None,
            log: Optional[Callable[[str], None]] = None, on_epoch: Optional[Callable[[dict], None]] = None,
            **kw) -> CompareResult:
    """Run the chosen methods on one split of ``images`` and write a comparison report. ``kw``: CompareSettings fields.

    With ``shots`` it also draws k images per class from the training split for each k, refits the best head
    kind, fine-tunes and trains each scratch CNN on them, scores all on the same validation images and writes
    ``learning_curve.png`` (see :mod:`featx.comparison.shots`).
    """
    from ..data.discover import discover
    from ..data.split import split_records
    from ..training.runs import release
    from . import methods, render, shots

    t0 = time.perf_counter()
    started = methods._clock()  # --budget counts from here
    s = _settings(settings, kw)
    log = log or (lambda m: None)
    images = _check_input(images, s)
    split = split_records(discover(images), s.val_split, s.seed)
    if not split.val:
        raise UsageError("compare needs validation images: add a val/ folder or use --val-split > 0")
    plan = shots.plan(s, split) if s.shots is not None else None  # bad --shots fail before any work
    bb = _backbone(s)  # missing weights fail here (exit 4), before any run folder exists
    claim = _claim(s, images)
    failed = True
    try:
        ctx = methods.Context(s=s, images=images, split=split, run_dir=claim.path, log=log, on_epoch=on_epoch,
                              budget=methods.Budget(s.budget, started))
        log(f"comparing on {len(split.train)} train / {len(split.val)} val images ({split.source}); "
            f"run folder {claim.path}")
        try:
            rows = methods.run_all(ctx, bb)
            curve = shots.run(ctx, plan, rows) if plan is not None else None
        except Interrupted as exc:  # a fine-tuning or scratch run inside says "--resume", which compare does not have
            what = "SIGTERM" if exc.signum == signal.SIGTERM else "Ctrl-C"
            raise Interrupted(f"stopped by {what}; compare cannot continue a stopped comparison: re-run the "
                              f"same command (with --exist-ok --name {safe_str(claim.path.name)} to reuse its "
                              f"folder)", exc.signum) from None
        result = CompareResult(run_dir=claim.path, rows=rows, report_path=claim.path / "report.md", chart_path=None,
                               split=split.source, n_train=len(split.train), n_val=len(split.val),
                               seconds=time.perf_counter() - t0, settings=s, curve=curve,
                               notes=list(ctx.budget.notes) + methods.chance_notes(rows),
                               val_images=[str(r.relpath) for r in split.val])
        render.write_outputs(result)
        failed = False
        return result
    finally:
        release(claim, failed)


def _settings(settings: Optional[CompareSettings], kw: dict) -> CompareSettings:
    s = settings or CompareSettings()
    unknown = set(kw) - set(CompareSettings.__dataclass_fields__)
    if unknown:
        raise UsageError(f"unknown compare setting(s): {', '.join(sorted(unknown))}")
    for k, v in kw.items():
        setattr(s, k, v)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("featx compare runs in one process; run finetune/scratch under torchrun instead")
    if s.skip_heads and s.skip_finetune and (s.skip_scratch or not s.archs):
        raise UsageError("every method is skipped; nothing to compare")
    if s.budget is not None and not s.budget > 0:
        raise UsageError(f"--budget must be a positive number of seconds, got {s.budget}")
    if int(s.repeats) != s.repeats or s.repeats < 1:
        raise UsageError(f"--repeats must be a whole number >= 1, got {s.repeats}")
    from ..training import zoo

    for a in s.archs:
        zoo.get_arch(a)  # unknown names fail before any work, with suggestions
    return s


def _check_input(images, s: CompareSettings) -> Path:
    from .._io import refuse_inside

    images = Path(images)
    if not images.is_dir():
        raise UsageError(f"{images} is not a folder of images")
    refuse_inside(Path(s.runs_dir), images, what="--runs-dir")
    return images


def _backbone(s: CompareSettings):
    """The backbone heads and fine-tuning share, built once up front: without its weights neither can run, so the
    comparison stops with the weights error (exit 4) instead of two failed rows (issue 12). Heads reuse it."""
    if s.skip_heads and s.skip_finetune:
        return None
    from ..backbones import create_backbone

    return create_backbone(s.backbone, pretrained=s.pretrained, weights=s.weights, image_size=s.image_size)


def _claim(s: CompareSettings, images: Path):
    """runs/compare/<name>, locked for the run; its own files checked (never replace a file featx did not write)."""
    from .._io import check_outputs
    from ..features.engine import is_features_store
    from ..training.runs import RUN_FILE_HINT, claim_run_dir, release

    claim = claim_run_dir(s.runs_dir, "compare", s.name, resume=False, exist_ok=s.exist_ok, resumable=False)
    try:
        outputs = {claim.path / n: None for n in OUTPUT_FILES}
        outputs[claim.path / "features.npz"] = is_features_store
        check_outputs(outputs, hint=RUN_FILE_HINT)
    except BaseException:
        release(claim, failed=True)
        raise
    return claim
