"""Augmentation: torchvision v2 recipes for PIL images in workers, and a crop+flip on uint8 batches on the device."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .preprocess import Preprocess

PRESETS = ("none", "light", "standard", "strong")


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
    """Random crop with reflect padding (1/8 of the side) and horizontal flip, on uint8 NCHW, on x's device.

    Hand-written rather than torchvision's v2.RandomCrop/RandomHorizontalFlip: those draw one crop per call
    (per batch, or a Python loop per image); here every image gets its own offset in two gathers, one kernel each,
    which is what keeps small-image training GPU-bound (the airbench lesson).
    """
    if preset == "none" or x.shape[0] == 0:
        return x
    n, c, h, w = x.shape
    pad = max(1, h // 8)
    xp = torch.nn.functional.pad(x.float(), (pad, pad, pad, pad), mode="reflect")
    oy = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device="cpu").to(x.device)
    ox = torch.randint(0, 2 * pad + 1, (n,), generator=generator, device="cpu").to(x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device)[None]).view(n, 1, h, 1).expand(n, c, h, w + 2 * pad)
    cols = (ox[:, None] + torch.arange(w, device=x.device)[None]).view(n, 1, 1, w).expand(n, c, h, w)
    out = torch.gather(torch.gather(xp, 2, rows), 3, cols).to(torch.uint8)
    if preset in ("standard", "strong"):
        flip = (torch.rand(n, generator=generator, device="cpu") < 0.5).to(x.device)
        out = torch.where(flip[:, None, None, None], out.flip(3), out)
    return out.contiguous()
