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

# The crop sizes featx accepts (--image-size, and any size recorded in a model file it loads). ImageNet backbones are
# trained at 224-600 px and timm's largest pretrained configurations stop near 800, so 2048 leaves room for
# high-resolution work while one image stays affordable (lite0's first stage at 2048 px: 32 x 1024 x 1024 floats,
# 128 MiB per image); 99,999 px would be 30 GB of uint8 pixels per image before the network runs.
MIN_IMAGE_SIZE = 8
MAX_IMAGE_SIZE = 2048

# Most pixels the resize before the centre crop may produce (48 MiB as RGB). A larger resize only happens to extreme
# aspect ratios (a 196-byte 1 x 40,000 PNG resized to a 256-px shorter side is 256 x 10,240,000 pixels, 7.3 GiB):
# those are resampled straight into the crop instead (`Preprocess.resize_crop`), which costs one crop. Normal photos
# stay far below it (4:3 at the largest crop, a 2,340-px shorter side, is 7.3 M pixels; 3:1 is 16.4 M), so they keep
# the exact pixels of the plain resize-then-crop.
RESIZE_PIXELS = 1 << 24

_PIL_INTERP = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


# How far (in output pixels, before scaling) each PIL filter reads around a sampling position.
_SUPPORT = {"nearest": 0.5, "bilinear": 1.0, "bicubic": 2.0, "lanczos": 3.0}


def _source_window(n_in: int, n_out: int, start: int, size: int, reach: float) -> tuple:
    """Source pixels [lo, hi) that output pixels [start, start + size) of a resize n_in -> n_out read, and where
    those outputs' box lies inside that window: (lo, hi, box start, box end)."""
    scale = n_in / n_out
    a, b = start * scale, min(n_in, (start + size) * scale)  # min: a crop that ends at the edge, rounded past it
    margin = reach * max(scale, 1.0) + 1  # the filter widens when shrinking; +1 for rounding at the edges
    lo, hi = max(0, math.floor(a - margin)), min(n_in, math.ceil(b + margin))
    return lo, hi, a - lo, b - lo


def check_image_size(value, option: str = "--image-size") -> int:
    """A crop size a user asked for -> int; UsageError (one line, before any work) outside MIN..MAX_IMAGE_SIZE."""
    from ..errors import UsageError

    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not (
            MIN_IMAGE_SIZE <= value <= MAX_IMAGE_SIZE):
        why = ("; backbones are trained at 224-600 px, and a larger crop costs memory without helping them"
               if isinstance(value, (int, float, np.number)) and value > MAX_IMAGE_SIZE else "")
        raise UsageError(f"{option} must be a whole number of pixels from {MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}, "
                         f"not {value!r}{why}")
    return int(value)


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

    @classmethod
    def from_record(cls, d, where: str) -> "Preprocess":
        """A recipe read from an artifact (`where`: "model.json", an ONNX file...) -> Preprocess, checked: an
        ArtifactError (one line, exit 5) for one featx cannot apply, e.g. a crop size edited to 99,999 px, which
        would allocate 30 GB per image, or an interpolation PIL does not have."""
        from ..errors import ArtifactError

        try:
            if not isinstance(d, dict):
                raise ValueError(f"a {type(d).__name__}, not a recipe")
            pre = cls.from_dict(d)
            pre.check()
        except (KeyError, TypeError, ValueError) as exc:
            what = f"no {exc}" if isinstance(exc, KeyError) else str(exc)
            raise ArtifactError(f"{where} records a preprocessing featx cannot use ({what}); make the model again "
                                "with featx") from exc
        return pre

    def fingerprint(self) -> str:
        return fingerprint(self.to_dict())

    def with_size(self, input_size: int) -> "Preprocess":
        """Same recipe at another crop size, keeping the resize/crop ratio (UsageError outside the accepted sizes)."""
        check_image_size(input_size)
        ratio = self.resize / self.input_size
        return Preprocess(**{**self.to_dict(), "input_size": input_size, "resize": int(round(input_size * ratio)),
                             "mean": self.mean, "std": self.std})

    def check(self) -> None:
        """ValueError naming the first field that no featx recipe can have (for recipes read from a file)."""
        def whole(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not whole(self.input_size) or not MIN_IMAGE_SIZE <= self.input_size <= MAX_IMAGE_SIZE:
            raise ValueError(f"crop size {self.input_size!r} is not a whole number of pixels between "
                             f"{MIN_IMAGE_SIZE} and {MAX_IMAGE_SIZE}")
        # resize / input_size is 1 / crop_pct: timm's configurations stay within 0.5..1.0 (1..2); 4 is generous
        if not whole(self.resize) or not 1 <= self.resize <= 4 * MAX_IMAGE_SIZE:
            raise ValueError(f"resize {self.resize!r} is not a whole number of pixels between 1 and "
                             f"{4 * MAX_IMAGE_SIZE}")
        if self.interpolation not in _PIL_INTERP:
            raise ValueError(f"unknown interpolation {self.interpolation!r} (known: {', '.join(_PIL_INTERP)})")
        for name, values in (("mean", self.mean), ("std", self.std)):
            ok = isinstance(values, (tuple, list)) and len(values) == 3 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
            if not ok or (name == "std" and min(values) <= 0):
                above = " above 0" if name == "std" else ""
                shown = list(values) if isinstance(values, (tuple, list)) else values
                raise ValueError(f"{name} {shown!r} is not three finite numbers{above}")

    # -- CPU side -------------------------------------------------------------------------------------
    def crop_geometry(self, w: int, h: int) -> tuple:
        """(resized width, resized height, left, top) of the crop in an image of w x h pixels."""
        s = self.input_size
        scale = self.resize / min(w, h)
        nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
        return nw, nh, (nw - s) // 2, (nh - s) // 2

    def crops_first(self, w: int, h: int) -> bool:
        """Whether resizing a w x h image whole would make more than RESIZE_PIXELS pixels (extreme aspect ratios):
        then `resize_crop` resamples only the crop's region of the source."""
        nw, nh, _, _ = self.crop_geometry(w, h)
        return nw * nh > RESIZE_PIXELS

    def resize_crop(self, img: Image.Image) -> np.ndarray:
        """RGB PIL image -> uint8 array (input_size, input_size, 3): shorter side to `resize`, centre crop.

        No image costs more than a normal photo: where the whole resized image would exceed RESIZE_PIXELS (only
        extreme aspect ratios), PIL resamples the crop's region of the source (``box=``) straight to the crop, at the
        same sampling positions; its weights are rounded from float32 box coordinates, so a pixel can differ from the
        whole-image resize by a few levels (as between two JPEG decoders). Every other image takes the plain
        resize-then-crop, with the pixels earlier featx versions recorded.
        """
        w, h = img.size
        s = self.input_size
        nw, nh, left, top = self.crop_geometry(w, h)
        interp = _PIL_INTERP[self.interpolation]
        if nw * nh > RESIZE_PIXELS:
            # The source pixels the crop's filter taps reach, cut out first: PIL takes box= in float32, and box
            # coordinates near 0 keep the sampling positions exact to ~1e-6 pixel (near 20,000 they would be 0.002).
            reach = _SUPPORT[self.interpolation]
            x0, x1, bx0, bx1 = _source_window(w, nw, left, s, reach)
            y0, y1, by0, by1 = _source_window(h, nh, top, s, reach)
            region = img.crop((x0, y0, x1, y1))
            return np.asarray(region.resize((s, s), interp, box=(bx0, by0, bx1, by1), reducing_gap=None),
                              dtype=np.uint8)
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), interp, reducing_gap=None)
        img = img.crop((left, top, left + s, top + s))
        return np.asarray(img, dtype=np.uint8)

    # -- device side ----------------------------------------------------------------------------------
    def normalize(self, x):
        """uint8 tensor N,3,H,W (any device) -> float tensor normalised with mean/std, on x's device."""
        import torch

        mean = torch.tensor(self.mean, device=x.device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.std, device=x.device, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        return (x.float() - mean) / std
