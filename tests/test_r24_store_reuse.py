"""Issue 24 item 5: `featx extract` into an existing store: another folder or backbone is refused without --overwrite
(naming both), and an identical re-run is "already complete" without building the network."""
from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from featx.cli.app import app
from tests.imagegen import make_folder

TINY = ["--no-pretrained", "--image-size", "32", "--workers", "0"]


def _extract(folder, out, *extra):
    return CliRunner().invoke(app, ["extract", str(folder), "-o", str(out), *TINY, *extra])


@pytest.fixture()
def store(tmp_path):
    folder = make_folder(tmp_path / "imgs", n_per_class=2, size=24)
    out = tmp_path / "f.npz"
    r = _extract(folder, out)
    assert r.exit_code == 0, r.output
    return folder, out


def _never_build(monkeypatch):
    import featx.backbones

    def boom(*a, **kw):
        raise AssertionError("the network was built")

    monkeypatch.setattr(featx.backbones, "create_backbone", boom)


def test_identical_rerun_is_already_complete_without_building_the_network(store, monkeypatch):
    folder, out = store
    before = out.read_bytes()
    _never_build(monkeypatch)
    r = _extract(folder, out, "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["already_complete"] is True and res["n_images"] == 8 and res["backbone"] == "efficientnet_lite0"
    assert out.read_bytes() == before  # the store was not rewritten
    plain = _extract(folder, out)
    assert plain.exit_code == 0 and "already complete" in plain.output


def test_a_changed_file_or_option_runs_again(store, monkeypatch):
    folder, out = store
    img = next((folder / "train" / "a").iterdir())
    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 10**9))  # a touched image: a new listing
    r = _extract(folder, out, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["already_complete"] is False
    _never_build(monkeypatch)
    assert json.loads(_extract(folder, out, "--json").stdout)["already_complete"] is True
    # --overwrite asks for a fresh extraction: the network is built (and here refuses to)
    assert _extract(folder, out, "--overwrite").exit_code != 0


def test_another_folder_is_refused_naming_both(store, tmp_path, monkeypatch):
    folder, out = store
    other = make_folder(tmp_path / "other", n_per_class=2, size=24, seed=3)
    before = out.read_bytes()
    _never_build(monkeypatch)  # refused before any network is built
    r = _extract(other, out)
    assert r.exit_code == 2, r.output
    assert str(folder.resolve()) in r.output and str(other.resolve()) in r.output and "--overwrite" in r.output
    assert out.read_bytes() == before


def test_another_folder_with_overwrite_replaces_it(store, tmp_path):
    folder, out = store
    other = make_folder(tmp_path / "other", classes=("x", "y", "z"), n_per_class=1, size=24, seed=3)
    r = _extract(other, out, "--overwrite", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["n_images"] == 6


def test_another_backbone_is_refused_naming_both(store):
    folder, out = store
    before = out.read_bytes()
    r = _extract(folder, out, "--backbone", "tv/resnet18")
    assert r.exit_code == 2, r.output
    text = " ".join(r.output.split())
    assert "efficientnet_lite0" in text and "tv/resnet18" in text and "--overwrite" in text
    assert out.read_bytes() == before
    # another crop size of the same backbone is another source too
    r = CliRunner().invoke(app, ["extract", str(folder), "-o", str(out), "--no-pretrained", "--image-size", "40",
                                 "--workers", "0"])
    assert r.exit_code == 2 and "40 px" in " ".join(r.output.split())


def test_a_parquet_store_is_reused_and_protected_too(tmp_path, monkeypatch):
    pytest.importorskip("pyarrow")
    folder = make_folder(tmp_path / "imgs", n_per_class=2, size=24)
    out = tmp_path / "f.parquet"
    assert _extract(folder, out).exit_code == 0
    _never_build(monkeypatch)
    r = _extract(folder, out, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["already_complete"] is True
    other = make_folder(tmp_path / "other", n_per_class=2, size=24, seed=5)
    r = _extract(other, out)
    assert r.exit_code == 2 and str(other.resolve()) in r.output
