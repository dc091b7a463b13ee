"""Helpers that write tiny image fixtures for tests: single images, labelled folders, and known-bad files.

Not a test module. Import with ``from tests.imagegen import make_image, make_folder, make_bad_files``.
Everything is deterministic (seeded) and small (16-64 px) so the whole suite stays fast on two CPU cores.

API (kept stable; other test files rely on it):
- ``make_image(path, size=(32, 32), color=None, mode="RGB", fmt=None, seed=0) -> Path``
- ``make_folder(root, classes=("a", "b"), n_per_class=4, splits=("train", "val"), size=32, seed=0, fmt="JPEG") -> Path``
- ``make_bad_files(dir) -> dict[file name -> substring expected in DecodeError.reason]``
- ``class_color(index) -> (r, g, b)``: the base colour of class ``index`` in ``make_folder``
"""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

# Base colours of classes 0, 1, 2... : reddish, bluish, greenish, then more. A linear probe separates them easily.
_CLASS_COLORS = [(200, 40, 40), (40, 60, 200), (40, 180, 60), (200, 180, 40), (150, 50, 180), (40, 170, 170)]

Size = Union[int, Tuple[int, int]]


def class_color(index: int) -> Tuple[int, int, int]:
    return _CLASS_COLORS[index % len(_CLASS_COLORS)]


def _pattern(size: Tuple[int, int], color, seed: int) -> np.ndarray:
    """H x W x 3 uint8: `color` plus seeded noise and a soft gradient, so images of one colour still differ."""
    w, h = size
    rng = np.random.default_rng(seed)
    if color is None:
        color = rng.integers(30, 226, size=3)
    base = np.asarray(color, dtype=np.float32).reshape(1, 1, 3)
    grad = np.linspace(-20, 20, w, dtype=np.float32).reshape(1, w, 1)
    noise = rng.normal(0, 12, size=(h, w, 3)).astype(np.float32)
    return np.clip(base + grad + noise, 0, 255).astype(np.uint8)


def make_image(
    path: Union[str, Path],
    size: Size = (32, 32),
    color: Optional[Sequence[int]] = None,
    mode: str = "RGB",
    fmt: Optional[str] = None,
    seed: int = 0,
    **save_kw,
) -> Path:
    """Write one small real image to ``path`` and return the path.

    ``mode`` is the Pillow mode stored in the file ("RGB", "L", "RGBA", "LA", "P", "CMYK", "I;16"...);
    ``fmt`` the Pillow format name (default: from the extension). Extra keywords go to ``Image.save``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(size, int):
        size = (size, size)
    rgb = Image.fromarray(_pattern(tuple(size), color, seed), "RGB")
    if mode == "RGB":
        img = rgb
    elif mode in ("I;16", "I;16B"):
        grey = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257
        img = Image.fromarray(grey.astype("<u2" if mode == "I;16" else ">u2"), mode)
    elif mode == "RGBA":
        img = rgb.convert("RGBA")
        img.putalpha(128)
    elif mode == "LA":
        img = rgb.convert("LA")
    elif mode == "P":
        img = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    else:
        img = rgb.convert(mode)
    img.save(path, format=fmt, **save_kw)
    return path


def make_folder(
    root: Union[str, Path],
    classes: Iterable[str] = ("a", "b"),
    n_per_class: int = 4,
    splits: Optional[Iterable[str]] = ("train", "val"),
    size: Size = 32,
    seed: int = 0,
    fmt: str = "JPEG",
) -> Path:
    """A labelled tree ``root/[split/]class/class_NNN.jpg`` whose classes differ by colour; returns ``root``.

    Class ``i`` gets ``class_color(i)`` plus per-image noise, so features from any backbone (even a random one)
    separate the classes with a linear probe. ``splits=None`` gives ``root/class/...`` without splits.
    Every image is distinct (seed differs per file), so no train/val leakage is created by accident.
    """
    root = Path(root)
    ext = {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp"}.get(fmt.upper(), "." + fmt.lower())
    split_names = list(splits) if splits else [None]
    counter = seed * 100_003
    for split in split_names:
        base = root / split if split else root
        for ci, cls in enumerate(classes):
            for i in range(n_per_class):
                counter += 1
                make_image(base / cls / f"{cls}_{i:03d}{ext}", size=size, color=class_color(ci), fmt=fmt, seed=counter)
    return root


def png_bytes(width: int, height: int, color_type: int = 2, bit_depth: int = 8, idat: bytes = b"") -> bytes:
    """A PNG header declaring any dimensions, with valid CRCs and (by default) almost no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat or zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def jpeg_bytes(size: Size = 64, seed: int = 0, quality: int = 95) -> bytes:
    """A real, noisy JPEG (noise keeps the entropy-coded data large, so cutting it really truncates pixels)."""
    if isinstance(size, int):
        size = (size, size)
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_bad_files(directory: Union[str, Path]) -> Dict[str, str]:
    """Write one file per kind of bad input into ``directory``; return {file name: expected reason substring}.

    The substrings match ``featx.data.decode.DecodeError.reason``: zero-byte, truncated JPEG, text named .jpg,
    HTML named .png, and a 30000x30000 PNG bomb that is only ~100 bytes on disk.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "empty.jpg").write_bytes(b"")
    full = jpeg_bytes(64, seed=1)
    (d / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (d / "text.jpg").write_text("this is not a picture, just some notes\n", encoding="utf-8")
    (d / "page.png").write_text("<!DOCTYPE html>\n<html><body>404 Not Found</body></html>\n", encoding="utf-8")
    (d / "bomb.png").write_bytes(png_bytes(30000, 30000))
    return {
        "empty.jpg": "empty file",
        "truncated.jpg": "truncated or corrupt",
        "text.jpg": "not an image",
        "page.png": "not an image",
        "bomb.png": "decompression bomb",
    }
