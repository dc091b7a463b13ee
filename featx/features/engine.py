"""The extraction engine: pixels from `featx.data` -> network on the device -> features, in input order, resumable.

Design notes (the why):
- The input side (discovery, decoding in workers, the device JPEG decoder, the DataLoader) lives in `featx.data`;
  this module runs the network: normalise on the device, forward, halve the batch on CUDA out-of-memory.
- A file that fails to decode is reported with its reason and gets no row; no other file's pixels are substituted.
- Work is cut into fixed chunks of files. Each finished chunk is written atomically into ``OUTPUT.partial/``, so a
  killed run resumes where it stopped; batches never straddle chunks, so a resumed run computes exactly the
  batches an uninterrupted one would (bit-identical features on the CPU).
- One run per output: an OS lock beside the output (`featx._io.OutputLock`) is held for the run's life; a second
  run refuses at once, naming the first. The OS drops the lock when a process dies, so it is never stale.
- A run that did no work leaves nothing behind: on failure ``OUTPUT.partial/`` is removed unless it holds a
  finished chunk worth resuming (a folder of garbage removes it whatever it holds: nothing there is worth keeping).
- Under torchrun, ranks take chunks round-robin and rank 0 assembles the single store.
- A sharded store (`featx.features.sharded`, a folder) is written by independent workers instead: `--shard I/N` (or
  torchrun's RANK / WORLD_SIZE) takes chunks c with c % N == I, writes each as its own shard file and a part
  manifest, with no process group and no shared file; the last worker to finish merges the parts.

`extract_features` = check -> claim the output -> plan chunks -> run them -> assemble the store.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence, Union

import numpy as np

from .._io import atomic_write, claim_outputs, fingerprint, refuse_inside, safe_str, sweep_stale_temps, written_by_featx
from ..errors import DataError, FeatxError, StrictModeError, UsageError
from . import reuse
from .sizing import SizeChoice, choose_image_size, parse_image_size
from .store import DEFAULT_FEATURES_PATH, FORMAT, FeatureSet, read_meta, read_npz, save_features

log = logging.getLogger("featx")

# A folder whose first GARBAGE_WINDOW files all fail is almost surely not an image folder: stop early.
GARBAGE_WINDOW = 64
RESUME_HINT = "finished chunks were kept; re-run the same command to resume"


# -- running a network over pixels ------------------------------------------------------------------------------
@dataclass
class Batch:
    indices: np.ndarray  # positions (into the given paths) of the images that produced outputs
    outputs: np.ndarray  # float32, one row per index
    errors: list  # (position, reason, stage) for files that failed


def default_batch_size(device) -> int:
    """256 on CUDA (fills the GPU), 32 on the CPU (measured fastest on a 2-core machine: 15 img/s vs 12-14 at 64)."""
    return 256 if device.type == "cuda" else 32


def iter_outputs(
    paths: Sequence,
    preprocess,
    fn: Callable,
    *,
    device,
    batches: Optional[list] = None,
    batch_size: int = 64,
    workers: Optional[int] = None,
    precision: str = "auto",
    max_pixels: Optional[int] = None,
    decoder: str = "pil",
    prefetch: Optional[int] = None,
    defer_copy: bool = True,
    stats: Optional[dict] = None,
) -> Iterator[Batch]:
    """Decode `paths` in workers and run `fn` (normalised float batch -> (N, K) tensor) on `device`, in order.

    `batches` (lists of positions) fixes the batch layout; otherwise consecutive runs of `batch_size`.
    CUDA out-of-memory retries the same images in halves, so the output does not depend on the memory left.
    `decoder`: pil | torchvision | auto, see `featx.data.loader.iter_pixels` (same rows, errors and batches).
    A network that takes uint8 pixels on the CPU (the onnxruntime runtime) is fed by decode threads instead of
    worker processes (`_iter_threaded`; ``workers`` then counts threads); the rows, errors and batches are the same.

    The pipeline (each part switchable, for measuring it; the output is the same whatever the switches):
    `prefetch` batches are put on the device by a background thread while the network runs (None: the default
    `featx.data.loader.PREFETCH`; 0: in this thread). `defer_copy`: batch k's outputs are copied to pinned host
    memory without waiting, and handed out once batch k+1 is queued on the device, so the host never waits for
    the GPU inside the loop except for that copy; False: each batch's outputs are copied back before the next
    starts. `stats` (a dict, optional) receives seconds: ``input_wait_s``, ``loader_wait_s``, ``to_device_s`` (see
    `iter_pixels`) and ``output_wait_s`` (waiting for the outputs to reach the host: the network's time not
    hidden behind the input side).
    """
    from ..data.loader import PREFETCH, iter_pixels

    if batches is None:
        batches = [list(range(s, min(s + batch_size, len(paths)))) for s in range(0, len(paths), batch_size)]
    stats = {} if stats is None else stats
    if _on_threads(fn, device, decoder, preprocess):
        yield from _iter_threaded(paths, preprocess, fn, batches=batches, workers=workers, max_pixels=max_pixels,
                                  prefetch=prefetch, stats=stats)
        return
    stats.setdefault("output_wait_s", 0.0)
    norm = normalizer(preprocess, device)
    pending = None
    for idx, pixels, errors in iter_pixels(paths, preprocess, device=device, batches=batches, workers=workers,
                                           max_pixels=max_pixels, decoder=decoder,
                                           prefetch=PREFETCH if prefetch is None else prefetch, stats=stats):
        if pixels is None:
            ready = _Outputs(idx, None, errors, device)
        else:
            ready = _Outputs(idx, _forward(fn, norm, pixels, device, precision), errors, device)
        if not defer_copy:
            yield ready.batch(stats)
            continue
        if pending is not None:  # batch k-1 waits for its copy only now that batch k is queued behind it
            yield pending.batch(stats)
        pending = ready
    if pending is not None:
        yield pending.batch(stats)


def _on_threads(fn, device, decoder, preprocess) -> bool:
    """Does this run decode in threads (`featx.data.thread_pixels`) rather than DataLoader worker processes?
    Yes for a network that takes uint8 pixels on the CPU (onnxruntime, `featx.runtime`) with the PIL decoder: the
    session and Pillow both release the GIL, so threads overlap them without pickling a batch between processes.
    ``--runtime torch`` keeps the worker processes (its input side is unchanged)."""
    from ..data.jpeg_batch import resolve_decoder
    from ..runtime import takes_pixels

    return takes_pixels(fn) and getattr(device, "type", str(device)) == "cpu" and \
        resolve_decoder(decoder, device, preprocess) == "pil"


def _iter_threaded(paths, preprocess, fn, *, batches, workers, max_pixels, prefetch, stats) -> Iterator[Batch]:
    """The CPU runtime's loop: decode threads feed ``fn`` (uint8 NHWC numpy -> float32 numpy) in this thread.
    ``workers`` counts decode threads here (0: decode in this thread). ``stats`` also gets ``network_s``."""
    from ..data.thread_pixels import PREFETCH as AHEAD, iter_thread_pixels

    stats.setdefault("network_s", 0.0)
    for idx, pixels, errors in iter_thread_pixels(paths, preprocess, batches=batches, threads=workers,
                                                  max_pixels=max_pixels, stats=stats,
                                                  prefetch=AHEAD if prefetch is None else prefetch):
        if pixels is None:
            yield Batch(idx, np.zeros((0, 0), np.float32), errors)
            continue
        t0 = time.perf_counter()
        out = fn(pixels)
        stats["network_s"] += time.perf_counter() - t0
        yield Batch(idx, np.asarray(out, dtype=np.float32), errors)


class _Outputs:
    """One batch's outputs on their way to the host: on CUDA a non-blocking copy into pinned memory, and an event
    that says when it landed; elsewhere the tensor itself."""

    def __init__(self, idx, out, errors, device):
        self.idx, self.errors, self.event = idx, errors, None
        self.out = out
        if out is not None and device.type == "cuda":
            import torch

            host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            host.copy_(out, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
            self.out = host

    def batch(self, stats: dict) -> Batch:
        if self.out is None:
            return Batch(self.idx, np.zeros((0, 0), np.float32), self.errors)
        if isinstance(self.out, np.ndarray):  # onnxruntime's outputs (featx.runtime)
            return Batch(self.idx, self.out.astype(np.float32, copy=False), self.errors)
        if self.event is not None:
            t0 = time.perf_counter()
            self.event.synchronize()
            stats["output_wait_s"] += time.perf_counter() - t0
        return Batch(self.idx, self.out.numpy().astype(np.float32, copy=False), self.errors)


def normalizer(preprocess, device) -> Callable:
    """``preprocess.normalize`` with its mean/std tensors put on ``device`` once.

    `Preprocess.normalize` builds them on every call: a copy from pageable host memory that makes the host wait for
    the GPU, once per batch. Same arithmetic, same values (tests check it is bit-identical).
    """
    import torch

    mean = (torch.tensor(preprocess.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0).to(device)
    std = (torch.tensor(preprocess.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0).to(device)

    def norm(x):
        return (x.float() - mean) / std

    return norm


def _forward(fn, norm, pixels, device, precision):
    """uint8 N,S,S,3 on the device -> float32 outputs on the device (queued, not waited for); a network that takes
    pixels itself (onnxruntime, `featx.runtime`) gets them as they are and returns numpy."""
    import torch

    from ..runtime import takes_pixels

    if takes_pixels(fn):
        return fn(pixels)
    x = norm(pixels.permute(0, 3, 1, 2))  # NCHW view, channels_last strides: what cuDNN likes
    if device.type != "cuda":
        x = x.contiguous()
    with torch.inference_mode():
        return _run_halving(fn, x, device, precision)


def _run_halving(fn, x, device, precision):
    import torch

    from ..devices import autocast, is_cuda_oom

    try:
        with autocast(device, precision):
            return fn(x).float()
    except Exception as exc:
        if not is_cuda_oom(exc):
            raise
        if len(x) == 1:
            raise FeatxError("CUDA out of memory even at batch size 1; use --device cpu or a smaller --image-size") from None
        torch.cuda.empty_cache()
        fn = getattr(fn, "eager", fn)  # a compiled network pads every batch back to full size: retry without it
        half = len(x) // 2
        return torch.cat([_run_halving(fn, x[:half], device, precision), _run_halving(fn, x[half:], device, precision)])


def compile_forward(fn: Callable, batch_size: int, backend: str = "inductor") -> Callable:
    """``torch.compile(fn)`` for one batch shape: a smaller batch (the last of a chunk) is padded with zeros to
    ``batch_size`` and its outputs cut back, so the network is compiled once, not once per batch size.

    Padding changes no output row: in eval mode every layer treats images independently.
    """
    import torch

    compiled = torch.compile(fn, backend=backend, dynamic=False)

    def run(x):
        n = len(x)
        if n >= batch_size:
            return compiled(x)
        if x.is_contiguous():
            full = x.new_zeros((batch_size, *x.shape[1:]))
        else:  # channels_last (N,C,H,W view of N,H,W,C memory): the same strides, or the graph is compiled again
            n_, c, h, w = x.shape
            full = x.new_zeros((batch_size, h, w, c)).permute(0, 3, 1, 2)
        full[:n].copy_(x)
        return compiled(full)[:n]

    run.eager = fn  # what an out-of-memory retry in halves runs (`_run_halving`)
    return run


def prepare_model(model, device):
    """Eval mode on the device; channels_last on CUDA (faster convolutions with tensor cores)."""
    import torch

    model.eval().to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model


# -- how large a batch the memory allows ----------------------------------------------------------------------
# Peak inference memory per image is about 4x the network's largest single activation: measured (CPU, batch 32,
# ru_maxrss) 23 MB/img for efficientnet_lite0 at 256 px (largest activation 6.0 MB), 7.0 for convnext_atto at 224
# (1.9 MB), 6.4 for tv/resnet18 at 224 (3.1 MB, so 4x overestimates there: a safe side to err on).
ACTIVATION_FACTOR = 4
CHECK_ABOVE = 64  # batches up to this size are never probed (the defaults are 32 on the CPU and 256 on CUDA)


def available_memory() -> Optional[int]:
    """Bytes of RAM the OS says are available now (Linux MemAvailable), or None when unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _largest_activation(model, size: int) -> int:
    """Bytes of the largest output of any leaf module for one image (one forward pass at batch 1)."""
    import torch

    largest = [0]

    def hook(_m, _a, out):
        if torch.is_tensor(out):
            largest[0] = max(largest[0], out.numel() * out.element_size())

    handles = [m.register_forward_hook(hook) for m in model.modules() if not any(True for _ in m.children())]
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, size, size, device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    return largest[0]


def cap_batch_size(batch_size: int, model, preprocess, device, *, workers: int, n_images: int,
                   largest_activation: Optional[Callable[[], int]] = None) -> tuple[int, Optional[str]]:
    """-> (batch size that fits in RAM, warning or None). A batch never exceeds ``n_images`` anyway.

    Counted: uint8 batches waiting in workers (prefetch 4 each), the float input and, on the CPU, the network's
    activations. CUDA memory is not counted: an out-of-memory there halves the batch (`iter_outputs`).
    ``largest_activation``: () -> bytes, for a model that is not a torch module (an ONNX session; `model` unused).
    """
    want = min(batch_size, max(1, n_images))
    free = available_memory()
    if want <= CHECK_ABOVE or not free:
        return want, None
    side = preprocess.input_size
    pixels = 3 * side * side
    # (the prefetch thread's queue holds up to `featx.data.loader.PREFETCH` more uint8 batches: small next to the
    # float input and the activations, and inside the half of the free memory left unclaimed below)
    per_image = pixels * (4 * workers + 1) + pixels * 4
    if device.type != "cuda":
        largest = largest_activation() if largest_activation else _largest_activation(model, side)
        per_image += ACTIVATION_FACTOR * largest
    cap = max(1, int(free * 0.5 // per_image))
    if want <= cap:
        return want, None
    return cap, (f"--batch-size {batch_size} would need about {want * per_image / 2**30:.1f} GB of memory here "
                 f"({free / 2**30:.1f} GB available); using batches of {cap}")


# -- extraction with resume ------------------------------------------------------------------------------------
@dataclass
class ExtractResult:
    path: Optional[Path]
    n_images: int
    n_skipped: int
    feature_dim: int
    seconds: float
    images_per_s: float
    device: str
    backbone: str
    skipped: list = field(default_factory=list)
    leakage: list = field(default_factory=list)
    resumed_images: int = 0
    warnings: list = field(default_factory=list)
    decoder: str = "pil"  # the input pipeline that ran: "pil" (CPU) or "torchvision" (batched on the device)
    # Where the loop's time went, in seconds (see `iter_outputs`): input_wait_s (the network waiting for pixels),
    # loader_wait_s (waiting for the workers), to_device_s (device decode / upload), output_wait_s (waiting for the
    # GPU), write_s (chunk files). input_wait_s large: input-bound; output_wait_s large: network-bound.
    timings: dict = field(default_factory=dict)
    # how the crop size was chosen (`featx.features.sizing.SizeChoice`: mode, size, default, median_short_side, ...)
    image_size: dict = field(default_factory=dict)
    runtime: str = "torch"  # the engine that ran the network: "torch" | "onnxruntime" (featx.runtime)
    # the output already held this very extraction (same folder, options and files): nothing ran (`reuse`)
    already_complete: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path) if self.path else None
        return d


@dataclass
class _Plan:
    """Which chunks exist, which are finished, which this rank computes, and the batches that compute them."""

    root: Path
    folder: object  # ImageFolder
    part: Path  # OUTPUT.partial: job.json + finished chunks
    chunk_size: int
    n_chunks: int
    done: set  # chunks finished by an earlier run
    mine: list  # chunks this rank computes now
    rank: int = 0
    world: int = 1
    job: dict = field(default_factory=dict)  # what the chunks were computed from (job.json)

    @property
    def n(self) -> int:
        return len(self.folder.records)

    def size(self, c: int) -> int:
        return min(self.chunk_size, self.n - c * self.chunk_size)

    def batches(self, batch_size: int) -> tuple[list, list]:
        """Batches of positions for this rank's chunks (never straddling a chunk), and the chunk of each."""
        batches, chunk_of = [], []
        for c in self.mine:
            lo, hi = c * self.chunk_size, c * self.chunk_size + self.size(c)
            for s in range(lo, hi, batch_size):
                batches.append(list(range(s, min(s + batch_size, hi))))
                chunk_of.append(c)
        return batches, chunk_of


def extract_features(
    images,
    output=DEFAULT_FEATURES_PATH,
    *,
    backbone="efficientnet_lite0",
    pretrained: bool = True,
    weights=None,
    layer: Optional[str] = None,
    device: str = "auto",
    batch_size: Optional[int] = None,
    workers: Optional[int] = None,
    precision: str = "auto",
    chunk_size: int = 1024,
    strict: bool = False,
    overwrite: bool = False,
    max_pixels: Optional[int] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    decoder: str = "auto",
    image_size: Union[int, str, None] = None,
    compile: Union[bool, str] = False,
    prefetch: Optional[int] = None,
    defer_copy: bool = True,
    format: Optional[str] = None,
    shard=None,
    dtype: Optional[str] = None,
    runtime: str = "auto",
    threads: Optional[int] = None,
) -> ExtractResult:
    """Extract features for every image under `images` and write one feature store at `output`.

    Args:
        images: a folder (class subfolders give labels; train/ and val/ or test/ give splits; flat = unlabeled).
        output: the .npz to write (atomically). Re-running after an interruption resumes from finished chunks.
        backbone: a name (see `featx models`) or a ready `Backbone`.
        device: auto | cpu | cuda. batch_size: default 32 on CPU, 256 on CUDA (capped to what RAM holds).
        workers: decoding processes (default `featx.devices.default_workers`).
        chunk_size: images per resumable chunk (also the unit of sharding under torchrun).
        strict: any skipped file or folder raises StrictModeError (finished chunks are kept; no store is written).
        overwrite: allow replacing an existing file that is not a featx features store.
        progress: callback(done_images, total_images).
        decoder: auto | pil | torchvision. auto = JPEGs decoded and resized batched on the GPU when the device is
            CUDA and torchvision can decode there, else pil (CPU decoding in the workers). Recorded in
            meta["decoder"]; not part of the provenance fingerprint (the two paths give interchangeable features).
        image_size: None (default): the backbone's own crop size; an int: that size; "auto": the backbone's own
            unless the images are small, then a smaller crop chosen from the median shorter side of a sample of them
            (`featx.features.sizing`; not the default: it saved time but no accuracy on small photos, BENCHMARKS.md
            "Small images"). Same resize/crop ratio either way; recorded in the store, how it was chosen in
            meta["image_size"].
        compile: ``torch.compile`` the network (True: inductor; a string names another backend). Pays on long runs
            only: compiling takes tens of seconds (see BENCHMARKS.md for the measured gain).
        prefetch, defer_copy: the pipeline's parts, switchable to measure each (`iter_outputs`); the defaults are
            the fast path, and the features do not depend on them.
        format: npz | parquet | sharded (default: from `output`, `featx.features.formats.format_of`: a folder or a
            path ending in "/" is sharded, .parquet is Parquet, else .npz).
        shard: "I/N" or (I, N): this worker computes every N-th chunk from the I-th into a sharded store, and the last
            of the N workers merges their manifests (default under torchrun with a sharded output: RANK/WORLD_SIZE).
        dtype: float32 (default) | float16 storage (npz and sharded stores).
        runtime: auto | torch | onnx (`featx.runtime`): auto = onnxruntime on the CPU (a graph built once and cached,
            checked against torch), torch on CUDA. Recorded in meta["runtime"]; not part of the provenance
            fingerprint: features from either agree within 1e-4, so heads fit on one apply to the other, and an
            interrupted run resumes under the other runtime.
        threads: onnxruntime's threads (default: the cores this process may use).

    Ctrl-C raises KeyboardInterrupt after the finished chunks were written (the CLI turns it, and SIGTERM, into
    exit 130 / 143 with a resume hint).
    """
    from ..data.discover import discover
    from ..devices import setup_distributed
    from . import formats
    from ..runtime import resolve_runtime, resolve_threads

    t0 = time.perf_counter()
    root = Path(images)
    fmt = formats.format_of(output, format)
    output = Path(output)
    store = _Store(fmt, formats.check_dtype(fmt, dtype), _shard_of(shard, fmt), overwrite)
    image_size = parse_image_size(image_size)  # an absurd size is refused before the folder is even listed
    folder = discover(root)
    refuse_inside(output, root)
    _check_options(chunk_size, decoder, prefetch)
    if threads is not None:
        resolve_threads(threads)
    if compile and str(runtime or "auto").lower() == "onnx":
        raise UsageError("--compile compiles the torch network; it does not apply to --runtime onnx")
    dist, dev = setup_distributed(device) if store.shard is None else _independent(device)
    try:
        with _claim(store.target(output), overwrite, dist, store.recogniser()):
            if strict and folder.skipped:  # known before any work: fail before loading a model
                raise _strict_error(folder.skipped)
            old = None if overwrite else reuse.existing_store(output, fmt)
            stamp = {"request": reuse.request_key(backbone, pretrained=pretrained, weights=weights, layer=layer,
                                                  image_size=image_size, max_pixels=max_pixels),
                     "files": reuse.files_key(folder)}
            if reuse.is_complete(old, root, stamp["request"], stamp["files"]):
                return _complete(old, output, t0)
            reuse.refuse_other_folder(old, output, root, backbone)
            bb, size_choice = _backbone(backbone, pretrained, weights, layer, image_size, folder)
            reuse.refuse_other_backbone(old, output, bb.meta())
            run = _RunOptions(precision=precision, max_pixels=max_pixels, decoder=decoder, compile=compile,
                              prefetch=prefetch, defer_copy=defer_copy,
                              runtime=resolve_runtime("torch" if compile else runtime, dev), threads=threads, stamp=stamp)
            return _extract(folder, root, output, bb, dev, dist, t0, batch_size=batch_size, workers=workers,
                            chunk_size=chunk_size, strict=strict, progress=progress, run=run, size_choice=size_choice,
                            store=store)
    finally:
        dist.cleanup()


@dataclass
class _RunOptions:
    """How the loop runs (not what it computes): precision, decoder, the pipeline's switches."""

    precision: str = "auto"
    max_pixels: Optional[int] = None
    decoder: str = "auto"
    compile: Union[bool, str] = False
    prefetch: Optional[int] = None
    defer_copy: bool = True
    runtime: str = "torch"  # resolved (featx.runtime.resolve_runtime): "torch" | "onnx"
    threads: Optional[int] = None
    ran: Optional[str] = None  # the engine that ran the network: "torch" | "onnxruntime" (featx.runtime.runtime_of)
    stamp: dict = field(default_factory=dict)  # the request and file listing, kept in meta (`reuse`)


def _complete(meta: dict, output: Path, t0: float) -> ExtractResult:
    """The summary of a store that already holds this extraction, read from its meta (nothing was run)."""
    skipped = list(meta.get("skipped") or [])
    return ExtractResult(
        path=output, n_images=int(meta.get("n_images", 0)), n_skipped=len(skipped),
        feature_dim=int(meta.get("feature_dim") or 0), seconds=round(time.perf_counter() - t0, 3), images_per_s=0.0,
        device=str(meta.get("device", "")), backbone=str(meta.get("backbone", "")), skipped=skipped,
        leakage=list(meta.get("leakage") or []), warnings=[],
        decoder=str(meta.get("decoder", "pil")), image_size=dict(meta.get("image_size") or {}), already_complete=True,
        runtime=str(meta.get("runtime") or "torch"))


@dataclass
class _Store:
    """What the run writes: the format, the features' dtype, and for a sharded store this worker's (I, N)."""

    fmt: str = "npz"
    dtype: str = "float32"
    shard: Optional[tuple] = None
    overwrite: bool = False

    def target(self, output: Path) -> Path:
        """The file this run claims and locks: the store, or in a sharded store this worker's part manifest."""
        if self.shard is None:
            return output
        from .sharded import check_folder, part_name

        check_folder(output, self.overwrite)
        return output / part_name(*self.shard)

    def recogniser(self):
        if self.shard is None and self.fmt != "npz":  # a Parquet store featx wrote may be replaced as an npz one may
            from . import formats

            return formats.recogniser(self.fmt)
        if self.shard is None:
            return is_features_store
        from .sharded import sharded_written_by_featx

        return sharded_written_by_featx


def _shard_of(shard, fmt: str) -> Optional[tuple]:
    """(I, N) for a sharded store: --shard, else torchrun's RANK / WORLD_SIZE, else (0, 1); None for one file."""
    from ..devices import dist_env
    from .sharded import parse_shard

    if fmt != "sharded":
        if shard is not None:
            raise UsageError("--shard writes a sharded store (a folder): pass --format sharded or an -o folder")
        return None
    parsed = parse_shard(shard)
    if parsed is None:
        env = dist_env()
        parsed = (env.rank, env.world_size) if env.enabled else (0, 1)
    return parsed


def _independent(device: str):
    """A worker of a sharded run: no process group (collectives are identities), its device by LOCAL_RANK."""
    from ..devices import Dist, dist_env, resolve_device

    env = dist_env()
    return Dist(), resolve_device(device, env.local_rank if env.enabled else None)


def _extract(folder, root, output, bb, dev, dist, t0, *, batch_size, workers, chunk_size, strict, progress,
             run: _RunOptions, size_choice: SizeChoice, store: Optional[_Store] = None) -> ExtractResult:
    """Plan, run and assemble with the output claimed; cleans up a partial folder that holds nothing to resume."""
    from ..data.jpeg_batch import resolve_decoder
    from ..devices import default_workers
    from ..runtime import network_for, runtime_of

    store = store or _Store()
    decoder = run.decoder = resolve_decoder(run.decoder, dev, bb.preprocess)
    plan = _plan_chunks(folder, root, store.target(output), bb, chunk_size, run.max_pixels, decoder, dist,
                        select=store.shard)
    warnings = _notes(folder)
    timings: dict = {}
    try:
        t_run = time.perf_counter()  # throughput counts the extraction loop, not model loading
        if plan.mine:
            nw = default_workers(workers)
            model = prepare_model(bb.model, dev)
            bsize, note = cap_batch_size(batch_size or default_batch_size(dev), model, bb.preprocess, dev,
                                         workers=nw, n_images=plan.n)
            warnings += [note] if note else []
            fn = bb.forward_features
            if run.compile:
                fn = compile_forward(fn, bsize, "inductor" if run.compile is True else str(run.compile))
            else:
                fn = network_for(fn, model, bb.preprocess, dev, runtime=run.runtime, threads=run.threads,
                                 what=f"features of {bb.name} at {bb.layer}")
            _run_chunks(plan, bb.preprocess, fn, dev, bsize, nw, run, progress, timings)
            run.ran = runtime_of(fn)
        dist.barrier()
        if not dist.is_main:
            dist.barrier()
            return ExtractResult(path=output, n_images=0, n_skipped=0, feature_dim=bb.feature_dim,
                                 seconds=time.perf_counter() - t0, images_per_s=0.0, device=str(dev), backbone=bb.name,
                                 decoder=decoder, timings=_rounded(timings), image_size=size_choice.to_dict())
        try:
            ran = run.ran or ("onnxruntime" if run.runtime == "onnx" else "torch")
            if store.shard is not None:
                res = _assemble_shards(plan, output, bb, dev, decoder, strict, t0, t_run, warnings, size_choice,
                                       store, ran, run.stamp)
            else:
                res = _assemble(plan, output, bb, dev, decoder, strict, t0, t_run, warnings, size_choice, store,
                                ran, run.stamp)
            res.timings = _rounded(timings)
        finally:
            dist.barrier()
        return res
    except BaseException as exc:
        if dist.is_main:
            _drop_debris(plan.part, everything=isinstance(exc, _Garbage))
        raise


class _Garbage(DataError):
    """The folder's first files all failed: nothing finished is worth keeping."""


def _rounded(timings: dict) -> dict:
    return {k: round(float(v), 3) for k, v in timings.items()}


def _check_options(chunk_size: int, decoder: str, prefetch: Optional[int]) -> None:
    from ..data.jpeg_batch import DECODERS

    if chunk_size < 1:
        raise UsageError("chunk size must be at least 1")
    if prefetch is not None and prefetch < 0:
        raise UsageError(f"prefetch must be 0 or more, not {prefetch}")
    if (decoder or "auto").lower() not in DECODERS:  # before the model loads
        raise UsageError(f"--decoder must be one of {', '.join(DECODERS)}, not {decoder!r}")


def _backbone(backbone, pretrained, weights, layer, image_size, folder):
    """-> (the Backbone to run, at the size `image_size` resolves to; SizeChoice). A ready `Backbone`'s own crop
    size is the "default" that auto starts from."""
    from ..backbones import Backbone, create_backbone

    if not isinstance(backbone, Backbone):
        backbone = create_backbone(backbone, pretrained=pretrained, weights=weights, layer=layer)
    choice = choose_image_size([r.path for r in folder.records], backbone.preprocess, image_size)
    if choice.size != backbone.preprocess.input_size:
        backbone = dataclasses.replace(backbone, preprocess=backbone.preprocess.with_size(choice.size))
    return backbone, choice


def _notes(folder) -> list:
    """The folder's warnings, minus the ones that announce a skip (those are listed with the skipped files)."""
    skip_lines = set(getattr(folder, "skip_warnings", ()))
    return [w for w in folder.warnings if w not in skip_lines]


# -- claiming the output -----------------------------------------------------------------------------------------
def is_features_store(path: Path) -> bool:
    """A featx feature store (its meta says so); used to decide what may be replaced without --overwrite."""
    meta = read_meta(path)  # reads only the meta member, under featx's zip caps
    return bool(meta) and meta.get("format") == FORMAT


@contextlib.contextmanager
def _claim(output: Path, overwrite: bool, dist, recognise=None):
    """Check (a foreign file, a folder, an unwritable place) and lock the output for the run; rank 0 does it and
    tells every rank the verdict, so all of them fail together with the same message."""
    stack = contextlib.ExitStack()
    failure = None
    if dist.is_main:
        try:
            recognise = recognise or is_features_store
            if output.is_file() and not overwrite and not written_by_featx(output, recognise):
                raise UsageError(f"{safe_str(str(output))} exists and is not a featx features file; refusing to "
                                 "overwrite it (pass --overwrite)")
            stack.enter_context(claim_outputs({output: recognise}, overwrite=overwrite))
        except FeatxError as exc:
            failure = exc
    verdict = dist.broadcast_object(None if failure is None else (str(failure), failure.exit_code))
    if failure is not None:
        raise failure
    if verdict is not None:
        raise FeatxError(verdict[0], exit_code=verdict[1])
    with stack:
        yield


# -- plan ---------------------------------------------------------------------------------------------------------
def _plan_chunks(folder, root, output, bb, chunk_size, max_pixels, decoder, dist, select=None) -> _Plan:
    """The chunks, and those this process computes: rank r of torchrun's w, or worker I of N (`select`)."""
    records = folder.records
    meta = bb.meta()
    job = {
        "meta": fingerprint({k: meta[k] for k in ("backbone", "weights_sha256", "preprocess", "layer")}),
        "chunk_size": chunk_size,
        "files": fingerprint([(r.relpath, *_stat_key(r.path)) for r in records]),
        "max_pixels": max_pixels,
    }
    if decoder != "pil":  # resumed chunks come from the decoder meta["decoder"] names; pil jobs keep their old key
        job["decoder"] = decoder
    part = output.with_name(output.name + ".partial")
    if dist.is_main:
        sweep_stale_temps(output.parent, output.name)
        _open_partial(part, job)
    dist.barrier()
    n = len(records)
    n_chunks = (n + chunk_size - 1) // chunk_size
    done = {c for c in range(n_chunks) if (part / _chunk_name(c)).is_file()}
    rank, world = select or (dist.rank, dist.world_size)
    mine = [c for c in range(n_chunks) if c % world == rank and c not in done]
    return _Plan(root=root, folder=folder, part=part, chunk_size=chunk_size, n_chunks=n_chunks, done=done, mine=mine,
                 rank=rank, world=world, job=job)


_OURS = re.compile(r"(chunk-\d{6}\.npz|job\.json|\.featx-tmp-.*)")


def _open_partial(part: Path, job: dict) -> None:
    """Reuse finished chunks of the same job; start afresh (our own folder only) when anything changed."""
    job_file = part / "job.json"
    if part.is_dir():
        try:
            same = json.loads(job_file.read_text()) == job
        except (OSError, ValueError):
            same = False
        if same:
            for p in part.glob(".featx-tmp-*"):  # a chunk write cut short by SIGKILL
                p.unlink(missing_ok=True)
            return
        foreign = [p.name for p in part.iterdir() if not _OURS.fullmatch(p.name)]
        if foreign:  # only names featx writes there may be deleted: anything else is the user's
            raise UsageError(f"{safe_str(str(part))} exists and holds files featx did not write "
                             f"(e.g. {safe_str(foreign[0])}); move it away first")
        shutil.rmtree(part)
    elif part.exists():
        raise UsageError(f"{safe_str(str(part))} exists and is not a folder featx made; move it away first")
    part.mkdir(parents=True)
    with atomic_write(job_file, "w") as fh:
        json.dump(job, fh)


def _drop_debris(part: Path, everything: bool = False) -> None:
    """After a failed run: remove OUTPUT.partial unless it holds a finished chunk worth resuming."""
    try:
        if part.is_dir() and (everything or not any(part.glob("chunk-*.npz"))):
            shutil.rmtree(part, ignore_errors=True)
    except OSError:
        pass


# -- run ------------------------------------------------------------------------------------------------------------
def _run_chunks(plan: _Plan, preprocess, fn, dev, bsize, workers, run: _RunOptions, progress, timings: dict) -> None:
    """Compute this rank's chunks; each is written atomically as soon as its last batch is in."""
    records = plan.folder.records
    batches, chunk_of = plan.batches(bsize)
    remaining = {c: plan.size(c) for c in plan.mine}
    acc: dict = {c: ([], [], []) for c in plan.mine}
    total_mine = sum(plan.size(c) for c in range(plan.n_chunks) if c % plan.world == plan.rank)
    done_mine = total_mine - sum(remaining.values())
    seen = {"attempted": 0, "failed": 0}
    if progress:
        progress(done_mine, total_mine)
    stream = iter_outputs([r.path for r in records], preprocess, fn, device=dev, batches=batches, workers=workers,
                          precision=run.precision, max_pixels=run.max_pixels, decoder=run.decoder,
                          prefetch=run.prefetch, defer_copy=run.defer_copy, stats=timings)
    timings.setdefault("write_s", 0.0)
    with contextlib.closing(stream):  # an exception here stops the prefetch thread and the workers at once
        for b_i, batch in enumerate(stream):
            c = chunk_of[b_i]
            _file_batch(plan, acc[c], batch, len(batches[b_i]), seen)
            remaining[c] -= len(batches[b_i])
            done_mine += len(batches[b_i])
            if progress:
                progress(done_mine, total_mine)
            if remaining[c] == 0:
                t0 = time.perf_counter()
                _write_chunk(plan.part / _chunk_name(c), *acc.pop(c))
                timings["write_s"] += time.perf_counter() - t0


def _file_batch(plan: _Plan, chunk_acc, batch: Batch, k: int, seen: dict) -> None:
    """Add one batch's rows and errors to its chunk; stop early when a folder's first files all fail."""
    records = plan.folder.records
    idx_list, feat_list, err_list = chunk_acc
    if len(batch.indices):
        idx_list.append(batch.indices)
        feat_list.append(batch.outputs)
    for i, reason, stage in batch.errors:
        err_list.append({"path": records[i].relpath, "reason": reason, "stage": stage})
        log.info("skipped %s: %s", records[i].relpath, reason)  # listed in the summary
    seen["attempted"] += k
    seen["failed"] += len(batch.errors)
    attempted = seen["attempted"]
    if attempted >= min(GARBAGE_WINDOW, plan.n) and seen["failed"] == attempted and not plan.done:
        first = err_list[0]
        raise _Garbage(f"the first {attempted} files under {safe_str(str(plan.root))} all failed to decode (e.g. "
                       f"{safe_str(first['path'])}: {first['reason']}); is this an image folder?")


# -- assemble -------------------------------------------------------------------------------------------------------
def _assemble(plan: _Plan, output, bb, dev, decoder, strict, t0, t_run, warnings, size_choice: SizeChoice,
              store: Optional[_Store] = None, runtime: str = "torch",
              stamp: Optional[dict] = None) -> ExtractResult:
    """Rank 0: read every chunk in order, apply --strict, write the store, remove the partial folder."""
    from ..data.discover import find_leakage

    folder, records = plan.folder, plan.folder.records
    idx_all, feats_all, skipped = [], [], list(folder.skipped)
    for c in range(plan.n_chunks):
        idx, feats, errs = _read_chunk(plan.part / _chunk_name(c))
        idx_all.append(idx)
        if len(feats):
            feats_all.append(feats)
        skipped.extend(errs)
    idx = np.concatenate(idx_all) if idx_all else np.zeros(0, np.int64)
    feats = np.concatenate(feats_all) if feats_all else np.zeros((0, bb.feature_dim), np.float32)
    leakage = find_leakage(folder) if folder.has_splits else []
    if strict and skipped:
        raise _strict_error(skipped)
    if len(idx) == 0:
        raise DataError(f"none of the {plan.n} files under {safe_str(str(plan.root))} could be decoded; "
                        "no features file written")
    kept = [records[i] for i in idx]
    meta = bb.meta()
    meta.update({
        "root": str(plan.root.resolve()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "n_images": int(len(kept)),
        "n_files": int(plan.n),
        "skipped": skipped,
        "leakage": leakage,
        "device": str(dev),
        "decoder": decoder,
        "runtime": runtime,  # the engine that ran the network (featx.runtime); not part of the provenance
        "world_size": plan.world,
        "warnings": list(folder.warnings),
        "image_size": size_choice.to_dict(),  # how the crop size in meta["preprocess"] was chosen
        **(stamp or {}),  # request + file listing: a re-run of the same extraction returns at once (`reuse`)
    })
    save_features(FeatureSet(
        features=feats,
        paths=[r.relpath for r in kept],
        labels=[r.label or "" for r in kept] if folder.has_labels else None,
        splits=[r.split for r in kept] if folder.has_splits else None,
        classes=folder.classes,
        meta=meta,
    ), output, format=store.fmt if store else None, dtype=store.dtype if store else None)
    shutil.rmtree(plan.part, ignore_errors=True)
    resumed = sum(plan.size(c) for c in plan.done)
    run_s = time.perf_counter() - t_run
    return ExtractResult(
        path=output, n_images=len(kept), n_skipped=len(skipped), feature_dim=int(feats.shape[1]),
        seconds=round(time.perf_counter() - t0, 3),
        images_per_s=round((plan.n - resumed) / run_s, 1) if run_s > 0 else 0.0,
        device=str(dev), backbone=bb.name, skipped=skipped, leakage=leakage, resumed_images=resumed,
        warnings=warnings, decoder=decoder, image_size=size_choice.to_dict(), runtime=runtime,
    )


def _assemble_shards(plan: _Plan, output: Path, bb, dev, decoder, strict, t0, t_run, warnings,
                     size_choice: SizeChoice, store: _Store, runtime: str = "torch",
                     stamp: Optional[dict] = None) -> ExtractResult:
    """A worker of a sharded store: turn each of its chunks into a shard file named by the chunk's number, publish
    its part manifest, and merge all parts into ``manifest.json`` if it is the last worker to finish."""
    from ..data.discover import find_leakage
    from .sharded import MANIFEST, features_name, merge_parts, rows_name, write_part, write_shard

    folder, records = plan.folder, plan.folder.records
    rank, world = store.shard
    # An older store's manifest (a re-extraction `reuse` let through, or --overwrite) goes before its first shard is
    # replaced: readers see "not finished" until the merge, never an old manifest over new shards. The new manifest
    # cannot exist yet: the merge waits for this worker's part.
    with contextlib.suppress(FileNotFoundError):
        (output / MANIFEST).unlink()
    shards, chunk_errors, skipped = [], [], list(folder.skipped)
    for c in range(rank, plan.n_chunks, world):
        idx, feats, errs = _read_chunk(plan.part / _chunk_name(c))
        chunk_errors.append([c, errs])
        skipped.extend(errs)
        for name in (features_name(c), rows_name(c)):  # temp files a killed earlier run left for this shard
            sweep_stale_temps(output, name)
        if len(idx):
            kept = [records[i] for i in idx]
            shards.append(write_shard(
                output, c, feats, [r.relpath for r in kept],
                [r.label or "" for r in kept] if folder.has_labels else None,
                [r.split for r in kept] if folder.has_splits else None, store.dtype))
    if strict and skipped:
        raise _strict_error(skipped)
    leakage = find_leakage(folder) if folder.has_splits else []
    meta = bb.meta()
    meta.update({"root": str(plan.root.resolve()), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "n_files": int(plan.n), "leakage": leakage, "device": str(dev), "decoder": decoder,
                 "runtime": runtime,  # this worker's engine (featx.runtime); not part of the provenance
                 "warnings": list(folder.warnings), "image_size": size_choice.to_dict(),
                 **(stamp or {})})  # request + file listing: a re-run of the same extraction returns at once (`reuse`)
    write_part(output, rank, world, {"job": plan.job, "dim": int(bb.feature_dim), "dtype": store.dtype,
                                     "classes": list(folder.classes), "meta": meta, "shards": shards,
                                     "chunk_errors": chunk_errors, "discover_skipped": list(folder.skipped)})
    shutil.rmtree(plan.part, ignore_errors=True)
    if merge_parts(output, world) is None:
        warnings = warnings + [f"worker {rank}/{world} finished; the store at {safe_str(str(output))} is readable "
                               f"once all {world} workers have finished (the last one merges their manifests)"]
    resumed = sum(plan.size(c) for c in plan.done)
    run_s = time.perf_counter() - t_run
    n_mine = sum(plan.size(c) for c in range(rank, plan.n_chunks, world))
    return ExtractResult(
        path=output, n_images=int(sum(s["n"] for s in shards)), n_skipped=len(skipped),
        feature_dim=int(bb.feature_dim), seconds=round(time.perf_counter() - t0, 3),
        images_per_s=round((n_mine - resumed) / run_s, 1) if run_s > 0 else 0.0,
        device=str(dev), backbone=bb.name, skipped=skipped, leakage=leakage, resumed_images=resumed,
        warnings=warnings, decoder=decoder, image_size=size_choice.to_dict(), runtime=runtime,
    )


def _strict_error(skipped: list) -> StrictModeError:
    first = skipped[0]
    return StrictModeError(f"--strict: {len(skipped)} file(s) or folder(s) could not be read (first: "
                           f"{safe_str(first['path'])}: {first['reason']}); no features file written")


# -- chunk files ------------------------------------------------------------------------------------------------------
def _stat_key(path) -> tuple:
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -1, -1


def _chunk_name(c: int) -> str:
    return f"chunk-{c:06d}.npz"


def _write_chunk(path: Path, idx_list, feat_list, errs) -> None:
    idx = np.concatenate(idx_list) if idx_list else np.zeros(0, np.int64)
    feats = np.concatenate(feat_list) if feat_list else np.zeros((0, 0), np.float32)
    with atomic_write(path) as fh:
        np.savez(fh, index=idx, features=feats, errors=np.asarray(json.dumps(errs)))


def _read_chunk(path: Path):
    z = read_npz(path, ("index", "features", "errors"), what="chunk of a partial extraction")
    return z["index"], z["features"], json.loads(str(z["errors"][()]))
