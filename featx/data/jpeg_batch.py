"""Batched JPEG decoding and resizing on the model's device (torchvision / nvJPEG), with the PIL path as fallback.

Why the work is split this way:
- DataLoader workers only read a file's bytes and parse its header (format, mode, size, EXIF orientation, frame
  type, end-of-image marker). No pixel is decoded there, so a few CPU cores can feed a GPU that decodes thousands
  of JPEGs per second. Workers return numpy arrays, never tensors (see `featx.data.datasets`).
- Anything that is not a complete 8-bit baseline/progressive JPEG in YCbCr or grey (PNG, CMYK, 12-bit, lossless,
  truncated, too many pixels...) is decoded in the worker by the PIL path (`load_rgb` + `Preprocess.resize_crop`),
  so such a file gets exactly the row, or the error reason, that ``decoder="pil"`` gives it.
- The main process decodes a whole batch with one ``decode_jpeg(list, device=...)`` call, applies EXIF
  orientation on the device, and resizes + centre-crops every group of same-sized images with one antialiased
  ``interpolate`` call (the same geometry as `Preprocess.resize_crop`, so the pixels are close to the PIL path's,
  not identical: another JPEG decoder and float instead of PIL's fixed-point resampling).
- A file the device decoder rejects is decoded by the PIL path in the main process: never dropped, never replaced.
- GPU memory is bounded by image size, not only by batch size: a batch is decoded in slices of at most
  ``DECODE_PIXELS`` pixels and resized in groups of at most ``RESIZE_ELEMENTS`` floats (input or output side).
- A JPEG whose whole resized image would exceed `featx.data.preprocess.RESIZE_PIXELS` (an extreme aspect ratio: a
  1 x 40,000 JPEG resized to 256 x 10,240,000) goes to the PIL path, which resamples only the crop's region.
"""
from __future__ import annotations

import io
import logging
import os
import stat
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import UsageError

log = logging.getLogger("featx")

DECODERS = ("auto", "pil", "torchvision")

# Decoded pixels alive at once on the device per slice of a batch: 2**27 pixels = 384 MiB as RGB uint8
# (about 700 ImageNet-sized photos, or eleven 12-megapixel ones).
DECODE_PIXELS = 1 << 27
# Float elements per interpolate call (input side): 2**27 floats = 512 MiB. Bounds the float copy of a group.
RESIZE_ELEMENTS = 1 << 27

# Frame types the device decoders handle: baseline, extended sequential and progressive, Huffman coded.
# Lossless (C3), arithmetic-coded (C9-CB) and hierarchical (C5-C7, CD-CF) JPEGs go to the PIL path.
_DEVICE_SOF = {0xC0, 0xC1, 0xC2}
_JPEG_FORMATS = ("JPEG", "MPO")  # MPO: camera JPEGs with extra frames; both decoders give the first frame
_JPEG_MODES = ("RGB", "L")  # YCbCr (or Adobe RGB) and grey; CMYK/YCCK go to the PIL path
# torch.nn.functional.interpolate modes that match PIL's filters (antialiased when shrinking).
_TORCH_INTERP = {"bicubic": ("bicubic", True), "bilinear": ("bilinear", True), "nearest": ("nearest-exact", False)}
_O_FLAGS = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NONBLOCK", 0)  # a FIFO never hangs a worker


# -- shared: the CPU (PIL) path ------------------------------------------------------------------------------------
def stack_batch(positions, results) -> tuple:
    """One batch's ``pil_pixels`` results, in order -> (positions of the good files as int64, their stacked pixels
    or None, [(position, reason, stage)]): what every CPU pixel stream yields per batch."""
    good, pixels, errors = [], [], []
    for i, (px, reason, stage) in zip(positions, results):
        if px is None:
            errors.append((i, reason, stage))
        else:
            good.append(i)
            pixels.append(px)
    return np.asarray(good, dtype=np.int64), (np.stack(pixels) if pixels else None), errors


def pil_pixels(path, preprocess, max_pixels: Optional[int] = None, clock: Optional[list] = None):
    """The PIL path for one file -> (uint8 HxWx3 array or None, error reason, stage). Same as decoder="pil".

    ``clock`` (a list of two floats, optional) gets the seconds spent decoding and resizing added to it."""
    from .decode import DecodeError, load_rgb

    kw = {"draft_size": preprocess.resize if preprocess.jpeg_draft else None}
    if max_pixels:
        kw["max_pixels"] = max_pixels
    try:
        if clock is None:
            return preprocess.resize_crop(load_rgb(path, **kw)), None, None
        t0 = time.perf_counter()
        try:
            img = load_rgb(path, **kw)
        finally:
            t1 = time.perf_counter()
            clock[0] += t1 - t0
        try:
            return preprocess.resize_crop(img), None, None
        finally:
            clock[1] += time.perf_counter() - t1
    except DecodeError as exc:
        return None, exc.reason, exc.stage
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as exc:  # an unexpected decoder failure must not take the other 9,999 files down
        return None, f"{type(exc).__name__}: {exc}", "decode"


# -- worker side -----------------------------------------------------------------------------------------------------
def read_device_jpeg(path, max_pixels: Optional[int] = None,
                     preprocess=None) -> Optional[Tuple[np.ndarray, int, int, int]]:
    """A JPEG the device can decode -> (file bytes as a uint8 array, EXIF orientation 1-8, width, height).

    Returns None for every other file (and for any file that cannot be read): the caller then uses the PIL path,
    which gives the canonical error reason. Reads the whole file but decodes no pixel. ``max_pixels`` has
    `load_rgb`'s meaning (None: `featx.data.decode.MAX_PIXELS`); a larger header goes to the PIL path,
    which refuses it before decoding. With ``preprocess``, a JPEG whose resize would be oversized
    (`Preprocess.crops_first`) also goes to the PIL path.
    """
    from PIL import Image

    from .decode import MAX_PIXELS, _orientation

    try:
        fd = os.open(path, _O_FLAGS)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size < 4:
            return None
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read()
    except OSError:
        return None
    finally:
        os.close(fd)
    frame = jpeg_frame(data)
    if frame is None or frame[0] not in _DEVICE_SOF or frame[1] != 8 or frame[2] not in (1, 3):
        return None
    try:
        with warnings.catch_warnings():  # featx's own limit decides below; Pillow's warning would print raw
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))  # lazy: parses the header (and EXIF), decodes nothing
        if img.format not in _JPEG_FORMATS or img.mode not in _JPEG_MODES:
            return None
        w, h = img.size
        if w < 1 or h < 1 or w * h > (max_pixels or MAX_PIXELS):
            return None
        if preprocess is not None and preprocess.crops_first(w, h):
            return None
        orientation = _orientation(img, path) or 1
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception:  # PIL's own bomb guard, a broken header...: the PIL path reports it with its usual reason
        return None
    return np.frombuffer(bytearray(data), dtype=np.uint8), int(orientation), int(w), int(h)


def jpeg_frame(data) -> Optional[Tuple[int, int, int]]:
    """(SOF marker, bits per sample, components) of a JPEG whose first scan is followed by an end-of-image marker.

    None for anything else, notably a file cut short: entropy-coded data never contains the bytes FF D9 (FF is
    stuffed as FF 00), so a missing EOI after the first scan means missing data. This matters because the GPU
    decoder may decode a truncated file with grey fill where the PIL path reports "truncated or corrupt".
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    pos, frame = 2, None
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        if marker == 0xD9:
            return None
        length = (data[pos + 2] << 8) | data[pos + 3]
        if length < 2:
            return None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOFn (C4 DHT, C8 JPG, CC DAC are not)
            if frame is not None or pos + 10 > n:  # a second frame: hierarchical JPEG
                return None
            frame = (marker, data[pos + 4], data[pos + 9])
        elif marker == 0xDA:  # start of scan
            if frame is None or data.find(b"\xff\xd9", pos + 2 + length) < 0:
                return None
            return frame
        pos += 2 + length
    return None


@dataclass
class RawBatch:
    """One batch as workers hand it over: PIL-path pixels, raw JPEG bytes and errors, by position in the batch."""

    index: np.ndarray  # positions (into the paths) of every file of the batch, in batch order
    pixel_slots: List[int] = field(default_factory=list)  # batch positions decoded by the PIL path
    pixels: Optional[np.ndarray] = None  # uint8 (len(pixel_slots), S, S, 3)
    jpeg_slots: List[int] = field(default_factory=list)  # batch positions left to the device decoder
    jpegs: List[np.ndarray] = field(default_factory=list)  # the files' bytes
    orientations: List[int] = field(default_factory=list)
    sizes: List[Tuple[int, int]] = field(default_factory=list)  # (width, height) from the header, before rotation
    errors: List[Tuple[int, str, str]] = field(default_factory=list)  # (path position, reason, stage)


def collate_raw(items) -> RawBatch:
    """Items (index, pixels or None, reason, stage, (bytes, orientation, w, h) or None) -> RawBatch."""
    b = RawBatch(index=np.asarray([it[0] for it in items], dtype=np.int64))
    px = []
    for slot, (i, pixels, reason, stage, jpeg) in enumerate(items):
        if jpeg is not None:
            b.jpeg_slots.append(slot)
            b.jpegs.append(jpeg[0])
            b.orientations.append(jpeg[1])
            b.sizes.append((jpeg[2], jpeg[3]))
        elif pixels is not None:
            b.pixel_slots.append(slot)
            px.append(pixels)
        else:
            b.errors.append((i, reason, stage))
    b.pixels = np.stack(px) if px else None
    return b


# -- main side -------------------------------------------------------------------------------------------------------
_available: dict = {}


def device_decoding_available(device) -> Tuple[bool, str]:
    """Whether torchvision decodes JPEGs on `device` here: (ok, why not). Probed once per device with a tiny JPEG."""
    key = str(device)
    if key not in _available:
        try:
            import torch
            from PIL import Image

            buf = io.BytesIO()
            Image.new("RGB", (16, 8), (200, 40, 40)).save(buf, format="JPEG")
            out = _decode_list([torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)], device)
            ok = tuple(out[0].shape) == (3, 8, 16) and out[0].device.type == torch.device(device).type
            _available[key] = (ok, "" if ok else "unexpected output from torchvision.io.decode_jpeg")
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as exc:
            _available[key] = (False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    return _available[key]


def resolve_decoder(decoder: str, device, preprocess=None) -> str:
    """'auto' | 'pil' | 'torchvision' -> 'pil' or 'torchvision' for this device and pixel recipe.

    auto = torchvision when the device is CUDA and decoding there works, else pil (the CPU path, unchanged).
    torchvision also runs on the CPU (that is how the tests check it); asking for it where it cannot work is an error.
    """
    d = (decoder or "auto").lower()
    if d not in DECODERS:
        raise UsageError(f"--decoder must be one of {', '.join(DECODERS)}, not {decoder!r}")
    if d == "pil":
        return "pil"
    interp = getattr(preprocess, "interpolation", "bicubic")
    if d == "auto":
        if getattr(device, "type", str(device)) != "cuda" or interp not in _TORCH_INTERP:
            return "pil"
        return "torchvision" if device_decoding_available(device)[0] else "pil"
    if interp not in _TORCH_INTERP:
        raise UsageError(f"--decoder torchvision: {interp} resizing has no device equivalent; "
                         f"use --decoder pil or auto")
    ok, why = device_decoding_available(device)
    if not ok:
        raise UsageError(f"--decoder torchvision: torchvision cannot decode JPEGs on {device} here ({why}); "
                         f"use --decoder pil or auto")
    return "torchvision"


def _decode_list(tensors, device):
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():  # torchvision 0.29 flags its decoders as deprecated in favour of torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        with torch.inference_mode():
            return decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device)


def orient(img, orientation: int):
    """Apply EXIF orientation 1-8 to a C,H,W tensor, as `featx.data.decode` does with PIL's transposes."""
    import torch

    if orientation == 2:  # FLIP_LEFT_RIGHT
        return img.flip(-1)
    if orientation == 3:  # ROTATE_180
        return img.flip((-2, -1))
    if orientation == 4:  # FLIP_TOP_BOTTOM
        return img.flip(-2)
    if orientation == 5:  # TRANSPOSE
        return img.transpose(-2, -1)
    if orientation == 6:  # ROTATE_270 (PIL turns counter-clockwise: 90 degrees clockwise)
        return torch.rot90(img, -1, (-2, -1))
    if orientation == 7:  # TRANSVERSE
        return img.transpose(-2, -1).flip((-2, -1))
    if orientation == 8:  # ROTATE_90
        return torch.rot90(img, 1, (-2, -1))
    return img


def crop_geometry(w: int, h: int, preprocess) -> Tuple[int, int, int, int]:
    """(resized width, resized height, left, top) exactly as `Preprocess.resize_crop` computes them."""
    return preprocess.crop_geometry(w, h)


def resize_crop_group(x, preprocess):
    """uint8 G,3,H,W (one size) -> uint8 G,3,S,S: shorter side to `resize`, centre crop, one interpolate call.

    The whole image is resized and then cropped, so every output pixel samples the source exactly where PIL's
    resize-then-crop does (a source crop box would land between pixels and shift the sampling grid).
    """
    import torch
    import torch.nn.functional as F

    h, w = x.shape[-2:]
    s = preprocess.input_size
    nw, nh, left, top = crop_geometry(w, h, preprocess)
    if (nw, nh) != (w, h):
        mode, antialias = _TORCH_INTERP[preprocess.interpolation]
        kw = {"align_corners": False} if mode in ("bicubic", "bilinear") else {}
        y = F.interpolate(x.float(), size=(nh, nw), mode=mode, antialias=antialias, **kw)
        x = y[..., top:top + s, left:left + s].round_().clamp_(0, 255).to(torch.uint8)  # bicubic overshoots
        return x
    return x[..., top:top + s, left:left + s]


class DeviceJpegPipeline:
    """Turns a `RawBatch` into one uint8 N,S,S,3 tensor on the device, in batch order, plus the errors."""

    def __init__(self, preprocess, device, max_pixels: Optional[int] = None,
                 fallback: Optional[Callable] = None):
        self.pre = preprocess
        self.device = device
        self.max_pixels = max_pixels
        # The main-process fallback for files the device decoder rejects (the PIL path; replaceable in tests).
        self.fallback = fallback or (lambda path: pil_pixels(path, preprocess, max_pixels))
        self.stats = {"device_decoded": 0, "pil_in_workers": 0, "pil_fallback": 0, "resize_calls": 0}

    def assemble(self, raw: RawBatch, paths: Sequence):
        """-> (positions into paths, uint8 N,S,S,3 tensor on the device or None, errors), all in batch order."""
        import torch

        cuda = self.device.type == "cuda"
        pieces, piece_slots = [], []  # device tensors (k,S,S,3) and the batch positions of their rows
        errors = list(raw.errors)
        if raw.pixels is not None:
            t = torch.from_numpy(raw.pixels)
            if cuda:
                t = t.pin_memory().to(self.device, non_blocking=True)
            pieces.append(t)
            piece_slots.extend(raw.pixel_slots)
            self.stats["pil_in_workers"] += len(raw.pixel_slots)
        # Oversized resizes (extreme aspect ratios) never reach the device: the PIL path crops before resizing.
        # Workers route them there already (read_device_jpeg); this covers batches assembled elsewhere.
        rejected = [raw.jpeg_slots[k] for k, (w, h) in enumerate(raw.sizes) if self.pre.crops_first(w, h)]
        keep = [k for k, (w, h) in enumerate(raw.sizes) if not self.pre.crops_first(w, h)]
        for sub in _slices([raw.sizes[k] for k in keep], DECODE_PIXELS):
            part = [keep[j] for j in sub]
            images = self._decode([raw.jpegs[k] for k in part])
            groups: dict = {}
            for k, img in zip(part, images):
                if img is None:
                    rejected.append(raw.jpeg_slots[k])
                    continue
                img = orient(img, raw.orientations[k])
                groups.setdefault(tuple(img.shape[-2:]), []).append((raw.jpeg_slots[k], img))
            del images
            for (h, w), members in groups.items():
                nw, nh, _, _ = crop_geometry(w, h, self.pre)
                step = max(1, RESIZE_ELEMENTS // (3 * max(h * w, nh * nw)))  # upsampling: the output is larger
                for a in range(0, len(members), step):
                    chunk = members[a:a + step]
                    crops = resize_crop_group(torch.stack([m[1] for m in chunk]), self.pre)
                    pieces.append(crops.permute(0, 2, 3, 1))
                    piece_slots.extend(m[0] for m in chunk)
                    self.stats["resize_calls"] += 1
                self.stats["device_decoded"] += len(members)
        for slot in rejected:  # never dropped, never substituted: the PIL path decides
            i = int(raw.index[slot])
            px, reason, stage = self.fallback(paths[i])
            self.stats["pil_fallback"] += 1
            if px is None:
                errors.append((i, reason, stage))
                continue
            log.debug("%s: the device JPEG decoder rejected it; decoded on the CPU", paths[i])
            px = np.array(px, dtype=np.uint8)  # a writable copy: PIL's arrays are read-only
            pieces.append(torch.from_numpy(px).unsqueeze(0).to(self.device))
            piece_slots.append(slot)
        if errors:
            pos = {int(i): p for p, i in enumerate(raw.index)}
            errors.sort(key=lambda e: pos.get(int(e[0]), -1))
        if not pieces:
            return raw.index[:0], None, errors
        # One gather puts the rows back in batch order; its index goes over without a sync (pinned, non-blocking).
        slots = np.asarray(piece_slots, dtype=np.int64)
        order = np.argsort(slots, kind="stable")
        x = torch.cat(pieces) if len(pieces) > 1 else pieces[0].contiguous()  # N,S,S,3 memory: channels_last later
        if not np.array_equal(order, np.arange(len(order))):
            perm = torch.from_numpy(order)
            if cuda:
                perm = perm.pin_memory().to(self.device, non_blocking=True)
            x = x.index_select(0, perm)
        return raw.index[slots[order]], x, errors

    def _decode(self, datas):
        """Raw JPEG bytes -> list of uint8 3,H,W tensors on the device (None where the decoder rejects the file)."""
        import torch

        tensors = [torch.from_numpy(d) for d in datas]
        if not tensors:
            return []
        if self.device.type == "cuda":
            # torchvision allocates the outputs on this stream but writes them from its own stream without waiting
            # for this one (pytorch/vision PR #9606): finish every queued kernel first, so no block the caching
            # allocator recycles (e.g. the previous slice's images, freed while their resize was queued) is still
            # being read when nvJPEG overwrites it. The decoder synchronises its own stream anyway. Under the
            # prefetch thread (`featx.data.loader.Prefetcher`) "this stream" is the thread's decode stream: the wait
            # is for the decoder's own kernels, never for the network's, and the blocks the network still reads
            # are held back by `record_stream`.
            torch.cuda.current_stream(self.device).synchronize()
        try:
            return list(_decode_list(tensors, self.device))
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as exc:  # one bad file fails the whole batched call: find it by decoding one by one
            log.debug("batched JPEG decoding failed (%s); decoding one by one", exc)
        images = []
        for t in tensors:
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
            try:
                images.append(_decode_list([t], self.device)[0])
            except (KeyboardInterrupt, MemoryError):
                raise
            except Exception:
                images.append(None)
        return images


def _slices(sizes: Sequence[Tuple[int, int]], budget: int) -> List[List[int]]:
    """Consecutive runs of item numbers whose summed pixel counts stay within `budget` (at least one item each)."""
    runs, cur, total = [], [], 0
    for k, (w, h) in enumerate(sizes):
        if cur and total + w * h > budget:
            runs.append(cur)
            cur, total = [], 0
        cur.append(k)
        total += w * h
    if cur:
        runs.append(cur)
    return runs
