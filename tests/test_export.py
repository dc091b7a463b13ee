"""featx export: ONNX graphs that agree with featx (parity at export), the torch-free ONNX predictor, Parquet stores."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from featx.cli.app import app
from featx.errors import ArtifactError, UsageError
from tests.imagegen import make_folder

onnx = pytest.importorskip("onnx", reason="featx[export] is not installed")
ort = pytest.importorskip("onnxruntime", reason="featx[export] is not installed")

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _features(bb, folder: Path):
    """A FeatureSet as `featx extract` records it, computed in-process (no DataLoader: seconds matter here)."""
    import torch

    from featx.data.discover import discover
    from featx.data.jpeg_batch import pil_pixels
    from featx.features.store import FeatureSet

    recs = discover(folder).records
    px = np.stack([pil_pixels(r.path, bb.preprocess)[0] for r in recs])
    feats = bb.forward_features(bb.preprocess.normalize(torch.from_numpy(px).permute(0, 3, 1, 2)).contiguous())
    return FeatureSet(features=feats.numpy(), paths=[r.relpath for r in recs], labels=[r.label for r in recs],
                      classes=sorted({r.label for r in recs}), meta=bb.meta()), px


def _head(fs, kind: str, path: Path, classes=None, calibrate: bool = False):
    from featx.heads import fit_head

    if classes is not None:
        fs = fs.subset(np.isin(fs.labels, classes))
        fs.classes = list(classes)
    if calibrate:  # label noise (every 5th image one class on): calibration needs mistakes on val (issue 22.4)
        fs = fs.subset(np.ones(len(fs), dtype=bool))
        names = list(fs.classes)
        fs.labels = np.array([names[(names.index(l) + 1) % len(names)] if i % 5 == 0 else l
                              for i, l in enumerate(fs.labels.tolist())])
    fixed = {"knn": {"k": 3}, "mlp": {}}.get(kind, {"C": 1.0})  # the mlp has no C: its default configuration
    # calibrated: half the images are validation rows, the ones the temperature is fitted on
    res = fit_head(fs, head=kind, cv=0, calibrate=calibrate, val_split=0.5 if calibrate else 0.2, **fixed)
    res.head.save(path)
    return res.head


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random-init timm test network at 32 px, its features on 12 tiny images of 3 classes, and their pixels; and
    its features on 42 other images (``fs_cal``, 14 a class) for calibrated heads: half are validation rows, and the
    temperature fit (scikit-learn's, 5-fold inside, and again inside featx's cross-fitted ECE) needs 5 of one class in
    every training fold."""
    from featx.backbones import create_backbone

    root = tmp_path_factory.mktemp("tiny")
    folder = make_folder(root / "imgs", classes=("a", "b", "c"), n_per_class=4, splits=None, size=40)
    bb = create_backbone("timm/test_resnet", pretrained=False, image_size=32)
    fs, px = _features(bb, folder)
    more = make_folder(root / "more", classes=("a", "b", "c"), n_per_class=14, splits=None, size=40, seed=1)
    return {"root": root, "images": folder, "fs": fs, "pixels": px, "fs_cal": _features(bb, more)[0]}


@pytest.fixture(scope="module")
def exported(tiny):
    """A logistic head exported through the CLI, features included. TorchScript, because the dynamo exporter costs
    ~10 s of CPU per model: the lite0 test below runs the default (dynamo) exporter."""
    head = _head(tiny["fs"], "logistic", tiny["root"] / "head.skops")
    out = tiny["root"] / "model.onnx"
    r = _run("export", head.path, "-o", out, "--check", tiny["images"], "--with-features", "--json",
             "--exporter", "torchscript")
    assert r.exit_code == 0, r.output
    return {"head": head, "onnx": out, "summary": json.loads(r.stdout)}


# -- ONNX: heads ----------------------------------------------------------------------------------------------------
def test_head_exports_as_one_uint8_graph_that_agrees_with_featx(tiny, exported):
    s = exported["summary"]
    assert s["exporter"] == {"name": "torchscript", "opset": 17, "fallback_reason": None}
    p = s["parity"]
    assert p["passed"] and p["images"] == 12 and p["top1_agreement"] == 1.0 and p["max_abs_diff"] <= 1e-3
    assert 1 in p["batch_sizes"] and any(b > 1 and b % 2 for b in p["batch_sizes"])

    model = onnx.load(str(exported["onnx"]))
    inp = model.graph.input[0]
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert not dims[0].HasField("dim_value") and [d.dim_value for d in dims[1:]] == [32, 32, 3]
    assert [o.name for o in model.graph.output] == ["probabilities", "features"]
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["featx.classes"]) == ["a", "b", "c"]
    prov = json.loads(props["featx.provenance"])
    assert prov["backbone"]["backbone"] == "timm/test_resnet" and prov["head"]["kind"] == "logistic"
    assert json.loads(props["featx.parity"])["passed"] is True


def test_onnx_predictor_scores_match_the_head(tiny, exported):
    from featx.export.onnx_predictor import load_onnx_predictor

    pred = load_onnx_predictor(exported["onnx"], threads=1)
    assert pred.classes == ["a", "b", "c"] and pred.score_kind == "probability" and pred.input_size == 32
    assert pred.preprocess["input_size"] == 32 and pred.kind == "head"
    px = tiny["pixels"][:5]  # an odd batch the export itself did not use
    scores = pred.predict(px)
    want = exported["head"].predict_scores(tiny["fs"].features[:5])[0]
    assert scores.shape == (5, 3) and np.abs(scores - want).max() < 1e-4
    assert np.array_equal(scores, pred.predict(px.transpose(0, 3, 1, 2)))  # NCHW works the same
    assert np.abs(pred.features(px) - tiny["fs"].features[:5]).max() < 1e-4
    assert pred.predict(px[:0]).shape == (0, 3)
    with pytest.raises(UsageError, match="uint8"):
        pred.predict(px.astype(np.float32))
    with pytest.raises(UsageError, match=r"\(N, 32, 32, 3\)"):
        pred.predict(px[:, :16])


def test_onnx_predictor_needs_no_torch(exported, tmp_path):
    code = (
        "import sys; sys.modules['torch'] = None\n"  # any `import torch` now fails
        "import numpy as np\n"
        "from featx.export.onnx_predictor import load_onnx_predictor\n"
        f"p = load_onnx_predictor({str(exported['onnx'])!r}, threads=1)\n"
        "s = p.predict(np.zeros((3, 32, 32, 3), np.uint8))\n"
        "assert s.shape == (3, 3) and abs(s.sum() - 3) < 1e-4, s\n"
        "print('ok', p.classes)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    assert "ok ['a', 'b', 'c']" in r.stdout


def test_predictor_refuses_onnx_files_featx_did_not_write(exported, tmp_path):
    from featx.export.onnx_predictor import load_onnx_predictor

    model = onnx.load(str(exported["onnx"]))
    del model.metadata_props[:]
    foreign = tmp_path / "foreign.onnx"
    onnx.save(model, str(foreign))
    with pytest.raises(ArtifactError, match="not one `featx export` wrote"):
        load_onnx_predictor(foreign)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ArtifactError, match="onnxruntime can load"):
        load_onnx_predictor(tmp_path / "junk.onnx")


@pytest.mark.parametrize("kind,classes", [("logistic", ("a", "b")), ("logistic", None), ("svm", ("a", "b")),
                                          ("svm", None), ("linear", ("a", "b")), ("linear", None),
                                          ("mlp", ("a", "b")), ("mlp", None)])
def test_head_graphs_give_predict_scores_calibrated_or_not(tiny, tmp_path, kind, classes):
    """Scaler + linear map folded into one Linear (the mlp: into its first Linear, then ReLU, Linear, softmax)
    reproduce Head.predict_scores: probabilities, or [-s, s]; and with a temperature T, softmax(logits / T) of the
    decision function ([-s, s] for two classes) or, for the mlp, of log(probabilities + 1e-12)."""
    import torch

    from featx.export.graph import head_scorer

    head = _head(tiny["fs"], kind, tmp_path / "h.skops", classes)
    x = np.random.default_rng(0).normal(size=(7, tiny["fs"].dim)).astype(np.float32) * 3 + tiny["fs"].features[:1]
    x = np.vstack([x, tiny["fs"].features]).astype(np.float32)
    for t in (None, 0.2, 1.0, 4.0):  # a calibrated head's record, as `featx fit --calibrate` writes it
        head.meta.pop("calibration", None)
        if t is not None:
            head.meta["calibration"] = {"method": "temperature", "temperature": t, "fitted_on": "val"}
        want, kind_of = head.predict_scores(x)
        with torch.no_grad():
            got = head_scorer(head)(torch.from_numpy(x)).numpy()
        assert got.shape == want.shape and np.abs(got - want).max() < 1e-4, (t, np.abs(got - want).max())
        assert np.array_equal(got.argmax(1), want.argmax(1))
        if t is not None:
            assert kind_of == "probability" and np.allclose(got.sum(1), 1.0, atol=1e-5)


@pytest.mark.parametrize("activation,layers", [("tanh", (6, 5)), ("logistic", (4,)), ("identity", (3,))])
def test_mlp_graph_follows_sklearns_stored_layout(tiny, activation, layers):
    """Any MLPClassifier a head file may hold (the type is trusted): each hidden activation, several hidden layers,
    the two-class single logistic output; a multi-label net (logistic outputs for 3 classes) is refused."""
    import torch
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    from featx.export.graph import head_scorer
    from featx.heads.store import Head

    fs = tiny["fs"]
    x = np.vstack([fs.features, fs.features[:3] * 2]).astype(np.float32)
    for classes in (("a", "b"), ("a", "b", "c")):
        keep = np.isin(fs.labels, classes)
        clf = MLPClassifier(hidden_layer_sizes=layers, activation=activation, max_iter=30, random_state=0)
        pipe = Pipeline([("scale", StandardScaler()), ("clf", clf)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning after 30 iterations: fine here
            pipe.fit(fs.features[keep], np.asarray(fs.labels)[keep])
        head = Head(pipe, {"kind": "mlp", "score_kind": "probability"})
        for t in (None, 3.0):
            head.meta["calibration"] = None if t is None else {"method": "temperature", "temperature": t}
            with torch.no_grad():
                got = head_scorer(head)(torch.from_numpy(x)).numpy()
            assert np.abs(got - head.predict_scores(x)[0]).max() < 1e-5
    multilabel = MLPClassifier(hidden_layer_sizes=(3,), max_iter=5, random_state=0)
    onehot = np.eye(3)[np.searchsorted(["a", "b", "c"], fs.labels)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        multilabel.fit(fs.features, onehot)
    multilabel.classes_ = np.array(["a", "b", "c"])  # what a doctored head file could claim
    head = Head(Pipeline([("scale", StandardScaler().fit(fs.features)), ("clf", multilabel)]), {"kind": "mlp"})
    with pytest.raises(ArtifactError, match="multi-label"):
        head_scorer(head)


def _jsonl_scores(path: Path, classes: list) -> tuple:
    """(labels, scores N x C in ``classes`` order) from a `featx predict --format jsonl --top-k C` table."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    scores = np.array([[{t["label"]: t["score"] for t in r["top_k"]}[c] for c in classes] for r in rows])
    return [r["path"] for r in rows], [r["label"] for r in rows], scores


@pytest.mark.parametrize("kind,classes,calibrate", [("mlp", None, False), ("mlp", ("a", "b"), True),
                                                    ("logistic", None, True), ("svm", ("a", "b"), True),
                                                    ("svm", None, True)])
def test_mlp_and_calibrated_heads_export_and_predict_like_the_head(tiny, tmp_path, kind, classes, calibrate):
    """`featx export` of an mlp head and of calibrated heads (temperature scaling: probabilities for SVMs too)
    passes the parity check, says what it exported, and `featx predict --model x.onnx` gives the rows, labels and
    probabilities `featx predict` gives with the head file."""
    head = _head(tiny["fs_cal" if calibrate else "fs"], kind, tmp_path / "h.skops", classes, calibrate=calibrate)
    if calibrate:
        t = head.calibration["temperature"]
        assert head.score_kind == "probability" and np.isfinite(t) and t > 0 and abs(t - 1) > 1e-3  # T moves scores
    out = tmp_path / "m.onnx"
    r = _run("export", head.path, "-o", out, "--check", tiny["images"], "--json", "--exporter", "torchscript")
    assert r.exit_code == 0, r.output
    s = json.loads(r.stdout)
    assert s["parity"]["passed"] and s["parity"]["top1_agreement"] == 1.0 and s["parity"]["max_abs_diff"] <= 1e-3
    assert s["score_kind"] == "probability" and s["outputs"] == ["probabilities"]
    assert s["classes"] == head.classes and s["description"].startswith(f"{kind} head on timm/test_resnet features")
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    if calibrate:
        want = {"method": "temperature", "temperature": t}
        assert s["calibration"] == want and json.loads(props["featx.calibration"]) == want
        assert f"calibrated (temperature {t:.4g})" in s["description"] == props["featx.description"]
        assert json.loads(props["featx.provenance"])["head"]["calibration"]["temperature"] == t
    else:
        assert s["calibration"] is None and props["featx.calibration"] == "null" and "calibrated" not in s["description"]

    # featx predict: the ONNX file against the head file it came from, on the same folder
    k = str(len(head.classes))
    for model, table in ((out, "onnx.jsonl"), (head.path, "head.jsonl")):
        r = _run("predict", tiny["images"], "--model", model, "-o", tmp_path / table, "--top-k", k, "--workers", 0)
        assert r.exit_code == 0, r.output
    paths, labels, got = _jsonl_scores(tmp_path / "onnx.jsonl", head.classes)
    paths_ref, labels_ref, want_scores = _jsonl_scores(tmp_path / "head.jsonl", head.classes)
    assert paths == paths_ref and len(paths) == 12 and labels == labels_ref  # top-1 identical on every image
    assert np.abs(got - want_scores).max() < 1e-4 and np.allclose(got.sum(1), 1.0, atol=1e-5)
    from featx.export.onnx_predictor import load_onnx_predictor

    pred = load_onnx_predictor(out, threads=1)
    assert pred.score_kind == "probability" and pred.calibration == (want if calibrate else None)


@pytest.mark.parametrize("record", [{"method": "temperature", "temperature": -1.5},
                                    {"method": "temperature", "temperature": 0},
                                    {"method": "temperature", "temperature": "abc"},
                                    {"method": "temperature", "temperature": float("nan")},
                                    {"method": "temperature", "temperature": float("inf")},
                                    {"method": "temperature"},
                                    {"method": "isotonic", "temperature": 1.5},
                                    "temperature 1.5"])
def test_a_tampered_calibration_record_is_refused_and_nothing_is_written(tiny, tmp_path, record):
    """A head whose calibration record featx did not write (no temperature > 0) would give meaningless
    probabilities (T < 0 flips every label): loading refuses it, so export and predict fail in one line (exit 5)
    before building anything, and write no file."""
    from featx.errors import ArtifactError
    from featx.heads import load_head
    from featx.heads.store import save_head

    head = _head(tiny["fs_cal"], "logistic", tmp_path / "h.skops", ("a", "b"), calibrate=True)
    head.meta["calibration"] = record
    save_head(head, tmp_path / "h.skops")
    with pytest.raises(ArtifactError, match="records a calibration featx cannot use"):
        load_head(tmp_path / "h.skops")
    for args in (("export", tmp_path / "h.skops", "-o", tmp_path / "m.onnx", "--check", tiny["images"],
                  "--exporter", "torchscript"),
                 ("predict", tiny["images"], "--model", tmp_path / "h.skops", "-o", tmp_path / "p.csv")):
        r = _run(*args)
        assert r.exit_code == 5, r.output
        assert "records a calibration featx cannot use" in r.output and "featx fit --calibrate" in r.output
        assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
        assert sorted(p.name for p in tmp_path.iterdir()) == ["h.skops"]  # no model, table, temp or lock file


def test_svm_head_exports_decision_scores(tiny, tmp_path):
    from featx.export import export_model
    from featx.export.onnx_predictor import load_onnx_predictor

    head = _head(tiny["fs"], "svm", tmp_path / "svm.skops", ("a", "b"))
    res = export_model(head.path, tmp_path / "svm.onnx", check=tiny["images"], exporter="torchscript")
    assert res.score_kind == "decision" and res.outputs == ["scores"] and res.parity["passed"]
    pred = load_onnx_predictor(res.output, threads=1)
    s = pred.predict(tiny["pixels"][:3])
    assert pred.score_kind == "decision" and np.allclose(s[:, 0], -s[:, 1])


@pytest.mark.parametrize("kind", ["knn", "svm-rbf"])
def test_heads_that_are_not_a_fixed_graph_are_refused(tiny, tmp_path, kind):
    head = _head(tiny["fs"], kind, tmp_path / "h.skops")
    r = _run("export", head.path, "-o", tmp_path / "m.onnx", "--check", tiny["images"])
    assert r.exit_code == 2, r.output
    assert f"a {kind} head cannot be exported" in r.output and "linear, logistic, mlp, svm" in r.output
    assert "Traceback" not in r.output and not (tmp_path / "m.onnx").exists()


def test_parity_failure_writes_nothing_and_keeps_the_old_file(tiny, exported, tmp_path, monkeypatch):
    import featx.export.graph as graph

    old = tmp_path / "model.onnx"
    old.write_bytes(exported["onnx"].read_bytes())  # a featx export: replaceable, but only by a good one
    before = old.read_bytes()
    real = graph.head_exportable

    def broken(*a, **kw):  # featx's side answers with the classes reversed: top-1 must disagree
        exp = real(*a, **kw)
        ref = exp.reference
        exp.reference = lambda px: (lambda s, f: (s[:, ::-1], f))(*ref(px))
        return exp

    monkeypatch.setattr(graph, "head_exportable", broken)
    r = _run("export", exported["head"].path, "-o", old, "--check", tiny["images"], "--exporter", "torchscript")
    assert r.exit_code == 5, r.output
    assert "parity check failed, nothing was written" in r.output and "top-1 differs" in r.output
    assert old.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temp file, no lock file left


def test_dynamo_failure_falls_back_to_torchscript_and_says_so(tiny, exported, tmp_path, monkeypatch):
    import featx.export.onnx_export as ox

    def fail(*_a):
        raise RuntimeError("unsupported operator aten::boom")

    monkeypatch.setattr(ox, "_dynamo", fail)
    r = _run("export", exported["head"].path, "-o", tmp_path / "m.onnx", "--check", tiny["images"], "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)["exporter"]
    assert info["name"] == "torchscript" and info["opset"] == 17 and "aten::boom" in info["fallback_reason"]
    assert "used the TorchScript exporter" in r.stderr
    r = _run("export", exported["head"].path, "-o", tmp_path / "n.onnx", "--check", tiny["images"], "--exporter", "dynamo")
    assert r.exit_code == 5 and "--exporter torchscript" in r.output and not (tmp_path / "n.onnx").exists()


def test_export_refuses_bad_outputs_and_missing_extras(exported, tmp_path, monkeypatch):
    r = _run("export", exported["head"].path, "-o", tmp_path / "m.txt")
    assert r.exit_code == 2 and ".onnx" in r.output
    mine = tmp_path / "mine.onnx"
    mine.write_bytes(b"user data")
    r = _run("export", exported["head"].path, "-o", mine)
    assert r.exit_code == 2 and "not written by featx" in r.output and mine.read_bytes() == b"user data"
    r = _run("export", tmp_path / "f.npz", "-o", tmp_path / "f.parquet", "--with-features")
    assert r.exit_code == 2 and "--with-features apply to model exports" in r.output
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    r = _run("export", exported["head"].path, "-o", tmp_path / "m.onnx")
    assert r.exit_code == 2 and "pip install 'featx[export]'" in r.output and len(r.output.strip().splitlines()) == 1
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    r = _run("export", tmp_path / "f.npz", "-o", tmp_path / "f.parquet")
    assert r.exit_code == 2 and "pip install 'featx[parquet]'" in r.output


# -- ONNX: trained runs, and EfficientNet-Lite's TF "same" padding ----------------------------------------------------
def test_scratch_run_exports_with_features(tmp_path):
    from featx.export import export_model
    from featx.export.onnx_predictor import load_onnx_predictor
    from featx.training import load_model, train_scratch

    data = make_folder(tmp_path / "d", classes=("x", "y"), n_per_class=4, splits=None, size=24)
    run = train_scratch(data, arch="lenet5", epochs=1, image_size=16, workers=0, runs_dir=str(tmp_path / "r"))
    res = export_model(run.run_dir, tmp_path / "s.onnx", check=data, with_features=True, exporter="torchscript")
    assert res.kind == "scratch" and res.parity["passed"] and res.outputs == ["probabilities", "features"]
    pred = load_onnx_predictor(res.output, threads=1)
    tm = load_model(run.run_dir)
    from featx.data.jpeg_batch import pil_pixels

    px = np.stack([pil_pixels(p, tm.preprocess)[0] for p in sorted(data.rglob("*.jpg"))[:3]])
    import torch

    want = tm.predict_uint8(torch.from_numpy(px).permute(0, 3, 1, 2)).numpy()
    assert np.abs(pred.predict(px) - want).max() < 1e-5 and pred.features(px).shape == (3, 84)


def test_efficientnet_lite0_head_keeps_tf_same_padding(tmp_path):
    """The embedded lite0 (TF "same" padding: asymmetric at stride 2) on real photos, default exporter."""
    from featx.backbones import create_backbone
    from featx.export import export_model

    photos = tmp_path / "photos"
    for cls in ("ants", "bees"):  # 4 + 4 of the bundled example photos
        (photos / cls).mkdir(parents=True)
        for p in sorted((ROOT / "examples" / "ants_bees" / "train" / cls).glob("*.jpg"))[:4]:
            (photos / cls / p.name).write_bytes(p.read_bytes())
    bb = create_backbone("efficientnet_lite0")
    assert any(type(m).__name__ == "Conv2dSame" for m in bb.model.modules())  # what must survive export
    fs, _ = _features(bb, photos)
    head = _head(fs, "logistic", tmp_path / "lite0.skops")
    res = export_model(head.path, tmp_path / "lite0.onnx", check_limit=9, with_features=True)  # bundled examples
    assert res.exporter["name"] == "dynamo" and res.exporter["opset"] >= 18
    p = res.parity
    assert 1 in p["batch_sizes"] and any(b > 1 and b % 2 for b in p["batch_sizes"])  # the dynamic batch axis
    assert p["passed"] and p["images"] == 9 and p["top1_agreement"] == 1.0 and p["features_max_rel_diff"] < 1e-4
    assert p["folder"].endswith("check_images") and res.input_size == 256

    model = onnx.load(str(res.output))
    pads = [list(onnx.numpy_helper.to_array(init)) for init in model.graph.initializer if "pad" in init.name.lower()]
    for node in model.graph.node:  # pads as Pad inputs (constants) or as Conv attributes
        if node.op_type == "Conv":
            pads += [list(a.ints) for a in node.attribute if a.name == "pads"]
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type == onnx.TensorProto.INT64 and len(a.t.dims) == 1:
                    pads.append(list(onnx.numpy_helper.to_array(a.t)))
    asym = [q for q in pads if len(q) in (4, 8) and list(q[: len(q) // 2]) != list(q[len(q) // 2:])]
    assert asym, "no asymmetric padding left in the graph: TF 'same' padding was lost"


# -- Parquet ---------------------------------------------------------------------------------------------------------
def test_parquet_round_trip_pandas_pyarrow_and_fit(tmp_path):
    pd = pytest.importorskip("pandas")
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    from featx import load_features, save_features
    from featx.features.store import FeatureSet
    from featx.heads import fit_head

    rng = np.random.default_rng(0)
    labels = np.array(["ant [formicidae]", "bee"] * 6)
    feats = (rng.normal(size=(12, 5)) + (labels == "bee")[:, None] * 4).astype(np.float32)
    paths = [f"train/{lab}/{i}.jpg" for i, lab in enumerate(labels)]
    paths[1] = "train/bee/caf\udce9.jpg"  # a non-UTF-8 file name (surrogate-escaped byte)
    fs = FeatureSet(features=feats, paths=paths, labels=labels, splits=["train"] * 8 + ["val"] * 4,
                    classes=["ant [formicidae]", "bee"], meta={"backbone": "timm/x", "weights_sha256": "abc",
                                                                  "preprocess": {"input_size": 8}, "layer": "pooled"})
    save_features(fs, tmp_path / "f.npz")
    r = _run("export", tmp_path / "f.npz", "-o", tmp_path / "f.parquet", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["n"] == 12

    df = pd.read_parquet(tmp_path / "f.parquet")
    assert list(df.columns[:4]) == ["path", "label", "split", "embedding"] and len(df) == 12
    assert df["path"][1] == "train/bee/caf\ufffd.jpg" and np.allclose(np.stack(df["embedding"]), feats)
    schema = pq.read_schema(tmp_path / "f.parquet")
    assert schema.field("embedding").type == pa.list_(pa.float32(), 5)
    assert json.loads(schema.metadata[b"featx"])["meta"]["backbone"] == "timm/x"

    back = load_features(tmp_path / "f.parquet")
    assert np.array_equal(back.features, feats) and back.paths == paths and back.classes == fs.classes
    assert back.labels.tolist() == labels.tolist() and back.splits.tolist() == fs.splits.tolist()
    assert back.meta["weights_sha256"] == "abc" and back.fingerprint == fs.fingerprint
    assert fit_head(tmp_path / "f.parquet", cv=0).head.classes == ["ant [formicidae]", "bee"]

    # back to .npz, and an unlabeled store (null label/split columns) round-trips as unlabeled
    r = _run("export", tmp_path / "f.parquet", "-o", tmp_path / "g.npz")
    assert r.exit_code == 0, r.output
    assert np.array_equal(load_features(tmp_path / "g.npz").features, feats)
    from featx.export.parquet import read_features, write_features

    bare = FeatureSet(features=feats[:2], paths=paths[:2], meta={"backbone": "timm/x"})
    write_features(bare, tmp_path / "u.parquet")
    u = read_features(tmp_path / "u.parquet")
    assert u.labels is None and u.splits is None and u.paths == paths[:2]


def test_parquet_without_featx_metadata_is_refused(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    from featx import load_features

    pd.DataFrame({"path": ["a.jpg"], "label": ["x"], "split": [None], "embedding": [[0.0, 1.0]]}).to_parquet(
        tmp_path / "other.parquet")
    with pytest.raises(ArtifactError, match="not a featx feature store"):
        load_features(tmp_path / "other.parquet")
    r = _run("fit", tmp_path / "other.parquet", "-o", tmp_path / "h.skops")
    assert r.exit_code == 5 and "not a featx feature store" in r.output

    from featx import save_features
    from featx.features.store import FeatureSet

    save_features(FeatureSet(features=np.ones((2, 3)), paths=["a", "b"], meta={"backbone": "timm/x"}), tmp_path / "f.npz")
    before = (tmp_path / "other.parquet").read_bytes()
    r = _run("export", tmp_path / "f.npz", "-o", tmp_path / "other.parquet")
    assert r.exit_code == 2 and "not written by featx" in r.output
    assert (tmp_path / "other.parquet").read_bytes() == before
    for _ in range(2):  # a store featx wrote is replaced without --overwrite
        r = _run("export", tmp_path / "f.npz", "-o", tmp_path / "mine.parquet")
        assert r.exit_code == 0, r.output
