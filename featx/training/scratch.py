"""`featx.train_scratch`: the from-scratch recipe for the Trainer: a small CNN from random init, the baseline that
shows what pretraining buys.

When the decoded images fit in memory (the usual case at 32-64 px), every image is decoded and resized
once into a uint8 tensor on the device; each epoch then shuffles, crops and flips on the device with no
decoding at all (the airbench recipe). Larger data streams through a DataLoader instead.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from .. import devices
from ..data.preprocess import Preprocess
from ..errors import DataError
from ..data import augment as A
from ..data import batches as B
from ..data import loader as L
from ..data.split import Split, split_records
from . import zoo
from .callbacks import print_epoch, print_message
from .config import ScratchConfig
from .optim import param_groups
from .runs import RunSpec, execute, run_training, seen_of, training_subset
from .trainer import Phase, seed_everything


def train_scratch(images: str | os.PathLike, *, arch: str = "lenet5", config: Optional[ScratchConfig] = None,
                  log: Optional[Callable[[str], None]] = None, on_epoch: Optional[Callable[[dict], None]] = None,
                  verbose: bool = True, **settings):
    """Train ``arch`` (see :func:`featx.training.zoo.list_archs`) from scratch on the labelled folder ``images``.

    ``settings`` are :class:`ScratchConfig` fields (epochs, batch_size, image_size, lr, augment, val_split, seed,
    device, precision, name, runs_dir, resume, ...). Progress goes to stderr unless ``verbose=False`` or a ``log`` /
    ``on_epoch`` callback is given (then progress goes to the callbacks only). Runs unchanged under torchrun (DDP).
    """
    cfg = (config or ScratchConfig()).replace(arch=arch, **settings)
    zoo.get_arch(cfg.arch)  # unknown names fail before any work, with suggestions
    cfg.check()
    if verbose and log is None and on_epoch is None:  # a caller who passes either callback handles progress
        log, on_epoch = print_message, print_epoch
    return run_training("scratch", cfg, images, log, on_epoch, _train_scratch_in)


def auto_batch_size(n_train: int) -> int:
    """About 16 steps per epoch, a power of two in [32, 512]: large batches, but enough steps on small data."""
    b = 32
    while b * 2 <= min(512, max(32, n_train // 16)):
        b *= 2
    return b


@dataclass
class _Batches:
    train: object
    val: Optional[object]
    test: Optional[object]
    preprocess: Preprocess
    batch_size: int
    skipped: list
    n_train: int
    n_val: int
    n_test: int
    in_memory: bool


def _train_scratch_in(run_dir, resume_state, cfg, images, dist, device, log, on_epoch):
    from ..data.discover import discover
    from ..features.sizing import resolve_size

    cfg.check()
    folder = discover(images)
    split = training_subset(split_records(folder, cfg.val_split, cfg.seed), cfg, log)
    own = zoo.get_arch(cfg.arch).image_size  # auto: the architecture's own unless the images are smaller
    size = resolve_size(cfg.image_size, [r.path for r in split.train], Preprocess(input_size=own, resize=own))
    for w in [*getattr(folder, "warnings", []), *split.warnings]:
        log(f"warning: {w}")
    saved = _saved_preprocess(run_dir) if resume_state is not None else None
    fits = L.estimate_bytes(len(split.train) + len(split.val) + len(split.test), size) < cfg.memory_budget_gb * 2**30
    in_memory = cfg.in_memory if cfg.in_memory is not None else fits
    make = _in_memory_batches if in_memory else _streamed_batches
    b = make(cfg, split, size, saved, dist, device, log)
    for p, reason in b.skipped:
        log(f"warning: skipped {p}: {reason}")

    seed_everything(cfg.seed)
    model = zoo.build(cfg.arch, len(split.classes), size)
    lr = cfg.lr or 3e-3
    phases = [Phase("train", cfg.epochs, lr, lambda m: _setup_all(m, cfg.weight_decay), early_stop=True)]
    log(f"{cfg.arch}: {zoo.count_params(model):,} parameters, {size} px, batch {b.batch_size}, "
        f"{len(split.classes)} classes, {b.n_train} train / {b.n_val} val"
        + (f" / {b.n_test} test" if b.n_test else "") + f" images, device {device}")
    extra = {"kind": "scratch", "images": str(images.resolve()), "classes": split.classes, "split": split.source,
             "resolved_batch_size": b.batch_size, "resolved_image_size": size, "in_memory": bool(in_memory),
             "world_size": dist.world_size}
    spec = RunSpec(kind="scratch", model=model, preprocess=b.preprocess, classes=split.classes, train_batches=b.train,
                   val_batches=b.val, test_batches=b.test, phases=phases, cfg=cfg, run_dir=run_dir,
                   model_info={"arch": cfg.arch, "image_size": size}, dist=dist, device=device, n_train=b.n_train,
                   n_val=b.n_val, n_test=b.n_test, split_how=split.source, skipped=b.skipped, warnings=split.warnings,
                   config_extra=extra, resume_state=resume_state, log=log, on_epoch=on_epoch, seen=seen_of(split),
                   cpu_channels_last=zoo.get_arch(cfg.arch).cpu_channels_last)
    return execute(spec)


def _recipe(size: int, mean=None, std=None) -> Preprocess:
    # resize the shorter side straight to the network size and centre-crop: no crop margin at 32 px
    if mean is None:
        return Preprocess(input_size=size, resize=size, interpolation="bicubic")
    return Preprocess(input_size=size, resize=size, interpolation="bicubic", mean=mean, std=std)


def _in_memory_batches(cfg: ScratchConfig, split: Split, size: int, saved: Optional[Preprocess], dist, device,
                       log) -> _Batches:
    """Decode every image once into one uint8 tensor on the device; the net's own channel statistics."""
    recs = split.train + split.val + split.test
    arrays, kept, bad = L.decode_all(recs, _recipe(size), mode="crop", workers=devices.default_workers(cfg.workers))
    cidx = {c: i for i, c in enumerate(split.classes)}
    part = torch.tensor([0 if i < len(split.train) else 1 if i < len(split.train) + len(split.val) else 2
                         for i in kept], dtype=torch.long)
    x = L.stack_uint8(arrays)
    y = torch.tensor([cidx[recs[i].label] for i in kept], dtype=torch.long)
    xtr, ytr = x[part == 0], y[part == 0]
    if len(ytr) == 0:
        raise DataError("none of the training images could be decoded")
    # the net's own normalisation, recorded in model.json for predict; a resumed run keeps the one it started with
    mean, std = (saved.mean, saved.std) if saved else B.channel_stats(xtr)
    bs = cfg.batch_size or auto_batch_size(len(ytr))
    log(f"decoded {len(kept)} images once into a {tuple(x.shape)} uint8 tensor ({x.numel() / 2**20:.1f} MiB) "
        f"on {device}")

    def held_out(k: int):
        sel = part == k
        if not sel.any():
            return None, 0
        return B.TensorBatches(x[sel].to(device), y[sel].to(device), bs * 2, train=False, dist=dist), int(sel.sum())

    train = B.TensorBatches(xtr.to(device), ytr.to(device), bs, train=True, augment=cfg.augment, dist=dist,
                            seed=cfg.seed)
    (val, n_val), (test, n_test) = held_out(1), held_out(2)
    return _Batches(train, val, test, _recipe(size, mean, std), bs, list(bad), len(ytr), n_val, n_test, True)


def _streamed_batches(cfg: ScratchConfig, split: Split, size: int, saved: Optional[Preprocess], dist, device,
                      log) -> _Batches:
    """Decode every epoch in DataLoader workers; ImageNet statistics (close enough for photos, no extra pass)."""
    pp = saved or _recipe(size)
    bs = cfg.batch_size or auto_batch_size(len(split.train))
    workers = devices.default_workers(cfg.workers)
    cidx = {c: i for i, c in enumerate(split.classes)}
    log(f"streaming {len(split.train) + len(split.val) + len(split.test)} images (decoded size above the "
        f"{cfg.memory_budget_gb} GB budget)")

    def loader(recs: list, batch: int, train: bool):
        if not recs:
            return None
        return B.LoaderBatches([r.path for r in recs], [cidx[r.label] for r in recs], [r.relpath for r in recs], pp,
                               A.EvalCrop(pp), batch, train=train, workers=workers, dist=dist, seed=cfg.seed,
                               device=device)

    train = B.AugmentedBatches(loader(split.train, bs, True), cfg.augment, cfg.seed)
    return _Batches(train, loader(split.val, bs * 2, False), loader(split.test, bs * 2, False), pp, bs, [],
                    len(split.train), len(split.val), len(split.test), False)


def _setup_all(model, weight_decay: float) -> list:
    for p in model.parameters():
        p.requires_grad_(True)
    return param_groups([model], weight_decay)


def _saved_preprocess(run_dir: Path) -> Optional[Preprocess]:
    from .._io import read_json

    mj = run_dir / "model.json"
    return Preprocess.from_dict(read_json(mj)["preprocess"]) if mj.is_file() else None
