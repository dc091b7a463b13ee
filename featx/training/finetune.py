"""`featx.finetune`: fine-tune a pretrained backbone on a folder of images with a two-phase recipe.

Phase 1 trains a fresh linear head on the frozen backbone (BatchNorm statistics frozen too), so the random
head does not send large gradients into good features. Phase 2 unfreezes the top ``unfreeze`` layer groups
(default all) with layer-wise decaying learning rates: the head learns at ``lr``, the top group at
``lr * layer_decay``, the next at ``lr * layer_decay**2``, ... This is fastai's `fine_tune` with discriminative
learning rates (Howard & Ruder 2018, ULMFiT), which works on a few hundred images without tuning.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

from . import data as D
from .config import FinetuneConfig
from .distributed import Dist
from .loop import Phase, RunSpec, TrainResult, seed_everything, split_decay, train, write_config
from .runs import run_training


def finetune(backbone: str = "efficientnet_lite0", images: str | os.PathLike = ".", *,
             config: Optional[FinetuneConfig] = None, log: Optional[Callable[[str], None]] = None,
             on_epoch: Optional[Callable[[dict], None]] = None, **settings) -> TrainResult:
    """Fine-tune ``backbone`` on the labelled folder ``images``; returns the run's :class:`TrainResult`.

    ``settings`` are :class:`FinetuneConfig` fields (epochs, batch_size, image_size, lr, unfreeze, augment,
    val_split, seed, device, name, runs_dir, resume, ...). ``log`` receives progress messages and warnings;
    ``on_epoch`` each epoch's metrics row. Runs unchanged under torchrun (DDP).
    """
    cfg = (config or FinetuneConfig()).replace(backbone=backbone, **settings)
    cfg.check()
    return run_training("finetune", cfg, images, log, on_epoch, _finetune_in)


def _finetune_in(run_dir, resume_state, cfg, images, dist, device, log, on_epoch) -> TrainResult:
    from ..backbones import create_backbone
    from ..data.discover import discover

    cfg.check()
    folder = discover(images)
    split = D.make_split(folder, cfg.val_split, cfg.seed)
    for w in [*getattr(folder, "warnings", []), *split.warnings]:
        log(f"warning: {w}")

    seed_everything(cfg.seed)  # the new head's initialisation is part of the run's reproducibility
    bb = create_backbone(cfg.backbone, pretrained=cfg.pretrained, weights=cfg.weights)
    pp = bb.preprocess.with_size(cfg.image_size) if cfg.image_size else bb.preprocess
    bb.reset_classifier(len(split.classes))
    model = bb.model
    log(f"{bb.name}: {'pretrained' if cfg.pretrained else 'random init'}, input {pp.input_size} px, "
        f"{len(split.classes)} classes, {len(split.train)} train / {len(split.val)} val images, device {device}")

    train_b, val_b, skipped, n_train, n_val = _batches(cfg, pp, split, dist, device, log)
    phases = _phases(cfg, bb)
    info = {"backbone": bb.name, "pretrained": cfg.pretrained, "base_weights_sha256": getattr(bb, "weights_sha256", None),
            "image_size": pp.input_size}
    if dist.is_main and resume_state is None:
        write_config(run_dir, cfg, {"kind": "finetune", "images": str(images.resolve()), "classes": split.classes,
                                    "split": split.source, "phases": [[p.name, p.epochs] for p in phases],
                                    "backbone_meta": _safe_meta(bb), "world_size": dist.world_size})
    spec = RunSpec(kind="finetune", model=model, preprocess=pp, classes=split.classes, train_batches=train_b,
                   val_batches=val_b, phases=phases, cfg=cfg, run_dir=run_dir, model_info=info, dist=dist,
                   device=device, n_train=n_train, n_val=n_val, split_source=split.source, skipped=skipped,
                   warnings=split.warnings, resume_state=resume_state, log=log, on_epoch=on_epoch)
    return train(spec)


def _safe_meta(bb) -> dict:
    try:
        return bb.meta()
    except Exception:  # provenance is informative here; a backbone without meta() must not stop training
        return {"backbone": bb.name}


def _batches(cfg: FinetuneConfig, pp, split: D.Split, dist: Dist, device, log):
    """Validation: decoded once by the eval recipe (kept on the device when small). Training: a DataLoader
    over images decoded once and downscaled to the recipe's resize side when they fit in RAM, else streamed."""
    workers = D.default_workers(cfg.workers)
    budget = cfg.memory_budget_gb * 2**30
    cidx = {c: i for i, c in enumerate(split.classes)}
    skipped: list = []
    bs = cfg.batch_size or 32

    val_b, n_val = None, 0
    if split.val:
        if cfg.in_memory is not False and D.estimate_bytes(len(split.val), pp.input_size) < budget:
            arrays, kept, bad = D.decode_all(split.val, pp, mode="crop", workers=workers)
            skipped += bad
            import torch

            x = D.stack_uint8(arrays).to(device)
            y = torch.tensor([cidx[split.val[i].label] for i in kept], dtype=torch.long, device=device)
            val_b, n_val = D.TensorBatches(x, y, bs * 2, train=False, dist=dist), len(kept)
        else:
            val_b = D.LoaderBatches([r.path for r in split.val], [cidx[r.label] for r in split.val],
                                    [r.relpath for r in split.val], pp, D.EvalCrop(pp), bs * 2, train=False,
                                    workers=workers, dist=dist, seed=cfg.seed, device=device)
            n_val = len(split.val)

    shorter = max(pp.resize, pp.input_size)
    recs = split.train
    if cfg.in_memory is not False and D.estimate_bytes(len(recs), shorter, aspect=1.4) < budget:
        arrays, kept, bad = D.decode_all(recs, pp, mode="shorter", shorter=shorter, workers=workers)
        skipped += bad
        sources = arrays
        recs = [recs[i] for i in kept]
        log(f"decoded {len(recs)} training images once into memory ({sum(a.nbytes for a in arrays) / 2**20:.0f} MiB)")
    else:
        sources = [r.path for r in recs]
    if not recs:
        from ..errors import DataError

        raise DataError("none of the training images could be decoded")
    for p, reason in skipped:
        log(f"warning: skipped {p}: {reason}")
    train_b = D.LoaderBatches(sources, [cidx[r.label] for r in recs], [r.relpath for r in recs], pp,
                              D.train_transform(pp, cfg.augment), bs, train=True, workers=workers, dist=dist,
                              seed=cfg.seed, device=device)
    return train_b, val_b, skipped, len(recs), n_val


def _phases(cfg: FinetuneConfig, bb) -> list:
    head_epochs = min(cfg.head_epochs, max(1, cfg.epochs // 3)) if cfg.head_epochs else 0
    if cfg.unfreeze == 0 or head_epochs >= cfg.epochs:
        # only the head ever trains: one phase that may stop early
        return [Phase("head", cfg.epochs, lambda m: _setup_head(m, bb, cfg), early_stop=True)]
    phases = []
    if head_epochs:
        phases.append(Phase("head", head_epochs, lambda m: _setup_head(m, bb, cfg), early_stop=False))
    bn_stats = cfg.train_bn_stats if cfg.train_bn_stats is not None else not (cfg.pretrained or cfg.weights)
    phases.append(Phase("finetune", cfg.epochs - head_epochs, lambda m: _setup_unfrozen(m, bb, cfg), early_stop=True,
                        bn_stats=bn_stats))
    return phases


def _setup_head(model, bb, cfg: FinetuneConfig) -> list:
    for p in model.parameters():
        p.requires_grad_(False)
    head = bb.classifier()
    for p in head.parameters():
        p.requires_grad_(True)
    return split_decay(head.named_parameters(), cfg.head_lr, cfg.weight_decay)


def _setup_unfrozen(model, bb, cfg: FinetuneConfig) -> list:
    groups = bb.layer_groups()  # bottom to top, classifier excluded
    n = len(groups) if cfg.unfreeze == "all" else min(int(cfg.unfreeze), len(groups))
    for p in model.parameters():
        p.requires_grad_(False)
    head = bb.classifier()
    for p in head.parameters():
        p.requires_grad_(True)
    lr = cfg.lr or 1e-3
    out = split_decay(head.named_parameters(), lr, cfg.weight_decay)
    seen = {id(p) for p in head.parameters()}
    top = groups[len(groups) - n:] if n else []
    for depth, group in enumerate(reversed(top), start=1):
        params = []
        for mod in group:
            for name, p in (mod.named_parameters() if hasattr(mod, "named_parameters") else [("", mod)]):
                if id(p) not in seen:
                    seen.add(id(p))
                    p.requires_grad_(True)
                    params.append((name, p))
        out += split_decay(params, lr * cfg.layer_decay ** depth, cfg.weight_decay)
    return out
