"""torchrun / DistributedDataParallel helpers: one process per device, rank 0 writes files and prints.

`featx finetune` and `featx scratch` run unchanged under ``torchrun --nproc-per-node N -m featx ...``:
torchrun sets WORLD_SIZE/RANK/LOCAL_RANK/MASTER_ADDR, and :func:`setup` joins the process group
(NCCL on CUDA, gloo on CPU). Without those variables everything here is a no-op for a single process.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import UsageError


@dataclass
class Dist:
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

    # -- collectives (identity in a single process) ---------------------------------------------------
    def all_reduce_sum(self, values: list, device) -> list:
        if not self.enabled:
            return list(values)
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def all_gather_object(self, obj) -> list:
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` on every rank (run folder paths, errors found by rank 0)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def cleanup(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def setup(device_request: str = "auto") -> tuple[Dist, torch.device]:
    """Join the process group if launched by torchrun (WORLD_SIZE > 1) and pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_request, local if world > 1 else None)
    d = Dist(rank=rank, local_rank=local, world_size=world)
    if world > 1:
        if dist.is_initialized():
            return d, device
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        d.owns_group = True
    return d, device


def resolve_device(request: str = "auto", local_rank: int | None = None) -> torch.device:
    request = (request or "auto").lower()
    if request == "auto":
        request = "cuda" if torch.cuda.is_available() else "cpu"
    if request.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError("--device cuda was requested but CUDA is not available (use --device cpu or auto)")
        if request == "cuda" and local_rank is not None:
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device(request)
    if request in ("cpu", "mps"):
        return torch.device(request)
    raise UsageError(f"--device must be auto, cpu or cuda[:N], got {request!r}")


def unwrap(model):
    """The plain module inside a DistributedDataParallel wrapper (for saving and evaluation)."""
    return model.module if hasattr(model, "module") and isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
