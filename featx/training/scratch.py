"""`featx.train_scratch`: train a small CNN from random init: the baseline that shows what pretraining buys.

When the decoded images fit in memory (the usual case at 32-64 px), every image is decoded and resized
once into a uint8 tensor on the device; each epoch then shuffles, crops and flips on the device with no
decoding at all (the airbench recipe). Larger data streams through a DataLoader instead.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import torch

from ..data.preprocess import Preprocess
from ..errors import DataError
from . import data as D
from . import zoo
from .config import ScratchConfig
from .loop import Phase, RunSpec, TrainResult, seed_everything, split_decay, train, write_config
from .runs import run_training


def train_scratch(images: str | os.PathLike, *, arch: str = "lenet5", config: Optional[ScratchConfig] = None,
                  log: Optional[Callable[[str], None]] = None, on_epoch: Optional[Callable[[dict], None]] = None,
                  **settings) -> TrainResult:
    """Train ``arch`` (see :func:`featx.training.zoo.list_archs`) from scratch on the labelled folder ``images``.

    ``settings`` are :class:`ScratchConfig` fields (epochs, batch_size, image_size, lr, augment, val_split, seed,
    device, name, runs_dir, resume, ...). Runs unchanged under torchrun (DDP).
    """
    cfg = (config or ScratchConfig()).replace(arch=arch, **settings)
    zoo.get_arch(cfg.arch)  # unknown names fail before any work, with suggestions
    cfg.check()
    return run_training("scratch", cfg, images, log, on_epoch, _train_scratch_in)

def auto_batch_size(n_train: int) -> int:
    """About 16 steps per epoch, a power of two in [32, 512]: large batches, but enough steps on small data."""
    b = 32
    while b * 2 <= min(512, max(32, n_train // 16)):
        b *= 2
    return b


def _train_scratch_in(run_dir, resume_state, cfg, images, dist, device, log, on_epoch) -> TrainResult:
    from ..data.discover import discover

    cfg.check()
    arch = zoo.get_arch(cfg.arch)
    size = cfg.image_size or arch.image_size
    folder = discover(images)
    split = D.make_split(folder, cfg.val_split, cfg.seed)
    for w in [*getattr(folder, "warnings", []), *split.warnings]:
        log(f"warning: {w}")
    cidx = {c: i for i, c in enumerate(split.classes)}
    workers = D.default_workers(cfg.workers)
    # resize the shorter side straight to the network size and centre-crop: no crop margin at 32 px
    pp = Preprocess(input_size=size, resize=size, interpolation="bicubic")
    n_all = len(split.train) + len(split.val)
    fits = D.estimate_bytes(n_all, size) < cfg.memory_budget_gb * 2**30
    in_memory = cfg.in_memory if cfg.in_memory is not None else fits
    skipped: list = []

    if in_memory:
        arrays, kept, bad = D.decode_all(split.train + split.val, pp, mode="crop", workers=workers)
        skipped += bad
        recs = [(split.train + split.val)[i] for i in kept]
        is_train = torch.tensor([i < len(split.train) for i in kept], dtype=torch.bool)
        x = D.stack_uint8(arrays)
        y = torch.tensor([cidx[r.label] for r in recs], dtype=torch.long)
        xtr, ytr, xva, yva = x[is_train], y[is_train], x[~is_train], y[~is_train]
        if len(ytr) == 0:
            raise DataError("none of the training images could be decoded")
        mean, std = D.channel_stats(xtr)  # the net's own normalisation, recorded in model.json for predict
        if resume_state is not None:  # keep the statistics the run started with
            saved = _saved_preprocess(run_dir)
            mean, std = saved.mean if saved else mean, saved.std if saved else std
        pp = Preprocess(input_size=size, resize=size, interpolation="bicubic", mean=mean, std=std)
        n_train, n_val = len(ytr), len(yva)
        bs = cfg.batch_size or auto_batch_size(n_train)
        log(f"decoded {n_train + n_val} images once into a {tuple(x.shape)} uint8 tensor "
            f"({x.numel() / 2**20:.1f} MiB) on {device}")
        train_b = D.TensorBatches(xtr.to(device), ytr.to(device), bs, train=True, augment=cfg.augment,
                                  dist=dist, seed=cfg.seed)
        val_b = D.TensorBatches(xva.to(device), yva.to(device), bs * 2, train=False, dist=dist) if n_val else None
    else:
        n_train, n_val = len(split.train), len(split.val)
        bs = cfg.batch_size or auto_batch_size(n_train)
        saved = _saved_preprocess(run_dir) if resume_state is not None else None
        pp = saved or pp  # ImageNet statistics: close enough for natural photos, no extra pass over the data
        log(f"streaming {n_train + n_val} images (decoded size above the {cfg.memory_budget_gb} GB budget)")
        inner = D.LoaderBatches([r.path for r in split.train], [cidx[r.label] for r in split.train],
                                [r.relpath for r in split.train], pp, D.EvalCrop(pp), bs, train=True,
                                workers=workers, dist=dist, seed=cfg.seed, device=device)
        train_b = D.AugmentedBatches(inner, cfg.augment, cfg.seed)
        val_b = D.LoaderBatches([r.path for r in split.val], [cidx[r.label] for r in split.val],
                                [r.relpath for r in split.val], pp, D.EvalCrop(pp), bs * 2, train=False,
                                workers=workers, dist=dist, seed=cfg.seed, device=device) if split.val else None
    for p, reason in skipped:
        log(f"warning: skipped {p}: {reason}")

    seed_everything(cfg.seed)
    model = zoo.build(cfg.arch, len(split.classes), size)
    lr = cfg.lr or 3e-3
    phases = [Phase("train", cfg.epochs, lambda m: _setup_all(m, lr, cfg.weight_decay), early_stop=True)]
    log(f"{cfg.arch}: {zoo.count_params(model):,} parameters, {size} px, batch {bs}, "
        f"{len(split.classes)} classes, {n_train} train / {n_val} val images, device {device}")
    if dist.is_main and resume_state is None:
        write_config(run_dir, cfg, {"kind": "scratch", "images": str(images.resolve()), "classes": split.classes,
                                    "split": split.source, "resolved_batch_size": bs, "resolved_image_size": size,
                                    "in_memory": bool(in_memory), "world_size": dist.world_size})
    spec = RunSpec(kind="scratch", model=model, preprocess=pp, classes=split.classes, train_batches=train_b,
                   val_batches=val_b, phases=phases, cfg=cfg, run_dir=run_dir,
                   model_info={"arch": cfg.arch, "image_size": size}, dist=dist, device=device,
                   n_train=n_train, n_val=n_val, split_source=split.source, skipped=skipped,
                   warnings=split.warnings, resume_state=resume_state, log=log, on_epoch=on_epoch)
    return train(spec)


def _setup_all(model, lr: float, wd: float) -> list:
    for p in model.parameters():
        p.requires_grad_(True)
    return split_decay(model.named_parameters(), lr, wd)


def _saved_preprocess(run_dir: Path) -> Optional[Preprocess]:
    from .._io import read_json

    mj = run_dir / "model.json"
    return Preprocess.from_dict(read_json(mj)["preprocess"]) if mj.is_file() else None
