"""Device choice shared by extraction, heads and training: auto = CUDA when present, with the GPU-only speedups."""
from __future__ import annotations

import contextlib

from .errors import UsageError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str = "auto"):
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> torch.device; asking for CUDA without one is a clear error."""
    import torch

    d = (device or "auto").lower()
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if d == "cpu":
        return torch.device("cpu")
    if d.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available on this machine (use --device auto or cpu)")
        return torch.device(d)
    raise UsageError(f"--device must be one of auto, cpu, cuda (or cuda:N), not {device!r}")


def autocast(device, precision: str = "auto"):
    """bf16 autocast on CUDA (fp16 if the GPU lacks bf16); a no-op on the CPU, where fp32 is both exact and fast."""
    import torch

    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" or not torch.cuda.is_bf16_supported() else torch.bfloat16
    return torch.autocast("cuda", dtype=dtype)


def is_cuda_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))
