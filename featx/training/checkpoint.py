"""Checkpoints without pickle: weights in safetensors, everything else in JSON; `load_model` for predict.

A run folder holds ``best.safetensors`` and ``last.safetensors`` (plain state dicts), ``model.json`` (what
the network is: kind, architecture or backbone, classes, preprocessing, best scores, library versions,
the SHA-256 of the best weights) and ``resume.safetensors``: the optimizer state as torch flattens it
(``torch.distributed.checkpoint.state_dict``: one entry per parameter name and key), its tensors in the file and
its hyper-parameters plus the loop counters as JSON in the safetensors header. Loading never unpickles anything.
"""
from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .._io import atomic_write, read_json, sha256_file, stamp, write_json
from ..data.preprocess import Preprocess
from ..errors import ArtifactError

MODEL_FORMAT = "featx.model"
MODEL_FORMAT_VERSION = 1
MODEL_JSON = "model.json"
RESUME_FILE = "resume.safetensors"  # optimizer state + loop counters of the last finished epoch


def versions() -> dict:
    import numpy
    import torch

    from .. import __version__

    out = {"featx": __version__, "torch": torch.__version__, "numpy": numpy.__version__, "python": platform.python_version()}
    try:
        import timm

        out["timm"] = timm.__version__
    except ImportError:  # pragma: no cover
        pass
    try:
        import PIL

        out["pillow"] = PIL.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


# -- weights ------------------------------------------------------------------------------------------
def save_weights(path: str | os.PathLike, state_dict: dict, metadata: Optional[dict] = None) -> None:
    """State dict -> safetensors, atomically. Tensors are copied to contiguous CPU memory (tied weights too).

    The header carries ``written_by: featx X``, so a later run recognises the file as its own (check_outputs).
    """
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    meta = {"written_by": stamp(), **{k: str(v) for k, v in (metadata or {}).items()}}
    data = st_save(tensors, metadata=meta)
    with atomic_write(path, "wb") as fh:
        fh.write(data)


def load_weights(path: str | os.PathLike) -> tuple[dict, dict]:
    """safetensors file -> (state dict of CPU tensors, header metadata)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError as exc:
        raise ArtifactError(f"{path} does not exist") from exc
    try:
        tensors = st_load(raw)
        from safetensors import safe_open  # header metadata (str -> str)

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
    except (SafetensorError, ValueError, OSError) as exc:
        raise ArtifactError(f"{path} is not a valid safetensors file ({exc}); it may be truncated") from exc
    return tensors, meta


def safetensors_is_ours(path: Path) -> bool:
    """A recogniser for check_outputs: a safetensors file whose header says featx wrote it.

    Files from featx before the ``written_by`` mark are recognised by the ``epoch`` (weights) or ``loop`` (resume)
    entry every featx run wrote. Only the header is read (its length is the file's first 8 bytes).
    """
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            if not 0 < n <= 100 << 20:
                return False
            meta = json.loads(fh.read(n)).get("__metadata__") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return str(meta.get("written_by", "")).startswith("featx") or "epoch" in meta or "loop" in meta


# -- optimizer / loop state for --resume -------------------------------------------------------------
RESUME_FORMAT = "featx.resume/2"  # optimizer state keyed by parameter name (torch's flattened optimizer state dict)


def _flat_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)


def save_resume(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                loop_state: dict) -> None:
    """Optimizer state flattened by torch (``state.<param name>.<key>``, ``param_groups.<param name>.<key>``):
    its tensors go to safetensors, the rest (hyper-parameters) and the loop counters to the JSON header."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    flat = get_optimizer_state_dict(model, optimizer, options=_flat_options())
    tensors = {k: v for k, v in flat.items() if torch.is_tensor(v)}
    scalars = {k: (list(v) if isinstance(v, tuple) else v) for k, v in flat.items() if not torch.is_tensor(v)}
    meta = {"format": RESUME_FORMAT, "loop": json.dumps(loop_state), "scalars": json.dumps(scalars)}
    save_weights(path, tensors, meta)


def load_resume(path: str | os.PathLike) -> tuple[dict, dict]:
    """-> (loop state dict, flattened optimizer state for :func:`restore_optimizer`)."""
    tensors, meta = load_weights(path)
    if meta.get("format") != RESUME_FORMAT:
        raise ArtifactError(f"{path} was written by an older featx (its optimizer state has another layout); "
                            "start a new run, or finish this one with the featx version that started it")
    try:
        loop = json.loads(meta["loop"])
        scalars = json.loads(meta["scalars"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path} lacks featx resume metadata ({exc})") from exc
    # JSON has no tuples: torch's optimizers keep tuple hyper-parameters (AdamW betas)
    flat = {k: (tuple(v) if isinstance(v, list) else v) for k, v in scalars.items()}
    return loop, {**flat, **tensors}


def restore_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, flat: dict) -> None:
    """Load a flattened optimizer state into a freshly built optimizer of the same parameters.

    torch initialises the optimizer state with a zero-learning-rate step before loading, and skips that (loading
    nothing, silently) when the parameters already hold gradients: clear them first, and check the result.
    """
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    optimizer.zero_grad(set_to_none=True)
    set_optimizer_state_dict(model, optimizer, flat, options=_flat_options())
    expected = any(k.startswith("state.") for k in flat)
    if expected and not any(st for st in optimizer.state.values()):
        raise ArtifactError("the saved optimizer state did not load into the resumed optimizer; start a new run")


# -- model.json + load_model -------------------------------------------------------------------------
def write_model_json(run_dir: Path, info: dict) -> Path:
    """``info``: kind, arch or backbone, classes, preprocess (dict), best (dict), ... ; adds format and versions."""
    best = run_dir / "best.safetensors"
    doc = {
        "format": MODEL_FORMAT,
        "format_version": MODEL_FORMAT_VERSION,
        **info,
        "num_classes": len(info["classes"]),
        "weights": {"file": best.name, "sha256": sha256_file(best) if best.is_file() else None},
        "versions": versions(),
    }
    path = run_dir / MODEL_JSON
    write_json(path, doc)
    return path


@dataclass
class TrainedModel:
    """A fine-tuned or scratch network ready for inference: feed it ``preprocess``-ed, normalised batches."""

    model: torch.nn.Module  # in eval mode
    preprocess: Preprocess
    classes: list
    meta: dict = field(default_factory=dict)  # the parsed model.json
    path: Optional[Path] = None  # the weights file that was loaded

    @property
    def kind(self) -> str:
        return self.meta.get("kind", "")

    @property
    def name(self) -> str:
        return self.meta.get("backbone") or self.meta.get("arch") or "model"

    def to(self, device) -> "TrainedModel":
        self.model.to(device)
        return self

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float batch (N, 3, S, S) -> logits (N, C), without gradients."""
        with torch.inference_mode():
            return self.model(x)

    def predict_uint8(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 batch from ``preprocess.resize_crop`` (N, 3, S, S) -> class probabilities (N, C)."""
        dev = next(self.model.parameters()).device
        return torch.softmax(self.logits(self.preprocess.normalize(x.to(dev))).float(), dim=1)


def _find_model_json(path: Path) -> tuple[Path, Optional[Path]]:
    """-> (model.json, explicit weights file or None) for a run folder, a model.json or a .safetensors."""
    if path.is_dir():
        return path / MODEL_JSON, None
    if path.suffix == ".safetensors":
        return path.parent / MODEL_JSON, path
    return path, None


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu", which: str = "best") -> TrainedModel:
    """Rebuild a trained network from a run folder, its ``model.json``, or a ``.safetensors`` beside one.

    ``which`` picks ``best`` (default) or ``last`` weights when a folder or model.json is given.
    """
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"model {path} does not exist")
    mj, weights = _find_model_json(path)
    if not mj.is_file():
        raise ArtifactError(f"{path} is not a featx model: {mj} is missing (expected a run folder of "
                            "`featx finetune`/`featx scratch`, its model.json, or a .safetensors beside one)")
    meta = read_json(mj)
    if meta.get("format") != MODEL_FORMAT:
        raise ArtifactError(f"{mj} is not a featx model file (format {meta.get('format')!r})")
    if int(meta.get("format_version", 0)) > MODEL_FORMAT_VERSION:
        raise ArtifactError(f"{mj} was written by a newer featx (model format {meta['format_version']}); upgrade featx")
    preprocess = Preprocess.from_record(meta.get("preprocess"), str(mj))  # before any weights are read
    if weights is None:
        if which not in ("best", "last"):
            raise ArtifactError(f"which must be 'best' or 'last', got {which!r}")
        weights = mj.parent / f"{which}.safetensors"
    if not weights.is_file():
        raise ArtifactError(f"weights file {weights} is missing")
    expected = (meta.get("weights") or {}).get("sha256")
    if expected and weights.name == meta["weights"].get("file") and sha256_file(weights) != expected:
        raise ArtifactError(f"{weights} does not match the SHA-256 recorded in {mj}: the file was changed or truncated")
    classes = list(meta["classes"])
    model = build_network(meta, len(classes))
    state, _ = load_weights(weights)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ArtifactError(f"{weights} does not fit the network described in {mj}: {str(exc).splitlines()[0]}") from exc
    model.to(device).eval()
    return TrainedModel(model=model, preprocess=preprocess, classes=classes,
                        meta=meta, path=weights)


def build_network(meta: dict, num_classes: int) -> torch.nn.Module:
    """The untrained network a model.json describes (weights are loaded separately)."""
    kind = meta.get("kind")
    if kind == "scratch":
        from . import zoo

        return zoo.build(meta["arch"], num_classes, meta.get("image_size"))
    if kind == "finetune":
        from ..backbones import create_backbone

        return create_backbone(meta["backbone"], pretrained=False, num_classes=num_classes).model
    raise ArtifactError(f"unknown model kind {kind!r} in model.json")
