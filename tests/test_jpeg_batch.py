"""The batched device JPEG pipeline (decoder="torchvision") checked on the CPU against the PIL path it replaces.

Both decoders must give the same rows, paths, skips and batches; pixels and features only close (float instead
of PIL's fixed-point resampling; on the GPU also nvJPEG instead of libjpeg-turbo). Measured here (CPU, torchvision
0.29): mean absolute pixel difference per image 0.17-0.22 grey levels (max single pixel 1) for JPEGs that PIL
decodes at full size, 1.7 for a 200x150 JPEG that PIL decodes in draft mode at 1/4 scale, 0.0 for files both
paths decode with PIL (PNG, CMYK); limits 0.5 and 3.0. lite0 features at 32 px: per-image relative L2 difference
mean 0.03, max 0.08 (limits 0.08 / 0.2); every image's nearest neighbour across the two paths is itself.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import featx
from featx.data import jpeg_batch
from featx.data.jpeg_batch import jpeg_frame, read_device_jpeg, resolve_decoder
from featx.data.preprocess import Preprocess
from featx.errors import UsageError
from featx.features.engine import iter_outputs
from tests.imagegen import jpeg_bytes, make_folder, make_image

PRE = Preprocess(input_size=32, resize=36)  # tiny crop; 36/32 is the usual resize/crop ratio


def _cpu():
    import torch

    return torch.device("cpu")


def _asymmetric(w, h) -> Image.Image:
    """Red top-left quadrant, blue elsewhere, a green bar at the bottom: every rotation/flip looks different."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:] = (40, 60, 200)
    a[: h // 2, : w // 2] = (220, 30, 30)
    a[-max(2, h // 6):, :] = (30, 200, 60)
    return Image.fromarray(a)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """A flat folder of every kind of file the two paths must treat alike; returns (sorted paths, names)."""
    d = tmp_path_factory.mktemp("mixed")
    for k, size in enumerate([(40, 30), (30, 40), (64, 48), (40, 30), (48, 48), (40, 30), (20, 20)]):
        make_image(d / f"j{k}.jpg", size=size, seed=k, quality=92)
    make_image(d / "grey.jpg", size=(44, 33), mode="L", seed=11)
    make_image(d / "prog.jpg", size=(50, 40), seed=12, progressive=True)
    make_image(d / "big.jpg", size=(200, 150), seed=13, quality=90)  # PIL decodes this in draft (1/4 scale) mode
    make_image(d / "img.png", size=(40, 30), seed=14)
    make_image(d / "cmyk.jpg", size=(40, 30), mode="CMYK", seed=15)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait (rotated 90 degrees clockwise)
    _asymmetric(48, 32).save(d / "rot6.jpg", format="JPEG", quality=95, exif=exif)
    full = jpeg_bytes(64, seed=1)
    (d / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (d / "zero.jpg").write_bytes(b"")
    paths = sorted(str(p) for p in d.iterdir())
    return paths


def _inputs(paths, decoder, workers=0, batch_size=5, pre=PRE):
    """Every batch as (indices, uint8-valued pixels N x 3 x S x S, errors): `fn` returns the network input."""
    std = np.asarray(pre.std, np.float32).reshape(1, 3, 1, 1) * 255
    mean = np.asarray(pre.mean, np.float32).reshape(1, 3, 1, 1) * 255
    out = []
    for b in iter_outputs(paths, pre, lambda x: x.flatten(1), device=_cpu(), batch_size=batch_size,
                          workers=workers, decoder=decoder):
        s = pre.input_size
        px = b.outputs.reshape(len(b.indices), 3, s, s) * std + mean if len(b.indices) else None
        out.append((b.indices.tolist(), px, b.errors))
    return out


def _mad(a, b):
    return np.abs(a.astype(np.float64) - b.astype(np.float64)).mean(axis=(1, 2, 3))


def test_same_rows_skips_batches_and_close_pixels(mixed):
    pil = _inputs(mixed, "pil")
    tv = _inputs(mixed, "torchvision")
    names = [p.rsplit("/", 1)[1] for p in mixed]
    assert len(pil) == len(tv) == 3  # 15 files in batches of 5: the batch layout resume relies on
    for (i_a, px_a, err_a), (i_b, px_b, err_b) in zip(pil, tv):
        assert i_a == i_b
        assert err_a == err_b  # same files, same reasons, same stages
        for i, m in zip(i_a, _mad(px_a, px_b)):
            limit = {"big.jpg": 3.0, "img.png": 1e-6, "cmyk.jpg": 1e-6}.get(names[i], 0.5)  # draft; both PIL
            assert m < limit, (names[i], m)
    skipped = {names[i]: reason for _, _, errs in tv for i, reason, _ in errs}
    assert set(skipped) == {"truncated.jpg", "zero.jpg"}
    assert "truncated or corrupt" in skipped["truncated.jpg"] and skipped["zero.jpg"] == "empty file"
    kept = [names[i] for idx, _, _ in tv for i in idx]
    assert len(kept) == 13 and {"img.png", "cmyk.jpg", "grey.jpg", "prog.jpg", "rot6.jpg"} <= set(kept)


def test_exif_orientation_applied_on_the_device(mixed):
    k = next(i for i, p in enumerate(mixed) if p.endswith("rot6.jpg"))
    pre = Preprocess(input_size=32, resize=32)
    (_, px_tv, _), = _inputs([mixed[k]], "torchvision", pre=pre)
    (_, px_pil, _), = _inputs([mixed[k]], "pil", pre=pre)
    # Displayed portrait: after orientation 6 the red quadrant sits top-right and the green bar on the left.
    img = px_tv[0].transpose(1, 2, 0)  # the centre 32 x 32 of the 32 x 48 portrait
    assert img[4, -4, 0] > 150 and img[4, -4, 2] < 100  # red top-right
    assert img[4, 12, 2] > 150 and img[4, 12, 0] < 100  # blue
    assert img[16, 1, 1] > 150 and img[16, 1, 0] < 100  # the green bar now runs down the left edge
    assert img[28, -4, 2] > 150  # blue bottom-right
    assert _mad(px_tv, px_pil)[0] < 2.0
    assert _mad(px_tv, np.flip(px_pil, axis=3).copy())[0] > 20  # a missed or wrong rotation would be far off


def test_workers_ship_bytes_through_processes(mixed):
    a = _inputs(mixed, "torchvision", workers=2, batch_size=7)
    b = _inputs(mixed, "torchvision", workers=0, batch_size=7)
    for (ia, pa, ea), (ib, pb, eb) in zip(a, b):
        assert ia == ib and ea == eb
        np.testing.assert_array_equal(pa, pb)


def test_rejected_jpeg_falls_back_to_pil_in_the_main_process(mixed, monkeypatch):
    real = jpeg_batch._decode_list
    victim = next(p for p in mixed if p.endswith("j2.jpg"))
    n_bytes = len(open(victim, "rb").read())
    calls = []

    def picky(tensors, device):
        calls.append(len(tensors))
        if any(t.numel() == n_bytes for t in tensors):
            raise RuntimeError("nvjpeg says no")
        return real(tensors, device)

    monkeypatch.setattr(jpeg_batch, "_decode_list", picky)
    tv = _inputs(mixed, "torchvision", batch_size=15)
    pil = _inputs(mixed, "pil", batch_size=15)
    assert calls[0] > 1 and calls[1:] == [1] * (len(calls) - 1)  # batched call failed -> one by one
    (i_tv, px_tv, e_tv), = tv
    (i_pil, px_pil, e_pil), = pil
    assert i_tv == i_pil and e_tv == e_pil  # not dropped
    k = i_tv.index(mixed.index(victim))
    np.testing.assert_allclose(px_tv[k], px_pil[k], atol=1e-3)  # decoded by the PIL path itself: same pixels


def test_headers_route_only_plain_complete_jpegs_to_the_device(mixed, tmp_path):
    by_name = {p.rsplit("/", 1)[1]: p for p in mixed}
    for name in ("j0.jpg", "grey.jpg", "prog.jpg", "big.jpg", "rot6.jpg"):
        got = read_device_jpeg(by_name[name])
        assert got is not None, name
        assert got[0].dtype == np.uint8 and got[0].flags.writeable
    assert read_device_jpeg(by_name["rot6.jpg"])[1:] == (6, 48, 32)
    for name in ("img.png", "cmyk.jpg", "truncated.jpg", "zero.jpg"):
        assert read_device_jpeg(by_name[name]) is None, name
    assert read_device_jpeg(by_name["big.jpg"], max_pixels=100 * 100) is None  # bomb limit on the header
    assert read_device_jpeg(tmp_path / "missing.jpg") is None
    data = open(by_name["j0.jpg"], "rb").read()
    assert jpeg_frame(data) == (0xC0, 8, 3)
    assert jpeg_frame(open(by_name["prog.jpg"], "rb").read())[0] == 0xC2
    assert jpeg_frame(open(by_name["grey.jpg"], "rb").read())[2] == 1
    assert jpeg_frame(data[:-2]) is None  # end-of-image marker missing: cut short
    assert jpeg_frame(data + b"trailing junk") == (0xC0, 8, 3)  # bytes after EOI are harmless


def test_bomb_header_is_refused_without_decoding(tmp_path):
    p = make_image(tmp_path / "wide.jpg", size=(120, 40), seed=3)
    batches = list(iter_outputs([str(p)], PRE, lambda x: x.flatten(1), device=_cpu(), workers=0,
                                decoder="torchvision", max_pixels=1000))
    (b,) = batches
    assert len(b.indices) == 0 and "decompression bomb" in b.errors[0][1] and b.errors[0][2] == "open"


def test_auto_picks_pil_on_cpu_and_bad_names_are_usage_errors():
    cpu = _cpu()
    assert resolve_decoder("auto", cpu, PRE) == "pil"
    assert resolve_decoder("PIL", cpu, PRE) == "pil"
    assert resolve_decoder("torchvision", cpu, PRE) == "torchvision"
    with pytest.raises(UsageError, match="--decoder"):
        resolve_decoder("nvjpeg", cpu, PRE)
    with pytest.raises(UsageError, match="lanczos"):
        resolve_decoder("torchvision", cpu, Preprocess(32, 36, interpolation="lanczos"))


@pytest.fixture(scope="module")
def lite0():
    return featx.create_backbone("efficientnet_lite0", image_size=32)


def test_features_and_linear_probe_agree(lite0, tmp_path):
    from sklearn.linear_model import LogisticRegression

    # 60x45 -> 48x36 -> crop 32: a real resize (at exactly 48x36 both paths would only crop: identical pixels)
    folder = make_folder(tmp_path / "imgs", classes=("red", "blue", "green"), n_per_class=6, size=(60, 45))
    fs = {}
    for dec in ("pil", "torchvision"):
        res = featx.extract_features(folder, tmp_path / f"{dec}.npz", backbone=lite0, workers=0, decoder=dec)
        assert res.decoder == dec
        fs[dec] = featx.load_features(res.path)
        assert fs[dec].meta["decoder"] == dec
    a, b = fs["pil"], fs["torchvision"]
    assert a.paths == b.paths and list(a.labels) == list(b.labels) and list(a.splits) == list(b.splits)
    rel = np.linalg.norm(a.features - b.features, axis=1) / np.linalg.norm(a.features, axis=1)
    assert 0 < rel.mean() < 0.08 and rel.max() < 0.2, rel
    na = a.features / np.linalg.norm(a.features, axis=1, keepdims=True)
    nb = b.features / np.linalg.norm(b.features, axis=1, keepdims=True)
    assert ((na @ nb.T).argmax(axis=1) == np.arange(len(na))).all()  # each image's nearest neighbour is itself
    assert featx.features.store.provenance_fingerprint(a.meta) == featx.features.store.provenance_fingerprint(b.meta)
    tr, va = np.asarray(a.splits) == "train", np.asarray(a.splits) == "val"
    probe = LogisticRegression(max_iter=500).fit(a.features[tr], np.asarray(a.labels)[tr])
    on_pil = probe.predict(a.features[va])
    on_tv = probe.predict(b.features[va])
    assert (on_pil == np.asarray(a.labels)[va]).mean() == 1.0
    assert (on_tv == on_pil).all()


def test_resume_keeps_the_decoder_and_batches(lite0, tmp_path):
    folder = make_folder(tmp_path / "imgs", classes=("a", "b"), n_per_class=5, splits=None, size=(50, 40))
    kw = dict(backbone=lite0, workers=0, chunk_size=4, batch_size=3)
    full = featx.load_features(featx.extract_features(folder, tmp_path / "full.npz", decoder="torchvision", **kw).path)
    out = tmp_path / "resumed.npz"

    def stop_after_two_chunks(done, total):
        if done >= 9:  # progress runs before the chunk is written: 8 means chunk 1 is not on disk yet
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        featx.extract_features(folder, out, decoder="torchvision", progress=stop_after_two_chunks, **kw)
    res = featx.extract_features(folder, out, decoder="torchvision", **kw)
    assert res.resumed_images == 8
    again = featx.load_features(out)
    assert again.paths == full.paths and np.array_equal(again.features, full.features)  # same batches, bit-identical
    # Interrupted with one decoder, re-run with the other: the chunks are not mixed, meta["decoder"] stays true.
    out2 = tmp_path / "switched.npz"
    with pytest.raises(KeyboardInterrupt):
        featx.extract_features(folder, out2, decoder="torchvision", progress=stop_after_two_chunks, **kw)
    res = featx.extract_features(folder, out2, decoder="pil", **kw)
    assert res.resumed_images == 0 and featx.load_features(out2).meta["decoder"] == "pil"


def test_cli_decoder_option(lite0, tmp_path):
    from featx.cli.app import app

    folder = make_folder(tmp_path / "imgs", classes=("a", "b"), n_per_class=2, splits=None, size=32)
    r = CliRunner().invoke(app, ["extract", str(folder), "-o", str(tmp_path / "f.npz"), "--workers", "0",
                                 "--device", "cpu", "--decoder", "torchvision", "--no-pretrained", "--json"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert summary["decoder"] == "torchvision" and summary["n_images"] == 4
    r = CliRunner().invoke(app, ["extract", str(folder), "-o", str(tmp_path / "g.npz"), "--decoder", "gpu"])
    assert r.exit_code == 2 and "--decoder" in r.output


@pytest.mark.gpu
def test_cuda_auto_uses_the_device_decoder_and_matches_pil(mixed):
    import torch

    dev = torch.device("cuda")
    assert resolve_decoder("auto", dev, PRE) == "torchvision"
    std = np.asarray(PRE.std).reshape(1, 3, 1, 1) * 255
    res = {}
    for dec in ("pil", "auto"):
        res[dec] = [(b.indices.tolist(), b.outputs, b.errors) for b in iter_outputs(
            mixed, PRE, lambda x: x.flatten(1).float(), device=dev, batch_size=5, workers=0, decoder=dec)]
    for (ia, xa, ea), (ib, xb, eb) in zip(res["pil"], res["auto"]):
        assert ia == ib and ea == eb
        d = np.abs(xa - xb).reshape(len(ia), 3, -1) * std.reshape(1, 3, 1)
        assert d.mean(axis=(1, 2)).max() < 3.0
