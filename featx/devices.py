"""The ONE place that decides where and how featx computes: device, precision, loader workers, distributed ranks.

Extraction, prediction, heads, fine-tuning and scratch training all call these functions, so a command never
resolves ``--device auto`` or mixed precision its own way:

- device: ``auto`` = CUDA when present (this rank's GPU under torchrun), else the CPU;
- precision: fp32 on the CPU (exact and fast there); on CUDA bf16 autocast where the GPU supports it, else fp16
  autocast, which training pairs with a gradient scaler (fp16 gradients underflow without one);
- workers: one default for every DataLoader (decoding runs in worker processes, capped at 8);
- distributed: torchrun's WORLD_SIZE / RANK / LOCAL_RANK, the process group, collectives that are identities in a
  single process.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Optional

from .errors import UsageError

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


# -- device ------------------------------------------------------------------------------------------------
def resolve_device(device: str = "auto", local_rank: Optional[int] = None):
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> torch.device; asking for CUDA without one is a clear error.

    Under torchrun (``local_rank`` given), plain 'cuda' / 'auto' means this rank's GPU.
    """
    import torch

    d = (str(device) if device is not None else "auto").lower()
    if d == "auto":
        d = "cuda" if torch.cuda.is_available() else "cpu"
    if d == "cpu":
        return torch.device("cpu")
    if d.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available on this machine (use --device auto or cpu)")
        if d == "cuda" and local_rank is not None:
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device(d)
    if d == "mps":
        return torch.device("mps")
    raise UsageError(f"--device must be one of auto, cpu, cuda (or cuda:N), not {device!r}")


# -- precision ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Precision:
    """What autocast runs: ``dtype`` None means fp32; ``scaler`` says training needs a GradScaler (fp16)."""

    name: str  # "fp32" | "bf16" | "fp16"
    dtype: object = None
    scaler: bool = False


def bf16_supported(device) -> bool:
    import torch

    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def resolve_precision(device, precision: str = "auto") -> Precision:
    """fp32 on the CPU; on CUDA bf16 when supported (or asked), else fp16 with a gradient scaler.

    ``precision``: auto | bf16 | fp16 | fp32. Asking for bf16 on a GPU without it falls back to fp16 rather than
    failing (older GPUs). ``FEATX_FORCE_FP16=1`` makes ``auto`` take the fp16 path (to test it on a bf16 GPU).
    """
    import torch

    p = (precision or "auto").lower()
    if p not in PRECISIONS:
        raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if device.type != "cuda" or p == "fp32":
        return Precision("fp32")
    force16 = os.environ.get("FEATX_FORCE_FP16", "0") not in ("", "0")
    if p == "fp16" or force16 or not bf16_supported(device):
        return Precision("fp16", torch.float16, scaler=True)
    return Precision("bf16", torch.bfloat16)


def autocast(device, precision: "str | Precision" = "auto"):
    """The autocast context for ``precision`` on ``device`` (a no-op for fp32)."""
    import torch

    prec = precision if isinstance(precision, Precision) else resolve_precision(device, precision)
    if prec.dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=prec.dtype)


def grad_scaler(device, prec: Precision):
    """A GradScaler that is active only for fp16 (a disabled scaler passes losses and steps through unchanged)."""
    import torch

    return torch.amp.GradScaler(device.type, enabled=prec.scaler)


def is_cuda_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))


# -- loader workers ----------------------------------------------------------------------------------------
def default_workers(requested: Optional[int] = None) -> int:
    """DataLoader worker processes: the request, else one per core up to 8 (0 = decode in the main process)."""
    if requested is not None:
        if requested < 0:
            raise UsageError(f"--workers must be 0 or more, not {requested}")
        return int(requested)
    return max(1, min(8, os.cpu_count() or 1))


def share_tensors_through_files() -> None:
    """Workers that return tensors pass them through shared-memory file descriptors, which some containers
    refuse ("Bad file descriptor", too few fds): the 'file_system' strategy sends file names instead."""
    import torch.multiprocessing as mp

    if "file_system" in mp.get_all_sharing_strategies() and mp.get_sharing_strategy() != "file_system":
        mp.set_sharing_strategy("file_system")


# -- distributed (torchrun) --------------------------------------------------------------------------------
@dataclass
class Dist:
    """This process's place under torchrun; every collective is an identity in a single process."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    owns_group: bool = False  # this process initialised the group, so it must destroy it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, values: list, device) -> list:
        if not self.enabled:
            return list(values)
        import torch
        import torch.distributed as dist

        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def all_gather_object(self, obj) -> list:
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank (run folder paths, errors found by rank 0)."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def cleanup(self) -> None:
        import torch.distributed as dist

        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def dist_env() -> Dist:
    """torchrun's variables (WORLD_SIZE, RANK, LOCAL_RANK) without joining any group."""
    return Dist(rank=int(os.environ.get("RANK", "0")), local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                world_size=int(os.environ.get("WORLD_SIZE", "1")))


def setup_distributed(device_request: str = "auto"):
    """-> (Dist, torch.device): join the process group when launched by torchrun (NCCL on CUDA, gloo on CPU)."""
    import torch
    import torch.distributed as dist

    d = dist_env()
    device = resolve_device(device_request, d.local_rank if d.enabled else None)
    if d.enabled and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        d.owns_group = True
    return d, device


def unwrap(model):
    """The plain module inside a DistributedDataParallel wrapper (for saving and evaluation)."""
    import torch

    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
