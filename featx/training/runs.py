"""Run folders: `runs/<kind>/<name>` with auto-incremented names (exp, exp2, ...), as in Ultralytics.

A folder given by `--name` is never silently reused: it must be resumed (`--resume`) or explicitly
overwritten (`--exist-ok`), so an earlier run's weights and metrics are not mixed with a new run's.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from ..errors import UsageError

RESUME_FILE = "resume.safetensors"  # optimizer state + loop counters of the last finished epoch


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


def resolve_run_dir(runs_dir: str | os.PathLike, kind: str, name: Optional[str] = None, *,
                    resume: bool = False, exist_ok: bool = False, create: bool = True) -> tuple[Path, bool]:
    """Pick (and create) the folder of a run. Returns (path, resuming).

    ``resume`` with ``name`` continues that run; ``resume`` without a name continues the latest resumable run
    of this kind. ``name`` naming an existing folder is refused unless ``resume`` or ``exist_ok``.
    """
    base = Path(runs_dir) / kind
    if resume:
        path = base / name if name else latest_run_dir(base)
        if path is None:
            raise UsageError(f"--resume: no resumable run under {base}; start a new run without --resume")
        if not (path / RESUME_FILE).is_file():
            raise UsageError(f"--resume: {path} has no {RESUME_FILE} (not a featx run, or it ended before its first epoch)")
        return path, True
    if name:
        path = base / name
        if path.exists() and any(path.iterdir()) and not exist_ok:
            raise UsageError(f"run folder {path} already exists; pass --resume to continue it, --exist-ok to "
                             "overwrite it, or another --name")
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


def start_run(kind: str, cfg, dist, images) -> tuple[Path, object, Optional[tuple]]:
    """Pick the run folder on rank 0 (shared with the other ranks) and, for --resume, reload its settings.

    Returns (run folder, settings to use, (loop state, optimizer state) or None). A resumed run keeps the
    settings in its config.json; only the device and stop_after of the new call apply.
    """
    from .._io import read_json, refuse_inside
    from ..errors import FeatxError
    from . import checkpoint

    msg = None
    if dist.is_main:
        try:
            refuse_inside(Path(cfg.runs_dir), images, what="--runs-dir")
            msg = ("ok", *map(str, resolve_run_dir(cfg.runs_dir, kind, cfg.name, resume=cfg.resume, exist_ok=cfg.exist_ok)))
        except FeatxError as exc:
            msg = ("error", str(exc), exc.exit_code)
    msg = dist.broadcast_object(msg)
    if msg[0] == "error":
        raise FeatxError(msg[1], exit_code=msg[2])
    run_dir, resuming = Path(msg[1]), msg[2] == "True"
    if not resuming:
        return run_dir, cfg, None
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
    return run_dir, new, state


def remove_if_empty(run_dir: Path) -> None:
    """A run that failed before writing anything (bad weights, no images) leaves no empty `expN` folder behind."""
    try:
        run_dir.rmdir()  # only succeeds on an empty folder
    except OSError:
        pass


def run_training(kind: str, cfg, images, log, on_epoch, body):
    """The frame shared by finetune and scratch: devices/DDP, the run folder, cleanup of a run that never started.

    `body(run_dir, resume_state, cfg, images, dist, device, log, on_epoch)` does the training proper.
    """
    from .distributed import setup

    dist, device = setup(cfg.device)
    log0 = (lambda m: log(m)) if (log and dist.is_main) else (lambda m: None)
    images = Path(images)
    try:
        if not images.is_dir():
            raise UsageError(f"{images} is not a folder of images")
        run_dir, cfg, resume_state = start_run(kind, cfg, dist, images)
        try:
            return body(run_dir, resume_state, cfg, images, dist, device, log0, on_epoch)
        except BaseException:
            if dist.is_main and resume_state is None:
                remove_if_empty(run_dir)
            raise
    finally:
        dist.cleanup()
