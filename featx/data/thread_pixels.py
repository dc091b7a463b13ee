"""Files -> uint8 pixel batches decoded by a few threads of this process: the input side of the CPU runtime.

Why threads, not DataLoader worker processes, when the network runs in onnxruntime on the CPU: Pillow releases the
GIL while it decodes and resizes, and onnxruntime releases it while it runs, so a thread pool overlaps them as well
as processes do, without starting processes, without pickling every pixel batch through a pipe, and without a
second copy of the batch. On the 2-core machine the process pipeline left the network about 3.7x torch end to end;
the decode threads plus the session get it past 4x (BENCHMARKS.md "CPU runtime").

The stream keeps what `featx.data.loader.iter_pixels` promises with the PIL decoder:

- the same decoder and recipe per file (`featx.data.jpeg_batch.pil_pixels`), so the same pixels, the same skip
  reasons and stages, and the same batches (positions in the given order, whatever order the threads finish in);
- one file that fails is an error for that file only: ``(position, reason, stage)``;
- bounded memory: at most ``threads + prefetch x batch`` images are decoded ahead of the caller;
- an exception in the caller (Ctrl-C, SIGTERM through `featx.errors.interruptible`, a write error) cancels what has
  not started; the threads finish the image in hand (milliseconds: `load_rgb` refuses oversized images first) and
  end, so nothing outlives the stream.

Nothing here imports torch.
"""
from __future__ import annotations

import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Optional, Sequence

PREFETCH = 2  # batches decoded ahead of the one the caller is working on


def default_threads(requested: Optional[int] = None, cores: Optional[int] = None) -> int:
    """Decode threads: the request (0 = decode in the caller's thread), else one per usable core up to 4.

    One per core: the decode share of the work is small (about 0.3 of a core next to the network's two on the 2-core
    machine) but bursty, and a thread blocked on a file read leaves its core to the others."""
    if requested is not None:
        if int(requested) < 0:
            from ..errors import UsageError

            raise UsageError(f"--workers must be 0 or more, not {requested}")
        return int(requested)
    if cores is None:
        from ..runtime import usable_cores  # affinity and cgroup quota, as onnxruntime's threads

        cores = usable_cores()
    return max(1, min(4, int(cores)))


def iter_thread_pixels(paths: Sequence, preprocess, *, batches: list, threads: Optional[int] = None,
                       max_pixels: Optional[int] = None, prefetch: int = PREFETCH,
                       stats: Optional[dict] = None) -> Iterator[tuple]:
    """Decode ``paths`` batch by batch (``batches``: lists of positions) -> (positions, pixels, errors), in order.

    ``pixels`` is a uint8 (N, S, S, 3) numpy array (None when every file of the batch failed); ``errors`` lists
    (position, reason, stage), exactly as `featx.data.loader.iter_pixels` gives them with the PIL decoder.
    ``threads``: decoding threads (None: `default_threads`; 0: decode in the caller's thread, one image at a time).
    ``stats`` (a dict, optional) receives seconds: ``decode_s`` and ``resize_s`` (summed over the threads: work
    done beside the network, not wall time) and ``input_wait_s`` (the caller waiting for pixels).
    """
    paths = [os.fspath(p) for p in paths]
    stats = {} if stats is None else stats
    for key in ("decode_s", "resize_s", "input_wait_s"):
        stats.setdefault(key, 0.0)
    n = default_threads(threads)
    if n == 0:
        for batch in batches:
            t0 = time.perf_counter()
            items = [_one(paths[i], preprocess, max_pixels) for i in batch]
            stats["input_wait_s"] += time.perf_counter() - t0
            yield _collect(batch, items, stats)
        return
    ahead = n + max(0, int(prefetch)) * max((len(b) for b in batches), default=1)  # images in flight at most
    from ..errors import signals_to_main_thread

    pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="featx-decode", initializer=signals_to_main_thread)
    pending: deque = deque()  # futures in input order
    todo = ((i, paths[i]) for batch in batches for i in batch)
    try:
        for batch in batches:
            while len(pending) < max(ahead, len(batch)):
                nxt = next(todo, None)
                if nxt is None:
                    break
                pending.append(pool.submit(_one, nxt[1], preprocess, max_pixels))
            t0 = time.perf_counter()
            items = [pending.popleft().result() for _ in batch]
            stats["input_wait_s"] += time.perf_counter() - t0
            yield _collect(batch, items, stats)
    finally:
        for fut in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def _one(path: str, preprocess, max_pixels) -> tuple:
    """One file -> (pixels or None, reason, stage, [decode s, resize s]), on a decode thread."""
    from .jpeg_batch import pil_pixels

    clock = [0.0, 0.0]
    px, reason, stage = pil_pixels(path, preprocess, max_pixels, clock=clock)
    return px, reason, stage, clock


def _collect(positions: list, items: list, stats: dict) -> tuple:
    from .jpeg_batch import stack_batch

    for *_, clock in items:
        stats["decode_s"] += clock[0]
        stats["resize_s"] += clock[1]
    return stack_batch(positions, [item[:3] for item in items])
