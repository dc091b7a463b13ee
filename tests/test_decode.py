"""Tests for featx.data.decode: one per bad-image kind and image mode in RELIABILITY.md's "Images" table."""
from __future__ import annotations

import io
import logging
import os
import time

import numpy as np
import pytest
from PIL import Image

from featx.data import decode
from featx.data.decode import MAX_PIXELS, DecodeError, load_rgb
from tests.imagegen import jpeg_bytes, make_bad_files, make_image, png_bytes


def _px(img, xy):
    return np.asarray(img, dtype=np.int16)[xy[1], xy[0]]


def _assert_rgb(img, size=None):
    assert isinstance(img, Image.Image) and img.mode == "RGB"
    arr = np.asarray(img)
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    if size is not None:
        assert img.size == size


# -- bad files ---------------------------------------------------------------------------------------------------------
def test_bad_files_give_their_reason_and_stage(tmp_path):
    expected = make_bad_files(tmp_path)
    stages = {"empty.jpg": "open", "truncated.jpg": "decode", "text.jpg": "open", "page.png": "open",
              "bomb.png": "open"}
    assert set(expected) == set(stages)
    for name, reason in expected.items():
        with pytest.raises(DecodeError) as ei:
            load_rgb(tmp_path / name)
        assert reason in ei.value.reason, (name, ei.value.reason)
        assert str(ei.value) == ei.value.reason
        assert ei.value.stage == stages[name], (name, ei.value.stage)


def test_truncated_png_is_an_error_not_a_grey_fill(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(buf, "PNG")
    data = buf.getvalue()
    (tmp_path / "cut.png").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(DecodeError, match="truncated or corrupt"):
        load_rgb(tmp_path / "cut.png")


@pytest.mark.parametrize("name,cut", [("early.jpg", 20), ("header.jpg", 200)])
def test_jpeg_cut_inside_its_header_is_corrupt_not_unknown(tmp_path, name, cut):
    (tmp_path / name).write_bytes(jpeg_bytes(32)[:cut])
    with pytest.raises(DecodeError, match="truncated or corrupt") as ei:
        load_rgb(tmp_path / name)
    assert ei.value.stage == "open"


def test_png_with_bad_header_crc_is_corrupt(tmp_path):
    data = bytearray(png_bytes(10, 10))
    data[29] ^= 0xFF  # flip a bit in the IHDR checksum
    (tmp_path / "crc.png").write_bytes(bytes(data))
    with pytest.raises(DecodeError, match=r"truncated or corrupt image \(broken PNG header\)"):
        load_rgb(tmp_path / "crc.png")


def test_random_bytes_named_jpg_is_not_an_image(tmp_path):
    (tmp_path / "noise.jpg").write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(DecodeError, match="not an image"):
        load_rgb(tmp_path / "noise.jpg")


def test_bmp_and_png_named_jpg_decode_by_content(tmp_path):
    src = make_image(tmp_path / "src.png", size=(20, 12), seed=5)
    want = np.asarray(Image.open(src).convert("RGB"))
    for fmt in ("BMP", "PNG"):
        p = tmp_path / f"as_{fmt}.jpg"
        Image.open(src).save(p, format=fmt)
        img = load_rgb(p)
        _assert_rgb(img, (20, 12))
        assert np.array_equal(np.asarray(img), want)  # lossless formats: exact pixels


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DecodeError, match="file not found"):
        load_rgb(tmp_path / "nope.jpg")
    with pytest.raises(DecodeError, match="not a regular file"):
        load_rgb(tmp_path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_named_jpg_does_not_hang(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    t0 = time.monotonic()
    with pytest.raises(DecodeError, match="not a regular file"):
        load_rgb(tmp_path / "pipe.jpg")
    assert time.monotonic() - t0 < 5


# -- decompression bombs -----------------------------------------------------------------------------------------------
def test_bomb_is_refused_before_pixels_are_allocated(tmp_path, monkeypatch):
    (tmp_path / "bomb.png").write_bytes(png_bytes(30000, 30000))
    # With Pillow's own guard switched off (as some libraries do), featx's limit still holds.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    t0 = time.monotonic()
    with pytest.raises(DecodeError) as ei:
        load_rgb(tmp_path / "bomb.png")
    assert ei.value.reason == f"decompression bomb: 30000x30000 pixels exceeds the limit of {MAX_PIXELS}"
    assert ei.value.stage == "open"
    assert time.monotonic() - t0 < 2  # 2.7 GB were never decoded


def test_bomb_limit_is_configurable_and_checked_on_real_images(tmp_path):
    p = make_image(tmp_path / "small.png", size=(64, 40))
    with pytest.raises(DecodeError, match=r"decompression bomb: 64x40 pixels exceeds the limit of 1000"):
        load_rgb(p, max_pixels=1000)
    _assert_rgb(load_rgb(p, max_pixels=64 * 40), (64, 40))


def test_pillow_guard_still_reported_as_bomb_without_featx_limit(tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_bytes(30000, 30000))
    with pytest.raises(DecodeError, match="decompression bomb: 900000000 pixels"):
        load_rgb(tmp_path / "bomb.png", max_pixels=None)


class _LoadDataset:
    """Tiny map-style dataset: returns (shape, None) or (None, reason), never raises (like the extraction engine)."""

    def __init__(self, paths):
        self.paths = [str(p) for p in paths]

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return np.asarray(load_rgb(self.paths[i])).shape, ""
        except DecodeError as exc:
            return (), f"{exc.stage}: {exc.reason}"


def test_bomb_is_refused_inside_a_dataloader_worker(tmp_path, monkeypatch):
    torch = pytest.importorskip("torch")
    (tmp_path / "bomb.png").write_bytes(png_bytes(30000, 30000))
    good = make_image(tmp_path / "good.jpg", size=(24, 16))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # the forked worker inherits a disabled Pillow guard
    loader = torch.utils.data.DataLoader(_LoadDataset([tmp_path / "bomb.png", good]), batch_size=None,
                                         num_workers=1, collate_fn=lambda x: x)
    results = list(loader)
    assert results[0] == ((), f"open: decompression bomb: 30000x30000 pixels exceeds the limit of {MAX_PIXELS}")
    assert results[1] == ((16, 24, 3), "")


def test_decode_error_pickles_with_reason_and_stage():
    import pickle

    e = pickle.loads(pickle.dumps(DecodeError("empty file", "open")))
    assert (e.reason, e.stage, str(e)) == ("empty file", "open", "empty file")


# -- EXIF orientation --------------------------------------------------------------------------------------------------
def _quadrants(w=48, h=24) -> np.ndarray:
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2] = (255, 0, 0)
    a[: h // 2, w // 2:] = (0, 255, 0)
    a[h // 2:, : w // 2] = (0, 0, 255)
    a[h // 2:, w // 2:] = (255, 255, 0)
    return a


def _block_colors(arr: np.ndarray) -> list:
    h, w = arr.shape[:2]
    return [arr[y, x].astype(int) for y in (h // 4, 3 * h // 4) for x in (w // 4, 3 * w // 4)]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation,k", [(6, -1), (8, 1), (3, 2)])
def test_exif_orientation_gives_viewer_pixels(tmp_path, fmt, orientation, k):
    raw = _quadrants()
    exif = Image.Exif()
    exif[0x0112] = orientation
    p = tmp_path / f"o{orientation}.{fmt.lower()}"
    Image.fromarray(raw).save(p, format=fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))
    img = load_rgb(p)
    want = np.rot90(raw, k=k)  # what a viewer shows: 6 = turn 90 degrees clockwise, 8 = counter-clockwise
    _assert_rgb(img, (want.shape[1], want.shape[0]))
    tol = 40 if fmt == "JPEG" else 0
    for got, exp in zip(_block_colors(np.asarray(img)), _block_colors(want)):
        assert np.abs(got - exp).max() <= tol


def test_exif_orientation_with_jpeg_draft(tmp_path):
    raw = np.kron(_quadrants(8, 4), np.ones((60, 60, 1), np.uint8))  # 480 x 240
    exif = Image.Exif()
    exif[0x0112] = 6
    p = tmp_path / "big.jpg"
    Image.fromarray(raw).save(p, exif=exif, quality=95)
    img = load_rgb(p, draft_size=100)
    assert img.size == (120, 240)  # scaled by 2 (both sides stay >= 100), then turned upright
    for got, exp in zip(_block_colors(np.asarray(img)), _block_colors(np.rot90(raw, k=-1))):
        assert np.abs(got - exp).max() <= 40


@pytest.mark.parametrize("value", [0, 9])
def test_malformed_exif_orientation_loads_unrotated_with_warning(tmp_path, caplog, value):
    exif = Image.Exif()
    exif[0x0112] = value
    p = tmp_path / f"bad{value}.jpg"
    Image.fromarray(_quadrants()).save(p, exif=exif)
    with caplog.at_level(logging.WARNING, logger="featx"):
        img = load_rgb(p)
    _assert_rgb(img, (48, 24))
    assert any("orientation" in r.getMessage() and r.name == "featx" for r in caplog.records)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow's own notice; featx must just not crash
def test_garbage_exif_block_does_not_crash(tmp_path, caplog):
    p = tmp_path / "junk_exif.jpg"
    Image.fromarray(_quadrants()).save(p, exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff\x01\x12garbage")
    with caplog.at_level(logging.WARNING, logger="featx"):
        img = load_rgb(p)
    _assert_rgb(img, (48, 24))


# -- modes -> RGB uint8 ------------------------------------------------------------------------------------------------
def test_cmyk_tiff_and_adobe_jpeg(tmp_path):
    im = Image.new("CMYK", (4, 2))
    im.putpixel((0, 0), (0, 0, 0, 0))
    im.putpixel((1, 0), (255, 0, 0, 0))
    im.putpixel((2, 0), (0, 0, 0, 255))
    im.putpixel((3, 0), (0, 255, 255, 0))
    im.save(tmp_path / "c.tif")
    img = load_rgb(tmp_path / "c.tif")
    _assert_rgb(img)
    assert [tuple(_px(img, (x, 0))) for x in range(4)] == [(255, 255, 255), (0, 255, 255), (0, 0, 0), (255, 0, 0)]
    # Pillow writes CMYK JPEGs with an Adobe marker (inverted CMYK, as Photoshop does); it must round-trip.
    Image.new("CMYK", (16, 16), (255, 0, 0, 0)).save(tmp_path / "c.jpg", quality=95)
    img = load_rgb(tmp_path / "c.jpg")
    _assert_rgb(img)
    assert np.abs(_px(img, (8, 8)) - (0, 255, 255)).max() <= 6


def test_16bit_is_rescaled_not_clamped(tmp_path):
    vals = np.array([[0, 1000, 25700, 65535]], dtype=np.uint16)
    want = [0, 4, 100, 255]  # value / 257, rounded; clamping would give 0, 255, 255, 255
    for name, arr, mode in [("g16.png", vals, "I;16"), ("g16.tif", vals, "I;16"),
                            ("g16b.tif", vals.astype(">u2"), "I;16B"), ("gi.tif", vals.astype(np.int32), "I")]:
        Image.fromarray(arr).save(tmp_path / name)
        assert Image.open(tmp_path / name).mode == mode
        img = load_rgb(tmp_path / name)
        _assert_rgb(img, (4, 1))
        got = np.asarray(img)
        assert got[0, :, 0].tolist() == want, name
        assert np.array_equal(got[..., 0], got[..., 2])


def test_32bit_int_and_float_ranges(tmp_path):
    Image.fromarray(np.array([[-500, 0, 1500]], dtype=np.int32)).save(tmp_path / "i.tif")
    assert np.asarray(load_rgb(tmp_path / "i.tif"))[0, :, 0].tolist() == [0, 64, 255]  # min-max
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "unit.tif")
    assert np.asarray(load_rgb(tmp_path / "unit.tif"))[0, :, 0].tolist() == [0, 128, 255]  # x 255
    Image.fromarray(np.array([[10.0, 20.0, 30.0]], dtype=np.float32)).save(tmp_path / "f.tif")
    assert np.asarray(load_rgb(tmp_path / "f.tif"))[0, :, 0].tolist() == [0, 128, 255]  # min-max


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency_goes_over_white(tmp_path, fmt):
    im = Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    p = tmp_path / f"pal.{fmt.lower()}"
    im.save(p, transparency=0)
    img = load_rgb(p)
    _assert_rgb(img, (2, 1))
    assert tuple(_px(img, (0, 0))) == (255, 255, 255)  # transparent red -> background
    assert tuple(_px(img, (1, 0))) == (0, 0, 255)


def test_palette_without_transparency(tmp_path):
    p = make_image(tmp_path / "p.png", mode="P", size=16)
    assert Image.open(p).mode == "P"
    img = load_rgb(p)
    _assert_rgb(img, (16, 16))
    assert np.array_equal(np.asarray(img), np.asarray(Image.open(p).convert("RGB")))


def test_rgba_and_la_composite_over_background(tmp_path):
    im = Image.new("RGBA", (3, 1))
    im.putdata([(255, 0, 0, 0), (255, 0, 0, 255), (0, 0, 0, 128)])
    im.save(tmp_path / "rgba.png")
    img = load_rgb(tmp_path / "rgba.png")
    _assert_rgb(img, (3, 1))
    assert [tuple(_px(img, (x, 0))) for x in range(3)] == [(255, 255, 255), (255, 0, 0), (127, 127, 127)]
    img = load_rgb(tmp_path / "rgba.png", background=(0, 0, 0))
    assert tuple(_px(img, (0, 0))) == (0, 0, 0)

    la = Image.new("LA", (2, 1))
    la.putdata([(0, 0), (0, 255)])
    la.save(tmp_path / "la.png")
    img = load_rgb(tmp_path / "la.png")
    _assert_rgb(img, (2, 1))
    assert [tuple(_px(img, (x, 0))) for x in range(2)] == [(255, 255, 255), (0, 0, 0)]


def test_grey_bilevel_lab_ycbcr_become_rgb(tmp_path):
    Image.new("L", (2, 2), 77).save(tmp_path / "l.png")
    assert tuple(_px(load_rgb(tmp_path / "l.png"), (1, 1))) == (77, 77, 77)
    bw = Image.new("1", (2, 1))
    bw.putpixel((1, 0), 1)
    bw.save(tmp_path / "bw.png")
    img = load_rgb(tmp_path / "bw.png")
    assert [tuple(_px(img, (x, 0))) for x in range(2)] == [(0, 0, 0), (255, 255, 255)]
    Image.new("LAB", (2, 2), (128, 128, 128)).save(tmp_path / "lab.tif")  # mid grey in L*a*b*
    got = _px(load_rgb(tmp_path / "lab.tif"), (0, 0))
    assert got.max() - got.min() <= 2 and 100 < got[0] < 140
    Image.new("YCbCr", (2, 2), (200, 128, 128)).save(tmp_path / "ycc.tif")
    img = load_rgb(tmp_path / "ycc.tif")
    _assert_rgb(img)
    assert np.abs(_px(img, (0, 0)) - 200).max() <= 2


def test_animated_gif_gives_first_frame(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert getattr(Image.open(p), "n_frames", 1) == 3
    img = load_rgb(p)
    _assert_rgb(img, (8, 8))
    assert tuple(_px(img, (4, 4))) == (255, 0, 0)


def test_rgb_jpeg_fast_path_and_draft(tmp_path):
    p = make_image(tmp_path / "big.jpg", size=(400, 300))
    full = load_rgb(p)
    _assert_rgb(full, (400, 300))
    img = load_rgb(p, draft_size=64)
    _assert_rgb(img, (100, 75))  # libjpeg scaled by 1/4: both sides stay >= 64
    png = make_image(tmp_path / "big.png", size=(400, 300))
    _assert_rgb(load_rgb(png, draft_size=64), (400, 300))  # draft only applies to JPEG


# -- formats without a plugin, permissions, odd names ------------------------------------------------------------------
def test_heic_without_plugin_is_skipped_with_install_hint(tmp_path, monkeypatch):
    monkeypatch.setattr(decode, "_heif_registered", False)  # as on a machine without pillow-heif
    head = b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(200)
    (tmp_path / "IMG_0001.HEIC").write_bytes(head)
    (tmp_path / "disguised.jpg").write_bytes(head)
    for name in ("IMG_0001.HEIC", "disguised.jpg"):
        with pytest.raises(DecodeError) as ei:
            load_rgb(tmp_path / name)
        assert ei.value.reason.startswith("unsupported format: HEIC")
        assert "pip install pillow-heif" in ei.value.reason


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file_is_skipped_and_not_chmodded(tmp_path):
    p = make_image(tmp_path / "locked.jpg")
    p.chmod(0)
    try:
        with pytest.raises(DecodeError) as ei:
            load_rgb(p)
        assert ei.value.reason == "permission denied" and ei.value.stage == "open"
        assert (p.stat().st_mode & 0o777) == 0
    finally:
        p.chmod(0o644)


def test_permission_error_maps_to_reason(tmp_path, monkeypatch):
    # Same check as above, runnable as root: the OS refuses the open.
    p = make_image(tmp_path / "locked.jpg")

    def refuse(path, flags):
        raise PermissionError(13, "Permission denied", os.fsdecode(path))

    monkeypatch.setattr(decode, "_os_open", refuse)
    with pytest.raises(DecodeError) as ei:
        load_rgb(p)
    assert (ei.value.reason, ei.value.stage) == ("permission denied", "open")


def test_non_utf8_file_name(tmp_path):
    raw = os.fsencode(tmp_path) + b"/caf\xe9.jpg"
    try:
        with open(raw, "wb") as fh:
            fh.write(jpeg_bytes(16))
    except (OSError, UnicodeError):
        pytest.skip("file system refuses non-UTF-8 names")
    _assert_rgb(load_rgb(raw), (16, 16))
    _assert_rgb(load_rgb(os.fsdecode(raw)), (16, 16))  # str with a surrogate escape


def test_interrupts_and_memory_errors_pass_through(tmp_path, monkeypatch):
    p = make_image(tmp_path / "x.png")
    for exc in (KeyboardInterrupt, MemoryError):
        def boom(*a, _exc=exc, **k):
            raise _exc()

        monkeypatch.setattr(Image, "open", boom)
        with pytest.raises(exc):
            load_rgb(p)


def test_pillow_bomb_warning_never_reaches_stderr(tmp_path):
    """Between Pillow's limit and twice that, Pillow warns on stderr (once per worker); featx refuses by itself."""
    import struct
    import warnings

    from featx.data.jpeg_batch import read_device_jpeg

    (tmp_path / "big.png").write_bytes(png_bytes(10000, 9000))  # 90 M pixels: just over the limit
    jpg = bytearray(jpeg_bytes(16))
    sof = jpg.index(b"\xff\xc0")
    jpg[sof + 5:sof + 9] = struct.pack(">HH", 9000, 10000)  # the same size declared in a JPEG header
    (tmp_path / "big.jpg").write_bytes(bytes(jpg))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(DecodeError, match="decompression bomb: 10000x9000"):
            load_rgb(tmp_path / "big.png")
        assert read_device_jpeg(tmp_path / "big.jpg") is None  # the device path leaves it to the PIL path
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]
