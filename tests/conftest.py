"""Shared fixtures: CPU only, no progress bars, the shared ants/bees photos when present, tiny image folders."""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("FEATX_NO_PROGRESS", "1")
os.environ.setdefault("FEATX_OFFLINE", "1")  # never try the network from tests
# One graph cache for the whole session (featx.runtime): each (network, size) CPU graph is built once per test run,
# in-process tests and subprocesses alike, and never in the developer's own ~/.cache/featx.
GRAPH_CACHE = Path(tempfile.mkdtemp(prefix="featx-test-cache-"))
os.environ["FEATX_CACHE_DIR"] = str(GRAPH_CACHE)

HYMENOPTERA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hymenoptera"


@pytest.fixture(scope="session")
def hymenoptera() -> Path:
    if not (HYMENOPTERA / "train").is_dir():
        pytest.skip("../shared/data/hymenoptera is not present")
    return HYMENOPTERA


def selects_gpu(markexpr: str) -> bool:
    """Does ``-m EXPR`` ask for the tests marked gpu (``-m gpu``, ``-m "gpu and not slow"``), not exclude them?"""
    return bool(re.search(r"(?<!not )\bgpu\b", " ".join((markexpr or "").split())))


def pytest_configure(config):
    # Tests run on the CPU even on a GPU machine; `pytest -m gpu` runs only the GPU tests, and they get the GPU.
    # (Hiding it unconditionally, as before, made `pytest -m gpu` skip every GPU test on a GPU machine.)
    if not selects_gpu(config.getoption("markexpr", "") or ""):
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


def pytest_terminal_summary(terminalreporter):
    """How much of the run went into building CPU graphs (each built once per session, then reused)."""
    import json

    sides = [json.loads(p.read_text()) for p in (GRAPH_CACHE / "graphs").glob("*.json")]
    if sides:
        terminalreporter.write_line(f"featx CPU graphs built: {len(sides)}, "
                                    f"{sum(s.get('build_seconds', 0) for s in sides):.1f} s in all")


def pytest_unconfigure(config):
    shutil.rmtree(GRAPH_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        cuda = torch.cuda.is_available() and os.environ.get("CUDA_VISIBLE_DEVICES") != ""
    except Exception:
        cuda = False
    if cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny training runs: one intra-op thread (on 2 shared cores, oversubscribed threads make tiny nets 10x slower)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
