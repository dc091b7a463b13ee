"""The Backbone object: a network, its preprocessing, and pooled features from its classifier input or an earlier stage."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..data.preprocess import Preprocess

POOLED = "pooled"


class _StopForward(Exception):
    """Raised by a hook once the wanted activation is captured, so the rest of the network is skipped."""


@dataclass
class Backbone:
    """A (pretrained) image network plus everything needed to reproduce its features elsewhere."""

    name: str  # canonical name: efficientnet_lite0, timm/resnet18.a1_in1k, tv/resnet18 ...
    model: nn.Module  # the full network, classifier included (fine-tuning trains it)
    preprocess: Preprocess
    weights_sha256: str  # sha256 of the weights file, or "random-init:seed0"
    weights_source: str  # human-readable: package, cache file, user file, random
    layer: str = POOLED
    feature_dim: int = 0
    source: str = ""  # embedded | timm | torchvision
    arch: str = ""  # architecture name inside its library
    _classifier_path: str = field(default="", repr=False)

    # -- features --------------------------------------------------------------------------------------
    def _capture_module(self) -> tuple[nn.Module, bool]:
        """(module, use_input): pooled features are the classifier's input; a stage gives its output."""
        if self.layer == POOLED:
            return self.classifier(), True
        return self.model.get_submodule(self.layer), False

    def _timm_pre_logits(self) -> bool:
        """Whether timm's ``forward_head(pre_logits=True)`` returns exactly the classifier's input here.

        By timm's code it does when the classifier is the model's own child (EfficientNet, ResNet, ViT, MobileNet,
        DenseNet...) or the ``fc`` of timm's ClassifierHead / NormMlpClassifierHead (ConvNeXt, Swin, MaxViT...).
        Measured on random-init networks (tests/test_backbones.py): identical to the classifier-input hook on
        17 architectures (CNNs, ViT, Swin, MaxViT, ConvNeXt...); different on efficientvit_m0, whose classifier sits behind a BatchNorm inside its head
        (head.linear), so such heads keep the hook.
        """
        if self.source not in ("timm", "embedded") or not hasattr(self.model, "forward_head"):
            return False
        parent, _, leaf = self._classifier_path.rpartition(".")
        if not parent:
            return True
        from timm.layers import ClassifierHead, NormMlpClassifierHead

        return parent == "head" and leaf == "fc" and isinstance(self.model.get_submodule("head"),
                                                                (ClassifierHead, NormMlpClassifierHead))

    @torch.inference_mode()
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float batch (N,3,H,W) -> features (N, feature_dim): classifier input, or a stage's output
        globally average-pooled. The network stops at the captured layer (the classifier is never run).

        Pooled features of timm networks come from timm's ``forward_head(pre_logits=True)`` where that is the
        classifier input (see `_timm_pre_logits`). Stages and every other network use a forward hook that stops
        the pass: timm's ``forward_intermediates`` matched the hook on every CNN stage tried but not on ViT blocks
        (it drops the class token and reshapes to NCHW), and ``--layer`` also accepts any module name, which it
        cannot address.
        """
        if self.layer == POOLED and self._timm_pre_logits():
            return self.model.forward_head(self.model.forward_features(x), pre_logits=True).flatten(1).float()
        return self._hooked_features(x)

    def _hooked_features(self, x: torch.Tensor) -> torch.Tensor:
        module, use_input = self._capture_module()
        captured: list = []

        def pre_hook(_m, args):
            captured.append(args[0])
            raise _StopForward

        def post_hook(_m, _args, output):
            captured.append(output)
            raise _StopForward

        handle = module.register_forward_pre_hook(pre_hook) if use_input else module.register_forward_hook(post_hook)
        try:
            self.model(x)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if not captured:
            raise RuntimeError(f"layer {self.layer!r} of {self.name} was not reached in the forward pass")
        feats = captured[0]
        if isinstance(feats, (tuple, list)):
            feats = feats[0]
        if feats.ndim == 4:  # stage output, or a classifier that takes maps: global average pool
            # channels_last models may hand back NHWC-strided tensors; mean over H, W works on either.
            feats = feats.float().mean(dim=(2, 3))
        elif feats.ndim == 3:  # token sequences (ViT stages): average over tokens
            feats = feats.float().mean(dim=1)
        return feats.flatten(1).float()

    # -- provenance ------------------------------------------------------------------------------------
    def meta(self) -> dict:
        """What must match for features to be comparable (and what was used, for the record)."""
        import timm
        import torchvision

        from .. import __version__

        return {
            "backbone": self.name,
            "arch": self.arch,
            "source": self.source,
            "weights_sha256": self.weights_sha256,
            "weights_source": self.weights_source,
            "preprocess": self.preprocess.to_dict(),
            "layer": self.layer,
            "feature_dim": self.feature_dim,
            "versions": {
                "featx": __version__,
                "torch": torch.__version__,
                "torchvision": torchvision.__version__,
                "timm": timm.__version__,
                "pillow": _pillow_version(),
            },
        }

    # -- fine-tuning -----------------------------------------------------------------------------------
    def classifier(self) -> nn.Module:
        return self.model.get_submodule(self._classifier_path)

    def reset_classifier(self, num_classes: int) -> nn.Module:
        """Replace the classifier by a fresh Linear(in_features, num_classes); returns the new module."""
        old = self.classifier()
        in_features = old.in_features if isinstance(old, nn.Linear) else self._classifier_in_features()
        new = nn.Linear(in_features, num_classes)
        parent_path, _, attr = self._classifier_path.rpartition(".")
        parent = self.model.get_submodule(parent_path) if parent_path else self.model
        setattr(parent, attr, new)
        if hasattr(self.model, "num_classes"):
            try:
                self.model.num_classes = num_classes
            except AttributeError:
                pass
        return new

    def _classifier_in_features(self) -> int:
        dim = getattr(self.model, "num_features", None)
        if dim:
            return int(dim)
        raise RuntimeError(f"cannot tell the classifier input size of {self.name}")

    def layer_groups(self) -> list:
        """Modules with parameters, grouped bottom to top (stem, each stage, final conv/norm); classifier excluded.

        `--unfreeze N` unfreezes the top N groups; layer-wise learning rates decay from the top group down.
        """
        classifier = self.classifier()
        groups: list = []
        pending: list = []  # param-holding modules not yet attached to a group (stem parts, head convs)

        def has_params(m: nn.Module) -> bool:
            return any(True for _ in m.parameters())

        def contains_classifier(m: nn.Module) -> bool:
            return any(sub is classifier for sub in m.modules())

        for _name, child in self.model.named_children():
            if child is classifier:
                continue
            if contains_classifier(child):
                # e.g. torchvision's Sequential(Dropout, Linear): keep its non-classifier parts with params
                rest = [m for m in child.children() if m is not classifier and has_params(m)]
                pending.extend(rest)
                continue
            if not has_params(child):
                continue
            kids = list(child.named_children())
            if isinstance(child, (nn.Sequential, nn.ModuleList)) and len(kids) > 1 and all(k.isdigit() for k, _ in kids):
                if pending:
                    groups.append(pending)
                    pending = []
                groups.extend([[m] for _, m in kids if has_params(m)])
            elif _is_stage_name(_name):
                if pending:
                    groups.append(pending)
                    pending = []
                groups.append([child])
            else:
                pending.append(child)
        if pending:
            groups.append(pending)
        return groups

    def to(self, device) -> "Backbone":
        self.model.to(device)
        return self


def _is_stage_name(name: str) -> bool:
    return name.startswith("layer") or name.startswith("stage") or name in ("blocks", "features", "encoder")


def _pillow_version() -> str:
    import PIL

    return PIL.__version__


def infer_feature_dim(bb: Backbone) -> int:
    """Run one tiny forward pass to learn the feature size at `bb.layer` (cheap: stops at that layer)."""
    was_training = bb.model.training
    bb.model.eval()
    size = bb.preprocess.input_size
    x = torch.zeros(1, 3, size, size)
    dim = int(bb.forward_features(x).shape[1])
    bb.model.train(was_training)
    return dim


def stage_names(model: nn.Module) -> list:
    """Names a user can pass as --layer: timm's feature_info stages, else top-level children with parameters."""
    info = getattr(model, "feature_info", None)
    if info is not None:
        try:
            return [f["module"] for f in info] if isinstance(info, list) else list(info.module_name())
        except Exception:  # feature_info formats differ across timm versions
            pass
    names = []
    for name, child in model.named_children():
        kids = list(child.named_children())
        if isinstance(child, nn.Sequential) and kids and all(k.isdigit() for k, _ in kids):
            names.extend(f"{name}.{k}" for k, _ in kids)
        elif any(True for _ in child.parameters()):
            names.append(name)
    return names


def resolve_layer(model: nn.Module, layer: Optional[str]) -> str:
    from ..errors import UsageError

    if layer in (None, "", POOLED):
        return POOLED
    stages = stage_names(model)
    if layer.startswith("stage") and layer[5:].isdigit():
        idx = int(layer[5:])
        if not 0 <= idx < len(stages):
            raise UsageError(f"--layer {layer}: this network has stages stage0..stage{len(stages) - 1} ({', '.join(stages)})")
        return stages[idx]
    try:
        model.get_submodule(layer)
    except AttributeError:
        raise UsageError(
            f"--layer {layer!r} is not a module of this network; use 'pooled' (default), stage0..stage{len(stages) - 1} "
            f"or one of: {', '.join(stages)}"
        ) from None
    return layer
