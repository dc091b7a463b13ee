"""Training data: train/val split, robust decoding, augmentation presets and the two batch sources.

Two ways to feed the one training loop, both yielding uint8 NCHW batches (normalised on the device):

* :class:`TensorBatches` -- the whole split decoded once into a uint8 tensor that lives on the device,
  shuffled and augmented there (random crop with padding, flip). For small images this removes the
  per-epoch decode cost entirely (the airbench lesson: at 32 px the GPU is idle waiting for JPEG decoders).
* :class:`LoaderBatches` -- a DataLoader over decoded images (cached in RAM when they fit, else decoded
  each epoch) with PIL/torchvision augmentation in worker processes.

An image that cannot be decoded is skipped with its reason recorded; it is never replaced by another image.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ..data.preprocess import Preprocess
from ..errors import DataError
from .distributed import Dist

VAL_NAMES = ("val", "valid", "validation")


# -- which images train and which validate -------------------------------------------------------------
@dataclass
class Split:
    train: list  # ImageRecord
    val: list
    classes: list
    source: str  # "folders" (train/val sub-folders) or "val_split=0.2 (stratified, seed 0)" ...
    warnings: list = field(default_factory=list)


def make_split(folder, val_split: float, seed: int) -> Split:
    """Train/val from the folder layout, else a stratified, seeded hold-out of ``val_split``."""
    labelled = [r for r in folder.records if r.label is not None]
    if not labelled:
        raise DataError(f"no labelled images in {folder.root}: training needs one sub-folder per class "
                        "(or train/ and val/ folders with class sub-folders inside)")
    warnings = []
    if len(labelled) < len(folder.records):
        warnings.append(f"{len(folder.records) - len(labelled)} image(s) without a class folder were ignored")
    splits = {r.split for r in labelled}
    if getattr(folder, "has_splits", False) and "train" in splits:
        train = [r for r in labelled if r.split == "train"]
        val = [r for r in labelled if r.split in VAL_NAMES]
        source = "folders"
        if not val and "test" in splits:
            val = [r for r in labelled if r.split == "test"]
            warnings.append("no val/ folder: validating on test/ (model selection on test inflates its score)")
        if not val and val_split > 0:
            train, val = _stratified(train, val_split, seed)
            source = f"train folder, val_split={val_split} (stratified, seed {seed})"
    elif val_split > 0:
        train, val = _stratified(labelled, val_split, seed)
        source = f"val_split={val_split} (stratified, seed {seed})"
    else:
        train, val, source = labelled, [], "no validation (val_split=0)"
    classes = sorted({r.label for r in train} | {r.label for r in val})
    if list(getattr(folder, "classes", []) or []):
        classes = [c for c in folder.classes if c in set(classes)]
    if len(classes) < 2:
        raise DataError(f"training needs at least 2 classes, found {len(classes)} in {folder.root}")
    missing = sorted({r.label for r in val} - {r.label for r in train})
    if missing:
        warnings.append(f"class(es) {', '.join(missing)} have validation images but no training images")
    return Split(train=train, val=val, classes=classes, source=source, warnings=warnings)


def _stratified(records: list, frac: float, seed: int) -> tuple[list, list]:
    rng = np.random.default_rng(seed)
    by_class: dict = {}
    for r in sorted(records, key=lambda r: r.relpath):
        by_class.setdefault(r.label, []).append(r)
    train, val = [], []
    for label in sorted(by_class):
        items = by_class[label]
        order = rng.permutation(len(items))
        # at least one validation image per class with 2+ images, and always one left to train on
        k = min(len(items) - 1, max(1 if len(items) >= 2 else 0, int(round(len(items) * frac))))
        val += [items[i] for i in order[:k]]
        train += [items[i] for i in order[k:]]
    return train, val


# -- decoding ------------------------------------------------------------------------------------------
def decode(path, pp: Preprocess) -> Image.Image:
    """Decode as extraction and predict do (JPEG draft mode towards ``pp.resize`` when the recipe allows it)."""
    from ..data.decode import load_rgb

    return load_rgb(path, draft_size=pp.resize if pp.jpeg_draft else None)


def _error_text(exc: BaseException) -> str:
    stage = getattr(exc, "stage", None)
    reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
    return f"{reason} ({stage})" if stage else str(reason)


def _decode_errors() -> tuple:
    from ..data.decode import DecodeError

    return (DecodeError, OSError, ValueError, Image.DecompressionBombError)


class _DecodeDataset(torch.utils.data.Dataset):
    """Item i -> (i, uint8 array) or (i, error text). ``mode``: "crop" (eval recipe) or "shorter" (cache for RRC)."""

    def __init__(self, paths: Sequence, pp: Preprocess, mode: str, shorter: int = 0):
        self.paths, self.pp, self.mode, self.shorter = list(paths), pp, mode, shorter

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            img = decode(self.paths[i], self.pp)
            if self.mode == "crop":
                return i, self.pp.resize_crop(img)
            return i, _shorter_side(img, self.shorter, self.pp.interpolation)
        except _decode_errors() as exc:
            return i, _error_text(exc)


def _shorter_side(img: Image.Image, side: int, interpolation: str) -> np.ndarray:
    """Downscale (never upscale) so the shorter side is ``side``: a smaller cache for random-resized crops."""
    from ..data.preprocess import _PIL_INTERP

    w, h = img.size
    if min(w, h) > side:
        s = side / min(w, h)
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))), _PIL_INTERP.get(interpolation, Image.Resampling.BICUBIC))
    return np.asarray(img, dtype=np.uint8)


def _identity_collate(batch):
    return batch


def decode_all(records: list, pp: Preprocess, *, mode: str = "crop", shorter: int = 0, workers: int = 0,
               on_progress: Optional[Callable[[int, int], None]] = None) -> tuple[list, list, list]:
    """Decode every record once, in parallel. -> (arrays, kept record indices, skipped [(relpath, reason)])."""
    ds = _DecodeDataset([r.path for r in records], pp, mode, shorter)
    loader = torch.utils.data.DataLoader(ds, batch_size=16, num_workers=workers, collate_fn=_identity_collate)
    arrays, kept, skipped, done = [], [], [], 0
    for batch in loader:
        for i, item in batch:
            if isinstance(item, str):
                skipped.append((str(records[i].relpath), item))
            else:
                arrays.append(item)
                kept.append(i)
        done += len(batch)
        if on_progress:
            on_progress(done, len(records))
    return arrays, kept, skipped


def estimate_bytes(n: int, side: int, aspect: float = 1.0) -> int:
    return int(n * 3 * side * side * aspect)


def stack_uint8(arrays: list) -> torch.Tensor:
    """List of HWC uint8 arrays (same size) -> NCHW uint8 tensor."""
    if not arrays:
        return torch.zeros((0, 3, 1, 1), dtype=torch.uint8)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def channel_stats(x: torch.Tensor) -> tuple[tuple, tuple]:
    """Per-channel mean/std (0-1 scale) of a uint8 NCHW tensor, for a scratch net's own normalisation."""
    xf = x.float().div_(255.0)
    mean = xf.mean(dim=(0, 2, 3))
    std = xf.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


# -- augmentation -------------------------------------------------------------------------------------
def train_transform(pp: Preprocess, preset: str):
    """PIL image -> uint8 CHW tensor, built on the backbone's own size and interpolation (finetune)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import v2

    if preset == "none":
        return EvalCrop(pp)
    interp = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
              "nearest": InterpolationMode.NEAREST, "lanczos": InterpolationMode.LANCZOS}[pp.interpolation]
    # scale: how much of the image a crop may keep. Light keeps most of the object (small, clean data);
    # standard/strong follow the usual ImageNet ranges, which regularise more and need more epochs.
    scale = {"light": (0.35, 1.0), "standard": (0.25, 1.0), "strong": (0.08, 1.0)}[preset]
    ops = [v2.PILToTensor(), v2.RandomResizedCrop(pp.input_size, scale=scale, interpolation=interp, antialias=True),
           v2.RandomHorizontalFlip()]
    if preset == "standard":
        ops.append(v2.TrivialAugmentWide(interpolation=InterpolationMode.BILINEAR))
    elif preset == "strong":
        ops.append(v2.RandAugment(num_ops=2, magnitude=9, interpolation=InterpolationMode.BILINEAR))
    return v2.Compose(ops)


class EvalCrop:
    """PIL image -> uint8 CHW tensor by exactly the extraction/predict recipe (picklable for DataLoader workers)."""

    def __init__(self, pp: Preprocess):
        self.pp = pp

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return torch.from_numpy(np.array(self.pp.resize_crop(img), copy=True)).permute(2, 0, 1).contiguous()


def device_augment(x: torch.Tensor, preset: str, generator: torch.Generator) -> torch.Tensor:
    """Random crop with reflect padding (1/8 of the side) and horizontal flip, on uint8 NCHW, on x's device."""
    if preset == "none" or x.shape[0] == 0:
        return x
    n, c, h, w = x.shape
    pad = max(1, h // 8)
    xp = torch.nn.functional.pad(x.float(), (pad, pad, pad, pad), mode="reflect")
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device="cpu").to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device="cpu").to(x.device)
    # two gathers (rows, then columns) with a per-image offset: one kernel each, no Python loop over images
    rows = (oy[:, None] + torch.arange(h, device=x.device)[None]).view(n, 1, h, 1).expand(n, c, h, w + 2 * pad)
    cols = (ox[:, None] + torch.arange(w, device=x.device)[None]).view(n, 1, 1, w).expand(n, c, h, w)
    out = torch.gather(torch.gather(xp, 2, rows), 3, cols).to(torch.uint8)
    if preset in ("standard", "strong"):
        flip = (torch.rand(n, generator=generator, device="cpu") < 0.5).to(x.device)
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out.contiguous()


# -- batch sources -------------------------------------------------------------------------------------
class TensorBatches:
    """A uint8 tensor already on the device: seeded shuffle, sharded across ranks, augmented on the device."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, train: bool, augment: str = "none",
                 dist: Optional[Dist] = None, seed: int = 0):
        self.x, self.y, self.bs, self.train, self.augment = x, y, batch_size, train, augment
        self.dist = dist or Dist()
        self.seed = seed
        self.skipped: list = []  # decoding failures happened before; nothing fails here

    def _indices(self, epoch: int) -> torch.Tensor:
        n = len(self.y)
        if self.train:
            g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            idx = torch.randperm(n, generator=g)
            per = n // self.dist.world_size  # equal step counts on every rank (DDP needs them)
            return idx[self.dist.rank * per:(self.dist.rank + 1) * per] if self.dist.enabled else idx
        return torch.arange(self.dist.rank, n, self.dist.world_size)

    def __len__(self) -> int:
        n = len(self.y) // self.dist.world_size if self.train else math.ceil(len(self.y) / self.dist.world_size)
        return self._n_batches(n)

    def _n_batches(self, n: int) -> int:
        if self.train and n >= self.bs:
            return n // self.bs  # drop the ragged last batch: a batch of 1 breaks BatchNorm statistics
        return math.ceil(n / self.bs)

    def epoch(self, epoch: int):
        """Yields (uint8 NCHW on device, labels on device, dataset indices)."""
        idx = self._indices(epoch)
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch + 7919)
        nb = self._n_batches(len(idx))
        for b in range(nb):
            sel = idx[b * self.bs:(b + 1) * self.bs]
            dsel = sel.to(self.x.device)
            xb = self.x[dsel]
            if self.train:
                xb = device_augment(xb, self.augment, g)
            yield xb, self.y[dsel], sel


class _PilDataset(torch.utils.data.Dataset):
    """Item (i, epoch) -> (uint8 CHW tensor or error text, label, i). Sources are cached arrays or paths to decode.

    Training items reseed torch's RNG from (seed, epoch, i) before the random transforms, so augmentation is the
    same whatever the number of worker processes, and a resumed run sees the same crops as an uninterrupted one.
    """

    def __init__(self, sources: list, labels: list, pp: Preprocess, transform, seed: Optional[int] = None):
        self.sources, self.labels, self.pp, self.transform, self.seed = sources, labels, pp, transform, seed

    def __len__(self):
        return len(self.sources)

    def __getitem__(self, item):
        i, epoch = item
        src = self.sources[i]
        try:
            img = Image.fromarray(src) if isinstance(src, np.ndarray) else decode(src, self.pp)
            if self.seed is not None:
                torch.manual_seed((self.seed * 1_000_003 + epoch * 100_003 + i) % 2**63)
            x = self.transform(img)
            if not torch.is_tensor(x):
                x = torch.as_tensor(np.asarray(x)).permute(2, 0, 1)
            return x.contiguous(), self.labels[i], i
        except _decode_errors() as exc:
            return _error_text(exc), self.labels[i], i


def _filter_collate(batch):
    good = [b for b in batch if not isinstance(b[0], str)]
    bad = [(b[2], b[0]) for b in batch if isinstance(b[0], str)]
    if good:
        x = torch.stack([b[0] for b in good])
        y = torch.tensor([b[1] for b in good], dtype=torch.long)
        idx = torch.tensor([b[2] for b in good], dtype=torch.long)
    else:
        x, y, idx = None, None, None
    return x, y, idx, bad


class _EpochSampler(torch.utils.data.Sampler):
    """Yields (index, epoch): a seeded per-epoch permutation (train) or the plain order (val), sharded by rank.

    Training shards are cut to equal length (DDP needs the same number of steps on every rank); validation
    shards are not padded, so every image is scored exactly once.
    """

    def __init__(self, n: int, train: bool, d: Dist, seed: int):
        self.n, self.train, self.d, self.seed, self.epoch = n, train, d, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> list:
        if not self.train:
            return list(range(self.d.rank, self.n, self.d.world_size))
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + self.epoch)).tolist()
        per = self.n // self.d.world_size
        return order[self.d.rank * per:(self.d.rank + 1) * per]

    def __iter__(self):
        return iter([(i, self.epoch) for i in self._indices()])

    def __len__(self) -> int:
        return self.n // self.d.world_size if self.train else len(range(self.d.rank, self.n, self.d.world_size))


class LoaderBatches:
    """DataLoader with seeded, rank-sharded sampling and persistent workers; failed decodes are dropped and listed."""

    def __init__(self, sources: list, labels: list, relpaths: list, pp: Preprocess, transform, batch_size: int, *,
                 train: bool, workers: int = 0, dist: Optional[Dist] = None, seed: int = 0, device=None):
        self.dist = dist or Dist()
        self.ds = _PilDataset(sources, labels, pp, transform, seed if train else None)
        self.relpaths, self.bs, self.train, self.workers = relpaths, batch_size, train, workers
        self.seed, self.device = seed, device
        self.skipped: list = []
        self._seen_bad: set = set()
        self.sampler = _EpochSampler(len(self.ds), train, self.dist, seed)
        self._loader = None

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.bs if (self.train and n >= self.bs) else math.ceil(n / self.bs)

    def _get_loader(self):
        if self._loader is None:
            # created once: persistent workers skip a process start-up per epoch (seconds on a fast GPU)
            self._loader = torch.utils.data.DataLoader(
                self.ds, batch_size=self.bs, sampler=self.sampler, num_workers=self.workers,
                collate_fn=_filter_collate, drop_last=self.train and len(self.sampler) >= self.bs,
                pin_memory=self.device is not None and self.device.type == "cuda",
                persistent_workers=self.workers > 0, prefetch_factor=4 if self.workers > 0 else None)
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
        g = torch.Generator().manual_seed(self.seed * 100003 + epoch + 7919)
        for xb, yb, idx in self.inner.epoch(epoch):
            yield device_augment(xb, self.augment, g), yb, idx


def default_workers(requested: Optional[int]) -> int:
    if requested is not None:
        return max(0, requested)
    return max(0, min(8, (os.cpu_count() or 1) - 1))
