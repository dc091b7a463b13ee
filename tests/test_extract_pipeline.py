"""The fast extraction path (issue 14): prefetch thread, deferred output copy, normaliser built once, compiled
network padded to one batch shape. Every switch changes the speed, never a row, an error or a feature."""
from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import featx
from featx.data.loader import Prefetcher
from featx.data.preprocess import Preprocess
from featx.errors import UsageError
from featx.features.engine import compile_forward, iter_outputs, normalizer
from tests.imagegen import make_bad_files, make_image

PRE = Preprocess(input_size=32, resize=36)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """JPEGs of several sizes, a PNG, and a run of bad files long enough to make one batch fail entirely."""
    d = tmp_path_factory.mktemp("pipe")
    for k, size in enumerate([(40, 30), (30, 40), (64, 48), (40, 30), (48, 48), (50, 40), (20, 20), (33, 44)]):
        make_image(d / f"a{k}.jpg", size=size, seed=k)
    make_image(d / "b.png", size=(40, 30), seed=20)
    bad = make_bad_files(d / "bad")
    for k in range(3):
        make_image(d / f"c{k}.jpg", size=(36, 36), seed=30 + k)
    paths = sorted(str(p) for p in d.glob("*.*")) + sorted(str(d / "bad" / n) for n in bad)
    return paths


def _run(paths, device=None, **kw):
    device = device or torch.device("cpu")
    out = []
    for b in iter_outputs(paths, PRE, lambda x: x.flatten(1), device=device, batch_size=4, workers=0, **kw):
        out.append((b.indices.tolist(), b.outputs, b.errors))
    return out


def _same(a, b):
    assert len(a) == len(b)
    for (ia, xa, ea), (ib, xb, eb) in zip(a, b):
        assert ia == ib and ea == eb
        assert np.array_equal(xa, xb)


@pytest.mark.parametrize("decoder", ["pil", "torchvision"])
def test_pipeline_switches_change_no_row_error_or_pixel(files, decoder):
    ref = _run(files, decoder=decoder, prefetch=0, defer_copy=False)
    assert any(len(ix) == 0 and errs for ix, _, errs in ref)  # a batch where every file failed is in the middle
    for prefetch, defer in ((2, True), (1, False), (0, True), (5, True)):
        _same(_run(files, decoder=decoder, prefetch=prefetch, defer_copy=defer), ref)


def test_stats_say_where_the_time_went(files):
    stats = {}
    _run(files, decoder="torchvision", stats=stats)
    assert set(stats) == {"input_wait_s", "loader_wait_s", "to_device_s", "output_wait_s"}
    assert stats["to_device_s"] > 0 and all(v >= 0 for v in stats.values())


def test_normalizer_is_bit_identical_to_preprocess_normalize():
    pre = Preprocess(input_size=8, resize=9, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    x = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    assert torch.equal(normalizer(pre, torch.device("cpu"))(x), pre.normalize(x))


def _convert_failing_at(k):
    def convert(item):
        if item == k:
            raise ValueError(f"bad item {item}")
        return item, None, []

    return convert


def test_prefetcher_raises_the_threads_error_in_the_consumer_and_stops():
    pre = Prefetcher(range(10), _convert_failing_at(3), torch.device("cpu"), depth=2)
    got = []
    with pytest.raises(ValueError, match="bad item 3"):
        for item in pre:
            got.append(item[0])
    assert got == [0, 1, 2] and not pre.thread.is_alive()


def test_a_consumer_that_stops_early_stops_the_thread():
    pre = Prefetcher(range(10_000), _convert_failing_at(-1), torch.device("cpu"), depth=2)
    gen = iter(pre)
    assert [next(gen)[0] for _ in range(3)] == [0, 1, 2]
    gen.close()  # what happens when the consumer raises (Ctrl-C) or breaks out of its loop
    assert not pre.thread.is_alive() and pre.it is None
    assert not [t for t in threading.enumerate() if t.name == "featx-prefetch"]


def test_compiled_network_is_padded_to_one_batch_shape_and_compiled_once():
    compiles = []

    def backend(gm, example_inputs):
        compiles.append([tuple(t.shape) for t in example_inputs if torch.is_tensor(t)])
        return gm.forward

    torch._dynamo.reset()
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    run = compile_forward(net, 8, backend=backend)
    with torch.inference_mode():
        for n in (8, 3, 8, 5):
            x = torch.randn(n, 3, 10, 10)
            assert torch.allclose(run(x), net(x), atol=1e-6) and len(run(x)) == n
        y = torch.randn(4, 10, 10, 3).permute(0, 3, 1, 2)  # channels_last strides, as on CUDA
        assert torch.allclose(run(y), net(y), atol=1e-6)
    shapes = [s for c in compiles for s in c if s[1:] in ((3, 10, 10),)]  # the images, not the weights
    assert shapes and all(s[0] == 8 for s in shapes)  # every graph saw the full batch
    assert len(compiles) <= 2  # one per memory layout at most, never one per batch size


def test_out_of_memory_retries_in_halves_without_the_padding():
    """Padding every half back to the full batch would never free memory: the retry runs the network uncompiled."""
    from featx.features.engine import _run_halving

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    assert compile_forward(net, 8, backend="eager").eager is net
    seen = []

    def padded(x):  # stands for a compiled network: it always runs a full batch, so it is always out of memory
        seen.append(("compiled", len(x)))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    padded.eager = lambda x: (seen.append(("eager", len(x))), net(x))[1]
    x = torch.randn(8, 3, 10, 10)
    with torch.inference_mode():
        out = _run_halving(padded, x, torch.device("cpu"), "fp32")
    assert seen == [("compiled", 8), ("eager", 4), ("eager", 4)] and torch.allclose(out, net(x), atol=1e-6)


def test_bad_prefetch_is_a_usage_error(tmp_path):
    make_image(tmp_path / "i" / "x.jpg")
    with pytest.raises(UsageError, match="prefetch"):
        featx.extract_features(tmp_path / "i", tmp_path / "f.npz", prefetch=-1, pretrained=False)


def test_cli_documents_compile():
    from featx.cli.app import app

    r = CliRunner().invoke(app, ["extract", "--help"])
    assert r.exit_code == 0 and "--compile" in r.output


# -- on a CUDA machine (`pytest -m gpu`) -------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("decoder", ["pil", "torchvision"])
def test_cuda_streams_and_events_change_no_pixel(files, decoder):
    """Many batches through the decode stream + compute stream hand-over: a missing wait or record_stream shows up
    as pixels of one batch overwritten by the next."""
    dev = torch.device("cuda")
    many = files * 12
    ref = _run(many, dev, decoder=decoder, prefetch=0, defer_copy=False)
    for prefetch, defer in ((2, True), (1, False), (0, True), (4, True)):
        _same(_run(many, dev, decoder=decoder, prefetch=prefetch, defer_copy=defer), ref)


@pytest.mark.gpu
def test_cuda_extraction_is_the_same_with_every_switch_and_after_a_resume(files, tmp_path):
    from featx.features.store import load_features

    good = [p for p in files if "/bad/" not in p]
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k, p in enumerate(good * 4):
        os.link(p, folder / f"{k:03d}_{p.rsplit('/', 1)[1]}")
    bb = featx.create_backbone("efficientnet_lite0", image_size=64)
    kw = dict(backbone=bb, device="cuda", batch_size=8, chunk_size=16, workers=2)
    ref = featx.extract_features(folder, tmp_path / "ref.npz", **kw)
    assert ref.device.startswith("cuda") and ref.decoder == "torchvision"
    slow = featx.extract_features(folder, tmp_path / "slow.npz", prefetch=0, defer_copy=False, **kw)
    with pytest.raises(KeyboardInterrupt):
        featx.extract_features(folder, tmp_path / "res.npz", progress=lambda d, t: _stop_at(d, 24), **kw)
    res = featx.extract_features(folder, tmp_path / "res.npz", **kw)
    assert res.resumed_images > 0
    a = load_features(ref.path)
    for other in (slow.path, res.path):
        b = load_features(other)
        assert a.paths == b.paths and np.array_equal(a.features, b.features)


def _stop_at(done, n):
    if done >= n:
        raise KeyboardInterrupt
