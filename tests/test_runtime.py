"""featx.runtime: auto = onnxruntime on the CPU; cached, hashed, locked, parity-checked graphs; same features."""
from __future__ import annotations

import hashlib
import json
import shutil
import threading
from collections import OrderedDict

import numpy as np
import pytest
from typer.testing import CliRunner

import featx
from featx import runtime
from featx.errors import UsageError
from tests.imagegen import make_folder

TOL = 1e-4  # the bound on |onnxruntime - torch| for features of this size (lite0 features are < 10)


@pytest.fixture(scope="module")
def bb():
    return featx.create_backbone("efficientnet_lite0", image_size=32)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("rt") / "imgs", classes=("cat", "dog"), n_per_class=6,
                       splits=("train", "val"), size=40)


@pytest.fixture(scope="module")
def prebuilt(bb, folder, tmp_path_factory):
    """A cache holding bb's graph, built once by an extraction (so its sidecar records the parity check)."""
    cache = tmp_path_factory.mktemp("prebuilt")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(runtime.CACHE_ENV, str(cache))
        mp.setattr(runtime, "_SESSIONS", OrderedDict())
        featx.extract_features(folder, cache / "f.npz", backbone=bb, workers=0, runtime="onnx")
    return cache / "graphs"


@pytest.fixture(scope="module")
def wrong_graph(bb):
    """Another network's graph with the same inputs and outputs: bb's features scaled by 1.01."""
    return runtime.build_graph(lambda x: bb.forward_features(x) * 1.01, bb.model, bb.preprocess)[0]


@pytest.fixture()
def own_cache(tmp_path, monkeypatch, prebuilt):
    """A graph cache of this test's own holding bb's graph, no sessions kept from earlier tests, every build
    counted. (Copied, not rebuilt: each build costs seconds on a busy 2-core machine.)"""
    cache = tmp_path / "cache"
    shutil.copytree(prebuilt, cache / "graphs", ignore=shutil.ignore_patterns("*.lock"))
    monkeypatch.setenv(runtime.CACHE_ENV, str(cache))
    monkeypatch.setattr(runtime, "_SESSIONS", OrderedDict())
    builds = []
    real = runtime.build_graph

    def counting(*a, **k):
        builds.append(1)
        return real(*a, **k)

    monkeypatch.setattr(runtime, "build_graph", counting)
    return cache / "graphs", builds


def _extract(folder, out, bb, rt, **kw):
    res = featx.extract_features(folder, out, backbone=bb, workers=0, runtime=rt, overwrite=True, **kw)
    return res, featx.load_features(res.path)


def test_auto_is_onnxruntime_on_the_cpu_torch_on_cuda_and_bad_requests_are_refused(monkeypatch):
    import torch

    monkeypatch.delenv(runtime.RUNTIME_ENV, raising=False)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert runtime.resolve_runtime("auto", cpu) == "onnx"
    assert runtime.resolve_runtime(None, cpu) == "onnx"
    assert runtime.resolve_runtime("auto", cuda) == "torch"
    assert runtime.resolve_runtime("torch", cpu) == "torch"
    with pytest.raises(UsageError, match="--device cpu"):
        runtime.resolve_runtime("onnx", cuda)
    with pytest.raises(UsageError, match="auto, torch, onnx"):
        runtime.resolve_runtime("tensorrt", cpu)
    monkeypatch.setenv(runtime.RUNTIME_ENV, "torch")  # what auto means for a whole test run
    assert runtime.resolve_runtime("auto", cpu) == "torch"
    with pytest.raises(UsageError, match="--threads"):
        runtime.resolve_threads(0)


def test_threads_follow_the_cgroup_quota(monkeypatch):
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(runtime, "_cgroup_quota", lambda: 1.5)
    assert runtime.usable_cores() == 2
    monkeypatch.setattr(runtime, "_cgroup_quota", lambda: None)
    assert runtime.usable_cores() == 8
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert runtime.resolve_threads(None) == 8 and runtime.resolve_threads(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun's setting per rank
    assert runtime.resolve_threads(None) == 1


def test_onnx_features_match_torch_and_the_store_records_the_runtime(bb, folder, tmp_path, own_cache):
    graphs, builds = own_cache  # holds the graph the first extraction built and checked (`prebuilt`)
    r_t, torch_fs = _extract(folder, tmp_path / "t.npz", bb, "torch")
    r_o, onnx_fs = _extract(folder, tmp_path / "o.npz", bb, "onnx")
    assert (r_t.runtime, r_o.runtime) == ("torch", "onnxruntime")
    assert torch_fs.meta["runtime"] == "torch" and onnx_fs.meta["runtime"] == "onnxruntime"
    assert onnx_fs.paths == torch_fs.paths
    assert np.max(np.abs(onnx_fs.features - torch_fs.features)) <= TOL
    assert runtime.compare_outputs(onnx_fs.features, torch_fs.features)["cosine"] >= runtime.PARITY_COSINE
    # interchangeable: the same provenance, so heads and audits accept either
    from featx.features.store import provenance_fingerprint

    assert provenance_fingerprint(onnx_fs.meta) == provenance_fingerprint(torch_fs.meta)
    # one graph, with a sidecar that records its hash and its agreement with torch
    side = json.loads(next(graphs.glob("*.json")).read_text())
    assert not builds and side["parity"]["ok"] and side["parity"]["max_abs_diff"] <= TOL
    assert side["sha256"] == hashlib.sha256(next(graphs.glob("*.onnx")).read_bytes()).hexdigest()


def test_runtime_torch_builds_no_graph_and_matches_the_network_itself(bb, folder, tmp_path, own_cache):
    import torch

    graphs, builds = own_cache
    shutil.rmtree(graphs)
    _, fs = _extract(folder, tmp_path / "t.npz", bb, "torch", batch_size=4)
    assert not builds and not graphs.exists()
    # exactly what the torch network gives on the same pixels (the path as it was before featx.runtime)
    from featx.data.decode import load_rgb

    pixels = np.stack([bb.preprocess.resize_crop(load_rgb(folder / p)) for p in fs.paths[:4]])
    with torch.inference_mode():
        x = bb.preprocess.normalize(torch.from_numpy(pixels).permute(0, 3, 1, 2)).contiguous()
        np.testing.assert_array_equal(bb.forward_features(x).numpy(), fs.features[:4])


def test_a_second_process_reuses_the_cached_graph(bb, folder, tmp_path, own_cache, monkeypatch):
    graphs, builds = own_cache  # an earlier process built the graph (`prebuilt`)
    _, fs = _extract(folder, tmp_path / "b.npz", bb, "onnx")
    assert not builds and fs.meta["runtime"] == "onnxruntime"


def test_a_corrupted_cached_graph_is_rebuilt_not_used(bb, folder, tmp_path, own_cache, monkeypatch):
    graphs, builds = own_cache
    _, ref = _extract(folder, tmp_path / "a.npz", bb, "onnx")
    onnx_file = next(graphs.glob("*.onnx"))
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the weights
    onnx_file.write_bytes(bytes(data))
    monkeypatch.setattr(runtime, "_SESSIONS", OrderedDict())
    _, got = _extract(folder, tmp_path / "b.npz", bb, "onnx")
    assert len(builds) == 1
    np.testing.assert_array_equal(got.features, ref.features)


def test_a_swapped_graph_with_a_matching_hash_fails_parity_and_is_rebuilt(bb, folder, tmp_path, own_cache,
                                                                           wrong_graph, monkeypatch):
    graphs, builds = own_cache
    _, ref = _extract(folder, tmp_path / "a.npz", bb, "onnx")
    onnx_file = next(graphs.glob("*.onnx"))
    side_file = onnx_file.with_suffix(".json")
    # another network's graph with its sidecar's hash updated to match: only the parity check can tell
    wrong = wrong_graph
    onnx_file.write_bytes(wrong)
    side = json.loads(side_file.read_text())
    side["sha256"] = hashlib.sha256(wrong).hexdigest()
    side_file.write_text(json.dumps(side))
    monkeypatch.setattr(runtime, "_SESSIONS", OrderedDict())
    _, got = _extract(folder, tmp_path / "b.npz", bb, "onnx")
    assert len(builds) == 1  # the rebuild
    np.testing.assert_array_equal(got.features, ref.features)
    assert onnx_file.read_bytes() != wrong


def test_a_graph_that_disagrees_with_torch_falls_back_to_torch(bb, folder, tmp_path, own_cache, wrong_graph,
                                                               monkeypatch, caplog):
    graphs, builds = own_cache
    shutil.rmtree(graphs)
    _, ref = _extract(folder, tmp_path / "t.npz", bb, "torch")
    monkeypatch.setattr(runtime, "build_graph",  # an exporter that gets the network wrong every time
                        lambda fn, module, pp: (builds.append(1), (wrong_graph, "test"))[1])
    with caplog.at_level("WARNING", logger="featx"):
        res, got = _extract(folder, tmp_path / "o.npz", bb, "onnx")
    assert res.runtime == "torch" and got.meta["runtime"] == "torch"
    np.testing.assert_array_equal(got.features, ref.features)
    assert "disagrees with torch" in caplog.text and not list(graphs.glob("*.onnx"))


def test_two_builders_of_one_graph_build_it_once(bb, own_cache, monkeypatch, prebuilt):
    graphs, builds = own_cache
    shutil.rmtree(graphs)
    graph_bytes = next(prebuilt.glob("*.onnx")).read_bytes()
    waiting = threading.Event()
    real_lock = runtime._build_lock

    def lock(path):
        if threading.current_thread().name == "second":
            waiting.set()  # the second builder is at the lock; the first may finish its build now
        return real_lock(path)

    def slow_first(*a, **k):  # the lock is under test, not the exporter: bb's graph, built once already
        assert waiting.wait(60), "the second builder never reached the lock"
        builds.append(1)
        return graph_bytes, "test"

    monkeypatch.setattr(runtime, "_build_lock", lock)
    monkeypatch.setattr(runtime, "build_graph", slow_first)
    key = runtime.graph_key(bb.model, bb.preprocess, "features")
    nets = [runtime.OnnxNetwork(bb.forward_features, bb.model, bb.preprocess, what="features", threads=1)
            for _ in range(2)]
    results: dict = {}

    def run(i):
        results[i] = nets[i]._load_or_build(key, rebuild=False)

    first = threading.Thread(target=run, args=(0,), name="first")
    first.start()
    while not builds_started(graphs):  # the first holds the lock (its file exists once it is taken)
        first.join(0.01)
    second = threading.Thread(target=run, args=(1,), name="second")
    second.start()
    first.join(120)
    second.join(120)
    assert len(builds) == 1
    assert sorted(built for _, built in results.values()) == [False, True]  # one built it, the other loaded it
    x = np.zeros((2, 32, 32, 3), np.uint8)
    a, b = (results[i][0].run(None, {"pixels": x})[0] for i in (0, 1))
    np.testing.assert_array_equal(a, b)


def builds_started(graphs) -> bool:
    return graphs.is_dir() and any(graphs.glob("*.lock"))


def test_a_head_fitted_on_torch_features_predicts_the_same_on_onnxruntime(bb, folder, tmp_path):
    _, fs = _extract(folder, tmp_path / "t.npz", bb, "torch")
    head = featx.fit_head(fs, head="logistic", output=tmp_path / "head.skops")
    by = {rt: featx.predict_folder(folder, model=head.path, output=tmp_path / f"p-{rt}.csv", runtime=rt, workers=0)
          for rt in ("torch", "onnx")}
    assert by["torch"].runtime == "torch" and by["onnx"].runtime == "onnxruntime"
    assert by["torch"].labels == by["onnx"].labels
    conf = [[r["confidence"] for r in by[rt].rows] for rt in ("torch", "onnx")]
    np.testing.assert_allclose(conf[0], conf[1], atol=1e-4)


def test_an_interrupted_torch_run_resumes_under_onnxruntime(bb, folder, tmp_path):
    _, full = _extract(folder, tmp_path / "full.npz", bb, "torch", chunk_size=4, batch_size=4)
    out = tmp_path / "r.npz"

    def stop(done, total):  # called before a finished chunk is written: stops after chunks 0 and 1
        if done >= 12:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        featx.extract_features(folder, out, backbone=bb, workers=0, chunk_size=4, batch_size=4, runtime="torch",
                               progress=stop)
    res = featx.extract_features(folder, out, backbone=bb, workers=0, chunk_size=4, batch_size=4, runtime="onnx")
    got = featx.load_features(out)
    assert res.resumed_images == 8 and got.paths == full.paths
    np.testing.assert_array_equal(got.features[:8], full.features[:8])  # the resumed chunks, as torch wrote them
    assert np.max(np.abs(got.features - full.features)) <= TOL


def test_cli_says_once_that_it_prepares_the_cpu_graph(tmp_path, folder, monkeypatch):
    from featx.cli.app import app

    monkeypatch.setenv(runtime.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(runtime, "_SESSIONS", OrderedDict())
    runner = CliRunner()
    args = ["extract", str(folder), "--image-size", "32", "--workers", "0", "--overwrite"]
    first = runner.invoke(app, [*args, "-o", str(tmp_path / "a.npz")])
    assert first.exit_code == 0, first.output
    monkeypatch.setattr(runtime, "_SESSIONS", OrderedDict())
    second = runner.invoke(app, [*args, "-o", str(tmp_path / "b.npz")])
    assert second.exit_code == 0, second.output
    text = lambda r: r.output + (r.stderr if r.stderr_bytes is not None else "")  # noqa: E731
    assert "preparing the CPU graph" in text(first) and "took" in text(first)
    assert "largest difference" in text(first)
    assert "preparing the CPU graph" not in text(second)
    assert "onnxruntime" in text(second)
    bad = runner.invoke(app, [*args, "-o", str(tmp_path / "c.npz"), "--runtime", "tpu"])
    assert bad.exit_code == 2 and "--runtime" in bad.output + (bad.stderr if bad.stderr_bytes is not None else "")


def test_a_network_the_exporter_cannot_take_still_runs_in_torch(bb, folder, tmp_path, own_cache, monkeypatch, caplog):
    graphs, builds = own_cache
    shutil.rmtree(graphs)
    _, ref = _extract(folder, tmp_path / "t.npz", bb, "torch")

    def cannot(*a, **k):
        raise RuntimeError("Unsupported: ONNX export of operator frobnicate")

    monkeypatch.setattr(runtime, "build_graph", cannot)
    with caplog.at_level("WARNING", logger="featx"):
        res, got = _extract(folder, tmp_path / "o.npz", bb, "onnx")
    assert res.runtime == "torch" and "could not build the CPU graph" in caplog.text and "frobnicate" in caplog.text
    np.testing.assert_array_equal(got.features, ref.features)


def test_a_lock_path_that_links_to_a_user_file_is_not_followed(bb, folder, tmp_path, own_cache, caplog):
    graphs, builds = own_cache
    for p in graphs.iterdir():
        p.unlink()
    key = runtime.graph_key(bb.model, bb.preprocess, f"features of {bb.name} at {bb.layer}")
    precious = tmp_path / "precious.txt"
    precious.write_text("mine")
    (graphs / f"{key}.lock").symlink_to(precious)
    with caplog.at_level("WARNING", logger="featx"):
        res, fs = _extract(folder, tmp_path / "o.npz", bb, "onnx")
    assert res.runtime == "onnxruntime" and len(builds) == 1 and "for this run only" in caplog.text
    assert precious.read_text() == "mine" and not list(graphs.glob("*.onnx"))
