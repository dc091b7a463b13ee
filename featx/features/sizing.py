"""`--image-size auto`: the network's input size chosen from the sizes of the images themselves (small photos are
not upsampled far past their own resolution, which saves time).

The rule:
- read the header (width, height) of up to SAMPLE images spread evenly over the folder's sorted file list, and take
  the median of their shorter sides, `short`;
- images the backbone's resize (`Preprocess.resize`, e.g. 292 px for lite0's 256-px crop) upsamples by at most
  MAX_UPSAMPLE (lite0: a shorter side of 146 px or more) keep the backbone's own size;
- smaller ones get the crop whose resize upsamples the median image by MAX_UPSAMPLE, rounded to a multiple of 32
  (the network's stride), never below MIN_SIZE nor above the backbone's own size.

Not featx's default (measured, BENCHMARKS.md "Small images (issue 15.4)", ants/bees downscaled to 128 px): for lite0
the 224-px crop auto picks there scored like the default 256 (val +1 image, CV -2 of 245) in 0.77x the pixels, but for
lite1 and lite2 auto's 224 lost 5 and 2 of 398 images against their own 272 / 296. It is a speed option for folders of
small photos; MAX_UPSAMPLE = 2 maps 128-px photos to lite0's training size, 224.

The chosen size goes into the preprocessing recorded in the store, so `featx predict` uses it for new images.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

AUTO = "auto"
SAMPLE = 256  # headers read (~1 ms each): a median over 256 images is stable to a few pixels
MAX_UPSAMPLE = 2.0  # see the module docstring
MIN_SIZE = 64
STRIDE = 32


@dataclass(frozen=True)
class SizeChoice:
    """What `--image-size auto` saw and chose (recorded in the store's meta["image_size"])."""

    mode: str  # "auto" | "fixed" | "backbone" (the backbone's own, no --image-size)
    size: int  # crop side fed to the network
    default: int  # the backbone's own crop side
    median_short_side: Optional[int] = None  # auto only: median shorter side of the sampled images
    sampled: int = 0  # auto only: images whose header was read

    def to_dict(self) -> dict:
        return asdict(self)


def parse_image_size(value) -> Optional[int | str]:
    """``--image-size`` value -> "auto", an int from 8 to 2048 (`featx.data.preprocess.MAX_IMAGE_SIZE`), or None
    (the backbone's own); UsageError otherwise, before any work (99999 px would kill the decoding workers)."""
    from ..data.preprocess import check_image_size
    from ..errors import UsageError

    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text == AUTO:
            return AUTO
        try:
            value = int(text, 10)
        except ValueError:
            raise UsageError(f"--image-size must be a number of pixels or 'auto', not {value!r}") from None
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    return check_image_size(value)


def median_short_side(paths: Sequence, sample: int = SAMPLE) -> tuple[Optional[int], int]:
    """(median shorter side in pixels, images read) over up to `sample` files spread evenly over `paths`.

    Only headers are read (PIL opens lazily); a file that cannot be opened is left out (extraction reports it).
    """
    from PIL import Image

    n = len(paths)
    if n == 0:
        return None, 0
    picks = sorted({int(i * n / min(n, sample)) for i in range(min(n, sample))})
    sides = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DecompressionBombWarning etc.: decoding decides about those files
        for i in picks:
            try:
                with Image.open(paths[i]) as im:
                    w, h = im.size
            except Exception:  # unreadable, not an image, a bomb: not this function's business
                continue
            if w > 0 and h > 0:
                sides.append(min(w, h))
    if not sides:
        return None, 0
    sides.sort()
    mid = len(sides) // 2
    median = sides[mid] if len(sides) % 2 else (sides[mid - 1] + sides[mid]) / 2
    return int(round(median)), len(sides)


def auto_size(input_size: int, resize: int, short: Optional[int]) -> int:
    """The crop side for images whose median shorter side is `short` (None: unknown -> the backbone's own)."""
    if short is None or short * MAX_UPSAMPLE >= resize:
        return int(input_size)
    wanted = input_size * short * MAX_UPSAMPLE / resize  # crop that keeps the backbone's resize/crop ratio
    size = max(MIN_SIZE, STRIDE * math.floor(wanted / STRIDE + 0.5))
    return int(min(input_size, size))


def choose_image_size(paths: Sequence, preprocess, requested) -> SizeChoice:
    """Resolve ``--image-size`` (None, an int, or "auto") against the backbone's preprocessing and the images."""
    default = int(preprocess.input_size)
    requested = parse_image_size(requested)
    if requested is None:
        return SizeChoice("backbone", default, default)
    if requested != AUTO:
        return SizeChoice("fixed", int(requested), default)
    short, n = median_short_side(paths)
    return SizeChoice(AUTO, auto_size(default, int(preprocess.resize), short), default, short, n)


def resolve_size(requested, paths: Sequence, preprocess) -> int:
    """The crop side ``--image-size`` (None, a number or "auto") gives for these images: what finetune and scratch
    train at, by the same rule extract uses (`choose_image_size`)."""
    return choose_image_size(paths, preprocess, requested).size
