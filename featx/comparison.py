"""`featx.compare()`: is transfer learning worth it on my images? Frozen-feature heads vs fine-tuning vs scratch CNNs.

Every method sees the same train/validation split (the folder's train/ and val/, else one stratified, seeded
hold-out), so the table compares methods, not splits. The run folder ``runs/compare/<name>`` gets
``report.md``, ``accuracy.png``, ``results.json`` and the sub-runs (features + heads, the finetune run,
the scratch runs), each usable on its own with `featx predict`.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ._io import write_json, write_markdown
from .errors import FeatxError, UsageError

QUICK = {"finetune_epochs": 4, "scratch_epochs": 8, "cv": 3}  # --quick: minutes on a CPU, seconds on a GPU


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


@dataclass
class MethodResult:
    method: str  # "heads:logistic", "finetune:efficientnet_lite0", "scratch:lenet5"
    accuracy: Optional[float]
    balanced_accuracy: Optional[float]
    seconds: float
    trainable_params: Optional[int]
    family: str  # heads | finetune | scratch
    best_in_family: bool = True
    artifact: Optional[str] = None  # what `featx predict --model` accepts
    error: Optional[str] = None


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

    def to_json(self) -> list:
        """`--json`: one entry per method."""
        return [asdict(r) for r in self.rows]


def compare(images: str | os.PathLike, *, settings: Optional[CompareSettings] = None,
            log: Optional[Callable[[str], None]] = None, on_epoch: Optional[Callable[[dict], None]] = None,
            **kw) -> CompareResult:
    """Run the chosen methods on one split of ``images`` and write a comparison report. ``kw``: CompareSettings fields."""
    from .data.discover import discover
    from .data.split import split_records
    from .training.runs import resolve_run_dir

    s = settings or CompareSettings()
    unknown = set(kw) - set(CompareSettings.__dataclass_fields__)
    if unknown:
        raise UsageError(f"unknown compare setting(s): {', '.join(sorted(unknown))}")
    for k, v in kw.items():
        setattr(s, k, v)
    log = log or (lambda m: None)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("featx compare runs in one process; run finetune/scratch under torchrun instead")
    if s.skip_heads and s.skip_finetune and (s.skip_scratch or not s.archs):
        raise UsageError("every method is skipped; nothing to compare")
    from .training import zoo

    for a in s.archs:
        zoo.get_arch(a)
    images = Path(images)
    if not images.is_dir():
        raise UsageError(f"{images} is not a folder of images")
    from ._io import refuse_inside

    refuse_inside(Path(s.runs_dir), images, what="--runs-dir")
    folder = discover(images)
    split = split_records(folder, s.val_split, s.seed)
    run_dir, _ = resolve_run_dir(s.runs_dir, "compare", s.name, exist_ok=s.exist_ok)
    log(f"comparing on {len(split.train)} train / {len(split.val)} val images ({split.source}); run folder {run_dir}")
    if not split.val:
        raise UsageError("compare needs validation images: add a val/ folder or use --val-split > 0")

    t_all = time.perf_counter()
    rows: list = []
    ft_epochs = s.finetune_epochs or (QUICK["finetune_epochs"] if s.quick else None)
    sc_epochs = s.scratch_epochs or (QUICK["scratch_epochs"] if s.quick else None)
    common = dict(seed=s.seed, device=s.device, workers=s.workers, val_split=s.val_split, runs_dir=str(run_dir))

    if not s.skip_heads:
        rows += _guard("heads", log, lambda: _heads(images, split, s, run_dir, log))
    if not s.skip_finetune:
        def ft():
            from .training import finetune

            extra = {"epochs": ft_epochs} if ft_epochs else {}
            r = finetune(s.backbone, images, pretrained=s.pretrained, weights=s.weights, image_size=s.image_size,
                         name=_safe_name(s.backbone), exist_ok=True, log=log, on_epoch=on_epoch, **common, **extra)
            return [_from_train(r, f"finetune:{s.backbone}", "finetune")]

        rows += _guard("finetune", log, ft)
    if not s.skip_scratch:
        for arch in s.archs:
            def sc(arch=arch):
                from .training import train_scratch

                extra = {"epochs": sc_epochs} if sc_epochs else {}
                r = train_scratch(images, arch=arch, image_size=s.scratch_image_size, name=arch, exist_ok=True,
                                  log=log, on_epoch=on_epoch, **common, **extra)
                return [_from_train(r, f"scratch:{arch}", "scratch")]

            rows += _guard(f"scratch {arch}", log, sc)

    ok = [r for r in rows if r.error is None]
    if not ok:
        raise FeatxError("every method failed: " + "; ".join(f"{r.method}: {r.error}" for r in rows))
    rows.sort(key=lambda r: (r.error is not None, -(r.accuracy if r.accuracy is not None else -1.0)))
    result = CompareResult(run_dir=run_dir, rows=rows, report_path=run_dir / "report.md", chart_path=None,
                           split=split.source, n_train=len(split.train), n_val=len(split.val),
                           seconds=time.perf_counter() - t_all)
    _write_outputs(result, s)
    return result


def _guard(what: str, log, fn) -> list:
    """A method that fails (e.g. weights missing offline) becomes a row with its error; the others still run."""
    t0 = time.perf_counter()
    try:
        return fn()
    except FeatxError as exc:
        log(f"warning: {what} failed: {exc}")
        return [MethodResult(method=what.replace(" ", ":"), accuracy=None, balanced_accuracy=None,
                             seconds=round(time.perf_counter() - t0, 2), trainable_params=None,
                             family=what.split()[0], error=str(exc))]


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _from_train(r, method: str, family: str) -> MethodResult:
    return MethodResult(method=method, accuracy=r.best.get("accuracy"), balanced_accuracy=r.best.get("balanced_accuracy"),
                        seconds=round(r.seconds, 2), trainable_params=int(r.trainable_params), family=family,
                        artifact=str(r.run_dir))


def _heads(images: Path, split, s: CompareSettings, run_dir: Path, log) -> list:
    """Extract once, relabel the rows with the shared split, fit every head kind; the best first."""
    from .features.engine import extract_features
    from .features.store import load_features
    from .heads import fit_head

    t0 = time.perf_counter()
    feats = run_dir / "features.npz"
    ex = extract_features(images, feats, backbone=s.backbone, pretrained=s.pretrained, weights=s.weights,
                          device=s.device, workers=s.workers, overwrite=True)
    t_extract = time.perf_counter() - t0
    log(f"extracted {ex.n_images} feature vectors with {ex.backbone} in {t_extract:.1f} s")
    fs = load_features(feats)
    which = {str(r.relpath): "train" for r in split.train} | {str(r.relpath): "val" for r in split.val}
    keep = np.array([p in which for p in fs.paths], dtype=bool)
    fs = fs.subset(keep)
    fs.splits = np.array([which[p] for p in fs.paths])
    res = fit_head(fs, head="all", output=run_dir / "heads" / "head.skops", seed=s.seed,
                   cv=QUICK["cv"] if s.quick else 5, device=s.device)
    out = []
    for i, r in enumerate(res.results or [res]):
        val = r.scores.get("val", {})
        fit_s = float(r.training.get("fit_seconds", 0.0))
        out.append(MethodResult(
            method=f"heads:{r.kind}", accuracy=_num(val.get("accuracy")), balanced_accuracy=_num(val.get("balanced_accuracy")),
            seconds=round(t_extract + fit_s, 2), trainable_params=_head_params(r.head.pipeline), family="heads",
            best_in_family=i == 0,
            artifact=str(run_dir / "heads" / ("head.skops" if i == 0 else f"head-{r.kind}.skops"))))
    return out


def _num(v) -> Optional[float]:
    return None if v is None or (isinstance(v, float) and not np.isfinite(v)) else float(v)


def _head_params(pipeline) -> int:
    """Learned numbers of the classifier step (k-NN learns none: it stores the training features)."""
    clf = pipeline[-1]
    n = 0
    for attr in ("coef_", "intercept_", "dual_coef_"):
        v = getattr(clf, attr, None)
        if v is not None:
            n += int(np.asarray(v).size)
    return n


def _write_outputs(result: CompareResult, s: CompareSettings) -> None:
    from . import report

    run_dir = result.run_dir
    chart_rows = [{"method": r.method, "accuracy": r.accuracy} for r in result.rows if r.accuracy is not None]
    try:
        report.save_bar_chart_png(chart_rows, run_dir / "accuracy.png", key="accuracy", label_key="method",
                                  title=f"validation accuracy ({result.n_val} images)")
        result.chart_path = run_dir / "accuracy.png"
    except Exception as exc:  # a plotting problem must not hide the numbers
        result.chart_path = None
        chart_error = str(exc)
    else:
        chart_error = None
    write_json(run_dir / "results.json", {"settings": {k: (list(v) if isinstance(v, tuple) else v)
                                                       for k, v in asdict(s).items()},
                                          "split": result.split, "n_train": result.n_train, "n_val": result.n_val,
                                          "methods": result.to_json()})
    write_markdown(run_dir / "report.md", render_report(result, s, chart_error))


def _f(v, nd=4) -> str:
    return "-" if v is None else f"{v:.{nd}f}"


def render_report(result: CompareResult, s: CompareSettings, chart_error: Optional[str] = None) -> str:
    lines = ["# featx compare", "",
             f"- images: {result.n_train} train, {result.n_val} validation ({result.split}); seed {s.seed}",
             f"- backbone for heads and fine-tuning: `{s.backbone}`" + (" (random init)" if not s.pretrained else ""),
             f"- budget: {'quick' if s.quick else 'default'}; total wall time {result.seconds:.1f} s", "",
             "| method | val accuracy | balanced accuracy | seconds | trainable params |", "|---|---|---|---|---|"]
    for r in result.rows:
        name = r.method + ("" if r.best_in_family or r.family != "heads" else " (not the best head)")
        if r.error:
            lines.append(f"| {r.method} | failed: {r.error} | | {r.seconds:.1f} | |")
        else:
            tp = "-" if r.trainable_params is None else f"{r.trainable_params:,}"
            lines.append(f"| {name} | {_f(r.accuracy)} | {_f(r.balanced_accuracy)} | {r.seconds:.1f} | {tp} |")
    lines += [""]
    if result.chart_path:
        lines += ["![validation accuracy](accuracy.png)", ""]
    elif chart_error:
        lines += [f"(bar chart not drawn: {chart_error})", ""]
    lines += ["Heads: features extracted once from the frozen backbone (their time includes the extraction), "
              "one row per head kind. Fine-tuning and scratch rows report their best epoch on the same "
              "validation images. Trainable parameters of a head are its learned coefficients (k-NN stores "
              "the training features and learns none).", "",
              "## Artifacts (each works with `featx predict --model`)", ""]
    lines += [f"- {r.method}: `{r.artifact}`" for r in result.rows if r.artifact and not r.error]
    lines.append("")
    return "\n".join(lines)
