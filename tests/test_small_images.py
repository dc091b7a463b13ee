"""Small images (issue 15.4): --image-size auto, recorded so predict repeats it; plain stores' provenance unchanged.

--tta flip and --concat were tried and removed (no help on full-size or 128-px photos, BENCHMARKS.md "Small images")."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import featx
from featx.errors import UsageError
from featx.features import sizing
from featx.features.store import provenance_fingerprint
from tests.imagegen import make_folder, make_image

SIZE = 32  # the real lite0 network at a tiny crop: same code path, fast on the CPU


@pytest.fixture(scope="module")
def bb():
    return featx.create_backbone("efficientnet_lite0", image_size=SIZE)


def _extract(folder, out, backbone, **kw):
    return featx.load_features(featx.extract_features(folder, out, backbone=backbone, workers=0, **kw).path)


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



# -- provenance and predict ---------------------------------------------------------------------------------------
def test_plain_store_provenance_is_the_four_keys(bb, tmp_path):
    """The fingerprint of a plain store (and of heads fitted on it) is that of its backbone, weights, preprocessing
    and layer only: no tta/concat keys, in the meta or the key, so heads fitted before that experiment still match."""
    from featx._io import fingerprint
    from featx.features.store import provenance_key

    data = make_folder(tmp_path / "imgs", classes=("a",), n_per_class=2, splits=None, size=40)
    meta = _extract(data, tmp_path / "f.npz", bb).meta
    assert "tta" not in meta and "concat" not in meta
    key = {k: meta[k] for k in ("backbone", "weights_sha256", "preprocess", "layer")}
    assert provenance_key(meta) == key
    assert provenance_fingerprint(meta) == provenance_fingerprint(bb.meta()) == fingerprint(key)


@pytest.fixture(scope="module")
def auto_head(tmp_path_factory):
    """(data, store, head) for features of 48-px images at the size --image-size auto picks for them."""
    base = tmp_path_factory.mktemp("auto")
    data = make_folder(base / "data", classes=("ant", "bee"), n_per_class=4, splits=("train", "val"), size=48)
    res = featx.extract_features(data, base / "f.npz", backbone="efficientnet_lite0", image_size="auto", workers=0)
    featx.fit_head(res.path, output=base / "head.skops", C=1.0, cv=0)
    return data, res.path, base / "head.skops"


def test_extract_auto_records_the_choice_and_predict_uses_it(auto_head):
    data, store, head_path = auto_head
    fs = featx.load_features(store)
    want = sizing.auto_size(256, 292, 48)
    assert fs.meta["preprocess"]["input_size"] == want < 256
    assert fs.meta["image_size"] == {"mode": "auto", "size": want, "default": 256, "median_short_side": 48, "sampled": 16}
    from featx.predict.predictor import load_predictor

    assert load_predictor(head_path).image_size == want


def test_predict_extracts_new_images_exactly_like_extract(auto_head):
    from featx.features.engine import iter_outputs
    from featx.predict.predictor import load_predictor
    from featx.runtime import network_for

    data, store, head_path = auto_head
    fs = featx.load_features(store)
    pred = load_predictor(head_path)
    paths = [data / p for p in fs.paths]
    # the network as predict runs it (featx.runtime: the same engine extract picked)
    fn = network_for(pred.forward, pred.network, pred.preprocess, torch.device("cpu"), what=pred.what)
    rows = np.concatenate([b.outputs for b in iter_outputs(paths, pred.preprocess, fn,
                                                           device=torch.device("cpu"), workers=0)])
    assert rows.shape == (len(fs), 1280)
    np.testing.assert_allclose(rows, fs.features, rtol=1e-5, atol=1e-6)
    # and predict_folder's scores are the head's scores on the stored features
    out = featx.predict_folder(data / "val", model=head_path, output=False, workers=0)
    head = featx.load_head(head_path)
    val = fs.split("val")
    want = dict(zip(val.paths, head.predict_scores(val.features)[0].max(1)))
    got = {f"val/{r['path']}": r["confidence"] for r in out.rows}
    assert got.keys() == want.keys()
    assert all(abs(got[k] - want[k]) < 1e-5 for k in want)


def test_cli_extract_says_what_size_it_used(tmp_path):
    from typer.testing import CliRunner

    from featx.cli.app import app

    data = make_folder(tmp_path / "imgs", classes=("a",), n_per_class=2, splits=None, size=40)
    out = tmp_path / "f.npz"
    r = CliRunner().invoke(app, ["extract", str(data), "-o", str(out), "--workers", "0", "--image-size", "32", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["image_size"] == {"mode": "fixed", "size": 32, "default": 256, "median_short_side": None,
                                     "sampled": 0}
    assert summary["feature_dim"] == 1280 and "tta" not in summary and "concat" not in summary
    r = CliRunner().invoke(app, ["extract", str(data), "-o", str(tmp_path / "g.npz"), "--image-size", "huge"])
    assert r.exit_code == 2 and "--image-size must be a number of pixels or 'auto'" in r.output
    assert not (tmp_path / "g.npz").exists()
    for gone in (["--tta", "flip"], ["--concat", "stage4"]):  # removed options: click refuses them, nothing written
        r = CliRunner().invoke(app, ["extract", str(data), "-o", str(tmp_path / "h.npz"), *gone])
        assert r.exit_code == 2 and "No such option" in r.output and not (tmp_path / "h.npz").exists()
