"""Issue 22 items 7 and 9: odd feature stores and zip members whose headers lie give one line (exit 5), and nothing
is allocated or inflated from a size the file declares."""
from __future__ import annotations

import io
import json
import struct
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import featx
from featx.cli.app import app
from featx.errors import ArtifactError
from featx.features.store import FeatureSet, save_features

runner = CliRunner()
META = {"backbone": "efficientnet_lite0", "weights_sha256": "ab" * 32, "preprocess": {"input_size": 8},
        "layer": "pooled", "feature_dim": 4}
BOMB = 256 << 20  # bytes of zeros behind a lying header: ~260 kB deflated
SMALL = 48 << 20  # what a refusal may cost in Python allocations (numpy's included), far below BOMB


def _run(*args):
    return runner.invoke(app, [str(a) for a in args])


def _one_line(r, code: int = 5, needle: str = ""):
    assert r.exit_code == code, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
    lines = [ln for ln in r.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    assert needle in r.output, r.output


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _good_members(n: int = 6, meta=META) -> dict:
    rng = np.random.default_rng(0)
    return {"features.npy": _npy(rng.normal(size=(n, 4)).astype(np.float32)),
            "paths.npy": _npy(np.array([f"c{i % 2}/{i}.png" for i in range(n)])),
            "labels.npy": _npy(np.array([f"c{i % 2}" for i in range(n)])),
            "classes.npy": _npy(np.array(["c0", "c1"])),
            "meta.npy": _npy(np.asarray(json.dumps({"format": "featx.features", **meta})))}


def _write_zip(path, members: dict):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def forge_zip(path, members: list):
    """A zip written byte by byte, so its headers can lie: members are ``(name, raw, method, crc, declared_size)``
    (and optionally general-purpose flags) with ``raw`` the bytes as stored (a deflate stream for method 8); both
    headers declare ``declared_size``."""
    out, central = bytearray(), bytearray()
    for name, raw, method, crc, declared, *flags in members:
        nb, flags = name.encode(), (flags or [0])[0]
        offset = len(out)
        out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, flags, method, 0, 0x21, crc, len(raw), declared, len(nb), 0)
        out += nb + raw
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, flags, method, 0, 0x21, crc, len(raw),
                               declared, len(nb), 0, 0, 0, 0, 0, offset) + nb
    cd = len(out)
    out += central + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central), cd, 0)
    path.write_bytes(bytes(out))
    return path


def _stored(name: str, data: bytes):
    return (name, data, 0, zlib.crc32(data), len(data))


@pytest.fixture(scope="module")
def zeros_deflated() -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = bytes(16 << 20)
    return b"".join(c.compress(block) for _ in range(BOMB // len(block))) + c.flush()


def _lying(name: str, zeros: bytes, declared: int = 8):
    """A member whose headers declare ``declared`` bytes (and the CRC of that many zeros) over a 256 MiB stream."""
    return (name, zeros, 8, zlib.crc32(bytes(declared)), declared)


def _peak(fn) -> tuple:
    """(exception raised or None, result, peak bytes Python and numpy allocated while ``fn`` ran)."""
    tracemalloc.start()
    try:
        try:
            return None, fn(), tracemalloc.get_traced_memory()[1]
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            return exc, None, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ----------------------------------------------------------------------------------------------- item 7: odd stores

def test_a_store_of_n_by_0_features_is_one_line_in_load_fit_and_audit(tmp_path):
    """N x 0 features: fit raised sklearn's ValueError, audit ZeroDivisionError."""
    members = {**_good_members(), "features.npy": _npy(np.zeros((6, 0), np.float32))}
    path = _write_zip(tmp_path / "empty-dim.npz", members)
    with pytest.raises(ArtifactError, match="0 values per image"):
        featx.load_features(path)
    _one_line(_run("fit", path, "-o", tmp_path / "h.skops"), 5, "0 values per image")
    _one_line(_run("audit", path, "--report-dir", tmp_path / "rep"), 5, "0 values per image")
    assert not (tmp_path / "h.skops").exists() and not (tmp_path / "rep").exists()
    with pytest.raises(ArtifactError, match="0 values per image"):  # the same rule for a FeatureSet built in Python
        FeatureSet(np.zeros((3, 0)), ["a", "b", "c"])


def test_an_npy_header_declaring_373_gib_is_refused_before_allocating(tmp_path):
    """features.npy declaring 10^11 float32 over a few bytes of data: numpy tried to allocate 373 GiB first."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (10**8, 1000)})
    path = _write_zip(tmp_path / "huge.npz", {**_good_members(), "features.npy": buf.getvalue() + bytes(64)})
    exc, _, peak = _peak(lambda: featx.load_features(path))
    assert isinstance(exc, ArtifactError) and "'features'" in str(exc) and "declares" in str(exc), exc
    assert peak < SMALL, f"{peak:,} bytes allocated"
    _one_line(_run("fit", path, "-o", tmp_path / "h.skops"), 5, "declares")


def test_an_npy_header_larger_than_its_data_allocates_nothing_from_it(tmp_path):
    """A header declaring 1 GiB over 64 bytes: today numpy reserves the 1 GiB, then finds the data missing."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (1 << 18, 1024)})
    path = _write_zip(tmp_path / "short.npz", {**_good_members(), "features.npy": buf.getvalue() + bytes(64)})
    exc, _, peak = _peak(lambda: featx.load_features(path))
    assert isinstance(exc, ArtifactError), exc
    assert peak < SMALL, f"{peak:,} bytes allocated for a 64-byte array"


def test_a_parquet_embedding_of_strings_is_one_line(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    doc = {"format": "featx.features.parquet", "format_version": 1, "classes": ["a", "b"], "dim": 2, "meta": META}
    for values in (["x", "y"], ["1.5", "2"]):  # words, and numbers written as text (numpy would convert those)
        emb = pa.FixedSizeListArray.from_arrays(pa.array(values * 2, type=pa.string()), 2)
        table = pa.table({"path": ["a/1.png", "b/2.png"], "label": ["a", "b"], "split": pa.nulls(2, pa.string()),
                          "embedding": emb}).replace_schema_metadata({b"featx": json.dumps(doc).encode()})
        pq.write_table(table, tmp_path / "s.parquet")
        with pytest.raises(ArtifactError, match="embedding column"):
            featx.load_features(tmp_path / "s.parquet")
        _one_line(_run("fit", tmp_path / "s.parquet", "-o", tmp_path / "h.skops"), 5, "embedding column")


def test_a_parquet_store_declaring_more_rows_than_its_file_holds_is_refused_before_reading(tmp_path, monkeypatch):
    pq = pytest.importorskip("pyarrow.parquet")
    from featx.export import parquet as pqmod

    fs = FeatureSet(np.ones((4, 3), np.float32), [f"{i}.png" for i in range(4)], meta=META)
    pqmod.write_features(fs, tmp_path / "f.parquet")
    real = pq.read_metadata

    class Lying:  # what a forged footer says: 10^10 rows of 3 floats in a few kB
        def __init__(self, md):
            self.md = md

        def __getattr__(self, name):
            return getattr(self.md, name)

        num_rows = 10**10

    monkeypatch.setattr(pq, "read_metadata", lambda p, *a, **k: Lying(real(p, *a, **k)))
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("the table was read"))
    with pytest.raises(ArtifactError, match="10,000,000,000 rows"):
        featx.load_features(tmp_path / "f.parquet")


@pytest.mark.parametrize("bad", ["/etc/passwd", "../outside.png", "c0/../../outside.png", ""])
def test_store_paths_that_leave_the_image_root_are_refused(tmp_path, bad):
    """A store is paths relative to its image root; audit's gallery drew a file from outside it."""
    members = _good_members()
    paths = [f"c{i % 2}/{i}.png" for i in range(6)]
    paths[3] = bad
    path = _write_zip(tmp_path / "f.npz", {**members, "paths.npy": _npy(np.array(paths))})
    with pytest.raises(ArtifactError, match="image root") as err:
        featx.load_features(path)
    assert repr(bad) in str(err.value)
    _one_line(_run("audit", path, "--report-dir", tmp_path / "rep"), 5, "image root")
    assert not (tmp_path / "rep").exists()


def test_audit_of_a_feature_set_in_memory_never_reads_outside_its_root(tmp_path):
    from featx.audit import audit

    root = tmp_path / "images"
    (root / "a").mkdir(parents=True)
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"not for the gallery")
    X = np.ones((4, 8), np.float32)
    fs = FeatureSet(X, ["a/1.png", "a/2.png", "a/3.png", "../secret.png"], meta={**META, "root": str(root)})
    with pytest.raises(ArtifactError, match="image root"):
        audit(fs, report_dir=tmp_path / "rep", checks=["duplicates"])


def test_duplicate_paths_in_a_store_are_refused_naming_the_first(tmp_path):
    paths = [f"c{i % 2}/{i}.png" for i in range(6)]
    paths[4] = paths[1]
    path = _write_zip(tmp_path / "dup.npz", {**_good_members(), "paths.npy": _npy(np.array(paths))})
    with pytest.raises(ArtifactError, match=r"'c1/1.png' .*twice|'c1/1.png' appears"):
        featx.load_features(path)
    _one_line(_run("fit", path, "-o", tmp_path / "h.skops"), 5, "c1/1.png")


def test_fit_refuses_features_without_backbone_provenance(tmp_path):
    """fit succeeded and wrote a head that predict can never use (it cannot rebuild the backbone)."""
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(0, 1, (20, 4)), rng.normal(4, 1, (20, 4))]).astype(np.float32)
    labels = ["a"] * 20 + ["b"] * 20
    fs = FeatureSet(X, [f"{lab}/{i}.png" for i, lab in enumerate(labels)], labels=labels, classes=["a", "b"],
                    meta={"preprocess": {"input_size": 8}})
    save_features(fs, tmp_path / "f.npz")
    _one_line(_run("fit", tmp_path / "f.npz", "-o", tmp_path / "h.skops"), 5, "backbone")
    assert not (tmp_path / "h.skops").exists()
    with pytest.raises(ArtifactError, match="featx extract"):
        featx.fit_head(fs, head="logistic", C=1.0, cv=0)


# ----------------------------------------------------------------------------------- item 9: zip bombs, lying headers

@pytest.fixture(scope="module")
def head_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    X = np.concatenate([rng.normal(0, 1, (20, 4)), rng.normal(4, 1, (20, 4))]).astype(np.float32)
    labels = ["a"] * 20 + ["b"] * 20
    fs = FeatureSet(X, [f"{lab}/{i}.png" for i, lab in enumerate(labels)], labels=labels, classes=["a", "b"],
                    meta=META)
    path = tmp_path_factory.mktemp("head") / "h.skops"
    featx.fit_head(fs, head="logistic", C=1.0, cv=0, output=path)
    return path


def _forged_head(head_file, dest, zeros, victim="schema.json"):
    """The fitted head with ``victim`` replaced by a member declaring 8 bytes over 256 MiB of deflated zeros."""
    with zipfile.ZipFile(head_file) as zf:
        members = [_lying(i.filename, zeros) if i.filename == victim else _stored(i.filename, zf.read(i))
                   for i in zf.infolist()]
    return forge_zip(dest, members)


@pytest.mark.parametrize("victim", ["schema.json", "npy"])
def test_a_head_with_a_lying_member_header_is_refused_without_inflating_it(tmp_path, head_file, zeros_deflated,
                                                                           victim):
    from featx.heads.store import is_head_file, load_head

    with zipfile.ZipFile(head_file) as zf:
        name = victim if victim == "schema.json" else next(n for n in zf.namelist() if n.endswith(".npy"))
    bomb = _forged_head(head_file, tmp_path / "bomb.skops", zeros_deflated, name)
    assert bomb.stat().st_size < 2 << 20
    exc, _, peak = _peak(lambda: load_head(bomb))
    assert isinstance(exc, ArtifactError), exc
    assert peak < SMALL, f"{peak:,} bytes allocated loading a {bomb.stat().st_size:,}-byte head"
    exc, ours, peak = _peak(lambda: is_head_file(bomb))
    assert exc is None and peak < SMALL, (exc, f"{peak:,}")


def test_lying_heads_are_one_line_in_fit_export_and_predict(tmp_path, head_file, zeros_deflated):
    bomb = _forged_head(head_file, tmp_path / "bomb.skops", zeros_deflated)
    save_features(FeatureSet(np.ones((4, 4), np.float32), [f"{c}/{i}.png" for i, c in enumerate("abab")],
                             labels=list("abab"), classes=["a", "b"], meta=META), tmp_path / "f.npz")
    before = bomb.read_bytes()
    exc, r, peak = _peak(lambda: _run("fit", tmp_path / "f.npz", "-o", bomb))  # is the existing output featx's?
    assert peak < SMALL, f"{peak:,}"
    _one_line(r, 2, "not a featx head file")
    exc, r, peak = _peak(lambda: _run("export", bomb, "-o", tmp_path / "m.onnx"))
    assert peak < SMALL, f"{peak:,}"
    _one_line(r, 5, "bomb.skops")
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / "x.png")
    exc, r, peak = _peak(lambda: _run("predict", tmp_path / "imgs", "--model", bomb, "-o", tmp_path / "p.csv"))
    assert peak < SMALL, f"{peak:,}"
    _one_line(r, 5, "bomb.skops")
    assert bomb.read_bytes() == before and not (tmp_path / "m.onnx").exists() and not (tmp_path / "p.csv").exists()


def test_a_store_member_that_is_a_lying_bomb_is_refused_without_inflating_it(tmp_path, zeros_deflated):
    """paths.npy declaring 8 bytes over 256 MiB of zeros: not an .npy, so numpy's NpzFile zf.read() all of it."""
    members = [_stored(n, d) for n, d in _good_members().items() if n != "paths.npy"]
    bomb = forge_zip(tmp_path / "bomb.npz", members + [_lying("paths.npy", zeros_deflated)])
    exc, _, peak = _peak(lambda: featx.load_features(bomb))
    assert isinstance(exc, ArtifactError), exc
    assert peak < SMALL, f"{peak:,}"
    bomb = forge_zip(tmp_path / "bomb2.npz", [m for m in members if m[0] != "meta.npy"]
                     + [_lying("paths.npy", zeros_deflated, 16), _lying("meta.npy", zeros_deflated)])
    from featx.features.engine import is_features_store

    exc, ours, peak = _peak(lambda: is_features_store(bomb))
    assert exc is None and ours is False and peak < SMALL, (exc, f"{peak:,}")


def test_a_member_whose_crc_fails_is_one_line(tmp_path, zeros_deflated):
    """The plain lying header (CRC of the whole stream): zipfile's 'Bad CRC-32' came after inflating all of it."""
    members = [_stored(n, d) for n, d in _good_members().items() if n != "labels.npy"]
    bomb = forge_zip(tmp_path / "crc.npz", members + [("labels.npy", zeros_deflated, 8, 12345, 200)])
    exc, _, peak = _peak(lambda: featx.load_features(bomb))
    assert isinstance(exc, ArtifactError) and "labels" in str(exc), exc
    assert peak < SMALL


def test_members_compressed_by_methods_that_cannot_be_read_in_bounded_steps_are_refused(tmp_path):
    """bzip2 and lzma inflate a whole compressed block per read: no cap on a read is possible, and featx never
    writes them (stores are stored, heads stored by skops)."""
    path = tmp_path / "bz.npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_BZIP2) as zf:
        for name, data in _good_members().items():
            zf.writestr(name, data)
    with pytest.raises(ArtifactError, match="bzip2"):
        featx.load_features(path)


def test_deflated_stores_still_load(tmp_path):
    """np.savez_compressed of a store (a user re-saving it) is still a store."""
    path = tmp_path / "c.npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in _good_members().items():
            zf.writestr(name, data)
    fs = featx.load_features(path)
    assert fs.features.shape == (6, 4) and fs.paths[1] == "c1/1.png" and fs.meta["backbone"] == META["backbone"]
    fortran = _good_members()
    fortran["features.npy"] = _npy(np.asfortranarray(np.arange(24, dtype=">f8").reshape(6, 4)))
    fs = featx.load_features(_write_zip(tmp_path / "f.npz", fortran))
    np.testing.assert_array_equal(fs.features, np.arange(24).reshape(6, 4))


def test_overlapping_members_cannot_multiply_what_a_small_file_inflates(tmp_path):
    """Many central-directory entries pointing at one compressed stream (an overlap bomb): refused from the
    directory alone, by the total they declare against the file's size."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    data = bytes(8 << 20)
    raw = c.compress(data) + c.flush()
    one = ("features.npy", raw, 8, zlib.crc32(data), len(data))
    out = bytearray()
    nb = b"x.npy"
    out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0x21, one[3], len(raw), len(data), len(nb), 0)
    out += nb + raw
    central = bytearray()
    for k in range(40):  # 40 names, one stream: 320 MiB declared by a file of ~10 kB
        name = f"m{k}.npy".encode()
        central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0x21, one[3], len(raw), len(data),
                               len(name), 0, 0, 0, 0, 0, 0) + name
    cd = len(out)
    out += central + struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 40, 40, len(central), cd, 0)
    path = tmp_path / "overlap.npz"
    path.write_bytes(bytes(out))
    with pytest.raises(ArtifactError, match="declare"):
        featx.load_features(path)


def test_fit_refuses_a_store_whose_meta_disagrees_with_its_width(tmp_path):
    """meta says 1280 values per image, the matrix has 4: a head fitted on it fails on every image at predict."""
    members = _good_members(meta={**META, "feature_dim": 1280})
    path = _write_zip(tmp_path / "f.npz", members)
    assert featx.load_features(path).dim == 4  # readable (audit does not care), but no head is fitted on it
    _one_line(_run("fit", path, "-o", tmp_path / "h.skops"), 5, "1280 values per image")
    assert not (tmp_path / "h.skops").exists()
    pytest.importorskip("pyarrow")
    from featx.export.parquet import write_features

    write_features(FeatureSet(np.ones((2, 4), np.float32), ["a.png", "b.png"], labels=["a", "b"],
                              meta={**META, "feature_dim": 8}), tmp_path / "f.parquet")
    _one_line(_run("fit", tmp_path / "f.parquet", "-o", tmp_path / "h.skops"), 5, "8 values per image")


def test_a_head_array_whose_npy_header_lies_is_refused_before_allocating(tmp_path, head_file):
    """skops reads each array with np.load(BytesIO): a header declaring 1 GiB was allocated before the data ran out."""
    from featx.heads.store import load_head

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False, "shape": (1 << 17, 1024)})
    with zipfile.ZipFile(head_file) as zf:
        infos = zf.infolist()
        victim = next(i.filename for i in infos if i.filename.endswith(".npy"))
        members = [_stored(i.filename, buf.getvalue() + bytes(16) if i.filename == victim else zf.read(i))
                   for i in infos]
    bomb = forge_zip(tmp_path / "h.skops", members)
    exc, _, peak = _peak(lambda: load_head(bomb))
    assert isinstance(exc, ArtifactError) and "declares" in str(exc), exc
    assert peak < SMALL, f"{peak:,}"


def test_a_deflated_head_still_loads(tmp_path, head_file):
    """A head re-zipped with deflate (not what skops writes) is read through the rewritten, stored copy."""
    from featx.heads.store import load_head

    with zipfile.ZipFile(head_file) as src, zipfile.ZipFile(tmp_path / "d.skops", "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    head = load_head(tmp_path / "d.skops")
    assert head.classes == ["a", "b"] and head.feature_meta["backbone"] == META["backbone"]


def test_the_process_peak_stays_small_loading_a_lying_head(tmp_path, head_file, zeros_deflated):
    """The same bomb in a real process: its peak resident memory grows by far less than the 256 MiB it hides."""
    import subprocess
    import sys

    bomb = _forged_head(head_file, tmp_path / "bomb.skops", zeros_deflated)
    if not Path("/proc/self/status").exists():
        pytest.skip("needs /proc (Linux)")
    # VmHWM (peak resident set of this process image), not ru_maxrss: a child inherits its parent's ru_maxrss
    code = ("import sys\n"
            "from featx.heads.store import load_head\n"
            "from featx.errors import ArtifactError\n"
            "def hwm():\n"
            "    return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
            "load_head(sys.argv[1])\n"
            "before = hwm()\n"
            "try:\n    load_head(sys.argv[2])\nexcept ArtifactError as exc:\n    print('refused', exc)\n"
            "print((hwm() - before) * 1024)\n")
    out = subprocess.run([sys.executable, "-c", code, str(head_file), str(bomb)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("refused"), out.stdout
    assert int(lines[-1]) < SMALL, f"peak RSS grew by {int(lines[-1]):,} bytes"


@pytest.mark.parametrize("change", [[1, 2], {"format_version": "two"}, {"features": [1]}, {"versions": "x"},
                                    {"kind": 5}, {"format_version": 99}])
def test_a_head_whose_metadata_was_tampered_is_one_line(tmp_path, head_file, change):
    """RELIABILITY 'a store or head with a tampered layout': a head's meta of the wrong shape gave tracebacks."""
    import skops.io as sio

    from featx.heads.store import load_head

    head = load_head(head_file)
    meta = change if isinstance(change, list) else {**head.meta, **change}
    path = tmp_path / "t.skops"
    path.write_bytes(sio.dumps({"pipeline": head.pipeline, "meta": json.dumps(meta)}))
    with pytest.raises(ArtifactError, match="t.skops"):
        load_head(path)


def test_a_store_from_a_newer_featx_is_refused(tmp_path):
    members = _good_members(meta={**META, "format_version": 99})
    with pytest.raises(ArtifactError, match="newer featx"):
        featx.load_features(_write_zip(tmp_path / "f.npz", members))


@pytest.mark.parametrize("doc", [{"format_version": "x", "classes": [], "meta": {}}, [1], {"classes": 3, "meta": {}}])
def test_a_parquet_store_with_tampered_featx_metadata_is_one_line(tmp_path, doc):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"path": ["a.png"], "label": ["a"], "split": pa.nulls(1, pa.string()),
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array([1.0, 2.0], pa.float32()), 2)})
    pq.write_table(table.replace_schema_metadata({b"featx": json.dumps(doc).encode()}), tmp_path / "t.parquet")
    with pytest.raises(ArtifactError, match="t.parquet"):
        featx.load_features(tmp_path / "t.parquet")


def test_an_encrypted_member_is_one_line(tmp_path, head_file):
    """zipfile raises RuntimeError ('password required') for an encrypted member: a traceback before."""
    from featx.heads.store import is_head_file, load_head

    members = [(*_stored(n, d), 0x1) if n == "meta.npy" else _stored(n, d) for n, d in _good_members().items()]
    with pytest.raises(ArtifactError, match="encrypted"):
        featx.load_features(forge_zip(tmp_path / "e.npz", members))
    with zipfile.ZipFile(head_file) as zf:
        members = [(*_stored(i.filename, zf.read(i)), 0x1) for i in zf.infolist()]
    forge_zip(tmp_path / "e.skops", members)
    with pytest.raises(ArtifactError, match="encrypted"):
        load_head(tmp_path / "e.skops")
    assert not is_head_file(tmp_path / "e.skops")
