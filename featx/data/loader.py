"""The ONE DataLoader factory (extract, predict, finetune, scratch) and the pixel stream extract and predict read.

Every loader featx builds goes through :func:`make_loader`, so all of them share:

- worker count from `featx.devices.default_workers` (one default for every command);
- workers that die with the main process: a ``kill -9`` of featx must not leave workers behind (they would sit
  forever, blocked writing a batch to a pipe nobody reads). On Linux each worker asks the kernel for SIGKILL when
  its parent dies (``prctl(PR_SET_PDEATHSIG)``); elsewhere a daemon thread polls the parent's pid;
- one intra-op thread per worker (workers inherit torch's pool size; N workers x N threads oversubscribe);
- tensors through files, not file descriptors, for workers that return tensors (containers with few fds).
"""
from __future__ import annotations

import functools
import logging
import os
import signal
import sys
import threading
import time
from typing import Iterator, Optional, Sequence

import numpy as np

log = logging.getLogger("featx")

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def die_with_parent(parent_pid: int) -> None:
    """Make this (worker) process end when ``parent_pid`` ends, even by SIGKILL.

    PR_SET_PDEATHSIG fires when the *thread* that forked us exits; DataLoader workers are started by the thread
    that iterates the loader, which in featx is the main thread for the life of the loader.
    """
    armed = False
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent_pid:  # the parent died before the signal was armed: it will never come
        os._exit(0)
    if not armed:
        threading.Thread(target=_poll_parent, args=(parent_pid,), daemon=True, name="featx-parent-watch").start()


def _poll_parent(parent_pid: int, every: float = 1.0) -> None:
    while os.getppid() == parent_pid:
        time.sleep(every)
    os._exit(0)


def _worker_init(parent_pid: int, _worker_id: int) -> None:
    import torch

    torch.set_num_threads(1)
    die_with_parent(parent_pid)


def make_loader(dataset, *, workers: Optional[int] = None, batch_size: Optional[int] = 1, batch_sampler=None,
                sampler=None, collate_fn=None, drop_last: bool = False, pin_memory: bool = False,
                persistent: bool = False, prefetch: int = 4, returns_tensors: bool = False):
    """A torch DataLoader over ``dataset`` with featx's worker policy (see the module docstring).

    Args:
        workers: decoding processes; None = `featx.devices.default_workers`; 0 = decode in this process.
        batch_sampler / sampler / batch_size / drop_last / collate_fn / pin_memory: as torch's DataLoader.
        persistent: keep workers between epochs (training: saves a process start-up per epoch).
        returns_tensors: the dataset's items hold tensors; they are then shared through files, not fds.
    """
    import torch

    from ..devices import default_workers, share_tensors_through_files

    n = default_workers(workers)
    if n and returns_tensors:
        share_tensors_through_files()
    kw = dict(batch_sampler=batch_sampler) if batch_sampler is not None else dict(
        batch_size=batch_size, sampler=sampler, drop_last=drop_last)
    return torch.utils.data.DataLoader(
        dataset, num_workers=n, collate_fn=collate_fn, pin_memory=pin_memory,
        worker_init_fn=functools.partial(_worker_init, os.getpid()) if n else None,
        prefetch_factor=prefetch if n else None, persistent_workers=bool(n and persistent), **kw)


# -- extract / predict: files -> uint8 pixels on the device -------------------------------------------------
def iter_pixels(paths: Sequence, preprocess, *, device, batches: list, workers: Optional[int] = None,
                max_pixels: Optional[int] = None, decoder: str = "pil") -> Iterator[tuple]:
    """Decode ``paths`` batch by batch (``batches``: lists of positions) -> (positions, pixels, errors), in order.

    ``pixels`` is a uint8 N,S,S,3 tensor on ``device`` (None when every file of the batch failed); ``errors`` lists
    (position, reason, stage). ``decoder``: "pil" decodes and resizes in the workers; "torchvision" lets workers
    ship plain JPEGs as bytes and decodes + resizes them batched on ``device`` (`featx.data.jpeg_batch`); "auto"
    picks torchvision on CUDA. Both give the same positions, errors and batches; pixels differ slightly.
    """
    import torch

    from .datasets import JpegBytesDataset, PixelDataset, collate_pixels
    from .jpeg_batch import DeviceJpegPipeline, collate_raw, resolve_decoder

    on_device = resolve_decoder(decoder, device, preprocess) == "torchvision"
    ds = (JpegBytesDataset if on_device else PixelDataset)(paths, preprocess, max_pixels)
    loader = make_loader(ds, workers=workers, batch_sampler=batches,
                         collate_fn=collate_raw if on_device else collate_pixels)
    if on_device:
        pipe = DeviceJpegPipeline(preprocess, device, max_pixels)
        for raw in loader:
            # Synchronous: the previous batch's results were copied back (finishing every kernel) before the
            # decoder, which writes on its own stream, is handed memory the caching allocator recycled.
            with torch.inference_mode():
                yield pipe.assemble(raw, ds.paths)
        log.debug("device JPEG pipeline: %s", pipe.stats)
        return
    cuda = device.type == "cuda"
    for idx, pixels, errors in loader:
        if pixels is None:
            yield idx, None, errors
            continue
        t = torch.from_numpy(pixels)  # N,H,W,3 uint8
        if cuda:
            t = t.pin_memory().to(device, non_blocking=True)
        yield idx, t, errors


# -- finetune / scratch: decode everything once --------------------------------------------------------------
def decode_all(records: list, pp, *, mode: str = "crop", shorter: int = 0, workers: Optional[int] = None,
               on_progress=None) -> tuple[list, list, list]:
    """Decode every record once, in parallel. -> (arrays, kept record indices, skipped [(relpath, reason)])."""
    from .datasets import DecodeDataset, identity_collate

    ds = DecodeDataset([r.path for r in records], pp, mode, shorter)
    loader = make_loader(ds, workers=workers, batch_size=16, collate_fn=identity_collate)
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
    """uint8 RGB bytes of ``n`` images ``side`` px square (times ``aspect`` for uncropped ones)."""
    return int(n * 3 * side * side * aspect)


def stack_uint8(arrays: list):
    """List of HWC uint8 arrays (same size) -> NCHW uint8 tensor."""
    import torch

    if not arrays:
        return torch.zeros((0, 3, 1, 1), dtype=torch.uint8)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
