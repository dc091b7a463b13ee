"""Issue 22.6: an ONNX file whose featx metadata was edited, or whose graph disagrees with it, is refused on load in
one line (exit 5) naming what is wrong; a failure of the onnxruntime session while it runs is one line, exit 5; an
ONNX file featx wrote under a name that is not UTF-8 opens."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from featx.cli.app import app
from featx.errors import ArtifactError
from tests.imagegen import make_folder

onnx = pytest.importorskip("onnx", reason="featx[export] is not installed")
pytest.importorskip("onnxruntime", reason="featx[export] is not installed")
from onnx import TensorProto, helper  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
runner = CliRunner()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A logistic head on a random-init timm test network at 32 px, exported by `featx export` (TorchScript: ~10x
    faster than dynamo on two cores), and its 6 images."""
    from featx.backbones import create_backbone
    from tests.test_export import _features, _head

    root = tmp_path_factory.mktemp("r22_onnx")
    folder = make_folder(root / "imgs", classes=("a", "b"), n_per_class=3, splits=None, size=40)
    bb = create_backbone("timm/test_resnet", pretrained=False, image_size=32)
    fs, _ = _features(bb, folder)
    _head(fs, "logistic", root / "head.skops")
    r = runner.invoke(app, ["export", str(root / "head.skops"), "-o", str(root / "model.onnx"), "--check",
                            str(folder), "--exporter", "torchscript"])
    assert r.exit_code == 0, r.output
    return {"onnx": root / "model.onnx", "images": folder}


def _props(model) -> dict:
    return {p.key: p.value for p in model.metadata_props}


def _set_props(model, **changes) -> None:
    props = {**_props(model), **changes}
    del model.metadata_props[:]
    for k, v in props.items():
        if v is not None:  # None: delete the key
            e = model.metadata_props.add()
            e.key, e.value = k, v


def _edit_json(model, key: str, fn) -> None:
    _set_props(model, **{key: json.dumps(fn(json.loads(_props(model)[key])))})


def _sized(n):
    """The crop size in both places the metadata records it (input and preprocess), as an editor would change it."""
    def edit(m):
        _edit_json(m, "featx.input", lambda d: {**d, "size": n})
        _edit_json(m, "featx.preprocess", lambda d: {**d, "input_size": n, "resize": n + 2 if n > 0 else n})
    return edit


def _huge_constant(m) -> None:
    """A ConstantOfShape of 2**48 floats (1 PiB) added to the scores: the graph loads, every run must allocate it."""
    m.graph.initializer.append(helper.make_tensor("huge_shape", TensorProto.INT64, [2], [1 << 24, 1 << 24]))
    out = m.graph.output[0].name
    for node in m.graph.node:
        for i, name in enumerate(node.output):
            if name == out:
                node.output[i] = "scores_before"
    m.graph.node.extend([
        helper.make_node("ConstantOfShape", ["huge_shape"], ["huge"],
                         value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])),
        helper.make_node("ReduceSum", ["huge"], ["huge_sum"], keepdims=0),
        helper.make_node("Add", ["scores_before", "huge_sum"], [out]),
    ])


def _dynamic_classes(m) -> None:
    """Scores tiled by a count computed from the pixels (always 1): onnxruntime cannot know the class axis before it
    runs, so only the scores it returns can show that 5 names were written for 2 scores."""
    out = m.graph.output[0].name
    for node in m.graph.node:
        for i, name in enumerate(node.output):
            if name == out:
                node.output[i] = "scores_before"
    m.graph.initializer.extend([helper.make_tensor("k256", TensorProto.INT64, [], [256]),
                                helper.make_tensor("k1", TensorProto.INT64, [], [1]),
                                helper.make_tensor("one", TensorProto.INT64, [1], [1]),
                                helper.make_tensor("axis0", TensorProto.INT64, [1], [0])])
    m.graph.node.extend([
        helper.make_node("ReduceMax", [m.graph.input[0].name], ["mx"], keepdims=0),
        helper.make_node("Cast", ["mx"], ["mx64"], to=TensorProto.INT64),
        helper.make_node("Div", ["mx64", "k256"], ["zero"]),  # a uint8 over 256: 0
        helper.make_node("Add", ["zero", "k1"], ["rep"]),
        helper.make_node("Unsqueeze", ["rep", "axis0"], ["rep1"]),
        helper.make_node("Concat", ["one", "rep1"], ["reps"], axis=0),
        helper.make_node("Tile", ["scores_before", "reps"], [out]),
    ])
    dims = m.graph.output[0].type.tensor_type.shape.dim
    dims[1].dim_param = "classes"
    _set_props(m, **{"featx.classes": json.dumps(list("abcde"))})


def tampered(exported, tmp_path, edit, name="model.onnx") -> Path:
    model = onnx.load(str(exported["onnx"]))
    edit(model)
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


# case -> (edit, words the one-line error must hold)
CASES = {
    "graph 32 px, metadata 64": (_sized(64), "graph takes pixels of shape (batch, 32, 32, 3), but its metadata says "
                                             "(batch, 64, 64, 3)"),
    "5 class names for 2 scores": (lambda m: _set_props(m, **{"featx.classes": json.dumps(list("abcde"))}),
                                   "graph scores 2 classes, but its metadata names 5"),
    "classes as a dict": (lambda m: _set_props(m, **{"featx.classes": json.dumps({"a": 0, "b": 1})}),
                          "class names must be a list of strings"),
    "classes as numbers": (lambda m: _set_props(m, **{"featx.classes": json.dumps([0, 1])}),
                           "class names must be a list of strings"),
    "a class name twice": (lambda m: _set_props(m, **{"featx.classes": json.dumps(["a", "a"])}),
                           "class names repeat a name"),
    "size 4096": (_sized(4096), "crop size 4096 is not a whole number of pixels between 8 and 2048"),
    "negative size": (_sized(-5), "crop size -5 is not a whole number of pixels between 8 and 2048"),
    "input size != crop size": (lambda m: _edit_json(m, "featx.input", lambda d: {**d, "size": 48}),
                                "input size 48 is not the preprocessing's crop size 32"),
    "unknown interpolation": (lambda m: _edit_json(m, "featx.preprocess", lambda d: {**d, "interpolation": "magic"}),
                              "unknown interpolation 'magic'"),
    "no std": (lambda m: _edit_json(m, "featx.preprocess", lambda d: {k: v for k, v in d.items() if k != "std"}),
               "no 'std'"),
    "zero std": (lambda m: _edit_json(m, "featx.preprocess", lambda d: {**d, "std": [0, 0, 0]}),
                 "std [0, 0, 0] is not three finite numbers above 0"),
    "unknown score kind": (lambda m: _set_props(m, **{"featx.score_kind": "vibes"}), "score kind 'vibes'"),
    "no input record": (lambda m: _set_props(m, **{"featx.input": None}), "no 'input'"),
    "garbage format version": (lambda m: _set_props(m, **{"featx.format_version": "x1"}), "format version 'x1'"),
    "a huge ConstantOfShape": (_huge_constant, "failed in onnxruntime"),
    "symbolic class axis, 5 names": (_dynamic_classes,
                                     "returned scores of shape (6, 2) for 6 images and 5 class names"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_tampered_onnx_is_one_line_exit_5_and_nothing_is_written(exported, tmp_path, case):
    edit, words = CASES[case]
    model = tampered(exported, tmp_path, edit)
    out = tmp_path / "out" / "p.csv"
    out.parent.mkdir()
    r = runner.invoke(app, ["predict", str(exported["images"]), "--model", str(model), "-o", str(out),
                            "--workers", "0", "--batch-size", "8"])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 5, (r.output, r.exception)
    assert len(lines) == 1 and lines[0].startswith("Error: ") and words in lines[0], r.output
    assert "image folder" not in r.output  # the model is to blame, not the images
    assert list(out.parent.iterdir()) == []  # no table, no report, no lock left behind


def test_metadata_size_99999_is_refused_on_load_not_a_memory_error(exported, tmp_path):
    from featx.export.onnx_predictor import load_onnx_predictor

    model = tampered(exported, tmp_path, _sized(99999))
    with pytest.raises(ArtifactError, match="crop size 99999 is not a whole number of pixels between 8 and 2048"):
        load_onnx_predictor(model)


def test_the_untampered_model_still_loads_and_predicts(exported, tmp_path):
    r = runner.invoke(app, ["predict", str(exported["images"]), "--model", str(exported["onnx"]), "-o",
                            str(tmp_path / "p.csv"), "--workers", "0"])
    assert r.exit_code == 0, r.output
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 7


def test_an_onnx_name_that_is_not_utf8_opens(exported, tmp_path):
    """featx export writes any name it is given; predict must read it back (onnxruntime takes UTF-8 str names)."""
    import featx

    raw = os.fsencode(tmp_path) + b"/mod\xe9l \xff.onnx"
    try:
        with open(raw, "wb") as fh:
            fh.write(exported["onnx"].read_bytes())
    except OSError as exc:  # a file system that only stores UTF-8 names (macOS APFS)
        pytest.skip(f"cannot create a non-UTF-8 file name here: {exc}")
    ref = featx.predict_folder(exported["images"], exported["onnx"], output=False, workers=0)
    for model in (raw, os.fsdecode(raw), Path(os.fsdecode(raw))):  # bytes, str with surrogates, Path
        res = featx.predict_folder(exported["images"], model, output=False, workers=0)
        assert [r["label"] for r in res.rows] == [r["label"] for r in ref.rows]
        assert [r["confidence"] for r in res.rows] == [r["confidence"] for r in ref.rows]
    r = runner.invoke(app, ["predict", str(exported["images"]), "--model", os.fsdecode(raw), "-o",
                            str(tmp_path / "p.csv"), "--workers", "0"])
    assert r.exit_code == 0, r.output
