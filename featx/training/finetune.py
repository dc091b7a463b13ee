"""`featx.finetune`: the fine-tuning recipe for the Trainer: a pretrained backbone on a folder, in two phases.

Phase 1 trains a fresh linear head on the frozen backbone (BatchNorm statistics frozen too), so the random
head does not send large gradients into good features. Phase 2 unfreezes the top ``unfreeze`` layer groups
with layer-wise decaying learning rates: the head learns at ``lr``, the top group at ``lr * layer_decay``, the
next at ``lr * layer_decay**2``, ... This is fastai's `fine_tune` with discriminative learning rates (Howard &
Ruder 2018, ULMFiT). On a small folder (under ``config.SMALL_DATA`` training images) a pretrained backbone's phase 2
is scaled down to the data (:func:`phase2_for_data`). The best epoch of either phase is kept and restored, so
phase 2 can only replace the head phase's weights by better ones, and the result says when it did not.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Optional

from .. import devices
from ..errors import DataError
from ..data import augment as A
from ..data import batches as B
from ..data import loader as L
from ..data.split import Split, split_records
from .callbacks import print_epoch, print_message
from .config import SMALL_DATA, FinetuneConfig
from .optim import layer_decay_groups, param_groups
from .runs import RunSpec, execute, run_training, seen_of, training_subset
from .trainer import Phase, seed_everything


def finetune(backbone: str = "efficientnet_lite0", images: str | os.PathLike = ".", *,
             config: Optional[FinetuneConfig] = None, log: Optional[Callable[[str], None]] = None,
             on_epoch: Optional[Callable[[dict], None]] = None, verbose: bool = True, **settings):
    """Fine-tune ``backbone`` on the labelled folder ``images``; returns the run's :class:`TrainResult`.

    ``settings`` are :class:`FinetuneConfig` fields (epochs, batch_size, image_size, lr, unfreeze, augment,
    val_split, seed, device, precision, name, runs_dir, resume, ...). Progress (one line per epoch, as the CLI
    shows it) goes to stderr unless ``verbose=False``, or unless you take it: ``log`` receives the messages and
    warnings, ``on_epoch`` each epoch's metrics row. Runs unchanged under torchrun (DDP).
    """
    cfg = (config or FinetuneConfig()).replace(backbone=backbone, **settings)
    cfg.check()
    if verbose and log is None and on_epoch is None:  # a caller who passes either callback handles progress
        log, on_epoch = print_message, print_epoch
    return run_training("finetune", cfg, images, log, on_epoch, _finetune_in)


def _finetune_in(run_dir, resume_state, cfg, images, dist, device, log, on_epoch):
    from ..backbones import create_backbone
    from ..data.discover import discover
    from ..features.sizing import resolve_size

    cfg.check()
    folder = discover(images)
    split = training_subset(split_records(folder, cfg.val_split, cfg.seed), cfg, log)
    for w in [*getattr(folder, "warnings", []), *split.warnings]:
        log(f"warning: {w}")
    seed_everything(cfg.seed)  # the new head's initialisation is part of the run's reproducibility
    bb = create_backbone(cfg.backbone, pretrained=cfg.pretrained, weights=cfg.weights)
    size = resolve_size(cfg.image_size, [r.path for r in split.train], bb.preprocess)
    pp = bb.preprocess.with_size(size) if size != bb.preprocess.input_size else bb.preprocess
    bb.reset_classifier(len(split.classes))
    log(f"{bb.name}: {'pretrained' if cfg.pretrained else 'random init'}, input {pp.input_size} px, "
        f"{len(split.classes)} classes, {len(split.train)} train / {len(split.val)} val"
        + (f" / {len(split.test)} test" if split.test else "") + f" images, device {device}")
    b = _batches(cfg, pp, split, dist, device, log)
    phases = _phases(cfg, bb, b.n_train, log)
    info = {"backbone": bb.name, "pretrained": cfg.pretrained, "base_weights_sha256": getattr(bb, "weights_sha256", None),
            "image_size": pp.input_size}
    extra = {"kind": "finetune", "images": str(images.resolve()), "classes": split.classes, "split": split.source,
             "phases": [[p.name, p.epochs] for p in phases], "phase_lrs": [p.lr for p in phases],
             "backbone_meta": _safe_meta(bb),
             "world_size": dist.world_size}
    spec = RunSpec(kind="finetune", model=bb.model, preprocess=pp, classes=split.classes, train_batches=b.train,
                   val_batches=b.val, test_batches=b.test, phases=phases, cfg=cfg, run_dir=run_dir, model_info=info,
                   dist=dist, device=device, n_train=b.n_train, n_val=b.n_val, n_test=b.n_test, split_how=split.source,
                   skipped=b.skipped, warnings=split.warnings, config_extra=extra, resume_state=resume_state, log=log,
                   on_epoch=on_epoch, seen=seen_of(split), cpu_channels_last=True)
    return execute(spec)


def _safe_meta(bb) -> dict:
    try:
        return bb.meta()
    except Exception:  # provenance is informative here; a backbone without meta() must not stop training
        return {"backbone": bb.name}


@dataclass
class _Batches:
    train: object
    val: Optional[object]
    test: Optional[object]
    skipped: list
    n_train: int
    n_val: int
    n_test: int


def _eval_batches(records: list, cfg, pp, cidx: dict, dist, device, workers: int, skipped: list):
    """Validation/test images by the extraction/predict recipe: decoded once (kept on the device) when small."""
    if not records:
        return None, 0
    bs = (cfg.batch_size or 32) * 2
    if cfg.in_memory is not False and L.estimate_bytes(len(records), pp.input_size) < cfg.memory_budget_gb * 2**30:
        import torch

        arrays, kept, bad = L.decode_all(records, pp, mode="crop", workers=workers)
        skipped += bad
        x = L.stack_uint8(arrays).to(device)
        y = torch.tensor([cidx[records[i].label] for i in kept], dtype=torch.long, device=device)
        return B.TensorBatches(x, y, bs, train=False, dist=dist), len(kept)
    batches = B.LoaderBatches([r.path for r in records], [cidx[r.label] for r in records],
                              [r.relpath for r in records], pp, A.EvalCrop(pp), bs, train=False,
                              workers=workers, dist=dist, seed=cfg.seed, device=device)
    return batches, len(records)


def _batches(cfg: FinetuneConfig, pp, split: Split, dist, device, log) -> _Batches:
    """Validation and test: decoded once by the eval recipe. Training: a DataLoader over images decoded once and
    downscaled to the recipe's resize side when they fit in RAM, else streamed."""
    workers = devices.default_workers(cfg.workers)
    cidx = {c: i for i, c in enumerate(split.classes)}
    skipped: list = []
    val_b, n_val = _eval_batches(split.val, cfg, pp, cidx, dist, device, workers, skipped)
    test_b, n_test = _eval_batches(split.test, cfg, pp, cidx, dist, device, workers, skipped)
    shorter = max(pp.resize, pp.input_size)
    recs = split.train
    if cfg.in_memory is not False and L.estimate_bytes(len(recs), shorter, aspect=1.4) < cfg.memory_budget_gb * 2**30:
        arrays, kept, bad = L.decode_all(recs, pp, mode="shorter", shorter=shorter, workers=workers)
        skipped += bad
        sources = arrays
        recs = [recs[i] for i in kept]
        log(f"decoded {len(recs)} training images once into memory ({sum(a.nbytes for a in arrays) / 2**20:.0f} MiB)")
    else:
        sources = [r.path for r in recs]
    if not recs:
        raise DataError("none of the training images could be decoded")
    for p, reason in skipped:
        log(f"warning: skipped {p}: {reason}")
    train_b = B.LoaderBatches(sources, [cidx[r.label] for r in recs], [r.relpath for r in recs], pp,
                              A.train_transform(pp, cfg.augment), cfg.batch_size or 32, train=True, workers=workers,
                              dist=dist, seed=cfg.seed, device=device)
    return _Batches(train_b, val_b, test_b, skipped, len(recs), n_val, n_test)


def phase2_for_data(cfg: FinetuneConfig, n_groups: int, n_train: int) -> tuple[float, int, float]:
    """Phase 2's (peak lr, unfrozen layer groups, scale) for ``n_train`` training images.

    A few dozen images give a handful of optimizer steps whose noise, at the full rate on every layer, wipes out
    what the head phase found (measured on examples/ants_bees: val accuracy 0.94 -> 0.56). Below
    ``config.SMALL_DATA`` images a pretrained backbone therefore gets ``f = sqrt(n_train / SMALL_DATA)`` of the
    rate and ``floor(groups * f)`` (at least 1) of the groups; a random-init backbone has nothing to protect.
    """
    lr = cfg.lr or 1e-3
    n = n_groups if cfg.unfreeze == "all" else min(int(cfg.unfreeze), n_groups)
    if not cfg.scale_to_data or not (cfg.pretrained or cfg.weights) or n_train >= SMALL_DATA:
        return lr, n, 1.0
    f = math.sqrt(n_train / SMALL_DATA)
    return lr * f, max(1, min(n, math.floor(n_groups * f))), f


def _phases(cfg: FinetuneConfig, bb, n_train: int, log) -> list:
    head_epochs = min(cfg.head_epochs, max(1, cfg.epochs // 3)) if cfg.head_epochs else 0
    head = Phase("head", cfg.epochs, cfg.head_lr, lambda m: _setup_head(m, bb, cfg), early_stop=True)
    if cfg.unfreeze == 0 or head_epochs >= cfg.epochs:
        return [head]  # only the head ever trains: one phase that may stop early
    phases = []
    if head_epochs:
        head.epochs, head.early_stop = head_epochs, False
        phases.append(head)
    n_groups = len(bb.layer_groups())
    lr, unfreeze, f = phase2_for_data(cfg, n_groups, n_train)
    if f < 1.0:
        log(f"small folder ({n_train} training images < {SMALL_DATA}): fine-tuning unfreezes the top {unfreeze} "
            f"of {n_groups} layer groups at lr {lr:.3g} (x{f:.2f}); --no-scale-to-data keeps --lr and --unfreeze")
    bn_stats = cfg.train_bn_stats if cfg.train_bn_stats is not None else not (cfg.pretrained or cfg.weights)
    phases.append(Phase("finetune", cfg.epochs - head_epochs, lr, lambda m: _setup_unfrozen(m, bb, cfg, unfreeze),
                        early_stop=True, bn_stats=bn_stats))
    return phases


def _freeze_all_but_head(model, bb):
    for p in model.parameters():
        p.requires_grad_(False)
    head = bb.classifier()
    for p in head.parameters():
        p.requires_grad_(True)
    return head


def _setup_head(model, bb, cfg: FinetuneConfig) -> list:
    return param_groups([_freeze_all_but_head(model, bb)], cfg.weight_decay)


def _setup_unfrozen(model, bb, cfg: FinetuneConfig, unfreeze: int) -> list:
    head = _freeze_all_but_head(model, bb)
    return layer_decay_groups(head, bb.layer_groups(), unfreeze, cfg.layer_decay, cfg.weight_decay)
