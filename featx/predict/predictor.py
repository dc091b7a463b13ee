"""Any model artifact -> a Predictor: a callable on uint8 pixels that carries its classes, preprocessing and score kind.

`load_predictor` is the one place that decides what ``--model`` names and how to load it:

    artifact_kind(model)  -> "head" | "trained" | "onnx"   (a path, or an already loaded object)
    LOADERS[kind](model)  -> Predictor

A head file (.skops) from `featx fit` rebuilds its backbone from the head's provenance (weights hash checked,
preprocessing restored verbatim); a run folder / model.json / .safetensors from `featx finetune` / `featx scratch`
carries its own network and preprocessing; an ``.onnx`` file from `featx export` runs in onnxruntime with the
preprocessing recorded in its metadata. The rest of predict only sees a `Predictor`: a torch predictor runs through
the extraction engine, one with ``score_pixels`` (ONNX) through `featx.data.numpy_pixels`, and nothing on that path
imports torch, so a deployment machine needs none.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .._io import safe_str
from ..errors import ArtifactError, UsageError

SCORE_KINDS = {"probability": "probability", "decision": "decision score"}  # score kind -> what the summary calls it

# What a user without a model is told (missing --model, or no head at the default path).
HOW_TO_MAKE_A_MODEL = ("make a head with `featx extract IMAGES` then `featx fit` (it writes featx-out/head.skops), "
                       "or train a model with `featx finetune` / `featx scratch` and pass its run folder")


@dataclass(frozen=True)
class RuntimeDevice:
    """Where a model that runs outside torch runs (no torch.device on a machine without torch).
    ``type`` answers the questions featx asks a torch.device (``"cpu"``: CPU batch size and memory rules)."""

    type: str = "cpu"
    runtime: str = "onnxruntime"

    def __str__(self) -> str:
        return f"{self.type} ({self.runtime})"


@dataclass
class Predictor:
    """What predict needs from any model.

    ``forward`` runs on a normalised float batch (N, 3, S, S) on the model's device and returns an (N, K) tensor;
    ``to_scores`` turns those outputs (numpy) into (N, C) scores in ``classes`` order. Splitting the two lets the
    extraction engine (workers, batching, autocast, OOM retry) run ``forward`` while scoring stays in numpy.
    A model that runs outside torch (ONNX) sets ``score_pixels`` instead: uint8 (N, S, S, 3) numpy -> (N, C) scores.
    Calling the predictor on uint8 pixels does either (for notebooks and tests).
    """

    preprocess: object  # featx.data.preprocess.Preprocess: the pixel recipe the model was made with
    forward: Optional[Callable]  # None when score_pixels is set
    to_scores: Callable
    classes: list
    score_kind: str  # "probability" | "decision"
    description: str  # for the summary: "logistic head on efficientnet_lite0 features"
    kind: str  # "head" | "finetune" | "scratch" | "trained"
    network: object = None  # the torch module the engine places on the device (None: forward manages its runtime)
    path: Optional[Path] = None
    device: object = field(default=None, repr=False)
    score_pixels: Optional[Callable] = None  # torch-free models (ONNX): uint8 NHWC numpy batch -> (N, C) scores
    # bytes of the largest intermediate output for one image (the batch-size cap's memory estimate); None: the
    # engine measures it on ``network`` with forward hooks
    largest_activation: Optional[Callable[[], int]] = None
    # what ``forward`` outputs, for featx.runtime's graph cache key and messages (changes whenever ``forward``
    # computes something else from the same weights)
    what: str = "outputs"
    # the images the model was trained or selected on (featx.data.seen record); None: the artifact records none
    seen: Optional[dict] = None
    # how ``__call__`` runs ``forward`` (featx.runtime: auto = onnxruntime on the CPU, torch on CUDA); predict_folder
    # takes its own --runtime instead
    runtime: str = "auto"
    _net: object = field(default=None, repr=False, compare=False)  # (device, runtime) -> network, made on first call

    @property
    def needs_torch(self) -> bool:
        return self.score_pixels is None

    @property
    def image_size(self) -> int:
        return int(self.preprocess.input_size)

    @property
    def confidence_kind(self) -> str:
        return SCORE_KINDS[self.score_kind]

    def to(self, device) -> "Predictor":
        """Eval mode on ``device`` (channels_last on CUDA), as the extraction engine does for extraction."""
        if self.network is not None:
            from ..features.engine import prepare_model

            prepare_model(self.network, device)
        self.device = device
        return self

    def __call__(self, pixels) -> np.ndarray:
        """uint8 pixels, (H, W, 3) or (N, H, W, 3), already resized and cropped by ``preprocess.resize_crop``
        -> (N, C) float64 scores. The CLI and `predict_folder` go through the extraction engine instead."""
        if not self.needs_torch:
            x = np.asarray(pixels)
            if x.dtype != np.uint8 or x.ndim not in (3, 4) or x.shape[-1] != 3:
                raise UsageError(f"expected uint8 pixels of shape (N, H, W, 3), got {tuple(x.shape)} {x.dtype}")
            return np.asarray(self.score_pixels(x[None] if x.ndim == 3 else x), dtype=np.float64)
        import torch

        x = torch.as_tensor(np.ascontiguousarray(pixels))
        if x.dtype != torch.uint8 or x.shape[-1] != 3 or x.ndim not in (3, 4):
            raise UsageError(f"expected uint8 pixels of shape (N, H, W, 3), got {tuple(x.shape)} {x.dtype}")
        if x.ndim == 3:
            x = x[None]
        device = self.device if self.device is not None else torch.device("cpu")
        net = self._network(device)
        from ..runtime import takes_pixels

        if takes_pixels(net):  # onnxruntime on uint8 pixels, normalisation inside (featx.runtime)
            return np.asarray(self.to_scores(np.asarray(net(x.numpy()), dtype=np.float32)), dtype=np.float64)
        x = self.preprocess.normalize(x.to(device).permute(0, 3, 1, 2)).contiguous()
        with torch.inference_mode():
            out = net(x).float().cpu().numpy()
        return np.asarray(self.to_scores(out), dtype=np.float64)

    def _network(self, device):
        """``forward`` as `featx.runtime.network_for` runs it on ``device`` (made once per device and runtime: the
        onnxruntime graph is loaded and parity-checked on the first call)."""
        from ..runtime import network_for

        key = (str(device), str(self.runtime))
        if self._net is None or self._net[0] != key:
            fn = self.forward if self.network is None else network_for(
                self.forward, self.network, self.preprocess, device, runtime=self.runtime, what=self.what)
            self._net = (key, fn)
        return self._net[1]

    def check_image_size(self, image_size: Optional[int]) -> None:
        """``--image-size`` can only confirm the size the model was made at: a head's features, and a trained
        network's weights, are only meaningful at the recorded preprocessing, so another size is refused."""
        if image_size is None or int(image_size) == self.image_size:
            return
        how = ("extract features at that size (`featx extract --image-size N`) and fit a new head on them"
               if self.kind == "head" else "train a model at that size (`--image-size N`)")
        if not self.needs_torch:
            how += ", then export it again"
        raise UsageError(f"this {self.kind} model was made at {self.image_size} px and predict always uses the "
                         f"preprocessing recorded in the model; --image-size {image_size} would give other features. "
                         f"Drop --image-size, or {how}")


def load_predictor(model=None, *, weights=None, strict: bool = False, image_size: Optional[int] = None) -> Predictor:
    """Resolve ``--model`` into a Predictor.

    ``model``: a head file (.skops), a run folder / model.json / .safetensors of a trained model, an ``.onnx`` file
    from `featx export`, or a loaded ``Head`` / ``TrainedModel`` / ``OnnxPredictor``; ``None`` means the head at fit's
    default path. ``weights`` names the backbone weights of a head fitted on features from a local file;
    ``image_size`` (optional) must equal the recorded crop size.
    """
    if model is None:
        model = _default_model()
    kind = artifact_kind(model)
    pred = LOADERS[kind](model, weights=weights, strict=strict)
    pred.classes = [safe_str(str(c)) for c in pred.classes]  # names end up in tables, PNGs and folder names
    pred.check_image_size(image_size)
    return pred


def artifact_kind(model) -> str:
    """Which loader handles ``model``: "head", "trained" or "onnx". The only place that looks at artifact types.

    Paths are told apart by suffix before anything heavy is imported: an ``.onnx`` file must be recognised on a
    machine without torch (featx.heads and featx.training import it)."""
    from ..export.onnx_predictor import OnnxPredictor  # numpy + onnxruntime only (lazily), no torch

    if isinstance(model, OnnxPredictor):
        return "onnx"
    if not isinstance(model, (str, bytes, os.PathLike)):
        from ..heads.store import Head

        if isinstance(model, Head):
            return "head"
        if _is_trained_model(model):
            return "trained"
    path = Path(os.fsdecode(model))
    shown = safe_str(str(path))
    if not path.exists():
        raise ArtifactError(f"model {shown} does not exist; {HOW_TO_MAKE_A_MODEL}")
    suffix = path.suffix.lower()
    if path.is_file() and suffix == ".skops":
        return "head"
    if path.is_file() and suffix == ".onnx":
        return "onnx"
    if path.is_dir() or suffix in (".json", ".safetensors"):
        return "trained"
    raise ArtifactError(f"{shown} is not a model featx can predict with: give a head file (.skops) from `featx fit`, "
                        "a run folder (or its model.json) from `featx finetune` / `featx scratch`, or an .onnx file "
                        "from `featx export`")


def model_device(model, device: str = "auto"):
    """The device ``model`` will run on: onnxruntime's CPU for an ONNX model (torch is not imported), else
    `featx.devices.resolve_device`. ``model=None`` means the default head, as in `load_predictor`."""
    if artifact_kind(_default_model() if model is None else model) != "onnx":
        from ..devices import resolve_device

        return resolve_device(device)
    if str(device or "auto").lower() not in ("auto", "cpu"):
        raise UsageError(f"--device {device}: an exported ONNX model runs on the CPU with onnxruntime; drop --device, "
                         "or predict on the GPU with the model it was exported from")
    return RuntimeDevice()


def _default_model() -> Path:
    from ..heads.store import DEFAULT_HEAD_PATH

    path = Path(DEFAULT_HEAD_PATH)
    if not path.exists():
        raise ArtifactError(f"no model given and no head at {path}; {HOW_TO_MAKE_A_MODEL}; or pass --model "
                            "(a head .skops file, or a run folder from `featx finetune` / `featx scratch`)")
    return path


def _is_trained_model(obj) -> bool:
    try:
        from ..training.checkpoint import TrainedModel
    except ImportError:  # pragma: no cover - training is an optional part of the install
        return False
    return isinstance(obj, TrainedModel)


def _from_head(model, *, weights=None, strict: bool = False) -> Predictor:
    from ..backbones import backbone_from_meta
    from ..heads import load_head
    from ..heads.store import Head

    head = model if isinstance(model, Head) else load_head(Path(model), strict=strict)
    if not head.feature_meta.get("backbone"):
        raise ArtifactError(f"head {head.path or ''} records no backbone provenance; re-fit it with `featx fit`")
    bb = backbone_from_meta(head.feature_meta, weights=weights)
    head.check_compatible(bb.meta(), bb.feature_dim)
    return Predictor(
        preprocess=bb.preprocess, forward=bb.forward_features, to_scores=lambda feats: head.predict_scores(feats)[0],
        classes=list(head.classes), score_kind=head.score_kind, description=f"{head.kind} head on {bb.name} features",
        kind="head", network=bb.model, path=head.path, what=f"features of {bb.name} at {bb.layer}",
        seen=head.meta.get("seen"))


def _from_trained(model, *, weights=None, strict: bool = False) -> Predictor:
    import torch

    if weights is not None:
        raise UsageError("--weights applies to heads (it names the backbone weights); a trained model carries its own")
    if _is_trained_model(model):
        tm = model
    else:
        from ..training import load_model

        tm = load_model(Path(model), device="cpu")
    net = tm.model

    def forward(x):
        return torch.softmax(net(x).float(), dim=1)

    return Predictor(
        preprocess=tm.preprocess, forward=forward, to_scores=lambda p: np.asarray(p, dtype=np.float64),
        classes=[str(c) for c in tm.classes], score_kind="probability",
        description=f"{tm.kind or 'trained'} model {tm.name}", kind=tm.kind or "trained", network=net, path=tm.path,
        what=f"probabilities of {tm.kind or 'trained'} model {tm.name}",
        seen=(getattr(tm, "meta", None) or {}).get("seen"))


def _from_onnx(model, *, weights=None, strict: bool = False) -> Predictor:
    """An exported ONNX file (or a loaded OnnxPredictor): classes, score kind and preprocessing from its metadata."""
    from ..data.preprocess import Preprocess
    from ..export.onnx_predictor import OnnxPredictor, load_onnx_predictor

    if weights is not None:
        raise UsageError("--weights applies to heads (it names the backbone weights); an exported ONNX model carries "
                         "its own")
    onnx = model if isinstance(model, OnnxPredictor) else load_onnx_predictor(Path(os.fsdecode(model)))
    what = onnx.description or f"{onnx.kind or 'exported'} model"
    return Predictor(
        preprocess=Preprocess.from_dict(onnx.preprocess), forward=None, to_scores=_as_scores,
        classes=list(onnx.classes), score_kind=onnx.score_kind, description=f"{what} (ONNX)", kind=onnx.kind or "onnx",
        path=onnx.path, score_pixels=onnx.predict, largest_activation=onnx.largest_activation)


def _as_scores(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


# artifact kind -> loader(model, weights=, strict=) -> Predictor
LOADERS = {"head": _from_head, "trained": _from_trained, "onnx": _from_onnx}
