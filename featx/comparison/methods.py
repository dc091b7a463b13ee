"""The methods `featx compare` runs: heads on frozen features (extracted once), fine-tuning, scratch CNNs.

Every method trains on the same training images and is scored on the same validation images: the one split rule
(``featx.data.split.split_records``). Fine-tuning and scratch apply that rule themselves (same seed, same
fraction); the heads are fitted on the rows of the feature store whose relative paths the same split put in train
and val. A method that fails (or that ``--budget`` leaves out) becomes a row saying so; the others still run.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from ..errors import DataError, FeatxError, Interrupted
from .types import QUICK, CompareSettings, MethodResult


def _clock() -> float:
    return time.perf_counter()  # the budget's clock (a test replaces it to spend the budget deterministically)


@dataclass
class Budget:
    """``--budget SECONDS`` for the whole comparison. A run starts only when the time left covers the last run of
    the same method (the runs of a method cost about the same by design); a run is never cut short, so the total
    can pass the budget by at most one run whose cost was not known yet (a method's first)."""

    seconds: Optional[float]
    t0: float = field(default_factory=lambda: _clock())
    last: dict = field(default_factory=dict)  # method -> seconds of its latest run
    notes: list = field(default_factory=list)  # what was skipped, for the report

    def allows(self, key: str, what: str) -> bool:
        if self.seconds is None:
            return True
        left = self.seconds - (_clock() - self.t0)
        need = self.last.get(key, 0.0)
        if left > 0 and need <= left:
            return True
        why = (f"{left:.0f} s of the {self.seconds:g} s budget left, its last run took {need:.0f} s" if left > 0
               else f"the {self.seconds:g} s budget is spent")
        self.notes.append(f"skipped {what}: {why}")
        return False

    def spent(self, key: str, seconds: float) -> None:
        self.last[key] = seconds


@dataclass
class Context:
    """One comparison's shared state: settings, split, run folder, callbacks, budget and the feature store."""

    s: CompareSettings
    images: Path
    split: object  # featx.data.split.Split
    run_dir: Path
    log: Callable[[str], None]
    on_epoch: Optional[Callable[[dict], None]]
    budget: Budget
    features: Optional[object] = None  # FeatureSet of every readable image, once extracted
    row_of: dict = field(default_factory=dict)  # relative path -> row of ``features``
    val_rows: Optional[np.ndarray] = None  # rows of the split's validation images
    extract_seconds: float = 0.0
    best_head: Optional[str] = None  # the head kind that scored best on the full training split

    @property
    def ft_epochs(self) -> Optional[int]:
        return self.s.finetune_epochs or (QUICK["finetune_epochs"] if self.s.quick else None)

    @property
    def sc_epochs(self) -> Optional[int]:
        return self.s.scratch_epochs or (QUICK["scratch_epochs"] if self.s.quick else None)

    @property
    def cv(self) -> int:
        return QUICK["cv"] if self.s.quick else 5

    def common(self) -> dict:
        s = self.s
        return dict(seed=s.seed, device=s.device, workers=s.workers, val_split=s.val_split,
                    runs_dir=str(self.run_dir), exist_ok=True, log=self.log, on_epoch=self.on_epoch)


def run_all(ctx: Context, bb) -> list:
    """Every chosen method on the full training split -> rows, best first; raises when none ran."""
    s = ctx.s
    rows: list = []
    errors: list = []
    if not s.skip_heads:
        rows += guard(ctx, "heads", lambda: heads(ctx, bb), errors)
    if not s.skip_finetune:
        rows += guard(ctx, f"finetune:{s.backbone}", lambda: [finetune_run(ctx)], errors)
    for arch in () if s.skip_scratch else s.archs:
        rows += guard(ctx, f"scratch:{arch}", lambda arch=arch: [scratch_run(ctx, arch)], errors)
    if not any(r.ok for r in rows):
        raise _all_failed(rows, errors)
    mark_best(rows)
    mark_chance(rows, [r.label for r in ctx.split.val])
    rows.sort(key=lambda r: (not r.ok, -(r.accuracy if r.accuracy is not None else -1.0)))
    return rows


def guard(ctx: Context, method: str, fn, errors: list) -> list:
    """Run one method: a FeatxError (other than an interruption) becomes a failed row; ``--budget`` may skip it."""
    family = method.split(":")[0]
    if not ctx.budget.allows(method, method):
        return [MethodResult(method=method, accuracy=None, balanced_accuracy=None, seconds=0.0,
                             trainable_params=None, family=family, skipped="budget")]
    t0, c0 = time.perf_counter(), _clock()
    try:
        out = fn()
    except Interrupted:
        raise
    except FeatxError as exc:
        ctx.log(f"warning: {method} failed: {exc}")
        errors.append(exc)
        out = [MethodResult(method=method, accuracy=None, balanced_accuracy=None,
                            seconds=round(time.perf_counter() - t0, 2), trainable_params=None, family=family,
                            error=str(exc))]
    ctx.budget.spent(method, _clock() - c0)  # on the budget's own clock (the same one, unless a test sets it)
    return out


def _all_failed(rows: list, errors: list) -> FeatxError:
    """One error for "nothing ran": the error itself when one method ran; else each distinct message once, with the
    exit code the errors share (else 1)."""
    if not errors:
        return FeatxError("no method ran: the --budget was spent before the first one; raise --budget")
    if len(errors) == 1:
        return errors[0]  # one method ran and failed: its own error, class and exit code
    codes = {e.exit_code for e in errors}
    by_message: dict = {}
    for r in rows:
        if r.error:
            by_message.setdefault(r.error, []).append(r.method)
    text = "; ".join(f"{', '.join(ms)}: {msg}" for msg, ms in by_message.items())
    return FeatxError(f"every method failed: {text}", exit_code=codes.pop() if len(codes) == 1 else 1)


def mark_best(rows: list) -> None:
    """``best_in_family``: the most accurate row of each family (heads, finetune, scratch), and only that one."""
    best: dict = {}
    for r in rows:
        r.best_in_family = False
        if r.ok and (r.family not in best or r.accuracy > best[r.family].accuracy):
            best[r.family] = r
    for r in best.values():
        r.best_in_family = True


def mark_chance(rows: list, val_labels: list) -> None:
    """``majority_rate`` and ``beats_chance`` of every row that ran: featx.report's one chance rule on the shared
    validation images (every method is scored on the same ones)."""
    from ..report import beats_chance, majority_rate

    majority = majority_rate(val_labels)
    for r in rows:
        r.majority_rate = majority
        if r.ok:
            r.beats_chance = beats_chance(round(r.accuracy * len(val_labels)), len(val_labels), majority)


def chance_notes(rows: list) -> list:
    """One note per method that does not clearly beat the majority-class rate (compare's notes and report.md)."""
    from ..report import chance_note

    return [f"{r.method}: " + chance_note(r.accuracy, r.majority_rate, r.balanced_accuracy, "val accuracy")
            + "; not a result" for r in rows if r.ok and r.beats_chance is False]


# -- heads on frozen features ---------------------------------------------------------------------------------
def extract(ctx: Context, bb) -> None:
    """Extract every image once into runs/compare/<name>/features.npz; index its rows by relative path."""
    from ..features.engine import extract_features
    from ..features.store import load_features

    t0 = time.perf_counter()
    path = ctx.run_dir / "features.npz"
    ex = extract_features(ctx.images, path, backbone=bb, image_size=ctx.s.image_size, device=ctx.s.device,
                          workers=ctx.s.workers, overwrite=True, runtime=ctx.s.runtime, threads=ctx.s.threads)
    ctx.extract_seconds = time.perf_counter() - t0
    ctx.log(f"extracted {ex.n_images} feature vectors with {ex.backbone} in {ctx.extract_seconds:.1f} s")
    fs = load_features(path)
    ctx.features, ctx.row_of = fs, {p: i for i, p in enumerate(fs.paths)}
    ctx.val_rows = rows_of(ctx, ctx.split.val, "validation")


def rows_of(ctx: Context, records, what: str) -> np.ndarray:
    """Store rows of these image records (an image that could not be decoded has no row and no say)."""
    rows = [ctx.row_of[str(r.relpath)] for r in records if str(r.relpath) in ctx.row_of]
    if not rows:
        raise DataError(f"none of the {what} images could be decoded")
    return np.array(rows, dtype=np.int64)


def heads(ctx: Context, bb) -> list:
    """Every head kind on the split's training rows, scored on its validation rows; the best first."""
    from ..heads import fit_head

    extract(ctx, bb)
    fs = ctx.features
    res = fit_head(fs.subset(rows_of(ctx, ctx.split.train, "training")), head="all", val=fs.subset(ctx.val_rows),
                   output=ctx.run_dir / "heads" / "head.skops", seed=ctx.s.seed, cv=ctx.cv, device=ctx.s.device)
    results = res.results or [res]
    ctx.best_head = results[0].kind
    out = []
    for i, r in enumerate(results):
        val = r.scores.get("val", {})
        out.append(MethodResult(
            method=f"heads:{r.kind}", accuracy=_num(val.get("accuracy")),
            balanced_accuracy=_num(val.get("balanced_accuracy")),
            seconds=round(ctx.extract_seconds + float(r.training.get("fit_seconds", 0.0)), 2),
            trainable_params=head_params(r.head.pipeline), family="heads",
            artifact=str(ctx.run_dir / "heads" / ("head.skops" if i == 0 else f"head-{r.kind}.skops"))))
    return out


def _num(v) -> Optional[float]:
    return None if v is None or (isinstance(v, float) and not np.isfinite(v)) else float(v)


def head_params(pipeline) -> int:
    """Learned numbers of the classifier step (k-NN learns none: it stores the training features)."""
    clf = pipeline[-1]
    n = 0
    for attr in ("coef_", "intercept_", "dual_coef_", "coefs_", "intercepts_"):
        v = getattr(clf, attr, None)
        if v is not None:
            n += sum(int(np.asarray(a).size) for a in v) if isinstance(v, list) else int(np.asarray(v).size)
    return n


# -- fine-tuning and scratch ----------------------------------------------------------------------------------
def safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def finetune_run(ctx: Context, subset: Optional[list] = None, name: Optional[str] = None) -> MethodResult:
    """featx.finetune on the split (or on ``subset`` of its training images, epochs filled to the full size)."""
    from ..training import finetune

    s = ctx.s
    extra = {"epochs": ctx.ft_epochs} if ctx.ft_epochs else {}
    if subset is not None:
        extra.update(train_subset=list(subset), fill_epoch=len(ctx.split.train))
    r = finetune(s.backbone, ctx.images, pretrained=s.pretrained, weights=s.weights, image_size=s.image_size,
                 name=name or safe_name(s.backbone), **ctx.common(), **extra)
    return from_train(r, f"finetune:{s.backbone}", "finetune")


def scratch_run(ctx: Context, arch: str, subset: Optional[list] = None, name: Optional[str] = None) -> MethodResult:
    """featx.train_scratch on the split (or on ``subset`` of its training images, epochs filled to the full size)."""
    from ..training import train_scratch

    extra = {"epochs": ctx.sc_epochs} if ctx.sc_epochs else {}
    if subset is not None:
        extra.update(train_subset=list(subset), fill_epoch=len(ctx.split.train))
    r = train_scratch(ctx.images, arch=arch, image_size=ctx.s.scratch_image_size, name=name or arch,
                      **ctx.common(), **extra)
    return from_train(r, f"scratch:{arch}", "scratch")


def from_train(r, method: str, family: str) -> MethodResult:
    return MethodResult(method=method, accuracy=r.best.get("accuracy"), balanced_accuracy=r.best.get("balanced_accuracy"),
                        seconds=round(r.seconds, 2), trainable_params=int(r.trainable_params), family=family,
                        artifact=str(r.run_dir))
