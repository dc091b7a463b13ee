"""The extraction engine: files -> uint8 pixels (workers) -> network on the device -> features, in input order.

Design notes (the why):
- Workers return numpy arrays, never tensors: tensors cross processes through shared-memory file descriptors,
  which fail in some containers ("Bad file descriptor"); numpy batches go through the pipe and always work.
- Only uint8 pixels cross process and PCIe boundaries; normalisation happens on the device.
- A file that fails to decode is reported with its reason and gets no row; no other file's pixels are substituted.
- Work is cut into fixed chunks of files. Each finished chunk is written atomically beside the output, so a killed
  run resumes where it stopped; batches never straddle chunks, so a resumed run computes exactly the batches an
  uninterrupted one would (bit-identical features on the CPU).
- Under torchrun, ranks take chunks round-robin and rank 0 assembles the single store.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from .._io import atomic_write, fingerprint, refuse_inside, sweep_stale_temps
from ..errors import DataError, FeatxError, Interrupted, StrictModeError, UsageError
from .store import DEFAULT_FEATURES_PATH, FORMAT, FeatureSet, save_features

log = logging.getLogger("featx")

# A folder whose first GARBAGE_WINDOW files all fail is almost surely not an image folder: stop early.
GARBAGE_WINDOW = 64


# -- worker side -------------------------------------------------------------------------------------------------
class _PixelDataset:
    """Index -> (index, uint8 HxWx3 array or None, error reason, stage). Runs in DataLoader workers."""

    def __init__(self, paths: Sequence, preprocess, max_pixels: Optional[int] = None):
        self.paths = [str(p) for p in paths]
        self.preprocess = preprocess
        self.max_pixels = max_pixels

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from ..data.jpeg_batch import pil_pixels

        return (i, *pil_pixels(self.paths[i], self.preprocess, self.max_pixels))


class _JpegBytesDataset(_PixelDataset):
    """For the device decoder: a plain JPEG comes back as its bytes (header checked, no pixel decoded), anything
    else through the PIL path as above. Index -> (index, pixels or None, reason, stage, jpeg or None)."""

    def __getitem__(self, i):
        from ..data.jpeg_batch import pil_pixels, read_device_jpeg

        jpeg = read_device_jpeg(self.paths[i], self.max_pixels)
        if jpeg is not None:
            return i, None, None, None, jpeg
        return (i, *pil_pixels(self.paths[i], self.preprocess, self.max_pixels), None)


def _collate(items):
    good = [(i, px) for i, px, _, _ in items if px is not None]
    errors = [(i, reason, stage) for i, px, reason, stage in items if px is None]
    idx = np.asarray([i for i, _ in good], dtype=np.int64)
    pixels = np.stack([px for _, px in good]) if good else None
    return idx, pixels, errors


def _worker_init(_):
    # Workers inherit torch's thread pool size; one decoder thread per worker avoids oversubscription.
    import torch

    torch.set_num_threads(1)


# -- main side ---------------------------------------------------------------------------------------------------
@dataclass
class Batch:
    indices: np.ndarray  # positions (into the given paths) of the images that produced outputs
    outputs: np.ndarray  # float32, one row per index
    errors: list  # (position, reason, stage) for files that failed


def default_batch_size(device) -> int:
    """256 on CUDA (fills the GPU), 32 on the CPU (measured fastest on a 2-core machine: 15 img/s vs 12-14 at 64)."""
    return 256 if device.type == "cuda" else 32


def default_workers() -> int:
    n = os.cpu_count() or 1
    return max(1, min(8, n))


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
) -> Iterator[Batch]:
    """Decode `paths` in workers and run `fn` (normalised float batch -> (N, K) tensor) on `device`, in order.

    `batches` (lists of positions) fixes the batch layout; otherwise consecutive runs of `batch_size`.
    CUDA out-of-memory retries the same images in halves, so the output does not depend on the memory left.
    `decoder`: "pil" decodes and resizes in the workers; "torchvision" lets workers ship plain JPEGs as bytes and
    decodes + resizes them batched on `device` (see `featx.data.jpeg_batch`); "auto" picks torchvision on CUDA.
    Both give the same rows, errors and batches; the pixels differ slightly.
    """
    import torch
    from torch.utils.data import DataLoader

    from ..data.jpeg_batch import DeviceJpegPipeline, collate_raw, resolve_decoder
    from ..devices import autocast

    if batches is None:
        batches = [list(range(s, min(s + batch_size, len(paths)))) for s in range(0, len(paths), batch_size)]
    workers = default_workers() if workers is None else workers
    on_device = resolve_decoder(decoder, device, preprocess) == "torchvision"
    ds = (_JpegBytesDataset if on_device else _PixelDataset)(paths, preprocess, max_pixels)
    loader = DataLoader(
        ds, batch_sampler=batches, num_workers=workers, collate_fn=collate_raw if on_device else _collate,
        worker_init_fn=_worker_init if workers else None,
        prefetch_factor=4 if workers else None, persistent_workers=False,
    )
    cuda = device.type == "cuda"

    def run(x):
        try:
            with autocast(device, precision):
                return fn(x).float()
        except Exception as exc:
            from ..devices import is_cuda_oom

            if not is_cuda_oom(exc):
                raise
            if len(x) == 1:
                raise FeatxError("CUDA out of memory even at batch size 1; use --device cpu or a smaller --image-size") from None
            torch.cuda.empty_cache()
            half = len(x) // 2
            return torch.cat([run(x[:half]), run(x[half:])])

    def forward(idx, t, errors):
        x = t.permute(0, 3, 1, 2)  # NCHW view with channels_last strides: what cuDNN likes best
        x = preprocess.normalize(x)
        if not cuda:
            x = x.contiguous()
        with torch.inference_mode():
            out = run(x)
        return Batch(idx, out.cpu().numpy().astype(np.float32, copy=False), errors)

    if on_device:
        pipe = DeviceJpegPipeline(preprocess, device, max_pixels)
        for raw in loader:
            # Synchronous: the previous batch's `out.cpu()` finished every kernel before the decoder (which writes
            # on its own stream) is handed memory the caching allocator recycled from that batch.
            with torch.inference_mode():
                idx, t, errors = pipe.assemble(raw, ds.paths)
            if t is None:
                yield Batch(idx, np.zeros((0, 0), np.float32), errors)
                continue
            yield forward(idx, t, errors)
        log.debug("device JPEG pipeline: %s", pipe.stats)
        return

    for idx, pixels, errors in loader:
        if pixels is None:
            yield Batch(idx, np.zeros((0, 0), np.float32), errors)
            continue
        t = torch.from_numpy(pixels)  # N,H,W,3 uint8
        if cuda:
            t = t.pin_memory().to(device, non_blocking=True)
        yield forward(idx, t, errors)


def prepare_model(model, device):
    """Eval mode on the device; channels_last on CUDA (faster convolutions with tensor cores)."""
    import torch

    model.eval().to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    return model


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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path) if self.path else None
        return d


def _partial_dir(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def _dist_info():
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, None
    if not dist.is_initialized():
        import torch

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size(), dist


def _check_output(output: Path, overwrite: bool) -> None:
    if output.is_dir():
        raise UsageError(f"output {output} is a folder; give a file path such as {output / 'features.npz'}")
    if output.exists() and not overwrite:
        try:
            with np.load(output, allow_pickle=False) as z:
                ok = "meta" in z.files and json.loads(str(z["meta"][()])).get("format") == FORMAT
        except Exception:
            ok = False
        if not ok:
            raise UsageError(f"{output} exists and is not a featx features file; refusing to overwrite it (pass --overwrite)")


class _SigtermAsInterrupt:
    """SIGTERM behaves like Ctrl-C during extraction: finished chunks are kept, the exit code is 143."""

    def __enter__(self):
        self.old = None
        try:
            self.old = signal.signal(signal.SIGTERM, self._handler)
        except ValueError:  # not the main thread
            pass
        return self

    def _handler(self, signum, _frame):
        raise Interrupted("stopped by SIGTERM; finished chunks were kept, re-run the same command to resume", signum)

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)
        return False


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
) -> ExtractResult:
    """Extract features for every image under `images` and write one feature store at `output`.

    Args:
        images: a folder (class subfolders give labels; train/ and val/ or test/ give splits; flat = unlabeled).
        output: the .npz to write (atomically). Re-running after an interruption resumes from finished chunks.
        backbone: a name (see `featx models`) or a ready `Backbone`.
        device: auto | cpu | cuda. batch_size: default 32 on CPU, 256 on CUDA. workers: decoding processes.
        chunk_size: images per resumable chunk (also the unit of sharding under torchrun).
        strict: any skipped file raises StrictModeError (finished chunks are kept; no store is written).
        overwrite: allow replacing an existing file that is not a featx features store.
        progress: callback(done_images, total_images).
        decoder: auto | pil | torchvision. auto = JPEGs decoded and resized batched on the GPU when the device is
            CUDA and torchvision can decode there, else pil (CPU decoding in the workers). Recorded in
            meta["decoder"]; not part of the provenance fingerprint (the two paths give interchangeable features).
    """
    from ..backbones import Backbone, create_backbone
    from ..data.discover import discover, find_leakage
    from ..data.jpeg_batch import DECODERS, resolve_decoder
    from ..devices import resolve_device

    t0 = time.perf_counter()
    root = Path(images)
    folder = discover(root)
    output = Path(output)
    refuse_inside(output, root)
    _check_output(output, overwrite)
    if chunk_size < 1:
        raise UsageError("chunk size must be at least 1")
    if (decoder or "auto").lower() not in DECODERS:  # before the model loads
        raise UsageError(f"--decoder must be one of {', '.join(DECODERS)}, not {decoder!r}")

    dev = resolve_device(device)
    bb = backbone if isinstance(backbone, Backbone) else create_backbone(backbone, pretrained=pretrained, weights=weights, layer=layer)
    bsize = batch_size or default_batch_size(dev)
    rank, world, dist = _dist_info()
    if dev.type == "cuda" and world > 1:
        import torch

        dev = __import__("torch").device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    decoder = resolve_decoder(decoder, dev, bb.preprocess)

    records = folder.records
    n = len(records)
    meta = bb.meta()
    job = {
        "meta": fingerprint({k: meta[k] for k in ("backbone", "weights_sha256", "preprocess", "layer")}),
        "chunk_size": chunk_size,
        "files": fingerprint([(r.relpath, *_stat_key(r.path)) for r in records]),
        "max_pixels": max_pixels,
    }
    if decoder != "pil":  # resumed chunks come from the decoder meta["decoder"] names; pil jobs keep their old key
        job["decoder"] = decoder
    part = _partial_dir(output)
    if rank == 0:
        sweep_stale_temps(output.parent, output.name)
        _open_partial(part, job)
    if dist is not None:
        dist.barrier()

    n_chunks = (n + chunk_size - 1) // chunk_size
    done = {c for c in range(n_chunks) if (part / _chunk_name(c)).is_file()}
    mine = [c for c in range(n_chunks) if c % world == rank and c not in done]
    resumed = sum(min(chunk_size, n - c * chunk_size) for c in done)
    total_mine = sum(min(chunk_size, n - c * chunk_size) for c in range(n_chunks) if c % world == rank)
    done_mine = total_mine - sum(min(chunk_size, n - c * chunk_size) for c in mine)

    t_run = time.perf_counter()  # throughput counts the extraction loop, not model loading
    if mine:
        prepare_model(bb.model, dev)
        batches, chunk_of = [], []
        for c in mine:
            lo, hi = c * chunk_size, min((c + 1) * chunk_size, n)
            for s in range(lo, hi, bsize):
                batches.append(list(range(s, min(s + bsize, hi))))
                chunk_of.append(c)
        remaining = {c: min(chunk_size, n - c * chunk_size) for c in mine}
        acc: dict = {c: ([], [], []) for c in mine}
        attempted = failed = 0
        if progress:
            progress(done_mine, total_mine)
        with _SigtermAsInterrupt():
            stream = iter_outputs([r.path for r in records], bb.preprocess, bb.forward_features, device=dev,
                                  batches=batches, workers=workers, precision=precision, max_pixels=max_pixels,
                                  decoder=decoder)
            for b_i, batch in enumerate(stream):
                c = chunk_of[b_i]
                idx_list, feat_list, err_list = acc[c]
                if len(batch.indices):
                    idx_list.append(batch.indices)
                    feat_list.append(batch.outputs)
                for i, reason, stage in batch.errors:
                    err_list.append({"path": records[i].relpath, "reason": reason, "stage": stage})
                    log.info("skipped %s: %s", records[i].relpath, reason)  # listed in the summary
                k = len(batches[b_i])
                attempted += k
                failed += len(batch.errors)
                if attempted >= min(GARBAGE_WINDOW, n) and failed == attempted and not done:
                    raise DataError(
                        f"the first {attempted} files under {root} all failed to decode (e.g. "
                        f"{err_list[0]['path']}: {err_list[0]['reason']}); is this an image folder?"
                    )
                remaining[c] -= k
                done_mine += k
                if progress:
                    progress(done_mine, total_mine)
                if remaining[c] == 0:
                    _write_chunk(part / _chunk_name(c), *acc.pop(c))

    if dist is not None:
        dist.barrier()
    if rank != 0:
        dist.barrier()
        return ExtractResult(path=output, n_images=0, n_skipped=0, feature_dim=bb.feature_dim,
                             seconds=time.perf_counter() - t0, images_per_s=0.0, device=str(dev), backbone=bb.name,
                             decoder=decoder)

    # Assemble: rank 0 reads every chunk in order.
    idx_all, feats_all, skipped = [], [], []
    for c in range(n_chunks):
        idx, feats, errs = _read_chunk(part / _chunk_name(c))
        idx_all.append(idx)
        feats_all.append(feats)
        skipped.extend(errs)
    idx = np.concatenate(idx_all) if idx_all else np.zeros(0, np.int64)
    feats = np.concatenate([f for f in feats_all if len(f)]) if any(len(f) for f in feats_all) else np.zeros((0, bb.feature_dim), np.float32)
    leakage = find_leakage(folder) if folder.has_splits else []
    if strict and skipped:
        if dist is not None:
            dist.barrier()
        raise StrictModeError(
            f"--strict: {len(skipped)} file(s) could not be read (first: {skipped[0]['path']}: {skipped[0]['reason']}); "
            f"no features file written"
        )
    if len(idx) == 0:
        if dist is not None:
            dist.barrier()
        raise DataError(f"none of the {n} files under {root} could be decoded; no features file written")
    kept = [records[i] for i in idx]
    elapsed = time.perf_counter() - t0
    meta.update({
        "root": str(root.resolve()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "n_images": int(len(kept)),
        "n_files": int(n),
        "skipped": skipped,
        "leakage": leakage,
        "device": str(dev),
        "decoder": decoder,
        "world_size": world,
        "warnings": list(folder.warnings),
    })
    fs = FeatureSet(
        features=feats,
        paths=[r.relpath for r in kept],
        labels=[r.label or "" for r in kept] if folder.has_labels else None,
        splits=[r.split for r in kept] if folder.has_splits else None,
        classes=folder.classes,
        meta=meta,
    )
    save_features(fs, output)
    shutil.rmtree(part, ignore_errors=True)
    if dist is not None:
        dist.barrier()
    computed = n - resumed
    run_s = time.perf_counter() - t_run
    return ExtractResult(
        path=output, n_images=len(kept), n_skipped=len(skipped), feature_dim=int(feats.shape[1]),
        seconds=round(elapsed, 3), images_per_s=round(computed / run_s, 1) if run_s > 0 else 0.0,
        device=str(dev), backbone=bb.name, skipped=skipped, leakage=leakage, resumed_images=resumed,
        warnings=list(folder.warnings), decoder=decoder,
    )


def _stat_key(path) -> tuple:
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -1, -1


def _chunk_name(c: int) -> str:
    return f"chunk-{c:06d}.npz"


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
        if not job_file.exists() and any(part.iterdir()):
            raise UsageError(f"{part} exists and was not made by featx; move it away first")
        shutil.rmtree(part)
    part.mkdir(parents=True)
    with atomic_write(job_file, "w") as fh:
        json.dump(job, fh)


def _write_chunk(path: Path, idx_list, feat_list, errs) -> None:
    idx = np.concatenate(idx_list) if idx_list else np.zeros(0, np.int64)
    feats = np.concatenate(feat_list) if feat_list else np.zeros((0, 0), np.float32)
    with atomic_write(path) as fh:
        np.savez(fh, index=idx, features=feats, errors=np.asarray(json.dumps(errs)))


def _read_chunk(path: Path):
    with np.load(path, allow_pickle=False) as z:
        return z["index"], z["features"], json.loads(str(z["errors"][()]))
