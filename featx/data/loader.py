"""The ONE DataLoader factory (extract, predict, finetune, scratch) and the pixel stream extract and predict read.

Every loader featx builds goes through :func:`make_loader`, so all of them share:

- worker count from `featx.devices.default_workers` (one default for every command);
- workers that die with the main process: a ``kill -9`` of featx must not leave workers behind (they would sit
  forever, blocked writing a batch to a pipe nobody reads). On Linux each worker asks the kernel for SIGKILL when
  its parent dies (``prctl(PR_SET_PDEATHSIG)``); elsewhere a daemon thread polls the parent's pid;
- one intra-op thread per worker (workers inherit torch's pool size; N workers x N threads oversubscribe);
- tensors through files, not file descriptors, for workers that return tensors (containers with few fds).

Extract and predict read :func:`iter_pixels`: workers decode (or only read) files, and a :class:`Prefetcher` thread
puts batch k+1 on the device while the network runs batch k.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import queue
import signal
import sys
import threading
import time
from typing import Callable, Iterator, Optional, Sequence

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
# Batches a background thread prepares ahead of the network (decoded on the device, or copied there). Two is
# enough to hide the decode of batch k+1 behind the network's batch k; more only holds more memory.
PREFETCH = 2


def iter_pixels(paths: Sequence, preprocess, *, device, batches: list, workers: Optional[int] = None,
                max_pixels: Optional[int] = None, decoder: str = "pil", prefetch: int = PREFETCH,
                stats: Optional[dict] = None) -> Iterator[tuple]:
    """Decode ``paths`` batch by batch (``batches``: lists of positions) -> (positions, pixels, errors), in order.

    ``pixels`` is a uint8 N,S,S,3 tensor on ``device`` (None when every file of the batch failed); ``errors`` lists
    (position, reason, stage). ``decoder``: "pil" decodes and resizes in the workers; "torchvision" lets workers
    ship plain JPEGs as bytes and decodes + resizes them batched on ``device`` (`featx.data.jpeg_batch`); "auto"
    picks torchvision on CUDA. Both give the same positions, errors and batches; pixels differ slightly.

    ``prefetch`` > 0: a background thread takes batches from the workers and puts them on the device (decoding
    them there for "torchvision") while the caller runs the network on the previous one; on CUDA it works on a
    stream of its own and hands each batch over with an event, so neither side waits for the other's kernels.
    0: everything in the caller's thread, one batch at a time. Same output either way. ``stats`` (a dict, optional)
    receives seconds spent: ``input_wait_s`` (caller waiting for pixels), ``loader_wait_s`` (waiting for workers),
    ``to_device_s`` (decode / upload).
    """
    from .datasets import JpegBytesDataset, PixelDataset, collate_pixels
    from .jpeg_batch import DeviceJpegPipeline, collate_raw, resolve_decoder

    on_device = resolve_decoder(decoder, device, preprocess) == "torchvision"
    ds = (JpegBytesDataset if on_device else PixelDataset)(paths, preprocess, max_pixels)
    loader = make_loader(ds, workers=workers, batch_sampler=batches,
                         collate_fn=collate_raw if on_device else collate_pixels)
    if on_device:
        pipe = DeviceJpegPipeline(preprocess, device, max_pixels)
        convert = functools.partial(_assemble, pipe, ds.paths)
    else:
        convert = functools.partial(_upload, device=device)
    stats = {} if stats is None else stats
    for key in ("input_wait_s", "loader_wait_s", "to_device_s"):
        stats.setdefault(key, 0.0)
    if prefetch > 0:
        yield from Prefetcher(loader, convert, device, depth=prefetch, stats=stats)
    else:
        yield from _inline(loader, convert, stats)
    if on_device:
        log.debug("device JPEG pipeline: %s", pipe.stats)


def _assemble(pipe, paths, raw):
    import torch

    with torch.inference_mode():
        return pipe.assemble(raw, paths)


def _upload(item, *, device):
    """A PIL-path batch (positions, uint8 array or None, errors) -> the same with the pixels on ``device``."""
    import torch

    idx, pixels, errors = item
    if pixels is None:
        return idx, None, errors
    t = torch.from_numpy(pixels)  # N,H,W,3 uint8
    if device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    return idx, t, errors


def _inline(loader, convert, stats: dict) -> Iterator[tuple]:
    """One batch at a time in the caller's thread (prefetch=0): the device decoder then synchronises before each
    decode (see `DeviceJpegPipeline._decode`), so the network and the decoder never overlap."""
    it = iter(loader)
    while True:
        t0 = time.perf_counter()
        try:
            raw = next(it)
        except StopIteration:
            return
        t1 = time.perf_counter()
        out = convert(raw)
        t2 = time.perf_counter()
        stats["loader_wait_s"] += t1 - t0
        stats["to_device_s"] += t2 - t1
        stats["input_wait_s"] += t2 - t0
        yield out


class Prefetcher:
    """Iterate ``convert(item)`` for the items of ``source`` computed ``depth`` items ahead in a background thread.

    Why a thread and not more DataLoader workers: the work left after the workers (decoding a batch on the GPU,
    pinning and uploading it) must happen in this process, which owns the CUDA context. A thread releases the GIL
    in every CUDA call, so it overlaps with the network.

    On CUDA the thread runs on a stream of its own. Each result is handed over with an event recorded after its
    kernels: the consumer's stream waits for that event (no host sync), and the pixel tensor is marked as used by
    the consumer's stream (`record_stream`), so the caching allocator does not give its memory to the decoder
    until the network has read it. The synchronisation that torchvision's decoder needs (vision#9606, see
    `DeviceJpegPipeline._decode`) then only waits for the decode stream's own kernels, in this thread.

    The source's iterator is created here, in the caller's thread: DataLoader workers are forked by the thread that
    starts them, and their parent-death signal (`die_with_parent`) is tied to that thread's life.
    """

    def __init__(self, source, convert: Callable, device, *, depth: int = PREFETCH, stats: Optional[dict] = None):
        import torch

        self.it = iter(source)
        self.convert = convert
        self.device = device
        self.queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.stop = threading.Event()
        self.stats = stats if stats is not None else {}
        for key in ("input_wait_s", "loader_wait_s", "to_device_s"):
            self.stats.setdefault(key, 0.0)
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.thread = threading.Thread(target=self._produce, daemon=True, name="featx-prefetch")

    def _produce(self) -> None:
        import torch

        try:
            with contextlib.ExitStack() as stack:
                if self.stream is not None:
                    stack.enter_context(torch.cuda.device(self.device))
                    stack.enter_context(torch.cuda.stream(self.stream))
                while not self.stop.is_set():
                    t0 = time.perf_counter()
                    try:
                        item = next(self.it)
                    except StopIteration:
                        break
                    t1 = time.perf_counter()
                    out = self.convert(item)
                    event = None
                    if self.stream is not None:
                        event = torch.cuda.Event()
                        event.record(self.stream)
                    self.stats["loader_wait_s"] += t1 - t0
                    self.stats["to_device_s"] += time.perf_counter() - t1
                    if not self._put(("item", out, event)):
                        return
            self._put(("end", None, None))
        except BaseException as exc:  # handed to the consumer, which raises it in its own thread
            self._put(("error", exc, None))

    def _put(self, msg) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(msg, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator[tuple]:
        import torch

        self.thread.start()
        try:
            while True:
                t0 = time.perf_counter()
                kind, out, event = self.queue.get()
                self.stats["input_wait_s"] += time.perf_counter() - t0
                if kind == "end":
                    return
                if kind == "error":
                    raise out
                pixels = out[1]
                if event is not None:
                    stream = torch.cuda.current_stream(self.device)
                    stream.wait_event(event)
                    if pixels is not None:
                        pixels.record_stream(stream)
                yield out
        finally:
            self.close()

    def close(self) -> None:
        """Stop the thread (it finishes the batch in hand) and let the workers go."""
        self.stop.set()
        deadline = time.monotonic() + 60  # a batch in hand takes well under a second; never hang an exit on it
        while self.thread.is_alive() and time.monotonic() < deadline:
            try:
                while True:
                    self.queue.get_nowait()
            except queue.Empty:
                pass
            self.thread.join(timeout=0.1)
        self.it = None  # the DataLoader iterator shuts its workers down when dropped


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
