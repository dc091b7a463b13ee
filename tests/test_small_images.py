"""Small images (issue 15.4): --image-size auto, --tta flip, --concat, and predict repeating all three."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import featx
from featx.errors import ArtifactError, UsageError
from featx.features import sizing
from featx.features.store import provenance_fingerprint
from tests.imagegen import make_folder, make_image

SIZE = 32  # the real lite0 network at a tiny crop: same code path, fast on the CPU


@pytest.fixture(scope="module")
def bb():
    return featx.create_backbone("efficientnet_lite0", image_size=SIZE)


def _extract(folder, out, backbone, **kw):
    return featx.load_features(featx.extract_features(folder, out, backbone=backbone, workers=0, **kw).path)


# -- flip TTA ---------------------------------------------------------------------------------------------------------
def test_flip_tta_is_the_mean_of_the_image_and_its_mirror_features(bb):
    x = torch.randn(3, 3, SIZE, SIZE)
    flip = bb.configured(tta="flip")
    want = (bb.forward_features(x) + bb.forward_features(x.flip(3))) / 2
    assert torch.allclose(flip.forward_features(x), want, atol=1e-6)
    assert not torch.allclose(bb.forward_features(x), want, atol=1e-3)  # the mirror does change the features
    assert flip.feature_dim == bb.feature_dim == 1280 and flip.meta()["tta"] == "flip"


def test_extract_with_flip_equals_the_mean_over_mirrored_files(bb, tmp_path):
    """Through the whole extraction path: an image's flip-TTA row is the mean of the plain rows of the image and of a
    mirrored copy of the file (square PNGs, so the centre crop of the mirror is the mirror of the crop)."""
    plain, mirrored = tmp_path / "plain" / "a", tmp_path / "mirrored" / "a"
    mirrored.mkdir(parents=True)
    for i in range(3):
        p = make_image(plain / f"{i}.png", size=(40, 40), seed=i, fmt="PNG")
        with Image.open(p) as im:
            ImageOps.mirror(im).save(mirrored / f"{i}.png")
    tta = _extract(tmp_path / "plain", tmp_path / "t.npz", bb, tta="flip")
    a = _extract(tmp_path / "plain", tmp_path / "a.npz", bb)
    m = _extract(tmp_path / "mirrored", tmp_path / "m.npz", bb)
    assert tta.paths == a.paths == m.paths
    np.testing.assert_allclose(tta.features, (a.features + m.features) / 2, rtol=1e-4, atol=1e-5)
    assert tta.meta["tta"] == "flip" and a.meta["tta"] == "none"


def test_bad_tta_is_refused_before_work(bb):
    with pytest.raises(UsageError, match="--tta must be one of none, flip"):
        bb.configured(tta="rotate")


# -- --image-size auto --------------------------------------------------------------------------------------------
def test_auto_size_rule_as_documented():
    # lite0: crop 256 after a resize to 292. Images of at least 292 / MAX_UPSAMPLE px on the short side keep 256.
    keep_from = int(np.ceil(292 / sizing.MAX_UPSAMPLE))
    for short in (3000, 374, 292, keep_from):
        assert sizing.auto_size(256, 292, short) == 256
    # Smaller ones: the crop whose resize upsamples them MAX_UPSAMPLE-fold, on the 32-px grid, at least MIN_SIZE.
    for short in (128, 100, keep_from - 1):
        want = 256 * short * sizing.MAX_UPSAMPLE / 292
        got = sizing.auto_size(256, 292, short)
        assert got % 32 == 0 and abs(got - want) <= 16 and got <= 256
    assert sizing.auto_size(256, 292, 100) < sizing.auto_size(256, 292, 128) < 256
    assert sizing.auto_size(256, 292, 10) == sizing.MIN_SIZE
    assert sizing.auto_size(256, 292, None) == 256  # no readable image: the backbone's own
    assert sizing.auto_size(32, 36, 10) == 32  # never above the backbone's own size


def test_choose_reads_the_median_short_side_of_the_files(tmp_path):
    pp = featx.create_backbone("efficientnet_lite0", pretrained=False).preprocess  # 256 / 292
    small = [make_image(tmp_path / f"s{i}.jpg", size=(170 + i, 128)) for i in range(5)]
    large = [make_image(tmp_path / f"l{i}.jpg", size=(600, 400 + i)) for i in range(3)]
    junk = tmp_path / "junk.jpg"
    junk.write_text("not an image")
    c = sizing.choose_image_size(small + large + [junk], pp, "auto")  # median of 5 x 128 and 3 x 400+
    assert (c.mode, c.median_short_side, c.sampled, c.default) == ("auto", 128, 8, 256)
    assert c.size == sizing.auto_size(256, 292, 128) < 256
    c = sizing.choose_image_size(large, pp, "auto")
    assert (c.size, c.median_short_side) == (256, 401)
    assert sizing.choose_image_size(small, pp, None).size == 256  # None: the backbone's own, files not read
    assert sizing.choose_image_size(small, pp, "224") == sizing.SizeChoice("fixed", 224, 256)
    for bad in ("big", 4, "0"):
        with pytest.raises(UsageError, match="--image-size"):
            sizing.parse_image_size(bad)


def test_extract_auto_records_the_choice_and_predict_uses_it(tmp_path):
    data = make_folder(tmp_path / "imgs", classes=("a", "b"), n_per_class=3, splits=("train", "val"), size=48)
    fs = _extract(data, tmp_path / "f.npz", "efficientnet_lite0", image_size="auto")
    want = sizing.auto_size(256, 292, 48)
    assert fs.meta["preprocess"]["input_size"] == want < 256
    assert fs.meta["image_size"] == {"mode": "auto", "size": want, "default": 256, "median_short_side": 48, "sampled": 12}
    featx.fit_head(fs, output=tmp_path / "h.skops", C=1.0, cv=0)
    from featx.predict.predictor import load_predictor

    assert load_predictor(tmp_path / "h.skops").image_size == want


# -- --concat -------------------------------------------------------------------------------------------------------
def test_concat_columns_are_the_pooled_features_then_each_stage(bb, tmp_path):
    data = make_folder(tmp_path / "imgs", classes=("a", "b"), n_per_class=2, splits=None, size=40)
    both = _extract(data, tmp_path / "c.npz", bb, concat=["stage3", "stage4"])
    assert both.dim == 1280 + 112 + 320 and both.meta["concat"] == ["blocks.4", "blocks.6"]
    assert both.meta["feature_dim"] == 1712
    pooled = _extract(data, tmp_path / "p.npz", bb)
    s3 = _extract(data, tmp_path / "s3.npz", featx.create_backbone("efficientnet_lite0", image_size=SIZE, layer="stage3"))
    s4 = _extract(data, tmp_path / "s4.npz", featx.create_backbone("efficientnet_lite0", image_size=SIZE, layer="stage4"))
    for cols, part in ((slice(0, 1280), pooled), (slice(1280, 1392), s3), (slice(1392, 1712), s4)):
        np.testing.assert_allclose(both.features[:, cols], part.features, rtol=1e-5, atol=1e-6)


def test_concat_names_are_checked():
    base = featx.create_backbone("efficientnet_lite0", pretrained=False, image_size=SIZE)
    assert base.configured(concat="stage4, blocks.5").concat == ("blocks.6", "blocks.5")
    for bad, msg in ((["pooled"], "pooled features are always included"), (["stage4", "blocks.6"], "given twice"),
                     (["stage9"], "stages stage0..stage4"), (["nonsense"], "--concat 'nonsense' is not a module")):
        with pytest.raises(UsageError, match=msg):
            base.configured(concat=bad)
    early = featx.create_backbone("efficientnet_lite0", pretrained=False, image_size=SIZE, layer="stage2")
    with pytest.raises(UsageError, match="come before --layer blocks.2"):
        early.configured(concat=["stage4"])


# -- provenance and predict ---------------------------------------------------------------------------------------
def test_plain_fingerprint_unchanged_and_recipe_in_provenance(bb):
    plain = bb.meta()
    old_key = {k: plain[k] for k in ("backbone", "weights_sha256", "preprocess", "layer")}  # before tta/concat
    from featx._io import fingerprint

    assert provenance_fingerprint(plain) == fingerprint(old_key)  # heads fitted before this still match
    assert provenance_fingerprint(bb.configured(tta="flip").meta()) != provenance_fingerprint(plain)
    assert provenance_fingerprint(bb.configured(concat=["stage4"]).meta()) != provenance_fingerprint(plain)


@pytest.fixture(scope="module")
def recipe_head(tmp_path_factory, bb):
    """(data, store, head) for features made with flip TTA and stage4 appended."""
    base = tmp_path_factory.mktemp("recipe")
    data = make_folder(base / "data", classes=("ant", "bee"), n_per_class=4, splits=("train", "val"), size=SIZE)
    res = featx.extract_features(data, base / "f.npz", backbone=bb, tta="flip", concat=["stage4"], workers=0)
    featx.fit_head(res.path, output=base / "head.skops", C=1.0, cv=0)
    return data, res.path, base / "head.skops"


def test_predict_extracts_new_images_exactly_like_extract(recipe_head):
    from featx.features.engine import iter_outputs
    from featx.predict.predictor import load_predictor

    data, store, head_path = recipe_head
    fs = featx.load_features(store)
    pred = load_predictor(head_path)
    paths = [data / p for p in fs.paths]
    rows = np.concatenate([b.outputs for b in iter_outputs(paths, pred.preprocess, pred.forward,
                                                           device=torch.device("cpu"), workers=0)])
    assert rows.shape == (len(fs), 1280 + 320)
    np.testing.assert_allclose(rows, fs.features, rtol=1e-5, atol=1e-6)
    # and predict_folder's scores are the head's scores on the stored features
    out = featx.predict_folder(data / "val", model=head_path, output=False, workers=0)
    head = featx.load_head(head_path)
    val = fs.split("val")
    want = dict(zip(val.paths, head.predict_scores(val.features)[0].max(1)))
    got = {f"val/{r['path']}": r["confidence"] for r in out.rows}
    assert got.keys() == want.keys()
    assert all(abs(got[k] - want[k]) < 1e-5 for k in want)


def test_head_refuses_features_made_without_the_recipe(recipe_head, bb, tmp_path):
    data, _, head_path = recipe_head
    plain = _extract(data, tmp_path / "plain.npz", bb.configured(concat=["stage4"]))  # same dim, no flip
    with pytest.raises(ArtifactError, match="differ in tta"):
        featx.load_head(head_path).predict(plain)


def test_cli_extract_takes_the_options_and_says_what_it_did(tmp_path):
    from typer.testing import CliRunner

    from featx.cli.app import app

    data = make_folder(tmp_path / "imgs", classes=("a",), n_per_class=2, splits=None, size=40)
    out = tmp_path / "f.npz"
    r = CliRunner().invoke(app, ["extract", str(data), "-o", str(out), "--workers", "0", "--image-size", "32",
                                 "--tta", "flip", "--concat", "stage4", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert (summary["tta"], summary["concat"], summary["feature_dim"]) == ("flip", ["blocks.6"], 1600)
    assert summary["image_size"]["mode"] == "fixed" and featx.load_features(out).meta["tta"] == "flip"
    r = CliRunner().invoke(app, ["extract", str(data), "-o", str(tmp_path / "g.npz"), "--image-size", "huge"])
    assert r.exit_code == 2 and "--image-size must be a number of pixels or 'auto'" in r.output
    assert not (tmp_path / "g.npz").exists()


def test_onnx_export_refuses_a_recipe_it_would_not_reproduce(recipe_head):
    from featx.export.graph import head_exportable

    with pytest.raises(UsageError, match="--tta or --concat"):
        head_exportable(featx.load_head(recipe_head[2]))
