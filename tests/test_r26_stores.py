"""Issue 26: one registry of store formats, sharded stores (mmap, float16, append), extraction by N workers."""
from __future__ import annotations

import ast
import json
import os
from pathlib import Path

import numpy as np
import pytest

import featx
from featx.errors import ArtifactError, UsageError
from tests.imagegen import make_folder

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path, package: str) -> set:
    """Absolute names of the featx modules ``path`` imports (anywhere in it, lazily or not)."""
    out = set()
    parts = package.split(".")
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = parts[:len(parts) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}
    return out


def test_features_package_never_imports_export():
    """features/ is a lower floor than export/: no import of it, even inside a function (the old circle)."""
    pkg = ROOT / "featx" / "features"
    bad = {f.name: sorted(m for m in _imports(f, "featx.features") if m.startswith("featx.export"))
           for f in pkg.glob("*.py")}
    assert not {k: v for k, v in bad.items() if v}
    # and no circle inside features/ either: the registry names its readers and writers as strings, imports nothing
    graph = {f"featx.features.{f.stem}": {m for m in _imports(f, "featx.features") if m.startswith("featx.features.")}
             for f in pkg.glob("*.py") if f.stem != "__init__"}
    graph = {k: {m if m in graph else m.rsplit(".", 1)[0] for m in v} & set(graph) - {k} for k, v in graph.items()}

    def reaches(a, b, seen=()):
        return any(n == b or (n not in seen and reaches(n, b, seen + (n,))) for n in graph[a])
    assert not [m for m in graph if reaches(m, m)]
    # the registry names its readers as strings: none of them may live in export/ either
    from featx.features.formats import FORMATS
    assert all(not spec.startswith("featx.export") for f in FORMATS.values()
               for spec in (f.reader, f.writer, f.recogniser))


def _fs(n=10, dim=6, seed=0):
    rng = np.random.default_rng(seed)
    return featx.FeatureSet(features=rng.normal(size=(n, dim)).astype(np.float32),
                            paths=[f"c{i % 2}/img{i}.jpg" for i in range(n)], labels=[f"c{i % 2}" for i in range(n)],
                            splits=["train"] * (n - 3) + ["val"] * 3, classes=["c0", "c1"], meta={"backbone": "x"})


def _same(a, b, exact=True):
    assert a.paths == b.paths and a.classes == b.classes
    for name in ("labels", "splits"):
        u, v = getattr(a, name), getattr(b, name)
        assert (u is None and v is None) or list(u) == list(v)
    if exact:
        assert np.array_equal(a.features, b.features)


def test_sharded_roundtrip_is_memory_mapped_and_readable_without_featx(tmp_path):
    from featx.features.sharded import open_sharded, write_sharded

    fs = _fs(10)
    write_sharded(fs, tmp_path / "s", shard_size=4)
    back = featx.load_features(tmp_path / "s")
    _same(fs, back)
    store = open_sharded(tmp_path / "s")
    assert [s["n"] for s in store.shards] == [4, 4, 2]
    assert isinstance(store.features(0), np.memmap)  # lazily mapped, not read
    # plain numpy, as the module docstring tells pandas / DuckDB users
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    x = np.concatenate([np.load(tmp_path / "s" / s["features"], mmap_mode="r") for s in m["shards"]])
    p = np.concatenate([np.load(tmp_path / "s" / s["rows"])["paths"] for s in m["shards"]])
    assert np.array_equal(x, fs.features) and p.tolist() == fs.paths


def test_save_features_chooses_format_by_path_and_float16_halves_the_shards(tmp_path):
    fs = _fs(50, dim=64)
    featx.save_features(fs, str(tmp_path / "s32") + "/")  # trailing slash: a sharded folder
    featx.save_features(fs, tmp_path / "s16", format="sharded", dtype="float16")
    assert (tmp_path / "s32" / "manifest.json").is_file()
    a, b = featx.load_features(tmp_path / "s32"), featx.load_features(tmp_path / "s16")
    _same(fs, a)
    _same(fs, b, exact=False)
    assert b.features.dtype == np.float32 and np.abs(b.features - fs.features).max() < 1e-2
    size = lambda d: sum(f.stat().st_size for f in d.glob("features-*.npy"))  # noqa: E731
    assert size(tmp_path / "s16") < 0.55 * size(tmp_path / "s32")
    with pytest.raises(UsageError, match="float16"):
        featx.save_features(fs, tmp_path / "x.parquet", dtype="float16")
    with pytest.raises(UsageError, match="--format"):
        featx.save_features(fs, tmp_path / "x", format="hdf5")


def test_sharded_store_appends_and_refuses_a_forged_shard(tmp_path):
    from featx.features.sharded import ShardWriter

    fs = _fs(9)
    w = ShardWriter(tmp_path / "s", dim=fs.dim, classes=fs.classes, meta=fs.meta, shard_size=4)
    w.add(fs.features[:5], fs.paths[:5], fs.labels[:5], fs.splits[:5])
    w.close()
    w = ShardWriter(tmp_path / "s", dim=fs.dim, classes=fs.classes, shard_size=4, append=True)
    w.add(fs.features[5:], fs.paths[5:], fs.labels[5:], fs.splits[5:])
    w.close()
    _same(fs, featx.load_features(tmp_path / "s"))
    # a shard whose header declares more rows than the manifest (and the file) hold: refused before mapping
    shard = tmp_path / "s" / "features-000000.npy"
    raw = shard.read_bytes()
    shard.write_bytes(raw.replace(b"(4, 6)", b"(9, 6)"))
    with pytest.raises(ArtifactError, match="declares|holds"):
        featx.load_features(tmp_path / "s")
    # a manifest naming a file outside the folder
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    m["shards"][0]["features"] = "../../etc/passwd"
    (tmp_path / "s" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="damaged"):
        featx.load_features(tmp_path / "s")


def test_unfinished_sharded_store_says_workers_are_missing(tmp_path):
    from featx.features.sharded import part_name

    (tmp_path / "s").mkdir()
    (tmp_path / "s" / part_name(0, 2)).write_text("{}")
    with pytest.raises(ArtifactError, match="not finished"):
        featx.load_features(tmp_path / "s")


@pytest.fixture(scope="module")
def bb():
    return featx.create_backbone("efficientnet_lite0", pretrained=False, image_size=32)


def test_two_workers_write_the_same_store_as_one_process(bb, tmp_path):
    """--shard 0/2 and 1/2 (as a Slurm array would run them) merge into the single-process store, row for row."""
    folder = make_folder(tmp_path / "imgs", classes=("cat", "dog"), n_per_class=4, splits=("train", "val"), size=32)
    (folder / "train" / "cat" / "empty.jpg").write_bytes(b"")
    kw = dict(backbone=bb, workers=0, chunk_size=4, batch_size=4)
    one = featx.extract_features(folder, tmp_path / "one.npz", **kw)
    out = tmp_path / "many"
    first = featx.extract_features(folder, out, format="sharded", shard="1/2", **kw)
    assert not (out / "manifest.json").exists() and any("readable once all 2" in w for w in first.warnings)
    from featx.features.sharded import part_name, sharded_written_by_featx
    assert sharded_written_by_featx(out / part_name(1, 2))  # so a re-run of worker 1 may replace its own part
    featx.extract_features(folder, out, format="sharded", shard=(0, 2), **kw)
    a, b = featx.load_features(one.path), featx.load_features(out)
    _same(a, b)
    assert a.meta["skipped"] == b.meta["skipped"] and b.meta["n_images"] == len(a) and b.meta["world_size"] == 2
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(("features-", "rows-"))) == ["manifest.json"]


def test_torchrun_variables_make_each_process_one_worker(bb, tmp_path, monkeypatch):
    """What torchrun hands each rank (RANK / WORLD_SIZE / LOCAL_RANK) is its shard of a sharded output, with no
    process group: rank 1 then rank 0 give the single-process store (the real launcher: the opt-in test below)."""
    folder = make_folder(tmp_path / "imgs", classes=("cat", "dog"), n_per_class=4, splits=("train", "val"), size=32)
    kw = dict(backbone=bb, workers=0, chunk_size=4, batch_size=4)
    one = featx.extract_features(folder, tmp_path / "one.npz", **kw)
    for rank in (1, 0):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        featx.extract_features(folder, tmp_path / "out", format="sharded", **kw)
        import torch.distributed as dist
        assert not dist.is_initialized()
    merged = featx.load_features(tmp_path / "out")
    _same(featx.load_features(one.path), merged)
    assert merged.meta["world_size"] == 2


def test_shard_option_is_checked(bb, tmp_path):
    folder = make_folder(tmp_path / "imgs", classes=("a",), n_per_class=2, splits=None, size=24)
    for bad in ("2/2", "1", "a/b"):
        with pytest.raises(UsageError, match="--shard"):
            featx.extract_features(folder, tmp_path / "s", backbone=bb, workers=0, format="sharded", shard=bad)
    with pytest.raises(UsageError, match="sharded"):
        featx.extract_features(folder, tmp_path / "f.npz", backbone=bb, workers=0, shard="0/2")
    assert not os.path.exists(tmp_path / "f.npz")


def test_fit_audit_export_read_a_sharded_store(tmp_path):
    """fit, audit and export take a sharded folder as they take an .npz (through load_features)."""
    from typer.testing import CliRunner

    from featx.cli.app import app

    rng = np.random.default_rng(1)
    n = 40
    y = np.array(["a", "b"] * (n // 2))
    x = rng.normal(size=(n, 8)).astype(np.float32) + (y == "a")[:, None] * 3
    fs = featx.FeatureSet(features=x, paths=[f"{c}/{i}.jpg" for i, c in enumerate(y)], labels=y, classes=["a", "b"],
                          meta={"backbone": "synthetic"})
    featx.save_features(fs, tmp_path / "s", format="sharded", dtype="float16")
    from featx.audit import audit

    res = featx.fit_head(tmp_path / "s", head="logistic", C=1.0, device="cpu")  # no output: writes nothing
    assert res.scores["val"]["accuracy"] > 0.9
    assert audit(tmp_path / "s", report_dir=False, checks=("duplicates",)) is not None
    runner = CliRunner()
    r = runner.invoke(app, ["export", str(tmp_path / "s"), "-o", str(tmp_path / "back.npz")])
    assert r.exit_code == 0, r.output
    _same(featx.load_features(tmp_path / "s"), featx.load_features(tmp_path / "back.npz"))


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FEATX_TEST_TORCHRUN") != "1",
                    reason="~25 s of torch start-up in 2 processes: set FEATX_TEST_TORCHRUN=1 (the in-process "
                           "tests above cover the same merge, from --shard and from torchrun's variables)")
def test_torchrun_two_ranks_write_one_sharded_store(bb, tmp_path):
    """Under torchrun, each rank is one independent worker (RANK/WORLD_SIZE); no process group, no shared file."""
    import subprocess
    import sys

    import torch

    folder = make_folder(tmp_path / "imgs", classes=("a", "b"), n_per_class=6, splits=("train", "val"), size=32)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "FEATX_NO_PROGRESS": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "featx",
           "extract", str(folder), "-o", str(tmp_path / "out") + "/", "--no-pretrained", "--image-size", "32",
           "--workers", "0", "--device", "cpu", "--chunk-size", "4"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank ran: the same kernels, bit-identical features
    try:
        one = featx.extract_features(folder, tmp_path / "one.npz", backbone=bb, workers=0, chunk_size=4)
    finally:
        torch.set_num_threads(threads)
    a, b = featx.load_features(one.path), featx.load_features(tmp_path / "out")
    _same(a, b)
    assert b.meta["world_size"] == 2


def test_sharded_store_never_writes_into_a_users_folder_or_overflows_float16(tmp_path):
    from featx.errors import DataError, OutputError

    mine = tmp_path / "photos"
    mine.mkdir()
    (mine / "features-000000.npy").write_bytes(b"the user's own file")
    (mine / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(OutputError, match="did not write"):
        featx.save_features(_fs(), mine, format="sharded")
    assert (mine / "features-000000.npy").read_bytes() == b"the user's own file"
    big = _fs()
    big.features[0, 0] = 1e6
    for where, fmt in ((tmp_path / "s", "sharded"), (tmp_path / "f.npz", "npz")):
        with pytest.raises(DataError, match="float16"):
            featx.save_features(big, where, format=fmt, dtype="float16")
    assert not (tmp_path / "f.npz").exists()


def test_merge_waits_for_every_part_refuses_mixed_jobs_and_runs_once(tmp_path):
    import threading

    from featx.features.sharded import merge_parts, read_manifest, write_part, write_shard

    fs = _fs(8)
    folder = tmp_path / "s"
    folder.mkdir()
    docs = []
    for rank in range(2):
        shard = write_shard(folder, rank, fs.features[rank * 4:(rank + 1) * 4], fs.paths[rank * 4:(rank + 1) * 4])
        docs.append({"job": {"files": "abc"}, "dim": fs.dim, "dtype": "float32", "classes": [], "meta": {},
                     "shards": [shard], "chunk_errors": [[rank, []]], "discover_skipped": []})
    write_part(folder, 0, 2, docs[0])
    assert merge_parts(folder, 2) is None and not (folder / "manifest.json").exists()
    write_part(folder, 1, 2, {**docs[1], "job": {"files": "other"}})
    with pytest.raises(ArtifactError, match="different jobs"):
        merge_parts(folder, 2)
    write_part(folder, 1, 2, docs[1])
    results, errors = [], []

    def last_worker():
        try:
            results.append(merge_parts(folder, 2))
        except Exception as exc:  # noqa: BLE001 - any failure of either racer fails the test
            errors.append(exc)

    racers = [threading.Thread(target=last_worker) for _ in range(2)]
    for t in racers:
        t.start()
    for t in racers:
        t.join()
    assert not errors and sum(r is not None for r in results) == 1  # one merges; the other finds nothing left
    assert read_manifest(folder)["n"] == 8
    assert np.array_equal(featx.load_features(folder).features, fs.features)


def test_sharded_store_is_reused_or_protected_like_an_npz(tmp_path):
    """A finished sharded store: the same extraction again returns at once; another folder or another crop size is
    refused (store untouched) unless --overwrite; the summary names the runtime that ran."""
    a = make_folder(tmp_path / "a", classes=("x", "y"), n_per_class=3, splits=None, size=32)
    b = make_folder(tmp_path / "b", classes=("x", "y"), n_per_class=3, splits=None, size=32, seed=5)
    out = tmp_path / "store"
    kw = dict(backbone="efficientnet_lite0", pretrained=False, workers=0, format="sharded", runtime="torch")
    first = featx.extract_features(a, out, image_size=32, **kw)
    assert first.runtime == "torch" and not first.already_complete
    manifest = (out / "manifest.json").read_bytes()
    assert featx.extract_features(a, out, image_size=32, **kw).already_complete
    with pytest.raises(UsageError, match="another folder"):
        featx.extract_features(b, out, image_size=32, **kw)
    with pytest.raises(UsageError, match="another backbone"):
        featx.extract_features(a, out, image_size=48, **kw)
    assert (out / "manifest.json").read_bytes() == manifest
    again = featx.extract_features(a, out, image_size=48, overwrite=True, **kw)
    assert not again.already_complete
    assert featx.load_features(out).meta["preprocess"]["input_size"] == 48
