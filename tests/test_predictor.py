"""featx.predict.predictor and tables: one dispatch on the artifact type, a predictor callable on pixels, one format
registry (a new table format is one function)."""
from __future__ import annotations

import numpy as np
import pytest

import featx
from featx.errors import ArtifactError
from featx.predict import predictor as PR
from featx.predict import tables as T
from tests.test_predict import tiny_head  # noqa: F401  (session fixture)


def test_artifact_kind_dispatches_in_one_place(tiny_head, tmp_path):  # noqa: F811
    from featx.heads import load_head

    assert PR.artifact_kind(tiny_head[1]) == "head" and PR.artifact_kind(load_head(tiny_head[1])) == "head"
    assert PR.artifact_kind(tmp_path) == "trained"  # a run folder (load_model then says what is missing)
    (tmp_path / "model.onnx").write_bytes(b"not yet")
    assert PR.artifact_kind(tmp_path / "model.onnx") == "onnx"  # the loader then says it is not a model it can load
    (tmp_path / "model.pt").write_bytes(b"not yet")
    with pytest.raises(ArtifactError, match="is not a model featx can predict with"):
        PR.artifact_kind(tmp_path / "model.pt")
    assert set(PR.LOADERS) == {"head", "trained", "onnx"}


def test_a_predictor_called_on_pixels_agrees_with_predict_folder(tiny_head):  # noqa: F811
    from featx.data.decode import load_rgb

    data, head = tiny_head
    res = featx.predict_folder(data / "val", head, output=False, workers=0)
    pred = PR.load_predictor(head)
    assert pred.classes == ["ant", "bee"] and pred.image_size == 32 and pred.score_kind == "probability"
    pixels = np.stack([pred.preprocess.resize_crop(load_rgb(data / "val" / r["path"])) for r in res])
    scores = pred(pixels)
    assert scores.shape == (len(res), 2)
    assert [pred.classes[i] for i in scores.argmax(1)] == res.labels
    assert np.allclose(scores.max(1), [r["confidence"] for r in res], atol=1e-4)


def test_a_new_table_format_is_one_registered_function(tmp_path):
    @T.table_format("tsv-test", suffixes=(".tsvtest",), recognise=lambda p: p.read_text().startswith("path\t"))
    def _tsv(rows, layout):
        return "".join(f"{r['path']}\t{r['label']}\n" for r in [{"path": "path", "label": "label"}, *rows]).encode()

    try:
        rows = [{"path": "a.jpg", "label": "ant", "confidence": 0.9, "top_k": [], "error": None}]
        out = T.write_table(rows, tmp_path / "p.tsvtest", T.resolve_format(tmp_path / "p.tsvtest", None))
        assert out.read_text() == "path\tlabel\na.jpg\tant\n" and T.is_featx_table(out)
    finally:
        T.FORMATS.pop("tsv-test")
