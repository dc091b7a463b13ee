"""Preprocessing that travels with every artifact: resize shorter side, centre crop, normalise.

The CPU part (resize + crop to uint8) runs in DataLoader workers; normalisation runs on the model's device
so that only uint8 pixels cross process and PCIe boundaries (4x fewer bytes than float32).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
from PIL import Image

from .._io import fingerprint

_PIL_INTERP = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class Preprocess:
    """How pixels become a network input. Recorded in every features, head and model file."""

    input_size: int = 224  # side of the square centre crop fed to the network
    resize: int = 256  # shorter side after resizing, before the crop (input_size / crop_pct)
    interpolation: str = "bicubic"
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)
    # JPEG draft mode lets libjpeg decode at 1/2, 1/4 or 1/8 scale when the image is much larger than
    # `resize`: 2-4x faster decoding, and both extract and predict use it, so features stay consistent.
    jpeg_draft: bool = True
    version: int = field(default=1)  # bump if the pixel recipe changes, so old artifacts are told apart

    @classmethod
    def from_crop_pct(cls, input_size: int, crop_pct: float, **kw) -> "Preprocess":
        return cls(input_size=input_size, resize=int(math.floor(input_size / crop_pct)), **kw)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"] = [float(x) for x in self.mean]
        d["std"] = [float(x) for x in self.std]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocess":
        d = dict(d)
        d["mean"] = tuple(d["mean"])
        d["std"] = tuple(d["std"])
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)

    def fingerprint(self) -> str:
        return fingerprint(self.to_dict())

    def with_size(self, input_size: int) -> "Preprocess":
        """Same recipe at another crop size, keeping the resize/crop ratio."""
        ratio = self.resize / self.input_size
        return Preprocess(**{**self.to_dict(), "input_size": input_size, "resize": int(round(input_size * ratio)),
                             "mean": self.mean, "std": self.std})

    # -- CPU side -------------------------------------------------------------------------------------
    def resize_crop(self, img: Image.Image) -> np.ndarray:
        """RGB PIL image -> uint8 array (input_size, input_size, 3): shorter side to `resize`, centre crop."""
        w, h = img.size
        scale = self.resize / min(w, h)
        nw, nh = max(self.input_size, round(w * scale)), max(self.input_size, round(h * scale))
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), _PIL_INTERP[self.interpolation], reducing_gap=None)
        left = (nw - self.input_size) // 2
        top = (nh - self.input_size) // 2
        img = img.crop((left, top, left + self.input_size, top + self.input_size))
        return np.asarray(img, dtype=np.uint8)

    # -- device side ----------------------------------------------------------------------------------
    def normalize(self, x):
        """uint8 tensor N,3,H,W (any device) -> float tensor normalised with mean/std, on x's device."""
        import torch

        mean = torch.tensor(self.mean, device=x.device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.std, device=x.device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        return (x.float() - mean) / std
