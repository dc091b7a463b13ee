"""`featx.compare()` itself: the run (one split, every method, one report). Its settings and results are in
``types`` (re-exported here); ``core`` is the top of the package: it imports the other modules, none imports it."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Callable, Optional

from .._io import safe_str
from ..errors import Interrupted, UsageError
from . import methods, render, shots
from .types import OUTPUT_FILES, CompareResult, CompareSettings, MethodResult  # noqa: F401 - MethodResult re-exported


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

    t0 = time.perf_counter()
    started = methods._clock()  # --budget counts from here
    s = _settings(settings, kw)
    log = log or (lambda m: None)
    images = _check_input(images, s)
    split = split_records(discover(images), s.val_split, s.seed)
    if not split.val:
        raise UsageError("compare needs validation images: add a val/ folder or use --val-split > 0")
    plan = shots.plan(s, split) if s.shots is not None else None  # bad --shots fail before any work
    bb = _backbone(s, split)  # missing weights fail here (exit 4), before any run folder exists
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
                              f"same command (with --overwrite --name {safe_str(claim.path.name)} to reuse its "
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
    from ..features.sizing import parse_image_size

    if s.image_size is not None:  # before any method runs, not when the first one that uses it starts
        s.image_size = parse_image_size(s.image_size)
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


def _backbone(s: CompareSettings, split=None):
    """The backbone heads and fine-tuning share, built once up front: without its weights neither can run, so the
    comparison stops with the weights error (exit 4) instead of two failed rows (issue 12). Heads reuse it.

    ``--image-size auto`` is resolved here, once, from the training images (`featx.features.sizing`), and
    ``s.image_size`` becomes that number: extraction and fine-tuning then run at the same crop size."""
    if s.skip_heads and s.skip_finetune:
        return None
    from ..backbones import create_backbone
    from ..features.sizing import AUTO, resolve_size

    auto = s.image_size == AUTO
    bb = create_backbone(s.backbone, pretrained=s.pretrained, weights=s.weights,
                         image_size=None if auto else s.image_size)
    if auto:
        s.image_size = resolve_size(AUTO, [r.path for r in (split.train if split else [])], bb.preprocess)
        if s.image_size != bb.preprocess.input_size:
            import dataclasses

            bb = dataclasses.replace(bb, preprocess=bb.preprocess.with_size(s.image_size))
    return bb


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
