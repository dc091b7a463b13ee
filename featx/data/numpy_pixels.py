"""Files -> uint8 pixel batches as numpy arrays, decoded in worker processes, without torch (deployment machines).

The torch pipeline (`featx.data.loader.iter_pixels`) needs torch for its DataLoader. A machine that only runs an
exported ONNX model (`featx predict --model model.onnx`) has numpy, Pillow and onnxruntime, so this module gives the
same stream with the standard library's process pool:

- the same decoder and recipe per file (`featx.data.jpeg_batch.pil_pixels`: `load_rgb` + `Preprocess.resize_crop`),
  so the same pixels, the same skip reasons and stages, and the same batches (positions in the given order);
- results in input order, whatever order the workers finish in; a file that fails is an error for that file only;
- workers die with the main process (`featx.data.loader.die_with_parent`, as DataLoader workers do) and leave
  Ctrl-C to it, so an interrupted run prints one line, not one traceback per worker.

Nothing here imports torch (tests import this module with torch blocked).
"""
from __future__ import annotations

import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Iterator, Optional, Sequence


from .._io import safe_str
from ..errors import DataError

PREFETCH = 2  # batches queued per worker: enough to keep the model busy, bounded so memory stays flat


def iter_numpy_pixels(paths: Sequence, preprocess, *, batches: list, workers: Optional[int] = None,
                      max_pixels: Optional[int] = None) -> Iterator[tuple]:
    """Decode ``paths`` batch by batch (``batches``: lists of positions) -> (positions, pixels, errors), in order.

    ``pixels`` is a uint8 (N, S, S, 3) array (None when every file of the batch failed); ``errors`` lists
    (position, reason, stage), as `featx.data.loader.iter_pixels` with the PIL decoder gives them.
    ``workers``: decoding processes (None: `featx.devices.default_workers`; 0: decode in this process).

    Raises:
        DataError when a decoding process dies (killed by the OS, e.g. out of memory), naming the first file of the
        first batch that did not come back.
    """
    from ..devices import default_workers

    paths = [os.fspath(p) for p in paths]
    n = min(default_workers(workers), len(batches))
    if n == 0:
        for batch in batches:
            yield _decode_batch(batch, [paths[i] for i in batch], preprocess, max_pixels)
        return
    yield from _in_processes(paths, preprocess, batches, n, max_pixels)


def _in_processes(paths: list, preprocess, batches: list, n: int, max_pixels) -> Iterator[tuple]:
    # fork where the OS has it: workers start at once and inherit the imports. Not forkserver (Python 3.14's default
    # on Linux): its children's parent is the server, so die_with_parent could not watch the main process.
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    pool = ProcessPoolExecutor(max_workers=n, mp_context=ctx, initializer=_worker_init, initargs=(os.getpid(),))
    pending: list = []
    try:
        nxt = 0
        for _ in batches:
            while nxt < len(batches) and len(pending) < n * PREFETCH:
                b = batches[nxt]
                pending.append((b, pool.submit(_decode_batch, b, [paths[i] for i in b], preprocess, max_pixels)))
                nxt += 1
            batch, fut = pending.pop(0)
            try:
                yield fut.result()
            except BrokenProcessPool:
                first = safe_str(paths[batch[0]]) if batch else "?"
                raise DataError(f"a decoding process died (killed by the OS, out of memory?); the images from {first} "
                                "on were not decoded; re-run with --workers 0 to decode in one process and find the "
                                "file") from None
    finally:
        for _, fut in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


def _worker_init(parent_pid: int) -> None:
    from .loader import die_with_parent  # torch-free at import: it imports torch only inside functions

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle (one line, exit 130)
    die_with_parent(parent_pid)


def _decode_batch(positions: list, paths: list, preprocess, max_pixels) -> tuple:
    """One batch -> (positions of the good files, their stacked pixels or None, [(position, reason, stage)])."""
    from .jpeg_batch import pil_pixels, stack_batch

    return stack_batch(positions, [pil_pixels(path, preprocess, max_pixels) for path in paths])
