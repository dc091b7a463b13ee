"""The CPU runtime's pipeline (issue 23): decode threads feed onnxruntime in lanes; order, errors, features, threads."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import featx
from featx import runtime
from featx.data import thread_pixels
from tests.imagegen import make_bad_files, make_folder

TOL = 1e-4  # the bound on |onnxruntime - torch| (lite0 features are < 10)


@pytest.fixture(scope="module")
def bb():
    return featx.create_backbone("efficientnet_lite0", image_size=32)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Good photos with bad files among them (so a bad one sits between good ones in every batch layout)."""
    root = make_folder(tmp_path_factory.mktemp("pipe") / "imgs", classes=("ant", "bee"), n_per_class=7, splits=None,
                       size=(48, 36))
    make_bad_files(root / "bee")
    return root


def _paths(root):
    return sorted(p for p in root.rglob("*") if p.is_file())


def _decode_threads():
    return [t for t in threading.enumerate() if t.name.startswith("featx-decode")]


def _lane_threads():
    return [t for t in threading.enumerate() if t.name.startswith("featx-lane")]


def test_thread_stream_gives_the_process_streams_batches_pixels_and_errors_in_order(bb, mixed):
    from featx.data.loader import iter_pixels

    paths = _paths(mixed)
    batches = [list(range(i, min(i + 4, len(paths)))) for i in range(0, len(paths), 4)]
    import torch

    ref = list(iter_pixels(paths, bb.preprocess, device=torch.device("cpu"), batches=batches, workers=0,
                           prefetch=0))
    for threads in (0, 1, 3):
        stats: dict = {}
        got = list(thread_pixels.iter_thread_pixels(paths, bb.preprocess, batches=batches, threads=threads,
                                                    stats=stats))
        assert len(got) == len(ref)
        for (gi, gp, ge), (ri, rp, re) in zip(got, ref):
            assert gi.tolist() == ri.tolist() and ge == re
            assert (gp is None and rp is None) or np.array_equal(gp, rp.numpy())
        assert stats["decode_s"] > 0 and stats["resize_s"] > 0
    errors = [e for _, _, es in ref for e in es]
    assert {paths[i].name for i, _, _ in errors} == {"empty.jpg", "truncated.jpg", "text.jpg", "page.png", "bomb.png"}
    assert all(stage for _, _, stage in errors)


def test_thread_stream_bounds_threads_and_images_in_flight_and_stops_on_an_exception(bb, mixed, monkeypatch):
    paths = _paths(mixed) * 4
    batches = [list(range(i, min(i + 3, len(paths)))) for i in range(0, len(paths), 3)]
    started, peak = [0], [0]
    real = thread_pixels._one

    def counting(*a):
        started[0] += 1
        return real(*a)

    monkeypatch.setattr(thread_pixels, "_one", counting)
    stream = thread_pixels.iter_thread_pixels(paths, bb.preprocess, batches=batches, threads=2, prefetch=1)
    consumed = 0
    for k, (idx, _, errors) in enumerate(stream):
        consumed += len(idx) + len(errors)
        peak[0] = max(peak[0], len(_decode_threads()))
        # decoded ahead of the caller: at most threads + prefetch x batch images
        assert started[0] - consumed <= 2 + 1 * 3
        if k == 4:
            break
    stream.close()  # what an exception in the caller does (generator closed): the pool is shut down
    assert 1 <= peak[0] <= 2
    assert not _decode_threads()


def test_onnx_extract_starts_no_worker_process_and_matches_torch(bb, mixed, tmp_path, monkeypatch):
    from featx.data import loader

    r_t = featx.extract_features(mixed, tmp_path / "t.npz", backbone=bb, runtime="torch", batch_size=4, workers=0)

    def no_processes(*a, **k):
        raise AssertionError("the CPU runtime decodes in threads; it must not build a DataLoader")

    monkeypatch.setattr(loader, "make_loader", no_processes)
    r_o = featx.extract_features(mixed, tmp_path / "o.npz", backbone=bb, runtime="onnx", batch_size=4, workers=2)
    assert (r_t.runtime, r_o.runtime) == ("torch", "onnxruntime")
    t, o = featx.load_features(r_t.path), featx.load_features(r_o.path)
    assert o.paths == t.paths and len(o.paths) == 14
    assert sorted(s["path"] for s in r_o.skipped) == sorted(s["path"] for s in r_t.skipped)
    assert [s["reason"] for s in sorted(r_o.skipped, key=lambda s: s["path"])] == \
        [s["reason"] for s in sorted(r_t.skipped, key=lambda s: s["path"])]
    assert np.max(np.abs(o.features - t.features)) <= TOL
    assert runtime.compare_outputs(o.features, t.features)["cosine"] >= 0.99999
    for key in ("network_s", "decode_s", "resize_s", "input_wait_s"):
        assert key in r_o.timings
    assert not _decode_threads()


def test_lanes_split_a_batch_over_the_threads_with_the_same_outputs(bb, mixed, monkeypatch):
    from featx.data.decode import load_rgb

    monkeypatch.setattr(runtime, "_SESSIONS", runtime.OrderedDict())
    good = [p for p in _paths(mixed) if p.suffix == ".jpg" and p.stat().st_size > 200][:12]
    pixels = np.stack([bb.preprocess.resize_crop(load_rgb(p)) for p in good])
    net = runtime.OnnxNetwork(bb.forward_features, bb.model, bb.preprocess, threads=3,
                              what=f"features of {bb.name} at {bb.layer}")
    runs = []
    real = net._run

    def spy(session, x):
        out = real(session, x)
        runs.append(len(x))
        return out

    monkeypatch.setattr(net, "_run", spy)
    out = net(pixels)
    assert runtime.PARALLEL == "lanes" and net.runtime == "onnxruntime"
    assert 1 <= len(_lane_threads()) <= 2  # the extra lanes: threads - 1
    one = net._session.run(None, {"pixels": pixels})[0]  # the whole batch in one run
    np.testing.assert_allclose(out, one, atol=1e-5)
    ref = net._torch(pixels)
    assert runtime.compare_outputs(out, ref)["ok"]


def test_predictor_call_runs_on_the_runtime(bb, mixed, tmp_path):
    """Predictor.__call__ (notebooks) runs its backbone where predict_folder does: onnxruntime on the CPU."""
    from featx.data.decode import load_rgb
    from featx.predict.predictor import load_predictor

    fs = featx.extract_features(mixed, tmp_path / "f.npz", backbone=bb, runtime="torch", workers=0)
    head = featx.fit_head(featx.load_features(fs.path), head="logistic", output=tmp_path / "h.skops", cv=2)
    pred = load_predictor(head.path)
    good = [p for p in _paths(mixed) if p.suffix == ".jpg" and p.stat().st_size > 200][:6]
    pixels = np.stack([pred.preprocess.resize_crop(load_rgb(p)) for p in good])
    scores = pred(pixels)
    assert runtime.runtime_of(pred._net[1]) == "onnxruntime"
    pred.runtime = "torch"
    ref = pred(pixels)
    assert runtime.runtime_of(pred._net[1]) == "torch"
    np.testing.assert_allclose(scores, ref, atol=1e-4)
    table = featx.predict_folder(mixed, model=head.path, output=tmp_path / "p.csv", workers=0)
    rows = {r["path"]: r for r in table.rows}
    assert [rows[str(p.relative_to(mixed))]["label"] for p in good] == \
        [pred.classes[i] for i in scores.argmax(1)]


def test_a_later_process_checks_the_cached_graph_against_recorded_torch_outputs_without_running_torch(
        bb, mixed, tmp_path, monkeypatch):
    """torch's first forward costs ~1.5 s per process; a cached graph is checked against the torch outputs its
    builder recorded on fixed probe images. A record that does not match the graph gets it rebuilt and checked
    against torch itself."""
    import base64
    import json

    from featx.data.decode import load_rgb

    monkeypatch.setenv(runtime.CACHE_ENV, str(tmp_path / "cache"))
    good = [p for p in _paths(mixed) if p.suffix == ".jpg" and p.stat().st_size > 200][:8]
    pixels = np.stack([bb.preprocess.resize_crop(load_rgb(p)) for p in good])
    what = f"features of {bb.name} at {bb.layer}"
    calls: list = []

    def counted(x):
        calls.append(len(x))
        return bb.forward_features(x)

    def fresh():  # a new process: no session kept
        monkeypatch.setattr(runtime, "_SESSIONS", runtime.OrderedDict())
        calls.clear()
        return runtime.OnnxNetwork(counted, bb.model, bb.preprocess, what=what, threads=2)

    first = fresh()
    ref = first(pixels)
    assert first.built_seconds is not None and calls  # built here, checked against torch itself
    side_file = next((tmp_path / "cache" / "graphs").glob("*.json"))
    side = json.loads(side_file.read_text())
    assert side["probe"]["images"] == runtime.PROBE_IMAGES and side["parity"]["ok"]

    later = fresh()
    np.testing.assert_array_equal(later(pixels), ref)
    assert not calls and later.built_seconds is None and later.parity["ok"]  # no torch forward at all

    rec = np.frombuffer(base64.b64decode(side["probe"]["outputs"]), "<f4") * 1.01  # a record that is off
    side["probe"]["outputs"] = base64.b64encode(rec.astype("<f4").tobytes()).decode()
    side_file.write_text(json.dumps(side))
    tampered = fresh()
    np.testing.assert_allclose(tampered(pixels), ref, atol=TOL)
    assert tampered.built_seconds is not None and calls  # rebuilt, and checked against torch again
