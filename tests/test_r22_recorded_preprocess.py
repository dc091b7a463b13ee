"""Issue 22.6's rule for the other model files: a preprocessing recipe read from a trained model's model.json or a
head's backbone record is checked like an ONNX file's (crop size 8 to 2048 px, a known interpolation, three means
and stds) before any network is built; an edited one is one line, exit 5, and never blamed on the images."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from featx.cli.app import app
from featx.data.preprocess import Preprocess
from featx.errors import ArtifactError
from tests.imagegen import make_folder

runner = CliRunner()


@pytest.fixture
def trained(tmp_path):
    """A scratch-style run folder (untrained lenet5 at 32 px) as featx writes it."""
    from featx.training import checkpoint, zoo

    run = tmp_path / "run"
    run.mkdir()
    checkpoint.save_weights(run / "best.safetensors", zoo.build("lenet5", 2).state_dict())
    checkpoint.write_model_json(run, {"kind": "scratch", "arch": "lenet5", "image_size": 32, "classes": ["x", "y"],
                                      "preprocess": Preprocess(32, 32).to_dict(), "best": {}})
    return run


def _edit_preprocess(run, **changes):
    doc = json.loads((run / "model.json").read_text())
    doc["preprocess"] = {**doc["preprocess"], **changes}
    (run / "model.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("changes,words", [
    ({"input_size": 99999, "resize": 99999}, "crop size 99999 is not a whole number of pixels between 8 and 2048"),
    ({"input_size": -4}, "crop size -4"),
    ({"interpolation": "magic"}, "unknown interpolation 'magic'"),
    ({"mean": [0.5]}, "mean [0.5] is not three finite numbers"),
])
def test_an_edited_model_json_recipe_is_refused_on_load(trained, changes, words):
    from featx.training import checkpoint

    assert checkpoint.load_model(trained).preprocess.input_size == 32  # as written: loads
    _edit_preprocess(trained, **changes)
    with pytest.raises(ArtifactError, match="records a preprocessing featx cannot use") as err:
        checkpoint.load_model(trained)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_predict_blames_the_model_not_the_images(trained, tmp_path):
    images = make_folder(tmp_path / "imgs", classes=("x", "y"), n_per_class=2, splits=None, size=24)
    _edit_preprocess(trained, interpolation="magic")  # before: every image "failed to decode"; is this an image folder?
    r = runner.invoke(app, ["predict", str(images), "--model", str(trained), "-o", str(tmp_path / "p.csv"),
                            "--workers", "0"])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 5 and len(lines) == 1, (r.output, r.exception)
    assert "unknown interpolation 'magic'" in lines[0] and "image folder" not in r.output
    assert not (tmp_path / "p.csv").exists()


def test_a_head_backbone_record_is_checked_before_the_network_is_built(monkeypatch):
    import featx.backbones as B

    def build(*a, **kw):
        raise AssertionError("the network was built from an unchecked recipe")

    monkeypatch.setattr(B, "create_backbone", build)
    meta = {"backbone": "timm/test_resnet", "weights_sha256": B.RANDOM_INIT,
            "preprocess": {**Preprocess(32, 36).to_dict(), "input_size": 99999}}
    with pytest.raises(ArtifactError, match="feature provenance records a preprocessing featx cannot use"):
        B.backbone_from_meta(meta)
