"""The one place that decides how a network runs without training: torch, or onnxruntime on a cached graph.

The caller asks for "outputs of this network on these pixels" (`network_for`); this module picks the engine
(`resolve_runtime`: ``auto`` = onnxruntime on the CPU, torch on CUDA), and for onnxruntime builds the graph
(uint8 NHWC pixels in, the same normalisation as ``Preprocess.normalize`` inside, the network's outputs out), caches
it, and checks it against torch on the first real pixels before any output is used. Nothing else knows which engine
ran; ``.runtime`` says, and the artifacts record it.

Why onnxruntime on the CPU: on the 2-core reference machine lite0 runs 3.7x faster there than in torch eager, with
features equal to 1e-6 (BENCHMARKS.md "CPU runtime"). Why the TorchScript exporter: it builds lite0's graph in about
2 s, the dynamo exporter in about 15 s (same session speed within noise), and every test that extracts builds one.

The graph cache (`cache_dir`: ``$FEATX_CACHE_DIR/graphs``, default ``~/.cache/featx/graphs``; the Docker image sets
``FEATX_CACHE_DIR=/cache/featx``): one ``<key>.onnx`` per (network weights and buffers, input size, what it
outputs), with a ``<key>.json`` sidecar written last that records the file's sha256, how it was built and how it
agreed with torch (and torch's outputs on fixed probe images, which a later process checks the loaded graph
against instead of running torch again: see PROBE_IMAGES). Writes are atomic and made under an exclusive lock on
``<key>.lock``: two processes that need the same graph build it once (the second waits, then loads the first's).
A file whose hash does not match its sidecar, or that disagrees with torch, is rebuilt, never used; a freshly
built graph that still disagrees is dropped and the run goes on in torch (with a warning), so a wrong feature is
never written.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import logging
import math
import os
import threading
import time
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .errors import UsageError

log = logging.getLogger("featx.runtime")

RUNTIMES = ("auto", "torch", "onnx")
CACHE_ENV = "FEATX_CACHE_DIR"
RUNTIME_ENV = "FEATX_RUNTIME"  # torch | onnx: what ``auto`` picks (run the test suite under either runtime)
GRAPH_FORMAT = 1  # bump when the graph's inputs/outputs or the key change: old cache entries are then ignored
OPSET = 17  # the highest opset the TorchScript exporter writes
# Parity with torch, checked on the first PARITY_IMAGES images of a run before their outputs are used. Outputs are
# compared at the scale of the torch outputs (floor 1): pretrained lite0 features are 0..~10, where 1e-4 absolute
# is the issue's bound; random-init test networks can reach hundreds, where float32 rounding alone exceeds 1e-4.
PARITY_ATOL = 1e-4
PARITY_COSINE = 0.99999
PARITY_IMAGES = 8
# A cached graph loaded by a later process is checked against the torch outputs its builder recorded on PROBE_IMAGES
# fixed synthetic images (`probe_pixels`), not by running torch again: torch's first forward in a process costs
# about 1.5 s on the 2-core machine (more than a third of extracting 398 photos on the CPU runtime). A graph whose
# sidecar records no probe gets the full check on real pixels, and its probe is recorded then.
PROBE_IMAGES = 2
_SESSIONS: "OrderedDict[tuple, object]" = OrderedDict()  # (graph key, lanes) -> checked session, this process
_MAX_SESSIONS = 4
# How the session uses its threads. "lanes": a session with one intra-op thread, run on up to ``threads`` slices of
# a batch at once (one slice per thread; onnxruntime's run is thread-safe and releases the GIL). "intra": one run
# with ``threads`` intra-op threads. Lanes measured faster on the 2-core machine (BENCHMARKS.md "CPU runtime"):
# lite0's many small layers each pay a hand-over between intra-op threads, and under other load one descheduled
# intra-op thread stalls every layer, while a lane only slows itself; decode threads fill the gaps either way.
PARALLEL = "lanes"
MIN_LANE_IMAGES = 4  # a slice smaller than this costs more in hand-over than it gains


def note(message: str) -> None:
    """A one-off line for the user (the CLI prints records marked ``note`` on stderr, as they are)."""
    log.info(message, extra={"note": True})


# -- which engine ----------------------------------------------------------------------------------------------------
def resolve_runtime(requested: Optional[str], device) -> str:
    """``auto`` | ``torch`` | ``onnx`` on ``device`` -> ``"torch"`` or ``"onnx"``.

    auto = onnxruntime on the CPU (where it is several times faster than torch eager), torch on CUDA (where torch
    already runs the GPU well and onnxruntime's CUDA build is not a dependency)."""
    req = str(requested or "auto").lower()
    if req not in RUNTIMES:
        raise UsageError(f"--runtime must be one of {', '.join(RUNTIMES)}, not {requested!r}")
    if req == "auto" and os.environ.get(RUNTIME_ENV, "").lower() in ("torch", "onnx"):
        req = os.environ[RUNTIME_ENV].lower()  # what auto means, for a whole test suite or CI job
    dev_type = getattr(device, "type", str(device))
    if req == "torch":
        return "torch"
    if dev_type != "cpu":
        if req == "onnx":
            raise UsageError(f"--runtime onnx runs on the CPU, and the device here is {device}; add --device cpu, "
                             "or use --runtime torch (auto picks torch on CUDA)")
        return "torch"
    if not _onnxruntime_available():
        if req == "onnx":
            raise UsageError("--runtime onnx needs onnxruntime (pip install onnxruntime), which is not installed")
        log.debug("onnxruntime is not installed; running the network in torch")
        return "torch"
    return "onnx"


def _onnxruntime_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


def usable_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup CPU quota (containers, CI runners)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota:
        n = min(n, max(1, math.ceil(quota)))
    return max(1, n)


def _cgroup_quota() -> Optional[float]:
    """CPUs the cgroup allows (cgroup v2 ``cpu.max``, else v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``), or None."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def resolve_threads(threads: Optional[int]) -> int:
    """onnxruntime's intra-op threads: the request, else the usable cores, capped by OMP_NUM_THREADS when set
    (torchrun sets it to 1 per rank, so ranks sharing a CPU do not each take every core)."""
    if threads is None:
        omp = os.environ.get("OMP_NUM_THREADS", "")
        return min(usable_cores(), int(omp)) if omp.isdigit() and int(omp) > 0 else usable_cores()
    if int(threads) < 1:
        raise UsageError(f"--threads must be at least 1, not {threads}")
    return int(threads)


def network_for(fn: Callable, module, preprocess, device, *, runtime: Optional[str] = "auto",
                threads: Optional[int] = None, what: str = "outputs", cache: Optional[Path] = None) -> Callable:
    """How to run ``fn`` (normalised float NCHW batch -> (N, K) tensor, computed by torch ``module``) here.

    -> ``fn`` itself for torch (``.runtime`` is not set on it; `runtime_of` says "torch"), or an `OnnxNetwork`: a
    callable on uint8 NHWC pixels (numpy or a CPU tensor) -> float32 numpy, with ``.runtime == "onnxruntime"``
    (``"torch"`` again if its graph failed the parity check). ``what`` names the output in the cache key and in
    messages (``features of efficientnet_lite0 at pooled``); it must change whenever ``fn`` computes something
    else from the same weights."""
    if resolve_runtime(runtime, device) == "torch":
        return fn
    return OnnxNetwork(fn, module, preprocess, what=what, threads=resolve_threads(threads), cache=cache)


def runtime_of(fn) -> str:
    """The engine that ran ``fn``: "onnxruntime" or "torch"."""
    return getattr(fn, "runtime", "torch")


def takes_pixels(fn) -> bool:
    """Does ``fn`` take uint8 NHWC pixels itself (normalisation inside), rather than a normalised float batch?"""
    return isinstance(fn, OnnxNetwork)


# -- the graph cache -------------------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """Where built graphs live: ``$FEATX_CACHE_DIR/graphs``, else ``$XDG_CACHE_HOME/featx/graphs``,
    else ``~/.cache/featx/graphs``."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser() / "graphs"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "featx" / "graphs"


def graph_key(module, preprocess, what: str) -> str:
    """sha256 over everything the graph computes from: the network's weights and buffers (names, dtypes, shapes,
    bytes), the input size, the normalisation constants, ``what`` it outputs, and the graph format."""
    import torch

    h = hashlib.sha256()
    head = {"format": GRAPH_FORMAT, "opset": OPSET, "what": what, "size": int(preprocess.input_size),
            "mean": [float(v) for v in preprocess.mean], "std": [float(v) for v in preprocess.std],
            "module": type(module).__qualname__}
    h.update(json.dumps(head, sort_keys=True).encode())
    for name, t in module.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def _build_lock(path: Path):
    """Exclusive, blocking ``flock`` on ``path`` (never a link): one process builds a graph, the others wait."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock; the lock file stays (removing it would race with a waiter)


def _read_cached(onnx_path: Path, side_path: Path) -> Optional[bytes]:
    """The cached graph's bytes when its sidecar is ours and its sha256 matches, else None (and the files go)."""
    if not onnx_path.is_file() or not side_path.is_file():
        return None
    try:
        side = json.loads(side_path.read_text())
        data = onnx_path.read_bytes()
    except (OSError, ValueError):
        side, data = None, b""
    if isinstance(side, dict) and side.get("format") == GRAPH_FORMAT and \
            hashlib.sha256(data).hexdigest() == side.get("sha256"):
        return data
    log.warning("the cached CPU graph %s failed its hash check; rebuilding it", onnx_path.name)
    _drop(onnx_path, side_path)
    return None


def _drop(*paths: Path) -> None:
    for p in paths:
        with contextlib.suppress(OSError):
            p.unlink()


def build_graph(fn: Callable, module, preprocess) -> tuple:
    """-> (ONNX bytes, exporter name): ``uint8 (N, S, S, 3) -> fn(normalise(pixels))`` with a dynamic batch axis.

    The TorchScript exporter first (about 2 s for lite0 against 15 s for dynamo); the dynamo exporter only if that
    one fails (it is deprecated in torch and may go), which needs onnxscript."""
    import torch

    graph = _PixelModule(fn, module, preprocess).eval()
    size = int(preprocess.input_size)
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)  # batch 2: a batch of 1 may be specialised
    try:
        buf = io.BytesIO()
        with _quiet():
            torch.onnx.export(graph, (example,), buf, dynamo=False, opset_version=OPSET, input_names=["pixels"],
                              output_names=["outputs"], dynamic_axes={"pixels": {0: "batch"}, "outputs": {0: "batch"}},
                              do_constant_folding=True)
        return buf.getvalue(), "torchscript"
    except Exception as exc:  # the exporter raises many types; try the other one before giving up
        first = exc
    try:
        with _quiet():
            prog = torch.onnx.export(graph, (example,), None, dynamo=True, input_names=["pixels"],
                                     output_names=["outputs"],
                                     dynamic_shapes={"pixels": {0: torch.export.Dim("batch")}}, verbose=False)
        return prog.model_proto.SerializeToString(), "dynamo"
    except Exception as exc:
        raise RuntimeError(f"torchscript: {type(first).__name__}: {first}; dynamo: {type(exc).__name__}: {exc}") \
            from exc


@contextlib.contextmanager
def _quiet():
    """Exporters print progress on stdout (which carries --json) and warn about their own deprecation."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _pixel_module_class():
    import torch
    from torch import nn

    class PixelModule(nn.Module):
        """uint8 NHWC -> ``fn((x - 255 mean) / (255 std))``, the arithmetic of the engine's `normalizer`."""

        def __init__(self, fn, module, preprocess):
            super().__init__()
            self.net = module  # registered, so the exporter sees its parameters as the graph's initialisers
            self.fn = fn
            self.register_buffer("mean", torch.tensor(preprocess.mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)
            self.register_buffer("std", torch.tensor(preprocess.std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0)

        def forward(self, pixels):
            return self.fn((pixels.permute(0, 3, 1, 2).float() - self.mean) / self.std).float()

    return PixelModule


def _PixelModule(fn, module, preprocess):
    return _pixel_module_class()(fn, module, preprocess)


def probe_pixels(preprocess) -> np.ndarray:
    """PROBE_IMAGES fixed uint8 (S, S, 3) images: seeded noise and a smooth colour gradient (inputs that any change
    to the graph shows on, made the same in every process)."""
    s = int(preprocess.input_size)
    noise = np.random.default_rng(23).integers(0, 256, (s, s, 3), dtype=np.uint8)
    ramp = np.linspace(0, 255, s)
    grad = np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], ramp[::-1][:, None] * 0 + 128), -1)
    return np.stack([noise, grad.astype(np.uint8)])[:PROBE_IMAGES]


def compare_outputs(got: np.ndarray, ref: np.ndarray) -> dict:
    """Largest absolute difference, the tolerance it is held to, and the smallest row cosine."""
    got = np.asarray(got, np.float64).reshape(len(got), -1)
    ref = np.asarray(ref, np.float64).reshape(len(ref), -1)
    diff = float(np.max(np.abs(got - ref))) if got.size else 0.0
    scale = max(1.0, float(np.max(np.abs(ref)))) if ref.size else 1.0
    ng, nr = np.linalg.norm(got, axis=1), np.linalg.norm(ref, axis=1)
    both = (ng > 0) & (nr > 0)
    cos = np.ones(len(ref))
    cos[both] = (got[both] * ref[both]).sum(1) / (ng[both] * nr[both])
    cos[(ng > 0) != (nr > 0)] = 0.0
    cosine = float(cos.min()) if len(cos) else 1.0
    tol = PARITY_ATOL * scale
    ok = bool(np.isfinite(got).all() and diff <= tol and cosine >= PARITY_COSINE)
    return {"max_abs_diff": diff, "tolerance": tol, "cosine": cosine, "ok": ok, "images": int(len(ref))}


class OnnxNetwork:
    """``fn`` on ``module`` as an onnxruntime session on uint8 pixels: built or loaded on the first call, checked
    against torch on that call's first images, then used for every batch (see the module docstring)."""

    def __init__(self, fn: Callable, module, preprocess, *, what: str, threads: int, cache: Optional[Path] = None,
                 parallel: Optional[str] = None):
        self.fn, self.module, self.preprocess, self.what = fn, module, preprocess, what
        self.threads = int(threads)
        self.parallel = parallel or PARALLEL  # "lanes" | "intra" (see PARALLEL)
        self.cache = Path(cache) if cache is not None else cache_dir()
        self.runtime = "onnxruntime"
        self.parity: Optional[dict] = None  # the check this process ran (or None before the first batch)
        self.built_seconds: Optional[float] = None  # set when this process built the graph
        self._session = None
        self._key: Optional[str] = None

    # what iter_outputs calls
    def __call__(self, pixels) -> np.ndarray:
        x = pixels.numpy() if hasattr(pixels, "numpy") else np.asarray(pixels)
        x = np.ascontiguousarray(x)
        if self.runtime == "torch":
            return self._torch(x)
        if self._session is None:
            self._start(x)
            if self.runtime == "torch":
                return self._torch(x)
        return self._run(self._session, x)

    def _lanes(self) -> int:
        return self.threads if self.parallel == "lanes" else 1

    def _run(self, session, x: np.ndarray) -> np.ndarray:
        """The session on ``x``: in lanes, up to ``threads`` slices at once (this thread runs the first)."""
        lanes = min(self._lanes(), len(x) // MIN_LANE_IMAGES)
        if lanes <= 1:
            return session.run(None, {"pixels": x})[0]
        bounds = np.linspace(0, len(x), lanes + 1).round().astype(int)
        parts = [x[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        with _POOL_LOCK:  # a pool is only replaced (and shut down) under this lock: never between get and submit
            pool = _lane_pool(lanes - 1)
            futs = [pool.submit(session.run, None, {"pixels": p}) for p in parts[1:]]
        try:
            first = session.run(None, {"pixels": parts[0]})[0]
        finally:  # an interrupted caller still waits for the slices in flight (under a second), never leaves them
            rest = [f.result()[0] for f in futs]
        return np.concatenate([first] + rest)

    def _torch(self, x: np.ndarray) -> np.ndarray:
        """``fn`` in torch exactly as the engine runs it for ``--runtime torch`` (same arithmetic, same memory
        layout: the parity reference, and the fallback gives the very features torch would)."""
        import torch

        with torch.inference_mode():  # Preprocess.normalize: the engine's arithmetic (engine.normalizer) exactly
            xt = self.preprocess.normalize(torch.from_numpy(x).permute(0, 3, 1, 2))
            return self.fn(xt.contiguous()).float().numpy()

    def _start(self, x: np.ndarray) -> None:
        """Load (or build) the graph and check it: a cached graph against the torch outputs recorded with it (see
        PROBE_IMAGES), else against torch on ``x[:PARITY_IMAGES]``; rebuild once on failure, then give up."""
        self._key = key = graph_key(self.module, self.preprocess, self.what)
        probe = x[:PARITY_IMAGES]
        cached = _SESSIONS.get((key, self.threads, self.parallel))
        if cached is not None:  # checked earlier in this process
            _SESSIONS.move_to_end((key, self.threads, self.parallel))
            self._session = cached
            return
        ref = None
        for attempt in (0, 1):
            try:
                session, built = self._load_or_build(key, rebuild=attempt == 1)
            except Exception as exc:  # an exporter that cannot take this network: it still runs, in torch
                log.warning("could not build the CPU graph for %s (%s: %s); running it in torch", self.what,
                            type(exc).__name__, str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "")
                self.runtime = "torch"
                return
            recorded = None if built else self._recorded_probe(key)
            if recorded is not None:
                self.parity = compare_outputs(self._run(session, probe_pixels(self.preprocess)), recorded)
                self.parity["against"] = "torch outputs recorded when the graph was built"
                if self.parity["ok"]:
                    self._accept(key, session, built, record=False)
                    return
                log.warning("the cached CPU graph for %s disagrees with the torch outputs recorded with it (largest "
                            "difference %.2g, cosine %.6f); rebuilding it", self.what, self.parity["max_abs_diff"],
                            self.parity["cosine"])
                _drop(*self._paths(key))
                continue
            if ref is None:
                ref = self._torch(probe)
            got = self._run(session, probe)
            self.parity = compare_outputs(got, ref)
            if self.parity["ok"]:
                self._accept(key, session, built)
                return
            log.warning("the CPU graph for %s disagrees with torch (largest difference %.2g, cosine %.6f)%s",
                        self.what, self.parity["max_abs_diff"], self.parity["cosine"],
                        "; rebuilding it" if attempt == 0 else "")
            _drop(*self._paths(key))
            if built:  # a fresh build is what torch gives: rebuilding again cannot help
                break
        log.warning("running %s in torch instead of onnxruntime (slower, same features)", self.what)
        self.runtime = "torch"

    def _accept(self, key: str, session, built: bool, record: bool = True) -> None:
        p = self.parity
        line = (f"checked the CPU graph against torch on {p['images']} images: largest difference "
                f"{p['max_abs_diff']:.2g}, cosine {p['cosine']:.7f}")
        if built:
            note(line)
        else:
            log.debug(line)
        if record:  # checked against torch itself here: record the check and the probe for later processes
            self._record_parity(key)
        _SESSIONS[(key, self.threads, self.parallel)] = session
        while len(_SESSIONS) > _MAX_SESSIONS:
            _SESSIONS.popitem(last=False)
        self._session = session

    def _paths(self, key: str) -> tuple:
        return self.cache / f"{key}.onnx", self.cache / f"{key}.json"

    def _load_or_build(self, key: str, rebuild: bool) -> tuple:
        """-> (session, built here?). The cached file when its hash holds; else build it under the lock (a process
        that waited for another's build loads that one)."""
        onnx_path, side_path = self._paths(key)
        data = None if rebuild else _read_cached(onnx_path, side_path)
        built = False
        if data is None:
            held = contextlib.ExitStack()
            try:
                self.cache.mkdir(parents=True, exist_ok=True)
                held.enter_context(_build_lock(self.cache / f"{key}.lock"))
            except OSError as exc:  # a read-only home, a lock path that is a link: build for this run only
                log.warning("cannot use the graph cache %s (%s); building the CPU graph for this run only",
                            self.cache, exc.strerror or exc)
                return self._session_from(self._build(None, None)), True
            with held:
                data = None if rebuild else _read_cached(onnx_path, side_path)  # built while we waited?
                if data is None:
                    data = self._build(onnx_path, side_path)
                    built = True
        return self._session_from(data), built

    def _build(self, onnx_path: Optional[Path], side_path: Optional[Path]) -> bytes:
        """Build the graph; cache it at ``onnx_path`` (None: for this run only). A cache that cannot be written
        (disk full) costs the cache, not the run."""
        from ._io import atomic_write
        from .errors import OutputError

        where = f"once; cached in {self.cache}" if onnx_path is not None else "not cached"
        note(f"preparing the CPU graph for {self.what} at {self.preprocess.input_size} px ({where})...")
        t0 = time.perf_counter()
        data, exporter = build_graph(self.fn, self.module, self.preprocess)
        self.built_seconds = time.perf_counter() - t0
        note(f"prepared the CPU graph (took {self.built_seconds:.1f} s)")
        if onnx_path is None:
            return data
        try:
            self._write(data, exporter, onnx_path, side_path)
        except (OSError, OutputError) as exc:
            log.warning("could not cache the CPU graph in %s (%s); it is used for this run only", self.cache, exc)
            _drop(onnx_path, side_path)
        return data

    def _write(self, data: bytes, exporter: str, onnx_path: Path, side_path: Path) -> None:
        from ._io import atomic_write

        with atomic_write(onnx_path) as fh:
            fh.write(data)
        side = {"format": GRAPH_FORMAT, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
                "what": self.what, "input_size": int(self.preprocess.input_size), "exporter": exporter,
                "opset": OPSET, "build_seconds": round(self.built_seconds, 2), "versions": _versions(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with atomic_write(side_path, "w") as fh:  # written last: a graph without its sidecar is not used
            json.dump(side, fh, indent=1)

    def _record_parity(self, key: str) -> None:
        from ._io import atomic_write
        from .errors import OutputError

        onnx_path, side_path = self._paths(key)
        try:
            side = json.loads(side_path.read_text())
            side["parity"] = self.parity
            probe = self._torch(probe_pixels(self.preprocess)).astype("<f4")
            side["probe"] = {"images": PROBE_IMAGES, "shape": list(probe.shape),
                             "outputs": base64.b64encode(probe.tobytes()).decode("ascii")}
            with atomic_write(side_path, "w") as fh:
                json.dump(side, fh, indent=1)
        except (OSError, ValueError, OutputError):  # the record is informative; the graph stays valid without it
            pass

    def _recorded_probe(self, key: str) -> Optional[np.ndarray]:
        """The torch outputs on `probe_pixels` recorded in the graph's sidecar, or None (none recorded, unreadable)."""
        try:
            rec = json.loads(self._paths(key)[1].read_text()).get("probe") or {}
            shape = tuple(int(v) for v in rec["shape"])
            out = np.frombuffer(base64.b64decode(rec["outputs"], validate=True), dtype="<f4").reshape(shape)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        return out.astype(np.float32) if shape and shape[0] == PROBE_IMAGES else None

    def _session_from(self, data: bytes):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = 1 if self.parallel == "lanes" else self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Decode threads share these cores: idle onnxruntime threads must sleep, not spin, or they starve them
        # (with lanes there is no intra-op pool to spin; the setting matters for "intra").
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        so.log_severity_level = 3
        return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


_POOL: list = [None, 0]  # [the lanes' thread pool, its size]
_POOL_LOCK = threading.Lock()


def _lane_pool(n: int):
    """The process-wide pool for the extra lanes: at least ``n`` threads (idle threads cost nothing; a larger
    request replaces the pool, whose threads end once their work is done, so lane threads never exceed the
    largest --threads asked for, minus one)."""
    from concurrent.futures import ThreadPoolExecutor

    pool, size = _POOL
    if pool is None or size < n:
        if pool is not None:
            pool.shutdown(wait=False)
        from .errors import signals_to_main_thread

        pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="featx-lane", initializer=signals_to_main_thread)
        _POOL[:] = [pool, n]
    return pool


def _versions() -> dict:
    import importlib.metadata as md

    out = {}
    for pkg in ("torch", "onnxruntime", "featx"):
        with contextlib.suppress(Exception):
            out[pkg] = md.version(pkg)
    return out
