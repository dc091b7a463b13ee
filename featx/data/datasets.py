"""Map-style datasets that turn files into uint8 pixels in DataLoader workers, plus their collate functions.

Every dataset here reports a file that cannot be used as an error *for that file* (its position and reason); none
substitutes another image (timm's ``ImageDataset`` habit of returning the next file would attach a feature or a
label to the wrong name). Two families:

- :class:`PixelDataset` / :class:`JpegBytesDataset` (extract, predict): the eval recipe, numpy out. Numpy batches
  travel through the worker pipe, tensors through shared-memory file descriptors that some containers refuse.
- :class:`LabelledDataset` / :class:`DecodeDataset` (finetune, scratch): training transforms, tensors out (the
  loader factory switches torch to file-name sharing for them, see `featx.devices.share_tensors_through_files`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from .preprocess import Preprocess


# -- one file ----------------------------------------------------------------------------------------------
def decode(path, pp: Preprocess) -> Image.Image:
    """Decode as extraction and predict do (JPEG draft mode towards ``pp.resize`` when the recipe allows it)."""
    from .decode import load_rgb

    return load_rgb(path, draft_size=pp.resize if pp.jpeg_draft else None)


def error_text(exc: BaseException) -> str:
    """``reason (stage)`` for a DecodeError, the message otherwise: one line for a skip list."""
    stage = getattr(exc, "stage", None)
    reason = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
    return f"{reason} ({stage})" if stage else str(reason)


def decode_errors() -> tuple:
    """Exceptions that mean "this file is unusable" (anything else is a bug and propagates)."""
    from .decode import DecodeError

    return (DecodeError, OSError, ValueError, Image.DecompressionBombError)


def shorter_side(img: Image.Image, side: int, interpolation: str) -> np.ndarray:
    """Downscale (never upscale) so the shorter side is ``side``: a smaller cache for random-resized crops."""
    from .preprocess import _PIL_INTERP

    w, h = img.size
    if min(w, h) > side:
        s = side / min(w, h)
        img = img.resize((max(1, round(w * s)), max(1, round(h * s))),
                         _PIL_INTERP.get(interpolation, Image.Resampling.BICUBIC))
    return np.asarray(img, dtype=np.uint8)


# -- extract / predict: the eval recipe, numpy out ---------------------------------------------------------
class PixelDataset:
    """Index -> (index, uint8 HxWx3 array or None, error reason, stage): the PIL path of the eval recipe."""

    def __init__(self, paths: Sequence, preprocess: Preprocess, max_pixels: Optional[int] = None):
        self.paths = [str(p) for p in paths]
        self.preprocess = preprocess
        self.max_pixels = max_pixels

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from .jpeg_batch import pil_pixels

        return (i, *pil_pixels(self.paths[i], self.preprocess, self.max_pixels))


class JpegBytesDataset(PixelDataset):
    """For the device decoder: a plain JPEG comes back as its bytes (header checked, no pixel decoded), anything
    else through the PIL path as above. Index -> (index, pixels or None, reason, stage, jpeg or None)."""

    def __getitem__(self, i):
        from .jpeg_batch import pil_pixels, read_device_jpeg

        jpeg = read_device_jpeg(self.paths[i], self.max_pixels, self.preprocess)
        if jpeg is not None:
            return i, None, None, None, jpeg
        return (i, *pil_pixels(self.paths[i], self.preprocess, self.max_pixels), None)


def collate_pixels(items):
    """PixelDataset items -> (positions, uint8 N,H,W,3 array or None, [(position, reason, stage)])."""
    good = [(i, px) for i, px, _, _ in items if px is not None]
    errors = [(i, reason, stage) for i, px, reason, stage in items if px is None]
    idx = np.asarray([i for i, _ in good], dtype=np.int64)
    pixels = np.stack([px for _, px in good]) if good else None
    return idx, pixels, errors


# -- finetune / scratch: decode once, or decode + augment every epoch --------------------------------------
class DecodeDataset(torch.utils.data.Dataset):
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
            return i, shorter_side(img, self.shorter, self.pp.interpolation)
        except decode_errors() as exc:
            return i, error_text(exc)


class LabelledDataset(torch.utils.data.Dataset):
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
        except decode_errors() as exc:
            return error_text(exc), self.labels[i], i


def collate_labelled(batch):
    """LabelledDataset items -> (x, y, indices) of the good ones (None when none) and [(index, reason)]."""
    good = [b for b in batch if not isinstance(b[0], str)]
    bad = [(b[2], b[0]) for b in batch if isinstance(b[0], str)]
    if good:
        x = torch.stack([b[0] for b in good])
        y = torch.tensor([b[1] for b in good], dtype=torch.long)
        idx = torch.tensor([b[2] for b in good], dtype=torch.long)
    else:
        x, y, idx = None, None, None
    return x, y, idx, bad


def identity_collate(batch):
    return batch
