"""A training run from start to end: its folder `runs/<kind>/<name>` (claimed under a lock, resumed, or cleaned up
when the run fails before its first epoch), the Trainer with its callbacks, and the result.

Names auto-increment (exp, exp2, ...) as in Ultralytics. A folder given by `--name` is never silently reused: it must
be resumed (`--resume`) or explicitly reused (`--overwrite`, once `--exist-ok`), so an earlier run's weights and
metrics are not mixed with a new run's; in a reused folder featx replaces only files it wrote itself. Two runs never
write one folder at once: the second fails at once, naming the first (an OS lock held for the run's life, released
when it dies).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from .._io import OutputLock, check_outputs, read_json, refuse_inside, safe_str, write_json
from ..data.preprocess import Preprocess
from ..devices import Dist
from ..errors import FeatxError, UsageError, interruptible
from . import checkpoint
from .callbacks import Checkpointer, EarlyStopping, EpochLog, StopAfter, metrics_csv_is_ours
from .checkpoint import MODEL_JSON, RESUME_FILE
from .reporting import REPORT_FILES, RunReport
from .result import TrainResult, best_of, outcome_notes
from .trainer import Trainer


# -- run folders -----------------------------------------------------------------------------------------------
def _numbered(name: str) -> int:
    m = re.fullmatch(r"exp(\d*)", name)
    if not m:
        return -1
    return int(m.group(1) or 1)


def next_run_dir(base: Path) -> Path:
    """The first free `exp`, `exp2`, `exp3`, ... under ``base`` (one past the highest existing number)."""
    taken = [_numbered(p.name) for p in base.iterdir()] if base.is_dir() else []
    n = max([0, *taken]) + 1
    return base / ("exp" if n == 1 else f"exp{n}")


def latest_run_dir(base: Path) -> Optional[Path]:
    """The most recently modified run folder under ``base`` that can be resumed."""
    if not base.is_dir():
        return None
    cands = [p for p in base.iterdir() if p.is_dir() and (p / RESUME_FILE).is_file()]
    return max(cands, key=lambda p: (p / RESUME_FILE).stat().st_mtime, default=None)


def _resume_target(base: Path, name: Optional[str]) -> Path:
    path = base / name if name else latest_run_dir(base)
    if path is None:
        raise UsageError(f"--resume: no resumable run under {base}; start a new run without --resume")
    if not (path / RESUME_FILE).is_file():
        raise UsageError(f"--resume: {path} has no {RESUME_FILE} (not a featx run, or it ended before its first epoch)")
    return path


# What to do about a file featx did not write inside a reused run folder: a run folder's --overwrite reuses the folder,
# and even then a user's file in it is never replaced, so the way out is another --name or moving the file.
RUN_FILE_HINT = "choose another --name, or move that file out of the run folder"


def _refuse_existing(path: Path, exist_ok: bool, resumable: bool = True) -> None:
    if path.exists() and not path.is_dir():
        raise UsageError(f"{safe_str(str(path))} is a file, not a run folder; choose another --name")
    if path.exists() and any(path.iterdir()) and not exist_ok:
        # only commands that have --resume (finetune, scratch) suggest it; compare cannot continue a run
        resume = "pass --resume to continue it, " if resumable else ""
        raise UsageError(f"run folder {safe_str(str(path))} already exists; {resume}pass --overwrite to reuse it "
                         f"(featx replaces only files it wrote), or choose another --name")


def resolve_run_dir(runs_dir: str | os.PathLike, kind: str, name: Optional[str] = None, *,
                    resume: bool = False, exist_ok: bool = False, create: bool = True) -> tuple[Path, bool]:
    """Pick (and create) the folder of a run, without a lock. Returns (path, resuming).

    ``resume`` with ``name`` continues that run; ``resume`` without a name continues the latest resumable run
    of this kind. ``name`` naming an existing folder is refused unless ``resume`` or ``exist_ok``.
    """
    base = Path(runs_dir) / kind
    if resume:
        return _resume_target(base, name), True
    if name:
        path = base / name
        _refuse_existing(path, exist_ok)
        if create:
            path.mkdir(parents=True, exist_ok=True)
        return path, False
    while True:  # two runs starting at once must not share a folder: mkdir without exist_ok claims it
        path = next_run_dir(base)
        if not create:
            return path, False
        try:
            path.mkdir(parents=True)
            return path, False
        except FileExistsError:
            continue


@dataclass
class Claim:
    """A run folder held by this process: its lock, and what this run created (removed again if it did no work)."""

    path: Path
    resuming: bool
    created: bool  # the folder did not exist before this run
    lock: OutputLock
    made: list = field(default_factory=list)  # parent folders this run created (runs/, runs/finetune/)


def _missing_parents(path: Path) -> list:
    made, probe = [], path.parent
    while not probe.exists() and probe.parent != probe:
        made.append(probe)
        probe = probe.parent
    return made  # innermost first


def claim_run_dir(runs_dir, kind: str, name: Optional[str], *, resume: bool, exist_ok: bool,
                  resumable: bool = True) -> Claim:
    """Pick the run folder and lock it for this run's life (a second run on it fails at once, naming this one).
    ``resumable``: whether the command has --resume (its messages suggest only options it has)."""
    base = Path(runs_dir) / kind
    if not resume and not name:  # a fresh exp/expN: mkdir claims the name, then the lock keeps --resume out
        made = _missing_parents(base / "x")
        path, _ = resolve_run_dir(runs_dir, kind)
        lock = OutputLock(path)
        try:
            lock.acquire()
        except BaseException:
            _remove_empty([path, *made])
            raise
        return Claim(path, False, True, lock, made)
    path = _resume_target(base, name) if resume else base / name
    made = _missing_parents(path)
    lock = OutputLock(path)
    lock.acquire()  # before looking inside: a folder another run is filling is "busy", not "already exists"
    try:
        created = not path.exists()
        if not resume:
            _refuse_existing(path, exist_ok, resumable)
            path.mkdir(parents=True, exist_ok=True)
        if not created:
            check_outputs(run_outputs(path), hint=RUN_FILE_HINT)  # a reused folder: replace only files featx wrote
    except BaseException:
        lock.release()
        _remove_empty([*made])
        raise
    return Claim(path, resume, created, lock, made)


def run_outputs(run_dir: Path) -> dict:
    """Every file a run writes in its folder -> how to recognise featx's own copy (None: by suffix)."""
    legacy = _is_featx_run(run_dir)  # a run folder of an older featx: its files carry no written_by mark
    json_rec, report_rec = (_legacy_json, _legacy_report_file) if legacy else (None, None)
    outputs = {run_dir / "config.json": json_rec, run_dir / MODEL_JSON: json_rec,
               run_dir / "metrics.csv": metrics_csv_is_ours}
    outputs.update({run_dir / n: checkpoint.safetensors_is_ours for n in ("best.safetensors", "last.safetensors",
                                                                          RESUME_FILE)})
    outputs.update({run_dir / n: report_rec for n in REPORT_FILES})
    return outputs


def _is_featx_run(run_dir: Path) -> bool:
    """A run folder of a featx from before the written_by marks: model.json of featx's format or its config.json."""
    try:
        if (run_dir / MODEL_JSON).is_file() and read_json(run_dir / MODEL_JSON).get("format") == checkpoint.MODEL_FORMAT:
            return True
        return (run_dir / "config.json").is_file() and read_json(run_dir / "config.json").get("kind") in ("finetune", "scratch")
    except FeatxError:
        return False


def _legacy_json(path: Path) -> bool:
    from .._io import written_by_featx

    if written_by_featx(path):
        return True
    try:
        doc = read_json(path)
    except FeatxError:
        return False
    return doc.get("format") == checkpoint.MODEL_FORMAT or doc.get("kind") in ("finetune", "scratch")


def _legacy_report_file(path: Path) -> bool:
    """In a folder featx's own config marks as a run: its report.md starts "# featx", its plots are PNGs."""
    from .._io import written_by_featx

    if written_by_featx(path):
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(16)
    except OSError:
        return False
    return head.startswith(b"# featx ") if path.suffix == ".md" else head.startswith(b"\x89PNG")


def _remove_empty(folders: list) -> None:
    for d in folders:  # innermost first; only empty folders go
        try:
            d.rmdir()
        except OSError:
            break


def release(claim: Claim, failed: bool) -> None:
    """Unlock; a run that failed before finishing an epoch in a folder it created leaves nothing behind."""
    if failed and claim.created and not claim.resuming and not (claim.path / "last.safetensors").exists():
        for n in ("config.json",):  # the only file written before the first epoch ends
            try:
                (claim.path / n).unlink()
            except OSError:
                pass
        _remove_empty([claim.path])
    claim.lock.release()
    _remove_empty(claim.made)


# -- one run -------------------------------------------------------------------------------------------------
@dataclass
class RunSpec:
    """Everything a recipe (finetune.py, scratch.py) decides; :func:`execute` runs it."""

    kind: str  # "finetune" | "scratch"
    model: nn.Module
    preprocess: Preprocess
    classes: list
    train_batches: object  # TensorBatches | LoaderBatches (featx.data.batches)
    val_batches: Optional[object]
    phases: list
    cfg: object  # TrainConfig
    run_dir: Path
    model_info: dict  # kind-specific model.json fields (arch/backbone, image_size, ...)
    dist: Dist
    device: torch.device
    n_train: int
    n_val: int
    test_batches: Optional[object] = None
    n_test: int = 0
    split_how: str = ""
    skipped: list = field(default_factory=list)  # decode failures found before training
    warnings: list = field(default_factory=list)
    config_extra: dict = field(default_factory=dict)  # written to config.json with the settings
    resume_state: Optional[tuple] = None  # (loop state, optimizer state) from resume.safetensors
    seen: Optional[dict] = None  # the images that trained (train) and chose (val: the best epoch) it: seen_of(split)
    log: Callable[[str], None] = lambda msg: None
    on_epoch: Optional[Callable[[dict], None]] = None
    cpu_channels_last: bool = False  # train in channels_last on the CPU (the recipe measured it faster: Trainer)

    @property
    def title(self) -> str:
        return str(self.model_info.get("backbone") or self.model_info.get("arch"))


def execute(spec: RunSpec) -> TrainResult:
    """Build the Trainer with featx's callbacks, restore a resumed run, write config.json, fit; -> the result."""
    cfg = spec.cfg
    make_result = lambda t: result_of(spec, t)  # noqa: E731 - the report callback and the caller share it
    trainer = Trainer(
        spec.model, spec.phases, train_batches=spec.train_batches, val_batches=spec.val_batches,
        test_batches=spec.test_batches, preprocess=spec.preprocess, classes=spec.classes, cfg=cfg,
        device=spec.device, dist=spec.dist, log=spec.log, cpu_channels_last=spec.cpu_channels_last,
        callbacks=(EpochLog(spec.log, spec.on_epoch), EarlyStopping(cfg.patience), StopAfter(cfg.stop_after),
                   Checkpointer(spec.run_dir, lambda t: model_json(spec, t)),
                   RunReport(spec.run_dir, make_result, spec.title, spec.split_how, spec.warnings)))
    if spec.resume_state is not None:
        _resume(trainer, spec)
    trainer.add_skipped(spec.skipped)
    if spec.dist.is_main and spec.resume_state is None:
        write_json(spec.run_dir / "config.json", {**cfg.to_dict(), **spec.config_extra,
                                                  "precision_used": trainer.precision.name,
                                                  "memory_format": trainer.memory_format})
    trainer.fit()
    return make_result(trainer)


def _resume(trainer: Trainer, spec: RunSpec) -> None:
    loop, opt_state = spec.resume_state
    last, _ = checkpoint.load_weights(spec.run_dir / "last.safetensors")
    best = None
    if loop["best"].get("epoch") is not None and (spec.run_dir / "best.safetensors").is_file():
        best, _ = checkpoint.load_weights(spec.run_dir / "best.safetensors")
    trainer.resume(loop, opt_state, last, best)
    if loop.get("done"):
        spec.log(f"{spec.run_dir} already finished; rewriting its report")
    else:
        spec.log(f"resuming {spec.run_dir} after epoch {loop['epoch']} of {trainer.total_epochs}")


def model_json(spec: RunSpec, trainer: Trainer) -> dict:
    """The fields of model.json (checkpoint.write_model_json adds format, weights hash and versions)."""
    return {"kind": spec.kind, **spec.model_info, "classes": list(spec.classes),
            "preprocess": spec.preprocess.to_dict(), "best": best_of(trainer.state),
            "trainable_params": trainer.trainable, "split": spec.split_how,
            **({"seen": spec.seen} if spec.seen else {})}


def seen_of(split) -> dict:
    """Content hashes of the training images and of the validation images that chose the best epoch
    (featx.data.seen): `featx predict` scores them apart (issue 24.2)."""
    from ..data.seen import record_files

    train = {str(r.relpath): r.path for r in split.train}  # a --shots subset repeats its images
    rec = record_files(list(train.values()), list(train), "trained")
    return record_files([r.path for r in split.val], [str(r.relpath) for r in split.val], "selected", rec)


def result_of(spec: RunSpec, trainer: Trainer) -> TrainResult:
    st = trainer.state
    best = best_of(st)
    return TrainResult(
        kind=spec.kind, run_dir=spec.run_dir, model_path=spec.run_dir / MODEL_JSON, best=best, rows=list(st["rows"]),
        metrics=trainer.final_metrics, skipped=[tuple(s) for s in st["skipped"]], seconds=trainer.elapsed,
        trainable_params=trainer.trainable, total_params=sum(p.numel() for p in trainer.model.parameters()),
        completed=bool(st["done"]), stopped_early=bool(st["stopped_early"]), n_train=spec.n_train,
        n_val=spec.n_val, config=spec.cfg.to_dict(), test_metrics=trainer.test_metrics, n_test=spec.n_test,
        precision=trainer.precision.name, notes=outcome_notes(st["rows"], best))


def training_subset(split, cfg, log):
    """``cfg.train_subset`` (featx compare --shots): train on those images only, repeated to ``cfg.fill_epoch``."""
    if cfg.train_subset is None:
        return split
    from ..data.split import restrict_train

    sub = restrict_train(split, cfg.train_subset, cfg.fill_epoch)
    n = len(set(map(str, cfg.train_subset)))
    log(f"training on {n} of the split's {len(split.train)} training images"
        + (f", each repeated {len(sub.train) // n}x per epoch" if len(sub.train) > n else ""))
    return sub


# -- the frame around a recipe ----------------------------------------------------------------------------------
def start_run(kind: str, cfg, dist: Dist, images: Path):
    """Claim the run folder on rank 0 (shared with the other ranks) and, for --resume, reload its settings.

    Returns (claim or None on other ranks, run folder, settings to use, (loop state, optimizer state) or None).
    A resumed run keeps the settings in its config.json; only the device and stop_after of the new call apply.
    """
    claim, msg, error = None, None, None
    if dist.is_main:
        try:
            refuse_inside(Path(cfg.runs_dir), images, what="--runs-dir")
            claim = claim_run_dir(cfg.runs_dir, kind, cfg.name, resume=cfg.resume, exist_ok=cfg.exist_ok)
            msg = ("ok", str(claim.path), claim.resuming)
        except FeatxError as exc:
            msg, error = ("error", str(exc), exc.exit_code), exc
    msg = dist.broadcast_object(msg)
    if error is not None:
        raise error
    if msg[0] == "error":  # the other ranks: the same message and exit code
        raise FeatxError(msg[1], exit_code=msg[2])
    run_dir, resuming = Path(msg[1]), bool(msg[2])
    if not resuming:
        return claim, run_dir, cfg, None
    try:
        return (claim, run_dir, *_reload(kind, cfg, run_dir))
    except BaseException:
        if claim is not None:
            release(claim, failed=True)
        raise


def _reload(kind: str, cfg, run_dir: Path):
    saved = read_json(run_dir / "config.json")
    if saved.get("kind") not in (None, kind):
        raise UsageError(f"--resume: {run_dir} is a {saved.get('kind')} run, not {kind}")
    new = type(cfg).from_dict(saved).replace(device=cfg.device, stop_after=cfg.stop_after, resume=True,
                                             runs_dir=cfg.runs_dir, name=run_dir.name)
    state = checkpoint.load_resume(run_dir / RESUME_FILE)
    _, meta = checkpoint.load_weights(run_dir / "last.safetensors")
    if str(meta.get("epoch")) != str(state[0].get("epoch")):
        raise UsageError(f"--resume: {run_dir}/last.safetensors (epoch {meta.get('epoch')}) and {RESUME_FILE} "
                         f"(epoch {state[0].get('epoch')}) disagree; the run was killed while saving. Start a new run.")
    return new, state


class _ResumeHint:
    """The end of the Ctrl-C / SIGTERM message, worded when the signal arrives: what was kept, how to go on."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def __str__(self) -> str:
        try:
            epoch = checkpoint.load_weights(self.run_dir / "last.safetensors")[1].get("epoch")
        except FeatxError:  # nothing saved yet (or unreadable): nothing to resume
            epoch = None
        if epoch is None:
            return "no epoch had finished, so there is nothing to resume"
        return (f"epoch {epoch} is saved in {safe_str(str(self.run_dir))}; continue with the same command plus "
                f"--resume --name {safe_str(self.run_dir.name)}")


def run_training(kind: str, cfg, images, log, on_epoch, body):
    """The frame shared by finetune and scratch: devices/DDP, the run folder and its lock, interrupts, cleanup.

    ``body(run_dir, resume_state, cfg, images, dist, device, log, on_epoch)`` builds the RunSpec and executes it.
    """
    from ..devices import setup_distributed

    dist, device = setup_distributed(cfg.device)
    log0 = (lambda m: log(m)) if (log and dist.is_main) else (lambda m: None)
    images = Path(images)
    try:
        if not images.is_dir():
            raise UsageError(f"{images} is not a folder of images")
        claim, run_dir, cfg, resume_state = start_run(kind, cfg, dist, images)
        failed = True
        with interruptible(_ResumeHint(run_dir)):  # Ctrl-C and SIGTERM: the same words, the same cleanup
            try:
                result = body(run_dir, resume_state, cfg, images, dist, device, log0, on_epoch)
                failed = False
                return result
            finally:
                if claim is not None:
                    release(claim, failed)
    finally:
        dist.cleanup()
