"""Issue 22.2: bombs after resizing. A 196-byte 1 x 40,000 PNG resized whole to a 256-px shorter side is 256 x
10,240,000 pixels (7.3 GiB); featx resamples only the crop's region instead, on every path (PIL in workers, the device
JPEG decoder, the torch-free ONNX stream), while normal photos keep the exact pixels they always had. Absurd
--image-size values are refused before any work."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from featx.cli.app import app
from featx.data import preprocess as P
from featx.data.preprocess import Preprocess
from tests.imagegen import make_folder, make_image

ROOT = Path(__file__).resolve().parents[1]
THIN = (1, 40_000)  # width x height of the bomb
COLOUR = (10, 200, 30)
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


def old_resize_crop(pp: Preprocess, img: Image.Image) -> np.ndarray:
    """featx's resize_crop before issue 22 (resize the whole image, then crop): the pixels normal photos must keep."""
    w, h = img.size
    scale = pp.resize / min(w, h)
    nw, nh = max(pp.input_size, round(w * scale)), max(pp.input_size, round(h * scale))
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), P._PIL_INTERP[pp.interpolation], reducing_gap=None)
    left, top = (nw - pp.input_size) // 2, (nh - pp.input_size) // 2
    return np.asarray(img.crop((left, top, left + pp.input_size, top + pp.input_size)), dtype=np.uint8)


def thin_png(path: Path, size=THIN) -> Path:
    Image.new("RGB", size, COLOUR).save(path, optimize=True)
    return path


def photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """Photo-like content: smooth gradients, an edge and noise (resampling differences would show)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    a = np.stack([120 + 80 * np.sin(xx / max(w, 1) * 6), 60 + 150 * yy / max(h, 1), 90 + 60 * (xx > w / 3)], -1)
    a += rng.normal(0, 10, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


# -- normal photos: bit-identical to the old code path ---------------------------------------------------------------
@pytest.mark.parametrize("interp", ["bicubic", "bilinear", "nearest", "lanczos"])
def test_normal_photos_keep_the_exact_pixels_of_the_old_resize(interp):
    recipes = [Preprocess(224, 256, interp), Preprocess(32, 36, interp), Preprocess(128, 146, interp),
               Preprocess(2048, 2340, interp)]
    # landscape, portrait, square, 16:9, a 3:1 panorama, thumbnails that are upsampled, a 1-px-short odd size
    sizes = [(640, 480), (480, 640), (500, 500), (1280, 720), (1800, 600), (100, 75), (37, 50), (257, 255)]
    for pp in recipes:
        for k, (w, h) in enumerate(sizes):
            if pp.input_size == 2048 and (w, h) != (100, 75):
                continue  # the largest crop upsamples every one of these: one shows it, and keeps the test fast
            img = photo(w, h, seed=k)
            assert np.array_equal(pp.resize_crop(img), old_resize_crop(pp, img)), (pp, w, h)


def test_real_photos_keep_their_exact_pixels(hymenoptera):
    from featx.data.decode import load_rgb

    paths = sorted((hymenoptera / "train" / "ants").glob("*.jpg"))[:6] + sorted(
        (hymenoptera / "val" / "bees").glob("*.jpg"))[:6]
    pp = Preprocess()
    for path in paths:
        img = load_rgb(path, draft_size=pp.resize)
        assert np.array_equal(pp.resize_crop(img), old_resize_crop(pp, img)), path


def test_the_crop_first_path_samples_where_the_whole_resize_would(monkeypatch):
    """Forced onto a thin image that the old path can still afford: the same picture, within a few grey levels
    (PIL takes box= in float32, so its weights round differently)."""
    img = photo(3, 900, seed=3)
    for interp in ("bicubic", "bilinear"):
        pp = Preprocess(64, 73, interp)
        ref = old_resize_crop(pp, img).astype(int)
        monkeypatch.setattr(P, "RESIZE_PIXELS", 0)
        got = pp.resize_crop(img).astype(int)
        monkeypatch.undo()
        assert got.shape == ref.shape == (64, 64, 3)
        assert np.abs(got - ref).max() <= 3 and np.abs(got - ref).mean() < 0.5, interp


@pytest.mark.parametrize("size", [THIN, THIN[::-1]])
def test_a_thin_image_gives_its_centre_at_the_cost_of_one_crop(size):
    """Tall and wide: the crop is the image's centre (for a 1-px-wide image at 256 px, under one source pixel of its
    length), and no resize makes more than RESIZE_PIXELS pixels (the old path made 256 x 10,240,000)."""
    tall = size[1] > size[0]
    a = np.empty((size[1], size[0], 3), np.uint8)
    a[:] = COLOUR
    half = (slice(0, size[1] // 2), slice(None)) if tall else (slice(None), slice(0, size[0] // 2))
    a[half] = (255, 255, 255)  # the first half white: the crop's first rows (columns) white, its last ones COLOUR
    img = Image.fromarray(a)
    seen = []
    real = Image.Image.resize

    def spy(self, size, *args, **kw):
        seen.append(size[0] * size[1])
        return real(self, size, *args, **kw)

    for interp in ("bicubic", "bilinear", "nearest", "lanczos"):
        pp = Preprocess(224, 256, interp)
        assert pp.crops_first(*img.size)
        Image.Image.resize = spy
        try:
            out = pp.resize_crop(img).astype(int)
            flat = pp.resize_crop(Image.new("RGB", img.size, COLOUR))
        finally:
            Image.Image.resize = real
        assert out.shape == (224, 224, 3) and (flat == np.array(COLOUR, np.uint8)).all()
        first, last = (out[0, 112], out[223, 112]) if tall else (out[112, 0], out[112, 223])
        assert np.abs(first - 255).max() <= 30 and np.abs(last - COLOUR).max() <= 30, (interp, first, last)
    assert seen and max(seen) <= P.RESIZE_PIXELS


# -- peak memory, measured in a process of its own -------------------------------------------------------------------
# The address-space cap turns a whole-image resize (7.3 GiB at 224 px, 2.4 GiB at 128 px) into a MemoryError at once
# on a build without the fix, instead of taking the memory from the machine; ru_maxrss is the peak actually touched.
CAP = textwrap.dedent("""
    import resource
    def vm_bytes():
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
    def cap(extra):
        limit = vm_bytes() + extra
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    def peak_kib():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
""")

PIXEL_PATHS = CAP + textwrap.dedent("""
    import json, sys, resource
    from featx.data.jpeg_batch import pil_pixels
    from featx.data.numpy_pixels import iter_numpy_pixels
    from featx.data.preprocess import Preprocess
    path = sys.argv[1]
    cap(1 << 30)
    base = peak_kib()
    out = {}
    for size in (224, 128):  # extract's default crop, and predict's at 128 px (4.6 GB before the fix)
        pp = Preprocess().with_size(size)
        px, reason, stage = pil_pixels(path, pp)
        out[f"pil{size}"] = [list(px.shape), [int(v) for v in px[size // 2, size // 2]]] if px is not None else reason
        for workers in (0, 1):  # the torch-free stream of `predict --model x.onnx`, in this process and in a pool
            (idx, pixels, errors), = iter_numpy_pixels([path], pp, batches=[[0]], workers=workers)
            out[f"numpy{size}w{workers}"] = list(pixels.shape) if pixels is not None else errors
    out["growth_kib"] = peak_kib() - base
    out["children_kib"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps(out))
""")


def _run_script(script: str, *args, timeout: int = 240) -> dict:
    # the CPU: CUDA's start reserves more address space than the cap leaves
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=env, cwd=str(ROOT))
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@linux_only
def test_a_196_byte_png_costs_no_more_than_a_photo_on_the_pil_and_numpy_paths(tmp_path):
    path = thin_png(tmp_path / "thin.png")
    assert path.stat().st_size < 400  # the bomb is tiny on disk
    out = _run_script(PIXEL_PATHS, path)
    assert out["pil224"] == [[224, 224, 3], list(COLOUR)] and out["pil128"] == [[128, 128, 3], list(COLOUR)]
    for key in ("numpy224w0", "numpy224w1", "numpy128w0", "numpy128w1"):
        assert out[key] == [1, int(key[5:8]), int(key[5:8]), 3], (key, out[key])
    # a 12-megapixel photo decodes to 36 MB; the bomb must cost less than that (it costs about one crop)
    assert out["growth_kib"] < 36 * 1024, out
    assert out["children_kib"] < 400 * 1024, out  # the pool worker: Python + numpy + PIL + one crop


EXTRACT_PREDICT = CAP + textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import featx
    folder, out = Path(sys.argv[1]), Path(sys.argv[2])
    bb = featx.create_backbone("timm/test_resnet", pretrained=False, image_size=224)
    featx.create_backbone("timm/test_resnet", pretrained=False, image_size=224)  # predict builds it again: warm
    cap(3 << 30)
    base = peak_kib()
    res = featx.extract_features(folder, out / "f.npz", backbone=bb, workers=0, batch_size=4, device="cpu")
    fs = featx.load_features(out / "f.npz")
    featx.fit_head(out / "f.npz", output=out / "head.skops", C=1.0, cv=0)
    pred = featx.predict_folder(folder, out / "head.skops", output=out / "p.csv", workers=0, batch_size=4,
                               device="cpu")
    thin = [r for r in pred.rows if r["path"] == "a/thin.png"]
    print(json.dumps({"paths": list(fs.paths), "finite": bool((fs.features == fs.features).all()),
                      "extract_skipped": res.n_skipped,
                      "predicted": thin[0]["label"] if thin else None, "pred_errors": pred.n_errors,
                      "growth_kib": peak_kib() - base}))
""")


@linux_only
def test_extract_and_predict_give_the_thin_png_a_feature_in_bounded_memory(tmp_path):
    folder = make_folder(tmp_path / "data", classes=("a", "b"), n_per_class=3, splits=None, size=48)
    thin_png(folder / "a" / "thin.png")
    out = _run_script(EXTRACT_PREDICT, folder, tmp_path)
    assert "a/thin.png" in out["paths"] and out["finite"] and out["extract_skipped"] == 0  # its centre's feature
    assert out["predicted"] in ("a", "b") and out["pred_errors"] == 0
    # before the fix: a MemoryError under the cap (7.3 GiB for the resize alone, 14.7 GB peak without a cap)
    assert out["growth_kib"] < 1024 * 1024, out


# -- the device JPEG path --------------------------------------------------------------------------------------------
def test_the_device_decoder_leaves_an_oversized_resize_to_the_pil_path(tmp_path):
    """A thin JPEG is never resized whole on the device: workers hand it to the PIL path, and a batch assembled
    elsewhere falls back to it too. Small enough (32 px) that the old code's float copy was ~330 MB, not 31 GB."""
    import torch

    from featx.data.jpeg_batch import DeviceJpegPipeline, collate_raw, pil_pixels, read_device_jpeg
    from featx.data.loader import iter_pixels

    pp = Preprocess(input_size=32, resize=37)
    thin = tmp_path / "thin.jpg"
    Image.new("RGB", (1, 20_000), COLOUR).save(thin, quality=95)
    normal = make_image(tmp_path / "normal.jpg", size=(48, 40), seed=1, quality=92)
    assert pp.crops_first(1, 20_000) and not pp.crops_first(48, 40)
    assert read_device_jpeg(thin, None, pp) is None  # the worker's choice: the PIL path
    assert read_device_jpeg(normal, None, pp) is not None

    raw = collate_raw([(0, None, None, None, read_device_jpeg(thin)), (1, None, None, None, read_device_jpeg(normal))])
    pipe = DeviceJpegPipeline(pp, torch.device("cpu"))
    idx, x, errors = pipe.assemble(raw, [str(thin), str(normal)])
    assert list(idx) == [0, 1] and not errors and tuple(x.shape) == (2, 32, 32, 3)
    assert pipe.stats["pil_fallback"] == 1 and pipe.stats["device_decoded"] == 1
    assert np.array_equal(x[0].numpy(), pil_pixels(str(thin), pp)[0])

    (idx, x, errors), = iter_pixels([str(thin), str(normal)], pp, device=torch.device("cpu"), batches=[[0, 1]],
                                    workers=0, decoder="torchvision", prefetch=0)
    assert list(idx) == [0, 1] and not errors
    assert np.array_equal(x[0].numpy(), pil_pixels(str(thin), pp)[0])


# -- --image-size: absurd values refused before any work -------------------------------------------------------------
@pytest.fixture
def no_model(monkeypatch):
    """Building a network means the size was accepted: fail loudly instead of running at 99,999 px."""
    import featx.backbones

    def refuse(*a, **kw):
        raise AssertionError("a network was built: the --image-size was not refused up front")

    monkeypatch.setattr(featx.backbones, "create_backbone", refuse)


@pytest.mark.parametrize("value", ["99999", "0", "-3", "4096"])
def test_extract_refuses_an_absurd_image_size_in_one_line(tmp_path, no_model, value):
    folder = make_folder(tmp_path / "data", classes=("a", "b"), n_per_class=1, splits=None, size=16)
    r = CliRunner().invoke(app, ["extract", str(folder), "-o", str(tmp_path / "f.npz"), "--workers", "0",
                                 "--image-size", value])
    assert r.exit_code == 2, (r.output, r.exception)
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--image-size must be a whole number of pixels from 8 to 2048" in lines[0], r.output
    assert not (tmp_path / "f.npz").exists() and not (tmp_path / "f.npz.partial").exists()


def test_the_library_and_the_other_commands_refuse_it_too(tmp_path, no_model):
    import featx
    from featx.errors import UsageError

    folder = make_folder(tmp_path / "data", classes=("a", "b"), n_per_class=1, splits=None, size=16)
    with pytest.raises(UsageError, match="from 8 to 2048"):
        featx.extract_features(folder, tmp_path / "f.npz", image_size=99999, workers=0)
    with pytest.raises(UsageError, match="from 8 to 2048"):
        Preprocess().with_size(99999)
    with pytest.raises(UsageError, match="from 8 to 2048"):  # before any method runs, not when finetune starts
        featx.compare(tmp_path / "missing", image_size=99999, runs_dir=str(tmp_path / "runs"))
    r = CliRunner().invoke(app, ["predict", str(folder), "--model", str(tmp_path / "missing.skops"),
                                 "--image-size", "99999", "-o", str(tmp_path / "p.csv")])
    assert r.exit_code == 2 and "from 8 to 2048" in r.output, r.output
