"""Robust image decoding: any file in, a fully loaded RGB uint8 PIL image out, or a DecodeError saying why not.

Every photo a user owns should come out the way an image viewer shows it (EXIF orientation applied, alpha over a
fixed background, 16-bit scaled rather than clipped), and every file that cannot be used should fail alone with a
short reason that an end-of-run summary can list. Nothing here is global state: the pixel limit is checked by featx
itself, so it holds in DataLoader worker processes (fork or spawn) whatever ``PIL.Image.MAX_IMAGE_PIXELS`` says.

Documented choices:
- animated images (GIF, APNG, WebP, multi-page TIFF) give their first frame;
- transparency (RGBA, LA, PA, palette or colour-key transparency) is composited over ``background`` (white);
- 16-bit images are divided by 257 (65535 -> 255) with rounding, never clipped at 255; 32-bit integer images within
  0..65535 are treated as 16-bit; float images within 0..1 are multiplied by 255; other I/F ranges are min-max scaled;
- ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is never set: a truncated file is an error, not a grey-filled image.
"""
from __future__ import annotations

import logging
import os
import re
import stat
import warnings
from typing import Optional, Tuple, Union

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from .._io import safe_str

logger = logging.getLogger("featx")

# Same number as Pillow's default guard (about 9459 x 9459 pixels, ~268 MB as RGB), but checked here right after
# the header is read, so no pixel buffer is ever allocated for a bomb.
MAX_PIXELS = 89_478_485

PathLike = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]

# EXIF orientation -> the transpose that shows the pixels as a viewer does (same table as ImageOps.exif_transpose).
_ORIENTATION_TAG = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# Modes Pillow converts to RGB correctly without help (colour spaces, greyscale, bilevel, palette without alpha).
_PLAIN_MODES = {"1", "L", "P", "CMYK", "YCbCr", "LAB", "HSV", "RGBX"}
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"msf1"}
_AVIF_BRANDS = {b"avif", b"avis", b"mif1"}
_HEIF_HINT = "unsupported format: HEIC/HEIF needs the pillow-heif plugin (pip install pillow-heif)"
_AVIF_HINT = ("unsupported format: AVIF needs Pillow built with AVIF support or the pillow-avif-plugin "
              "(pip install pillow-avif-plugin)")
# Signatures of formats Pillow reads: a file that starts like one but was not identified has a broken header.
_IMAGE_MAGIC = [(b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
                (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"RIFF", "WebP"), (b"BM", "BMP")]
_O_FLAGS = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0)  # NONBLOCK: a FIFO never hangs us

_os_open = os.open  # indirection so tests can simulate permission errors when running as root
_warned_truncated_flag = False
_heif_registered: Optional[bool] = None


class DecodeError(Exception):
    """A file that cannot become an RGB image. ``reason`` is short and human; ``stage`` says where it failed.

    ``stage`` is ``"open"`` (reading the file, recognising the format, header and pixel-limit checks),
    ``"decode"`` (decompressing pixels) or ``"convert"`` (mode or orientation handling).
    """

    def __init__(self, reason: str, stage: str = "open"):
        super().__init__(reason)
        self.reason = reason
        self.stage = stage

    def __str__(self) -> str:
        return self.reason

    def __reduce__(self):  # survives the trip back from a DataLoader worker process
        return (type(self), (self.reason, self.stage))


def load_rgb(
    path: PathLike,
    *,
    max_pixels: Optional[int] = MAX_PIXELS,
    draft_size: Optional[int] = None,
    background: Tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Decode ``path`` into a fully loaded RGB image, as an image viewer would show it.

    The format is decided by the content, not the extension (a PNG named ``.jpg`` decodes).

    Args:
        path: file to read (str, bytes or PathLike; undecodable bytes in the name are fine).
        max_pixels: refuse images with more than this many pixels before any pixel is decoded
            (``None``: only Pillow's own guard, twice ``PIL.Image.MAX_IMAGE_PIXELS``, still applies).
        draft_size: for JPEGs, let libjpeg decode at 1/2, 1/4 or 1/8 scale while both sides stay >= draft_size
            (pass the preprocessing's resize size). Ignored for other formats.
        background: RGB colour that transparent pixels are composited over.

    Raises:
        DecodeError: with ``reason`` and ``stage``; KeyboardInterrupt and MemoryError pass through.
    """
    _check_truncated_flag()
    try:
        fd = _os_open(path, _O_FLAGS)
    except OSError as exc:
        raise DecodeError(_os_reason(exc), "open") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DecodeError("not a regular file", "open")
        if st.st_size == 0:
            raise DecodeError("empty file", "open")
        fh = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with fh:
        img = _open(fh, max_pixels)
        w, h = img.size
        if max_pixels is not None and w * h > max_pixels:
            raise DecodeError(f"decompression bomb: {w}x{h} pixels exceeds the limit of {max_pixels}", "open")
        if draft_size and img.format in ("JPEG", "MPO"):
            img.draft("RGB", (int(draft_size), int(draft_size)))
        try:
            img.load()
        except MemoryError:
            raise
        except Image.DecompressionBombError as exc:
            raise DecodeError(_bomb_reason(exc, max_pixels), "decode") from None
        except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct.error... on bad data
            raise DecodeError(_corrupt_reason(exc), "decode") from None
        orientation = _orientation(img, path)
        try:
            img = _to_rgb(img, background)
            if orientation is not None:
                img = img.transpose(_TRANSPOSE[orientation])
        except (MemoryError, DecodeError):
            raise
        except Exception as exc:
            raise DecodeError(f"cannot convert {img.mode} image to RGB: {exc}", "convert") from None
    return img


def _open(fh, max_pixels: Optional[int]) -> Image.Image:
    """Image.open with every failure turned into a DecodeError; retries once after registering a HEIF plugin."""
    img = _try_open(fh, max_pixels)
    if img is not None:
        return img
    fh.seek(0)
    reason = _sniff(fh.read(1024))
    if reason == _HEIF_HINT and _register_heif():
        fh.seek(0)
        img = _try_open(fh, max_pixels)
        if img is not None:
            return img
    raise DecodeError(reason, "open")


def _try_open(fh, max_pixels: Optional[int]) -> Optional[Image.Image]:
    """The opened image, or None when no installed plugin recognises the content."""
    try:
        with warnings.catch_warnings():
            # Pillow warns (raw, on stderr, once per worker) about images between its limit and twice that; featx
            # applies its own limit right after the header is read (load_rgb), so the warning only adds noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(fh)
    except MemoryError:
        raise
    except Image.DecompressionBombError as exc:
        raise DecodeError(_bomb_reason(exc, max_pixels), "open") from None
    except UnidentifiedImageError:
        return None
    except Exception as exc:  # a recognised format with a broken header
        raise DecodeError(_corrupt_reason(exc), "open") from None


def _to_rgb(img: Image.Image, background) -> Image.Image:
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img  # the common JPEG path: no copy
    if mode.startswith("I") or mode.startswith("F"):
        return _high_depth_to_rgb(img)
    if _has_alpha(img):
        rgba = img if mode == "RGBA" else img.convert("RGBA")
        out = Image.new("RGB", rgba.size, tuple(background))
        out.paste(rgba, (0, 0), rgba)  # alpha blend: out = bg * (1 - a) + rgb * a
        return out
    if mode in _PLAIN_MODES or mode == "RGB":
        return img.convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError:
        raise DecodeError(f"unsupported image mode {mode}", "convert") from None


def _has_alpha(img: Image.Image) -> bool:
    flag = getattr(img, "has_transparency_data", None)  # Pillow >= 10.1
    if flag is not None:
        return bool(flag)
    return (img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info
            or (img.mode == "P" and img.palette is not None and img.palette.mode.endswith("A")))


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    """16/32-bit integer and float images -> 8-bit grey -> RGB, scaled rather than clipped."""
    a = np.asarray(img)
    if a.ndim != 2:
        raise DecodeError(f"unsupported image mode {img.mode}", "convert")
    if a.dtype.kind == "f":
        a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(a.min()), float(a.max())
        if lo >= 0.0 and hi <= 1.0:
            g = np.rint(a * 255.0)
        else:
            g = _minmax(a, lo, hi)
    else:
        lo, hi = int(a.min()), int(a.max())
        if lo >= 0 and hi <= 65535:
            g = (a.astype(np.uint32) + 128) // 257  # 16-bit -> 8-bit with rounding; 65535 -> 255
        else:
            g = _minmax(a.astype(np.float64), float(lo), float(hi))
    return Image.fromarray(g.astype(np.uint8), "L").convert("RGB")


def _minmax(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros_like(a)
    return np.rint((a - lo) * (255.0 / (hi - lo)))


def _orientation(img: Image.Image, path) -> Optional[int]:
    """EXIF orientation 2..8, or None. Malformed EXIF never stops a load: it is logged and ignored."""
    try:
        value = img.getexif().get(_ORIENTATION_TAG)
    except MemoryError:
        raise
    except Exception as exc:
        logger.warning("%s: unreadable EXIF data (%s); loaded without rotation", _show(path), exc)
        return None
    if value is None or value == 1:
        return None
    try:
        v = int(value)
    except (TypeError, ValueError):
        v = None
    if v in _TRANSPOSE:
        return v
    logger.warning("%s: invalid EXIF orientation %r (valid: 1-8); loaded without rotation", _show(path), value)
    return None


def _sniff(head: bytes) -> str:
    """Why Pillow did not recognise these bytes, in words a user can act on."""
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in _HEIF_BRANDS:
            return _HEIF_HINT
        if brand in _AVIF_BRANDS:
            from PIL import features

            return "truncated or corrupt image (AVIF)" if features.check("avif") else _AVIF_HINT
        return f"unsupported format: ISO media file (brand {brand.decode('latin-1')!r})"
    for magic, name in _IMAGE_MAGIC:
        if head.startswith(magic) and (name != "WebP" or head[8:12] == b"WEBP"):
            return f"truncated or corrupt image (broken {name} header)"
    if head.startswith(b"\xff\x0a") or head[4:12] == b"JXL \r\n\x87\n":
        return "unsupported format: JPEG XL needs the pillow-jxl-plugin (pip install pillow-jxl-plugin)"
    if head.startswith(b"%PDF"):
        return "not an image (PDF document)"
    if head.startswith(b"PK\x03\x04"):
        return "not an image (zip archive)"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if b"<svg" in text[:1024]:
        return "unsupported format: SVG vector graphics (convert to PNG first)"
    if text.startswith(b"<"):
        return "not an image (HTML/XML text)"
    try:
        head.decode("utf-8")
        is_text = True
    except UnicodeDecodeError as exc:  # a multi-byte character cut at the 1024-byte boundary is still text
        is_text = exc.start >= len(head) - 3
    if is_text:
        return "not an image (text file)"
    return "not an image (unrecognised content)"


def _register_heif() -> bool:
    """Register pillow-heif's opener if it is installed (once per process; workers re-run this lazily)."""
    global _heif_registered
    if _heif_registered is None:
        try:
            from pillow_heif import register_heif_opener

            register_heif_opener()
            _heif_registered = True
        except Exception:
            _heif_registered = False
    return _heif_registered


def _os_reason(exc: OSError) -> str:
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, FileNotFoundError):
        return "file not found"
    if isinstance(exc, IsADirectoryError):
        return "not a regular file (a directory)"
    return f"cannot read file: {exc.strerror or exc}"


def _bomb_reason(exc: Exception, max_pixels: Optional[int]) -> str:
    """Pillow refused the image in Image.open (more than twice PIL.Image.MAX_IMAGE_PIXELS)."""
    m = re.search(r"\((\d+) pixels\)", str(exc))
    n = f"{m.group(1)} pixels" if m else "too many pixels"
    pil_limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    if max_pixels is not None and max_pixels <= pil_limit:
        return f"decompression bomb: {n} exceeds the limit of {max_pixels}"
    return (f"decompression bomb: {n} exceeds Pillow's limit of {pil_limit} "
            "(raise PIL.Image.MAX_IMAGE_PIXELS to allow larger images)")


def _corrupt_reason(exc: Exception) -> str:
    detail = str(exc).strip() or type(exc).__name__
    return f"truncated or corrupt image ({type(exc).__name__}: {detail})"


def _check_truncated_flag() -> None:
    # Another library in the process may have set this global; then truncated files decode with grey fill.
    global _warned_truncated_flag
    if ImageFile.LOAD_TRUNCATED_IMAGES and not _warned_truncated_flag:
        _warned_truncated_flag = True
        logger.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set by another library: truncated images will "
                       "load with missing pixels instead of being skipped")


def _show(path) -> str:
    return safe_str(os.fsdecode(path))
