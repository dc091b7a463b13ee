"""Batch sources for the training loop: uint8 NCHW batches on the device, seeded, sharded across torchrun ranks.

* :class:`TensorBatches` -- the whole split decoded once into a uint8 tensor that lives on the device,
  shuffled and augmented there (random crop with padding, flip). For small images this removes the
  per-epoch decode cost entirely (the airbench lesson: at 32 px the GPU is idle waiting for JPEG decoders).
* :class:`LoaderBatches` -- a DataLoader (`featx.data.loader.make_loader`) over decoded images (cached in RAM
  when they fit, else decoded each epoch) with PIL/torchvision augmentation in worker processes.
* :class:`AugmentedBatches` -- LoaderBatches of fixed-size images augmented on the device like TensorBatches.

Sampling: training order is torch's ``DistributedSampler`` (seeded by seed + epoch, equal-length shards, the
ragged tail dropped so every rank runs the same number of steps). Validation shards are strided and *not*
padded: DistributedSampler pads a shard by repeating images, which would score some images twice.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..devices import Dist
from .augment import device_augment
from .preprocess import Preprocess


def train_sampler(n: int, dist: Dist, seed: int):
    """torch's DistributedSampler over ``n`` items for this rank (works without a process group)."""
    from torch.utils.data import DistributedSampler

    return DistributedSampler(range(n), num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=seed,
                              drop_last=True)


def val_indices(n: int, dist: Dist) -> list:
    """Every item exactly once over all ranks: rank r scores r, r + world, r + 2 world, ..."""
    return list(range(dist.rank, n, dist.world_size))


class EpochSampler(torch.utils.data.Sampler):
    """Yields (index, epoch) so datasets can seed augmentation per item: DistributedSampler order when
    training, the strided unpadded order (:func:`val_indices`) when validating."""

    def __init__(self, n: int, train: bool, d: Dist, seed: int):
        self.n, self.train, self.d, self.epoch = n, train, d, 0
        self.inner = train_sampler(n, d, seed) if train else None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.inner is not None:
            self.inner.set_epoch(epoch)

    def _indices(self) -> list:
        return list(self.inner) if self.inner is not None else val_indices(self.n, self.d)

    def __iter__(self):
        return iter([(i, self.epoch) for i in self._indices()])

    def __len__(self) -> int:
        return len(self.inner) if self.inner is not None else len(range(self.d.rank, self.n, self.d.world_size))


def _n_batches(n: int, bs: int, train: bool) -> int:
    if train and n >= bs:
        return n // bs  # drop the ragged last batch: a batch of 1 breaks BatchNorm statistics
    return math.ceil(n / bs)


def _augment_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100003 + epoch + 7919)


class TensorBatches:
    """A uint8 tensor already on the device: seeded shuffle, sharded across ranks, augmented on the device."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, train: bool, augment: str = "none",
                 dist: Optional[Dist] = None, seed: int = 0):
        self.x, self.y, self.bs, self.train, self.augment = x, y, batch_size, train, augment
        self.dist = dist or Dist()
        self.seed = seed
        self.skipped: list = []  # decoding failures happened before; nothing fails here
        self.sampler = EpochSampler(len(y), train, self.dist, seed)

    def __len__(self) -> int:
        return _n_batches(len(self.sampler), self.bs, self.train)

    def epoch(self, epoch: int):
        """Yields (uint8 NCHW on device, labels on device, dataset indices)."""
        self.sampler.set_epoch(epoch)
        idx = torch.tensor(self.sampler._indices(), dtype=torch.long)
        g = _augment_generator(self.seed, epoch)
        for b in range(_n_batches(len(idx), self.bs, self.train)):
            sel = idx[b * self.bs:(b + 1) * self.bs]
            dsel = sel.to(self.x.device)
            xb = self.x[dsel]
            if self.train:
                xb = device_augment(xb, self.augment, g)
            yield xb, self.y[dsel], sel


class LoaderBatches:
    """DataLoader with seeded, rank-sharded sampling and persistent workers; failed decodes are dropped and listed."""

    def __init__(self, sources: list, labels: list, relpaths: list, pp: Preprocess, transform, batch_size: int, *,
                 train: bool, workers: Optional[int] = 0, dist: Optional[Dist] = None, seed: int = 0, device=None):
        from .datasets import LabelledDataset

        self.dist = dist or Dist()
        self.ds = LabelledDataset(sources, labels, pp, transform, seed if train else None)
        self.relpaths, self.bs, self.train, self.workers = relpaths, batch_size, train, workers
        self.seed, self.device = seed, device
        self.skipped: list = []
        self._seen_bad: set = set()
        self.sampler = EpochSampler(len(self.ds), train, self.dist, seed)
        self._loader = None

    def __len__(self) -> int:
        return _n_batches(len(self.sampler), self.bs, self.train)

    def _get_loader(self):
        if self._loader is None:
            from .datasets import collate_labelled
            from .loader import make_loader

            # created once: persistent workers skip a process start-up per epoch (seconds on a fast GPU)
            self._loader = make_loader(
                self.ds, workers=self.workers, batch_size=self.bs, sampler=self.sampler, collate_fn=collate_labelled,
                drop_last=self.train and len(self.sampler) >= self.bs,
                pin_memory=self.device is not None and self.device.type == "cuda", persistent=True,
                returns_tensors=True)
        return self._loader

    def epoch(self, epoch: int):
        self.sampler.set_epoch(epoch)
        nb = self.device is not None and self.device.type == "cuda"
        for x, y, idx, bad in self._get_loader():
            for i, reason in bad:
                if i not in self._seen_bad:
                    self._seen_bad.add(i)
                    self.skipped.append((str(self.relpaths[i]), reason))
            if x is None:
                continue
            yield x.to(self.device, non_blocking=nb), y.to(self.device, non_blocking=nb), idx


class AugmentedBatches:
    """Streamed fixed-size uint8 batches, augmented on the device like :class:`TensorBatches` (scratch, large data)."""

    def __init__(self, inner: LoaderBatches, augment: str, seed: int = 0):
        self.inner, self.augment, self.seed = inner, augment, seed

    @property
    def skipped(self) -> list:
        return self.inner.skipped

    def __len__(self) -> int:
        return len(self.inner)

    def epoch(self, epoch: int):
        g = _augment_generator(self.seed, epoch)
        for xb, yb, idx in self.inner.epoch(epoch):
            yield device_augment(xb, self.augment, g), yb, idx


def channel_stats(x: torch.Tensor) -> tuple[tuple, tuple]:
    """Per-channel mean/std (0-1 scale) of a uint8 NCHW tensor, for a scratch net's own normalisation."""
    xf = x.float().div_(255.0)
    mean = xf.mean(dim=(0, 2, 3))
    std = xf.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)
